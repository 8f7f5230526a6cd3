// chunk_bwd_state_common.wgsl — shared by the two reverse walks (chunk_bwd_state.wgsl on SIMT,
// chunk_bwd_state_mma.wgsl on cooperative matrices), after chunk_bwd_common.wgsl. Each walk declares
// the bindings `carry` (f32, [N, HV, K, V] in the state layout) and `dht` (DHT_DT words) at its own
// indices.

// dS the reverse walk starts from at state offset `at`: carried from the later window (r.z == 0),
// else dht where the call has one, else zero.
fn start_ds(at: u32, r: vec3<u32>) -> f32 {
    if (r.z == 0u) {
        return carry[at];
    }
    if (HAS_DHT) {
        return decode(DHT_DT, dht[word_of(DHT_DT, at)], at);
    }
    return 0.0;
}
