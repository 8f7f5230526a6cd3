// recurrent_bwd.wgsl — gradients of the gated delta rule: replay each checkpoint block forward, then
// walk it back in time carrying dS = dL/dS_t.
//
// Forward step (SPEC 1), with P = S_{t-1} the state before row t:
//     S'  = D P            e = v - S'^T k        S_t = S' + beta k e^T       o = scale S_t^T q
// Backward step, with dS = dL/dS_t on entry (starts as dht, or 0):
//     dq    = scale S_t do                            (sum over columns j)
//     dS   += scale q do^T
//     kds   = dS^T k ;  de = beta kds ;  dv = de ;  dbeta = e . kds
//     dk    = beta dS e - S' de                       (sum over columns j)
//     dS'   = dS - k de^T
//     dD_i  = sum_j dS'_ij P_ij   (scalar gate: summed over i too; computed as
//             sum_ij dS_ij P_ij - sum_j de_j (P^T k)_j, from two column sums)
//     dS_{t-1} = D dS'            dg = dD * D (log gate) or dD (linear gate)
// A masked row is skipped (no gradient, dS passes through). dh0 = dS after the first row.
//
// Grid: one workgroup per (tile of BV value columns, hv, sequence n - seq_base), the forward's thread
// layout: KT threads per column (r = lid % KT, c = lid / KT), thread r holding rows i = r + KT*m.
// Per block of C rows (last block first): load the block's checkpoint S (`ckpt`, written by the
// forward), replay the block storing each P in `work` (this workgroup's own C states), then walk
// back. dq, dk, dg and dbeta are sums over columns: each step reduces over the workgroup's BV
// columns in workgroup memory (fixed order), then hands the per-tile sum to `accum` (one of
// accum_*.wgsl: f32 atomics, a compare-and-swap loop, or per-slice partials for the
// deterministic mode; slice = (hv % GROUP, V tile) for dq/dk, V tile for dg/dbeta).
//
// Shapes: q, k [rows, H, K]; v, do, dv [rows, HV, V]; g [rows, HV] or [rows, HV, K]; beta [rows, HV];
// dht, dh0 in the state layout [N, HV, K, V] (kv) or [N, HV, V, K] (vk); ckpt [N, HV, NB, K, V];
// acc: dq | dk | dg | dbeta at the offsets in P (partials: each region is `slices` copies).

struct Params {
    n_seqs: u32,      // sequences in this dispatch
    seq_base: u32,    // first sequence of this dispatch
    mask_off: u32,    // first mask word in `info` (when HAS_MASK)
    wg_per_row: u32,  // workgroups along y before z takes over (grid limit)
    scale: f32,
    ck_blocks: u32,   // NB of `ckpt`
    dh0_off: u32,     // dh0 inside `work` (hist starts at 0)
    qk_len: u32,      // rows * H * K
    g_len: u32,       // rows * HV (scalar gate) or rows * HV * K (per-key gate)
    b_len: u32,       // rows * HV
    dq_off: u32,      // regions of `acc`
    dk_off: u32,
    dg_off: u32,
    dbeta_off: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
// Bindings 1-6 (q, k, v, g, beta, info) and the shared overrides are in recurrent_common.wgsl.
@group(0) @binding(7) var<storage, read> d_o: array<u32>;
@group(0) @binding(8) var<storage, read> dht: array<u32>;
@group(0) @binding(9) var<storage, read> ckpt: array<f32>;
@group(0) @binding(10) var<storage, read_write> dv: array<f32>;
// Per-workgroup replay states [wg][C][KR][WG], then dh0 at dh0_off.
@group(0) @binding(11) var<storage, read_write> work: array<f32>;
// binding 12 (`acc`) and fn accum(fin, part, x) come from the accumulation variant.

override DO_DT: u32 = 0u;
override DHT_DT: u32 = 0u;
override HAS_DHT: bool = false;
override HAS_DH0: bool = false;
override C: u32 = 64u;       // checkpoint interval

const ROWS_MAX: u32 = 512u;  // K * BV <= 512 (host-checked): 8 KiB
var<workgroup> rows_red: array<vec4<f32>, ROWS_MAX>;
var<workgroup> seq_bounds: vec2<u32>;

fn ld_do(i: u32) -> f32 { return decode(DO_DT, d_o[word_of(DO_DT, i)], i); }
fn ld_dht(i: u32) -> f32 { return decode(DHT_DT, dht[word_of(DHT_DT, i)], i); }


// Decay of key row i (ic clamped) of row `hrow`, from the scalar decay or the per-key gate.
fn decay(d_scalar: f32, hrow: u32, ic: u32) -> f32 {
    if (!GATE_PER_KEY) {
        return d_scalar;
    }
    let x = ld_g(hrow * K + ic);
    return select(exp(x), x, GATE_LINEAR);
}

// A column's KT threads are consecutive invocations (r = lid % KT), as in the forward.
fn col_first(lid: u32) -> u32 {
    return (lid / KT) * KT;
}
fn col_stride() -> u32 {
    return 1u;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let nl = wid.y + wid.z * P.wg_per_row;
    if (nl >= P.n_seqs) {
        return;
    }
    let n = P.seq_base + nl;
    let tiles = V / BV;
    let hv = wid.x / tiles;
    let vt = wid.x % tiles;
    let j0 = vt * BV;
    let hk = hv / GROUP;
    let r = lid % KT;
    let c = lid / KT;
    let j = j0 + c;
    let qk_slice = (hv % GROUP) * tiles + vt;  // partial slice of dq/dk
    let hist = (nl * HV * tiles + wid.x) * C * KR * WG;

    if (lid == 0u) {
        seq_bounds = vec2<u32>(info[n], info[n + 1u]);
    }
    let bounds = workgroupUniformLoad(&seq_bounds);
    let sbase = (n * HV + hv) * K * V;
    let cbase = (n * HV + hv) * P.ck_blocks * K * V;

    var ds: array<f32, MAX_KR>;
    for (var m = 0u; m < KR; m++) {
        let i = r + KT * m;
        var x = 0.0;
        if (HAS_DHT && i < K) {
            x = ld_dht(sbase + s_off(i, j));
        }
        ds[m] = x;
    }

    var s: array<f32, MAX_KR>;
    var kk: array<f32, MAX_KR>;
    var qq: array<f32, MAX_KR>;
    var dd: array<f32, MAX_KR>;
    var ph = 0u;  // column_sum parity: alternates call by call
    let blocks = (bounds.y - bounds.x + C - 1u) / C;
    for (var blk = blocks; blk > 0u; blk--) {
        let start = bounds.x + (blk - 1u) * C;
        let end = min(start + C, bounds.y);
        // Replay the block from its checkpoint, keeping each state P = S_{t-1} in `work`.
        let cb = cbase + (blk - 1u) * K * V;
        for (var m = 0u; m < KR; m++) {
            let i = r + KT * m;
            s[m] = select(0.0, ckpt[cb + min(i, K - 1u) * V + j], i < K);
        }
        for (var row = start; row < end; row++) {
            let hrow = row * HV + hv;
            let kq_base = (row * H + hk) * K;
            var live = true;
            if (HAS_MASK) {
                live = byte_of(info[P.mask_off + row / 4u], row) != 0u;
            }
            var d_scalar = 1.0;
            if (!GATE_PER_KEY) {
                d_scalar = ld_g(hrow);
                if (!GATE_LINEAR) {
                    d_scalar = exp(d_scalar);
                }
            }
            let h = hist + (row - start) * KR * WG;
            var part = vec3<f32>(0.0);
            for (var m = 0u; m < KR; m++) {
                let i = r + KT * m;
                let ic = min(i, K - 1u);
                work[h + m * WG + lid] = s[m];
                kk[m] = select(0.0, ld_k(kq_base + ic), i < K);
                s[m] = s[m] * select(1.0, decay(d_scalar, hrow, ic), live);
                part.x += s[m] * kk[m];
            }
            let tot = column_sum(part, lid, ph & 1u);
            ph++;
            let u = select(0.0, ld_beta(hrow) * (ld_v(hrow * V + j) - tot.x), live);
            for (var m = 0u; m < KR; m++) {
                s[m] += kk[m] * u;
            }
        }

        // Walk the block back.
        for (var row = end; row > start; row--) {
            let t = row - 1u;
            let hrow = t * HV + hv;
            let kq_base = (t * H + hk) * K;
            var live = true;
            if (HAS_MASK) {
                live = byte_of(info[P.mask_off + t / 4u], t) != 0u;
            }
            var d_scalar = 1.0;
            if (!GATE_PER_KEY) {
                d_scalar = ld_g(hrow);
                if (!GATE_LINEAR) {
                    d_scalar = exp(d_scalar);
                }
            }
            let bt = ld_beta(hrow);
            let h = hist + (t - start) * KR * WG;
            // s = P (the state before row t), sp = S' = D P.
            var a = vec3<f32>(0.0);
            for (var m = 0u; m < KR; m++) {
                let i = r + KT * m;
                let ic = min(i, K - 1u);
                s[m] = work[h + m * WG + lid];
                kk[m] = select(0.0, ld_k(kq_base + ic), i < K);
                qq[m] = select(0.0, ld_q(kq_base + ic), i < K);
                dd[m] = decay(d_scalar, hrow, ic);
                a += vec3<f32>(dd[m] * s[m] * kk[m], s[m] * kk[m], 0.0);
            }
            let sa = column_sum(a, lid, ph & 1u);
            ph++;
            let e_j = ld_v(hrow * V + j) - sa.x;
            let do_j = select(0.0, ld_do(hrow * V + j), live);
            // dq_i = scale sum_j S_t,ij do_j; dS += scale q do^T.
            var dqp: array<f32, MAX_KR>;
            var b = vec3<f32>(0.0);
            for (var m = 0u; m < KR; m++) {
                let st = dd[m] * s[m] + bt * kk[m] * e_j;
                dqp[m] = P.scale * st * do_j;
                ds[m] += P.scale * qq[m] * do_j;
                b += vec3<f32>(kk[m] * ds[m], ds[m] * s[m], 0.0);
            }
            let sb = column_sum(b, lid, ph & 1u);
            ph++;
            let kds = sb.x;
            let de = bt * kds;
            if (r == 0u) {
                dv[hrow * V + j] = select(0.0, de, live);
            }
            // Scalar gate: dD = sum_ij dS_ij P_ij - sum_j de_j (P^T k)_j, per column here.
            let dd_col = sb.y - de * sa.y;
            for (var m = 0u; m < KR; m++) {
                let i = r + KT * m;
                let dk = bt * ds[m] * e_j - dd[m] * s[m] * de;
                let dsp = ds[m] - kk[m] * de;
                var z = 0.0;
                if (GATE_PER_KEY) {
                    z = dsp * s[m] * select(dd[m], 1.0, GATE_LINEAR);
                } else if (i == 0u) {
                    z = dd_col * select(d_scalar, 1.0, GATE_LINEAR);
                }
                if (i < K) {
                    rows_red[i * BV + c] = vec4<f32>(dqp[m], dk, z, select(0.0, e_j * kds, i == 0u));
                }
                ds[m] = select(ds[m], dd[m] * dsp, live);
            }
            workgroupBarrier();
            if (live) {
                let rq = (t * H + hk) * K;
                for (var i = lid; i < K; i += WG) {
                    var x = vec4<f32>(0.0);
                    for (var cc = 0u; cc < BV; cc++) {
                        x += rows_red[i * BV + cc];
                    }
                    accum(P.dq_off + rq + i, P.dq_off + qk_slice * P.qk_len + rq + i, x.x);
                    accum(P.dk_off + rq + i, P.dk_off + qk_slice * P.qk_len + rq + i, x.y);
                    if (GATE_PER_KEY) {
                        accum(P.dg_off + hrow * K + i, P.dg_off + vt * P.g_len + hrow * K + i, x.z);
                    } else if (i == 0u) {
                        accum(P.dg_off + hrow, P.dg_off + vt * P.g_len + hrow, x.z);
                    }
                    if (i == 0u) {
                        accum(P.dbeta_off + hrow, P.dbeta_off + vt * P.b_len + hrow, x.w);
                    }
                }
            }
            workgroupBarrier();
        }
    }

    if (HAS_DH0) {
        for (var m = 0u; m < KR; m++) {
            let i = r + KT * m;
            if (i < K) {
                work[P.dh0_off + sbase + s_off(i, j)] = ds[m];
            }
        }
    }
}
