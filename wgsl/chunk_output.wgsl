// chunk_output.wgsl — the output (FLA's chunk_fwd_o).
//
// Per local chunk lc, value head hv (key head hk), rows i < len:
//     o_i = scale * ( exp(gc_i) q_i S  +  sum_{j <= i} (q_i . k_j) exp(gc_i - gc_j) v_new_j )
// with S = h[lc] the state at the start of the chunk; a masked row writes 0.
// Output o [rows, HV, V] (f32), rows of the chunk only.
//
// Grid: (HV * V / BVO, local chunks on y/z). The causal, decay-masked Q K^T block (C x C) is built
// first in workgroup memory, then each thread computes outputs of the C x BVO tile.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> h: array<f32>;
@group(0) @binding(6) var<storage, read> vn: array<f32>;
@group(0) @binding(7) var<storage, read_write> o: array<f32>;

var<workgroup> pm: array<f32, TILE>; // (Q K^T ∘ Γ ∘ causal)[i, j] at i * C + j

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let tiles = V / BVO;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BVO;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * C;

    for (var e = lid; e < C * C; e += WG) {
        let i = e / C;
        let j = e % C;
        var x = 0.0;
        if (j <= i && i < ch.y) {
            let qb = ((ch.x + i) * H + hk) * K;
            let kb = ((ch.x + j) * H + hk) * K;
            var dot = 0.0;
            for (var m = 0u; m < K; m++) {
                dot += ld_q(qb + m) * ld_k(kb + m);
            }
            x = dot * exp(gc[hb + i] - gc[hb + j]);
        }
        pm[e] = x;
    }
    workgroupBarrier();

    let sb = (lc * HV + hv) * K * V + j0;
    for (var e = lid; e < C * BVO; e += WG) {
        let i = e / BVO;
        let c = e % BVO;
        if (i < ch.y) {
            let row = ch.x + i;
            let qb = (row * H + hk) * K;
            var inter = 0.0;
            for (var m = 0u; m < K; m++) {
                inter += ld_q(qb + m) * h[sb + m * V + c];
            }
            var intra = 0.0;
            for (var j = 0u; j <= i; j++) {
                intra += pm[i * C + j] * vn[(hb + j) * V + j0 + c];
            }
            let res = P.scale * (exp(gc[hb + i]) * inter + intra);
            o[(row * HV + hv) * V + j0 + c] = select(0.0, res, live(row));
        }
    }
}
