// chunk_pack16.wgsl — q as f16 for the cooperative-matrix output pass (chunk_output_mma.wgsl), per
// key head:
//     qk16[lc, hk, 0][i, m] = q_i[m]        (0 for rows i >= len)
// The rest of its f16 operands comes from the passes that have the values at hand: k^T of qk16 and the
// state walk's -w and K ∘ exp(gc_last - gc) from chunk_wu.wgsl (W16), S and v_new from
// chunk_state_mma.wgsl (OUT16). Output qk16 [L, H, 2, C, K] (plane 0 here) as u32 words of two halves
// (columns m, m + 1), rounded to nearest even by bit operations (prelude), so this pass needs no f16
// support.
//
// Grid: (H * C * K / (8 * WG), local chunks on y/z); one thread per 8 elements: a 16-byte load (two
// for f32) and a 16-byte store, which took 0.262 ms at B=8 T=8192 on the H100 against 0.376 with one
// thread per word (docs/PERF.md, R77).

@group(0) @binding(2) var<storage, read> q: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> qk16: array<vec4<u32>>;

// A word of two f16/bf16 inputs as two halves (f16 as it is).
fn halves(w: u32) -> u32 {
    if (QKV_DT == DT_F16) {
        return w;
    }
    return pack_halves(decode(QKV_DT, w, 0u), decode(QKV_DT, w, 1u));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    let vecs = CH * K / 8u; // per plane, 8 halves each (K is a multiple of 16)
    let x = wid.x * WG + lid;
    if (lc >= P.n_local || x >= H * vecs) {
        return;
    }
    let hk = x / vecs;
    let i = (x % vecs) / (K / 8u);
    let m = 8u * (x % (K / 8u));
    let ch = chunk_at(lc);
    var out = vec4<u32>(0u);
    if (i < ch.y) {
        let at = ((ch.x + i) * H + hk) * K + m; // a multiple of 8 elements: 16-byte aligned
        if (QKV_DT == DT_F32) {
            let a = bitcast<vec4<f32>>(q[at / 4u]);
            let b = bitcast<vec4<f32>>(q[at / 4u + 1u]);
            out = vec4<u32>(pack_halves(a.x, a.y), pack_halves(a.z, a.w), pack_halves(b.x, b.y), pack_halves(b.z, b.w));
        } else {
            let a = q[at / 8u];
            out = vec4<u32>(halves(a.x), halves(a.y), halves(a.z), halves(a.w));
        }
    }
    qk16[(lc * H + hk) * QPL * vecs + x % vecs] = out;
}
