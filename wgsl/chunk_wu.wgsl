// chunk_wu.wgsl — w and u (FLA's recompute_w_u): the chunk's keys and values through A.
//
// Per local chunk lc and value head hv (key head hk = hv / GROUP), for rows i < C:
//     w[i, :] = sum_{j <= i} A_ij bm_j exp(gc_j) k_j        [C x K]
//     u[i, :] = sum_{j <= i} A_ij bm_j v_j                  [C x V]
// (bm = beta with masked tokens zeroed; padded rows j >= len contribute nothing.)
// Outputs w [L, HV, C, K], u [L, HV, C, V].
//
// Grid: (HV * (K + V) / BD, local chunks on y/z): workgroup (hv, column tile) computes BD columns of
// w (tiles below K) or of u. The right-hand side (C x BD) is staged in workgroup memory, scaled
// once; rows of A are read from global memory. Thread (tr, tc) accumulates TM rows x 4 columns in
// registers, over j up to its last row only (A is lower triangular).

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> bm: array<f32>;
@group(0) @binding(6) var<storage, read> a: array<f32>;
@group(0) @binding(7) var<storage, read_write> w: array<f32>;
@group(0) @binding(8) var<storage, read_write> u: array<f32>;

var<workgroup> xs: array<f32, TILE>;

fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }
fn ld_v(i: u32) -> f32 { return decode(QKV_DT, v[word_of(QKV_DT, i)], i); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let tiles = (K + V) / BD;
    let hv = wid.x / tiles;
    let d0 = (wid.x % tiles) * BD;
    let is_w = d0 < K;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;

    for (var e = lid; e < CH * BD; e += WG) {
        let j = e / BD;
        let d = e % BD;
        var x = 0.0;
        if (j < ch.y) {
            let row = ch.x + j;
            if (is_w) {
                x = bm[hb + j] * exp(gc[hb + j]) * ld_k((row * H + hk) * K + d0 + d);
            } else {
                x = bm[hb + j] * ld_v((row * HV + hv) * V + d0 - K + d);
            }
        }
        xs[e] = x;
    }
    workgroupBarrier();
    let tm = max(1u, (CH * BD) / (4u * WG));
    let tc = lid % (BD / 4u);
    let tr = lid / (BD / 4u);
    if (tr * tm >= CH) {
        return;
    }
    var acc: array<vec4<f32>, 4>;
    for (var r = 0u; r < 4u; r++) {
        acc[r] = vec4<f32>(0.0);
    }
    let d4 = tc * 4u;
    let i0 = tr * tm;
    for (var j = 0u; j < i0 + tm; j++) {
        let xb = j * BD + d4;
        let xv = vec4<f32>(xs[xb], xs[xb + 1u], xs[xb + 2u], xs[xb + 3u]);
        for (var r = 0u; r < tm; r++) {
            acc[r] += a[(hb + i0 + r) * CH + j] * xv;
        }
    }
    for (var r = 0u; r < tm; r++) {
        let i = i0 + r;
        for (var cc = 0u; cc < 4u; cc++) {
            if (is_w) {
                w[(hb + i) * K + d0 + d4 + cc] = acc[r][cc];
            } else {
                u[(hb + i) * V + d0 - K + d4 + cc] = acc[r][cc];
            }
        }
    }
}
