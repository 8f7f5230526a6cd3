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
// once; rows of A are read from global memory (each broadcast to the BD threads of a row).

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
    let hb = (lc * HV + hv) * C;

    for (var e = lid; e < C * BD; e += WG) {
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
    for (var e = lid; e < C * BD; e += WG) {
        let i = e / BD;
        let d = e % BD;
        var acc = 0.0;
        for (var j = 0u; j <= i; j++) {
            acc += a[(hb + i) * C + j] * xs[j * BD + d];
        }
        if (is_w) {
            w[(hb + i) * K + d0 + d] = acc;
        } else {
            u[(hb + i) * V + d0 - K + d] = acc;
        }
    }
}
