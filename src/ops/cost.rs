//! What a call costs: bytes that must cross memory and the arithmetic of each algorithm, so
//! benchmarks report achieved GB/s and TFLOP/s beside their floors.

use crate::problem::{GateKind, Problem};

/// Memory traffic and arithmetic of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// Bytes that must be read or written at least once (inputs, outputs, states).
    pub bytes: f64,
    /// Floating-point operations (multiply-add = 2).
    pub flops: f64,
}

/// Minimum memory traffic of a forward: every input read once, `o` written, states in and out.
pub fn forward_bytes(p: &Problem, state_in: bool, state_out: bool) -> f64 {
    let d = &p.dims;
    let rows = d.rows() as f64;
    let es = p.dtype.size() as f64;
    let gk = if p.gate == GateKind::PerKey { d.k as f64 } else { 1.0 };
    let inputs = rows * (2.0 * (d.h * d.k) as f64 * es + (d.hv * d.v) as f64 * es)
        + rows * d.hv as f64 * (gk * p.g_dtype.size() as f64 + p.beta_dtype.size() as f64);
    let o = rows * (d.hv * d.v) as f64 * 4.0;
    let state = (p.n_seqs() * d.hv * d.k * d.v) as f64 * 4.0;
    inputs + o + state * (state_in as u8 as f64 + state_out as u8 as f64)
}

/// The recurrent forward: per token and value head, decay (KV), S'^T k and S'^T q (4KV), the
/// rank-1 write (2KV) and k.q (2K).
pub fn recurrent_forward(p: &Problem, state_in: bool, state_out: bool) -> Cost {
    let d = &p.dims;
    let (k, v) = (d.k as f64, d.v as f64);
    let flops = (d.rows() * d.hv) as f64 * (7.0 * k * v + 2.0 * k);
    Cost { bytes: forward_bytes(p, state_in, state_out), flops }
}

/// The chunked forward with chunks of `c` tokens (per chunk: K K^T per key head, the triangular
/// solve, w and u, v_new = u - w S, the state update, and the output's inter- and intra-chunk terms).
pub fn chunked_forward(p: &Problem, c: usize, state_in: bool, state_out: bool) -> Cost {
    let d = &p.dims;
    let (k, v, cf) = (d.k as f64, d.v as f64, c as f64);
    let chunks: f64 = (0..p.n_seqs()).map(|n| p.seqs.range(n).len().div_ceil(c) as f64).sum();
    let per_kh = 2.0 * cf * cf * k; // K K^T
    let per_vh = cf * cf * cf / 3.0 // solve
        + 2.0 * cf * cf * k + 2.0 * cf * cf * v // w, u
        + 2.0 * cf * k * v // w S
        + 2.0 * cf * k * v // state update
        + 2.0 * cf * k * v + 2.0 * cf * cf * k + 2.0 * cf * cf * v; // o
    let flops = chunks * (d.h as f64 * per_kh + d.hv as f64 * per_vh);
    Cost { bytes: forward_bytes(p, state_in, state_out), flops }
}
