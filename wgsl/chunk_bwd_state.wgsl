// chunk_bwd_state.wgsl — the reverse walk over chunks (FLA's chunk_gated_delta_rule_bwd_dhu).
//
// Per sequence n and value head hv, dS (K x V, f32; the gradient of the state at the end of the
// current chunk) starts from dht[n] (or 0, or the value carried from the window after this one) and
// for each of the sequence's chunks in this window, last to first:
//     dh[lc] = dS                                              (chunk_bwd_dqkwg reads it)
//     dvn_i += exp(gc_last - gc_i) k_i dS                      rows i < len          [C x V]
//     dS     = exp(gc_last) dS + sum_i (scale exp(gc_i) q_i) do_i^T - w_i^T dvn_i    [K x V]
// and at the end dS is written to `carry` in the call's layout (dh0 when the call has h0): the
// gradient of the state at the start of the window's first chunk.
//
// Grid: (HV * V / BV, sequences on y/z): sequential over chunks, parallel over sequences, heads and
// tiles of BV value columns. The K x BV tile of dS and the chunk's do and dvn tiles (C x BV each)
// live in workgroup memory; the chunk's k, q and w go through a staging area in slices (coalesced
// global reads, two elements a load, bf16/f16 decoded once), so the inner loops read only workgroup memory and registers:
//   dvn: thread (row i, column group) accumulates 4 columns of row i over K, KS columns of k at a time;
//   dS:  thread (row group, column group) owns RM rows x 4 columns of dS in registers and sums over
//        the chunk's rows, IS rows of q (pre-scaled) and of w at a time.
// The walk is latency-bound (one step after another; B=1 has only HV * V / BV workgroups), so:
// dS, do/dvn and the staging area share one array, the staging area taking all that dS leaves free
// (K = 128: 3072 floats, so 4 + 6 slices a step instead of 8 + 16), and every slice's global reads
// are issued one slice ahead, across phases and steps too (the next step's first k slice is read
// during this step's last q/w slice), so no step starts by waiting on memory.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<u32>;
@group(0) @binding(7) var<storage, read> dht: array<u32>;
@group(0) @binding(8) var<storage, read_write> dvn: array<f32>;
@group(0) @binding(9) var<storage, read_write> dh: array<f32>;
@group(0) @binding(10) var<storage, read_write> carry: array<f32>;

const WSM: u32 = 1808u;                        // vec4s of workgroup memory (28,928 bytes)
override BV4: u32 = BV / 4u;                    // column groups of 4
override RT0: u32 = K * BV4;                    // vec4 offset of do rows, then dvn rows ([i * BV4 + c / 4])
override STG0: u32 = 4u * (RT0 + 2u * CH * BV4); // float offset of the staging area
override STGN: u32 = 4u * WSM - STG0;           // staging floats (K <= 256, C <= 64, BV = 16: >= C * 17)
// k slice columns: 32 where K allows and C rows of 33 fit, else 16 (row stride KS + 1: no bank conflicts)
override KS: u32 = 16u + 16u * ((16u - K % 32u) / 16u) * min(1u, STGN / (CH * 33u));
override NKS: u32 = K / KS;                     // k slices
override NKP: u32 = (CH * KS / 2u + WG - 1u) / WG; // k pairs per thread per slice (<= 4)
override IS: u32 = min(CH, min(STGN, 3072u) / (2u * K)); // q/w slice rows (>= 2)
override NQS: u32 = (CH + IS - 1u) / IS;        // q/w slices (the last may be partial)
override NQP: u32 = (IS * K + WG - 1u) / WG;     // q/w pairs per thread per slice (<= 6)

var<workgroup> wsm: array<vec4<f32>, WSM>;     // dS [m * BV4 + c / 4] | do, dvn rows | staging
var<workgroup> seq_range: vec3<u32>;

fn stg_set(i: u32, x: f32) {
    let a = STG0 + i;
    wsm[a / 4u][a % 4u] = x;
}

fn stg(i: u32) -> f32 {
    let a = STG0 + i;
    return wsm[a / 4u][a % 4u];
}

fn ld_do(i: u32, row: u32) -> f32 { return select(0.0, decode(DO_DT, dout[word_of(DO_DT, i)], i), live(row)); }

// Elements i and i + 1 (i even) of q or k: one word for f16/bf16, so a slice takes half the loads.
fn ld2(from_q: bool, i: u32) -> vec2<f32> {
    if (QKV_DT == DT_F32) {
        if (from_q) {
            return vec2<f32>(bitcast<f32>(q[i]), bitcast<f32>(q[i + 1u]));
        }
        return vec2<f32>(bitcast<f32>(k[i]), bitcast<f32>(k[i + 1u]));
    }
    let wd = select(k[i / 2u], q[i / 2u], from_q);
    return vec2<f32>(decode(QKV_DT, wd, i), decode(QKV_DT, wd, i + 1u));
}

// This thread's pairs of k slice `sl` (C x KS, rows past len 0): pair x is elements 2 (lid + WG x)
// and the next, in one row (KS is even).
fn fetch_k(sl: u32, lid: u32, ch: vec3<u32>, hk: u32) -> array<vec2<f32>, 4> {
    var f: array<vec2<f32>, 4>;
    for (var x = 0u; x < NKP; x++) {
        let e = 2u * (lid + WG * x);
        let i = e / KS;
        let ok = e < CH * KS && i < ch.y;
        let at = ((ch.x + min(i, ch.y - 1u)) * H + hk) * K + sl * KS + e % KS;
        f[x] = select(vec2<f32>(0.0), ld2(false, at), ok);
    }
    return f;
}

// This thread's pairs of q/w slice `sl`: rows i0 .. i0 + IS of scale exp(gc) q, then of w (rows
// past len 0), at [ii * K + m] and [(IS + ii) * K + m]; a pair never straddles a row (K is even).
fn fetch_qw(sl: u32, lid: u32, ch: vec3<u32>, hk: u32, hb: u32) -> array<vec2<f32>, 6> {
    var f: array<vec2<f32>, 6>;
    for (var x = 0u; x < NQP; x++) {
        let e = 2u * (lid + WG * x);
        let half = e / (IS * K);
        let i = sl * IS + (e % (IS * K)) / K;
        let m = e % K;
        let ok = e < 2u * IS * K && i < ch.y;
        let ic = min(i, ch.y - 1u);
        var val = vec2<f32>(0.0);
        if (half == 0u) {
            val = P.scale * exp(gc[hb + ic]) * ld2(true, ((ch.x + ic) * H + hk) * K + m);
        } else {
            let at = (hb + ic) * K + m;
            val = vec2<f32>(w[at], w[at + 1u]);
        }
        f[x] = select(vec2<f32>(0.0), val, ok);
    }
    return f;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = local_chunk(wid);
    if (n >= P.n_seqs) {
        return;
    }
    let tiles = V / BV;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BV;
    let hk = hv / GROUP;
    if (lid == 0u) {
        seq_range = seq_range_of(n);
    }
    let r = workgroupUniformLoad(&seq_range);
    if (r.x == r.y && r.z == 0u) {
        return; // no chunk of this sequence in this window
    }
    let sbase = (n * HV + hv) * K * V;
    for (var e = lid; e < K * BV; e += WG) {
        let x = start_ds(sbase + s_off(e / BV, j0 + e % BV), r);
        wsm[e / 4u][e % 4u] = x;
    }

    let cg = lid % BV4;
    let vi = lid / BV4;                  // dvn row (rows >= C idle); also the dS update's row group
    let rm = (K * BV4 + WG - 1u) / WG;   // dS rows per thread: ceil(K / (WG / BV4)) <= 4
    let kmax = K - 1u;
    var nk: array<vec2<f32>, 4>;
    var nq: array<vec2<f32>, 6>;
    if (r.y > r.x) {
        nk = fetch_k(0u, lid, chunk_at(r.y - 1u), hk);
    }
    for (var t = r.y; t > r.x; t--) {
        let lc = t - 1u;
        workgroupBarrier(); // dS of the previous step is complete
        let ch = chunk_at(lc);
        let hb = (lc * HV + hv) * CH;
        let gl = gc[hb + ch.y - 1u];
        let dhb = (lc * HV + hv) * K * V + j0;
        for (var e = lid; e < K * BV; e += WG) {
            dh[dhb + (e / BV) * V + e % BV] = wsm[e / 4u][e % 4u];
        }

        // dvn += exp(gc_last - gc) ∘ (K dS), k staged KS columns at a time.
        var acc = vec4<f32>(0.0);
        for (var sl = 0u; sl < NKS; sl++) {
            workgroupBarrier();
            for (var x = 0u; x < NKP; x++) {
                let e = 2u * (lid + WG * x);
                if (e < CH * KS) {
                    let at = (e / KS) * (KS + 1u) + e % KS;
                    stg_set(at, nk[x].x);
                    stg_set(at + 1u, nk[x].y);
                }
            }
            workgroupBarrier();
            if (sl + 1u < NKS) {
                nk = fetch_k(sl + 1u, lid, ch, hk);
            } else {
                nq = fetch_qw(0u, lid, ch, hk, hb);
            }
            if (vi < CH) {
                let m0 = sl * KS;
                for (var mm = 0u; mm < KS; mm++) {
                    acc += stg(vi * (KS + 1u) + mm) * wsm[(m0 + mm) * BV4 + cg];
                }
            }
        }
        if (vi < CH) {
            var x = vec4<f32>(0.0);
            var d = vec4<f32>(0.0);
            if (vi < ch.y) {
                let at = (hb + vi) * V + j0 + cg * 4u;
                let da = ((ch.x + vi) * HV + hv) * V + j0 + cg * 4u;
                let f = exp(gl - gc[hb + vi]);
                for (var cc = 0u; cc < 4u; cc++) {
                    x[cc] = dvn[at + cc] + f * acc[cc];
                    dvn[at + cc] = x[cc];
                    d[cc] = ld_do(da + cc, ch.x + vi);
                }
            }
            wsm[RT0 + vi * BV4 + cg] = d;
            wsm[RT0 + (CH + vi) * BV4 + cg] = x;
        }

        // dS = exp(gc_last) dS + (scale exp(gc) ∘ Q)^T do - W^T dvn, IS rows of q and w at a time.
        var sacc: array<vec4<f32>, 4>;
        let dl = exp(gl);
        for (var x = 0u; x < rm; x++) {
            sacc[x] = dl * wsm[min(vi * rm + x, kmax) * BV4 + cg];
        }
        for (var sl = 0u; sl < NQS; sl++) {
            workgroupBarrier();
            for (var x = 0u; x < NQP; x++) {
                let e = 2u * (lid + WG * x);
                if (e < 2u * IS * K) {
                    stg_set(e, nq[x].x);
                    stg_set(e + 1u, nq[x].y);
                }
            }
            workgroupBarrier();
            if (sl + 1u < NQS) {
                nq = fetch_qw(sl + 1u, lid, ch, hk, hb);
            } else if (lc > r.x) {
                nk = fetch_k(0u, lid, chunk_at(lc - 1u), hk);
            }
            let i0 = sl * IS;
            if (vi * rm < K) {
                for (var ii = 0u; ii < min(IS, CH - i0); ii++) {
                    let d = wsm[RT0 + (i0 + ii) * BV4 + cg];
                    let y = wsm[RT0 + (CH + i0 + ii) * BV4 + cg];
                    for (var x = 0u; x < rm; x++) {
                        let m = min(vi * rm + x, kmax);
                        sacc[x] += stg(ii * K + m) * d - stg((IS + ii) * K + m) * y;
                    }
                }
            }
        }
        // Only this thread's entries of dS are read after the dvn phase (the barriers above
        // separate it), so they can be replaced without another barrier.
        if (vi * rm < K) {
            for (var x = 0u; x < rm; x++) {
                if (vi * rm + x < K) {
                    wsm[(vi * rm + x) * BV4 + cg] = sacc[x];
                }
            }
        }
    }
    workgroupBarrier();
    for (var e = lid; e < K * BV; e += WG) {
        carry[sbase + s_off(e / BV, j0 + e % BV)] = wsm[e / 4u][e % 4u];
    }
}
