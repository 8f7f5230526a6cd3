// chunk_state_common.wgsl — shared by the two state walks (chunk_state.wgsl on SIMT,
// chunk_state_mma.wgsl on cooperative matrices): their bindings and the reads around the walk.
// Outputs h [L, HV, K, V], vn [L, HV, C, V], state [N, HV, K, V] (kv) or [N, HV, V, K] (vk).

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> gc: array<f32>;
// Binding 4 is each walk's own: w (f32) for chunk_state.wgsl, the packed f16 operands for
// chunk_state_mma.wgsl.
@group(0) @binding(5) var<storage, read> u: array<f32>;
@group(0) @binding(6) var<storage, read> h0: array<f32>;
@group(0) @binding(7) var<storage, read_write> h: array<f32>;
@group(0) @binding(8) var<storage, read_write> vn: array<f32>;
@group(0) @binding(9) var<storage, read_write> state: array<f32>;

fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }

// The state the walk starts from at offset `at`: carried from the previous window, h0, or zero.
fn start_state(at: u32, r: vec3<u32>) -> f32 {
    if (r.z == 0u) {
        return state[at];
    }
    if (HAS_H0) {
        return h0[at];
    }
    return 0.0;
}
