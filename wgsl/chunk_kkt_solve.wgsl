// chunk_kkt_solve.wgsl — the in-chunk Gram product with its decay mask, and its unit-lower-
// triangular inverse (FLA's chunk_scaled_dot_kkt + solve_tril, fused).
//
// Per local chunk lc and key head hk (one workgroup), the Gram matrix G = K K^T (C x C, over the
// chunk's keys) is computed once and shared by the GROUP value heads hv of hk. For each of them:
//     N_ij = beta_i G_ij exp(gc_i - gc_j)      for j < i < len, else 0   (StrictLower, decay mask)
//     A    = (I + N)^-1                          unit lower triangular
// by forward substitution, row by row, the C columns solved in parallel in workgroup memory:
//     A_im = -N_im - sum_{m < j < i} N_ij A_jm   (m < i),   A_ii = 1
// The exponent gc_i - gc_j <= 0 for j < i, so no factor overflows (strong decays underflow to 0).
// Output a [L, HV, C, C] (rows i >= len are e_i).
//
// Grid: (H, local chunks on y/z). G is tiled through workgroup memory in K-slices of BK columns;
// each thread holds C*C/WG entries of G in registers. The same workgroup array then holds N/A.

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> gc: array<f32>;
@group(0) @binding(4) var<storage, read> bm: array<f32>;
@group(0) @binding(5) var<storage, read_write> a: array<f32>;

const BK: u32 = 16u;
const BKP: u32 = BK + 1u; // padded row stride of the staged slice (no bank conflicts)
const MAX_GE: u32 = 16u; // entries of G per thread: C*C/WG <= 4096/256

var<workgroup> buf: array<f32, TILE>;

fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let hk = wid.x;
    let ch = chunk_at(lc);
    let ne = (CH * CH) / WG;

    // G = K K^T, K-slices of BK staged as buf[i * BKP + m].
    var gram: array<f32, MAX_GE>;
    for (var x = 0u; x < MAX_GE; x++) {
        gram[x] = 0.0;
    }
    for (var m0 = 0u; m0 < K; m0 += BK) {
        for (var e = lid; e < CH * BK; e += WG) {
            let i = e / BK;
            var val = 0.0;
            if (i < ch.y) {
                val = ld_k(((ch.x + i) * H + hk) * K + m0 + e % BK);
            }
            buf[i * BKP + e % BK] = val;
        }
        workgroupBarrier();
        for (var x = 0u; x < ne; x++) {
            let e = lid + WG * x;
            let i = e / CH;
            let j = e % CH;
            var acc = gram[x];
            for (var m = 0u; m < BK; m++) {
                acc += buf[i * BKP + m] * buf[j * BKP + m];
            }
            gram[x] = acc;
        }
        workgroupBarrier();
    }

    for (var gi = 0u; gi < GROUP; gi++) {
        let hv = hk * GROUP + gi;
        let hb = (lc * HV + hv) * CH;
        // N, row-major in buf.
        for (var x = 0u; x < ne; x++) {
            let e = lid + WG * x;
            let i = e / CH;
            let j = e % CH;
            var nij = 0.0;
            if (j < i) {
                nij = bm[hb + i] * gram[x] * exp(gc[hb + i] - gc[hb + j]);
            }
            buf[e] = nij;
        }
        workgroupBarrier();
        // Forward substitution; thread m owns column m. Row i is read whole before it is rewritten.
        for (var i = 1u; i < CH; i++) {
            let m = lid;
            var acc = 0.0;
            if (m < i) {
                acc = -buf[i * CH + m];
                for (var j = m + 1u; j < i; j++) {
                    acc -= buf[i * CH + j] * buf[j * CH + m];
                }
            }
            workgroupBarrier();
            if (m < i) {
                buf[i * CH + m] = acc;
            }
            workgroupBarrier();
        }
        let ab = hb * CH;
        for (var e = lid; e < CH * CH; e += WG) {
            let i = e / CH;
            let j = e % CH;
            a[ab + e] = select(select(0.0, buf[e], j < i), 1.0, i == j);
        }
        workgroupBarrier();
    }
}
