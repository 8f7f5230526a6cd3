// chunk_state.wgsl — the chunk-to-chunk state walk (FLA's chunk_gated_delta_rule_fwd_h).
//
// Per sequence n and value head hv, S (K x V, f32) starts from h0[n] (or 0, or the state carried
// from the previous window) and for each of the sequence's chunks in this window, in order:
//     h[lc]  = S                                           (the output pass reads it)
//     v_new  = u - w S                                     [C x V], rows i >= len are 0
//     S      = exp(gc_last) S + (K ∘ exp(gc_last - gc))^T v_new
// and at the end the state is written to `state` (the carry between windows, and ht) in the
// call's layout. gc_last - gc_i <= 0, so every factor is at most 1.
// Bindings and outputs: chunk_state_common.wgsl.
//
// Grid: (HV * V / BV, sequences on y/z): sequential over chunks, parallel over sequences, heads and
// tiles of BV value columns. The K x BV state tile and the chunk's C x BV v_new tile live in
// workgroup memory; the chunk's w and k are staged through `stg` in slices (coalesced global reads,
// bf16/f16 decoded once), so the inner loops read only workgroup memory. A chunk's w and k are
// read from global memory into registers all at once at the start of its step.
//   v_new: thread (row i, column group) computes 4 columns of row i over K in slices of KS.
//   update: thread (row group, column group) owns RM rows x 4 columns of S in registers and sums
//   over the chunk's rows in slices of IS rows of k (pre-scaled by exp(gc_last - gc_i)).

@group(0) @binding(4) var<storage, read> w: array<f32>;

const KS: u32 = 16u;         // w slice: C rows x KS columns, row stride KS + 1 (no bank conflicts)
const STG: u32 = 2048u;      // staging floats: C * (KS + 1) and IS * K fit
override IS: u32 = min(CH, 2048u / K);  // k slice rows (K <= 256: at least 8; C is a power of two)
override NWS: u32 = K / KS;                 // w slices
override NWY: u32 = CH * KS / WG;            // w elements per thread per slice (C / 16: 1..4)
override NKS: u32 = (CH + IS - 1u) / IS;     // k slices (the last may be partial)
override NKX: u32 = (IS * K + WG - 1u) / WG; // k elements per thread per slice (<= 8)
// NWS * NWY <= 64 and NKS * NKX <= 64 for K <= 256, C <= 64: the register prefetch arrays.

var<workgroup> s: array<vec4<f32>, TILE / 4u>;   // S[m, c] at [m * BV / 4 + c / 4][c % 4]
var<workgroup> vt: array<vec4<f32>, 256>;       // v_new[i, c] likewise (C * BV <= 1024, host-checked)
var<workgroup> stg: array<f32, STG>;
var<workgroup> fac: array<f32, 64>;   // exp(gc_last - gc_i)
var<workgroup> seq_range: vec3<u32>;

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
        s[e / 4u][e % 4u] = start_state(sbase + s_off(e / BV, j0 + e % BV), r);
    }

    let cg = lid % (BV / 4u);
    let c4 = cg * 4u;
    let vi = lid / (BV / 4u);          // v_new row (rows >= C idle); also the update's row group
    let rm = (K * (BV / 4u) + WG - 1u) / WG; // update rows per thread: ceil(K / (WG / (BV / 4))) <= 4
    let rg = vi;
    let kmax = K - 1u;
    for (var lc = r.x; lc < r.y; lc++) {
        workgroupBarrier(); // S (and vt, stg, fac) of the previous chunk are complete
        let ch = chunk_at(lc);
        let hb = (lc * HV + hv) * CH;
        let gl = gc[hb + ch.y - 1u];
        if (lid < CH) {
            fac[lid] = select(0.0, exp(gl - gc[hb + lid]), lid < ch.y);
        }
        let hbase = h_base(lc, hv) + j0;
        for (var e = lid; e < K * BV; e += WG) {
            h[hbase + (e / BV) * V + e % BV] = s[e / 4u][e % 4u];
        }

        // Every global read of this chunk is issued at once, into registers (one round trip
        // instead of one per slice); the slices are staged from them.
        var wr: array<f32, 64>;
        for (var sl = 0u; sl < NWS; sl++) {
            for (var y = 0u; y < NWY; y++) {
                let e = lid + WG * y;
                let i = e / KS;
                wr[sl * NWY + y] = select(0.0, w[(hb + min(i, CH - 1u)) * K + sl * KS + e % KS], i < ch.y);
            }
        }
        var kr: array<f32, 64>;
        for (var sl = 0u; sl < NKS; sl++) {
            for (var x = 0u; x < NKX; x++) {
                let e = lid + WG * x;
                let i = sl * IS + e / K;
                let ok = e < IS * K && i < ch.y;
                kr[sl * NKX + x] = select(0.0, ld_k(((ch.x + min(i, ch.y - 1u)) * H + hk) * K + e % K), ok);
            }
        }

        // v_new = u - w S, w staged KS columns at a time.
        var acc = vec4<f32>(0.0);
        if (vi < ch.y) {
            let ub = (hb + vi) * V + j0 + c4;
            acc = vec4<f32>(u[ub], u[ub + 1u], u[ub + 2u], u[ub + 3u]);
        }
        for (var sl = 0u; sl < NWS; sl++) {
            workgroupBarrier();
            for (var y = 0u; y < NWY; y++) {
                let e = lid + WG * y;
                stg[(e / KS) * (KS + 1u) + e % KS] = wr[sl * NWY + y];
            }
            workgroupBarrier();
            if (vi < CH) {
                let m0 = sl * KS;
                for (var mm = 0u; mm < KS; mm++) {
                    acc -= stg[vi * (KS + 1u) + mm] * s[(m0 + mm) * (BV / 4u) + cg];
                }
            }
        }
        if (vi < CH) {
            let vb = (hb + vi) * V + j0 + c4;
            vt[vi * (BV / 4u) + cg] = acc;
            for (var cc = 0u; cc < 4u; cc++) {
                vn[vb + cc] = acc[cc];
            }
        }

        // S = exp(gc_last) S + (K ∘ fac)^T v_new; k staged IS rows at a time.
        let dl = exp(gl);
        var sacc: array<vec4<f32>, 4>;
        for (var x = 0u; x < rm; x++) {
            sacc[x] = dl * s[min(rg * rm + x, kmax) * (BV / 4u) + cg];
        }
        for (var sl = 0u; sl < NKS; sl++) {
            let i0 = sl * IS;
            workgroupBarrier();
            for (var x = 0u; x < NKX; x++) {
                let e = lid + WG * x;
                if (e < IS * K) {
                    stg[e] = fac[min(i0 + e / K, CH - 1u)] * kr[sl * NKX + x];
                }
            }
            workgroupBarrier();
            if (rg * rm < K) {
                for (var ii = 0u; ii < min(IS, CH - i0); ii++) {
                    let vv = vt[(i0 + ii) * (BV / 4u) + cg];
                    for (var x = 0u; x < rm; x++) {
                        sacc[x] += stg[ii * K + min(rg * rm + x, kmax)] * vv;
                    }
                }
            }
        }
        workgroupBarrier(); // every read of S in this chunk is done
        if (rg * rm < K) {
            for (var x = 0u; x < rm; x++) {
                if (rg * rm + x < K) {
                    s[(rg * rm + x) * (BV / 4u) + cg] = sacc[x];
                }
            }
        }
    }
    workgroupBarrier();

    for (var e = lid; e < K * BV; e += WG) {
        state[sbase + s_off(e / BV, j0 + e % BV)] = s[e / 4u][e % 4u];
    }
}
