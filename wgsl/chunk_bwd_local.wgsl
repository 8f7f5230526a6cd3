// chunk_bwd_local.wgsl — v_new and the chunk-local part of dv (FLA's chunk_bwd_dv_local).
//
// Per local chunk lc and value head hv (key head hk), rows i, j < len (the chunk's length):
//     v_new_i = u_i - w_i h                    h = saved state at the chunk's start, K x V
//     dvn_j   = sum_{i >= j} P_ij do_i         P_ij = scale exp(gc_i - gc_j) q_i . k_j
// Outputs vn, dvn [L, HV, C, V] (rows >= len 0); chunk_bwd_state adds the walk's term to dvn.
//
// Grid: (HV, local chunks on y/z). P (C x C) is built in workgroup memory (one K-long dot product
// per entry), then thread e computes element (i, c) of both outputs.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read> u: array<f32>;
@group(0) @binding(7) var<storage, read> ck: array<f32>;
@group(0) @binding(8) var<storage, read> dout: array<u32>;
@group(0) @binding(9) var<storage, read_write> vn: array<f32>;
@group(0) @binding(10) var<storage, read_write> dvn: array<f32>;

var<workgroup> pm: array<f32, TILE>;   // P[i][j] at i * C + j (0 above the diagonal and past len)
var<workgroup> gcs: array<f32, 64>;

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }
fn ld_do(i: u32, row: u32) -> f32 { return select(0.0, decode(DO_DT, dout[word_of(DO_DT, i)], i), live(row)); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let hv = wid.x;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    if (lid < CH) {
        gcs[lid] = select(0.0, gc[hb + min(lid, ch.y - 1u)], lid < ch.y);
    }
    workgroupBarrier();
    for (var e = lid; e < CH * CH; e += WG) {
        let i = e / CH;
        let j = e % CH;
        var acc = 0.0;
        if (j <= i && i < ch.y) {
            let qa = ((ch.x + i) * H + hk) * K;
            let ka = ((ch.x + j) * H + hk) * K;
            for (var m = 0u; m < K; m++) {
                acc += ld_q(qa + m) * ld_k(ka + m);
            }
            acc *= P.scale * exp(gcs[i] - gcs[j]);
        }
        pm[e] = acc;
    }
    workgroupBarrier();
    let hs = ck_base(lc, ch.z, hv);
    for (var e = lid; e < CH * V; e += WG) {
        let i = e / V;
        let c = e % V;
        var x = 0.0;
        var d = 0.0;
        if (i < ch.y) {
            x = u[(hb + i) * V + c];
            for (var m = 0u; m < K; m++) {
                x -= w[(hb + i) * K + m] * ck[hs + m * V + c];
            }
            for (var r = i; r < ch.y; r++) {
                d += pm[r * CH + i] * ld_do(((ch.x + r) * HV + hv) * V + c, ch.x + r);
            }
        }
        vn[(hb + i) * V + c] = x;
        dvn[(hb + i) * V + c] = d;
    }
}
