// chunk_pack16.wgsl — q as f16 for the cooperative-matrix output pass (chunk_output_mma.wgsl), per
// key head:
//     qk16[lc, hk, 0][i, m] = q_i[m]        (0 for rows i >= len)
// The rest of its f16 operands comes from the passes that have the values at hand: k^T of qk16 and the
// state walk's -w and K ∘ exp(gc_last - gc) from chunk_wu.wgsl (W16), S and v_new from
// chunk_state_mma.wgsl (OUT16). Output qk16 [L, H, 2, C, K] (plane 0 here) as u32 words of two halves
// (columns m, m + 1), rounded to nearest even by bit operations (prelude), so this pass needs no f16
// support.
//
// Grid: (H * C * K / (2 * WG), local chunks on y/z); one thread per word.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read_write> qk16: array<u32>;

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    let words = CH * K / 2u; // per plane
    let x = wid.x * WG + lid;
    if (lc >= P.n_local || x >= H * words) {
        return;
    }
    let hk = x / words;
    let i = (x % words) / (K / 2u);
    let m = 2u * (x % (K / 2u));
    let ch = chunk_at(lc);
    var qv = vec2<f32>(0.0);
    if (i < ch.y) {
        let at = ((ch.x + i) * H + hk) * K + m;
        qv = vec2<f32>(ld_q(at), ld_q(at + 1u));
    }
    qk16[(lc * H + hk) * 2u * words + x % words] = pack_halves(qv.x, qv.y);
}
