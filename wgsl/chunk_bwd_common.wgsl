// chunk_bwd_common.wgsl — shared by the chunked backward passes (chunk_bwd_*.wgsl), after
// chunk_common.wgsl. The math is that of src/reference/chunked_backward.rs; per pass, see its file.
//
// The backward runs over windows of its own, last first. Per window it first recomputes the forward's
// gc, bm, w, u (chunk_kkt_solve with SOLVE = false: the gates only; chunk_wu), from the A the training
// forward's chunk_kkt_solve saved (A_SLOT, [G, HV, C, C]), reads the state at the start of each chunk
// from the saved states `ck` (the chunked training forward's per-chunk states, in the canonical
// [G, HV, K, V] layout of chunk_common.wgsl), then:
//   chunk_bwd_local   v_new = u - w h;  dvn = P^T do                 (P = scale QK^T ∘ Γ, causal)
//   chunk_bwd_state   reverse walk: dh = dS; dvn += Kd dS; dS = e^{gc_last} dS + Qg^T do - w^T dvn
//   chunk_bwd_dqkwg   dq, dk (per value head), dw, and the gate gradient's terms dgc
//   chunk_bwd_wy      through A: dk, dv, dbeta, and dg (reverse cumulative sum of dgc)
//   chunk_bwd_reduce  dq, dk summed over the value heads of each key head, in a fixed order
// Scratch per local chunk and value head (padded to C rows, rows >= len zero): vn, dvn [C, V];
// dh [K, V] (the gradient of the chunk's final state); dqp, dkp, dw [C, K]; dgc [C].
// Nothing accumulates with atomics: the backward is bitwise repeatable.

override DO_DT: u32 = 0u;    // dtype of the upstream gradient do
override DHT_DT: u32 = 0u;   // dtype of dht
override HAS_DHT: bool = false;

// The passes that read do define `ld_do(i, row)`: element i of do, zero when row `row` is masked
// (its output row was dropped, so it has no gradient).
