//! Stage-by-stage float64 twin of the chunked WY/UT forward (SPEC section 5, flash-linear-attention's chunk.py).
//!
//! Each stage is one public function so a GPU stage can be checked on its own. Chunks never straddle
//! sequences: every sequence is cut into chunks of `chunk` tokens from its own first row, the last one
//! possibly short, and chunks are numbered globally in sequence order ([`chunk_spans`]).
//!
//! Per-chunk layouts (rows are the flattened `[B*T]` token axis, `C` = `chunk`, `c` the global chunk index):
//! - `gc`: `[rows, HV]`, the in-chunk inclusive cumulative log-decay;
//! - `a_raw`, `a`: `[rows, HV, C]`, entry `[r, hv, j]` couples token `r` (position `i` in its chunk) with the
//!   token at position `j` of the same chunk; `a_raw` is zero for `j >= i`, `a` has ones on `j == i` and zeros
//!   above, and columns `j >= len` of a short chunk are zero;
//! - `w`: `[rows, HV, K]`, `u` and `v_new`: `[rows, HV, V]`;
//! - `h`: `[n_chunks, HV, K, V]` (always Kv order), the state at the start of chunk `c`.
//!
//! Scalar gate only. Masks are supported by the exact substitution a masked step amounts to (log-decay 0,
//! beta 0, output row zeroed): with beta = 0 the token's rows of `w` and `u` vanish, so its `v_new` is zero and
//! its key never reaches the state or another token's output.

use super::recurrent::initial_state;
use super::{qk_at, rh_at, state_len, store_state, v_at, RefInputs, RefOutputs};
use crate::error::{Error, Result};
use crate::problem::{GateKind, GateSpace, Problem};

/// One chunk: rows `start .. start + len` of sequence `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    pub seq: usize,
    pub start: usize,
    pub len: usize,
}

/// All chunks of all sequences, in global chunk order (sequence by sequence, in time order).
/// An empty sequence has no chunk.
///
/// # Panics
/// If `chunk == 0`.
pub fn chunk_spans(p: &Problem, chunk: usize) -> Vec<ChunkSpan> {
    assert!(chunk > 0, "chunk size must be at least 1");
    let mut spans = Vec::new();
    for seq in 0..p.n_seqs() {
        let rows = p.seqs.range(seq);
        let mut start = rows.start;
        while start < rows.end {
            let len = chunk.min(rows.end - start);
            spans.push(ChunkSpan { seq, start, len });
            start += len;
        }
    }
    spans
}

/// Log-decay of a scalar gate entry, whatever space it was given in.
fn log_decay(p: &Problem, g: f64) -> f64 {
    match p.gate_space {
        GateSpace::Log => g,
        GateSpace::Linear => g.ln(),
    }
}

/// Stage 1 (`chunk_local_cumsum`): `gc[r, hv]` = sum of the log-decays of the rows of `r`'s chunk up to and
/// including `r`. A Linear gate is taken to log space first; a masked row contributes 0 (decay 1).
///
/// # Panics
/// If `chunk == 0` or `g` is not a scalar gate of `p`'s shape.
pub fn chunk_local_cumsum(p: &Problem, g: &[f64], mask: Option<&[u8]>, chunk: usize) -> Vec<f64> {
    let hvn = p.dims.hv;
    let mut gc = vec![0.0; p.dims.rows() * hvn];
    for sp in chunk_spans(p, chunk) {
        for hv in 0..hvn {
            let mut acc = 0.0;
            for r in sp.start..sp.start + sp.len {
                if mask.is_none_or(|m| m[r] != 0) {
                    acc += log_decay(p, g[rh_at(p, r, hv)]);
                }
                gc[rh_at(p, r, hv)] = acc;
            }
        }
    }
    gc
}

/// Stage 2 (`chunk_scaled_dot_kkt`): `A_raw = StrictLower(diag(beta) K K^T ∘ Γ)`, `Γ_ij = exp(gc_i - gc_j)`.
///
/// # Panics
/// If `chunk == 0` or a slice does not match `p`.
pub fn scaled_dot_kkt(p: &Problem, k: &[f64], beta: &[f64], gc: &[f64], chunk: usize) -> Vec<f64> {
    let (hvn, kd) = (p.dims.hv, p.dims.k);
    let mut a = vec![0.0; p.dims.rows() * hvn * chunk];
    for sp in chunk_spans(p, chunk) {
        for hv in 0..hvn {
            let hk = p.dims.key_head(hv);
            for i in 0..sp.len {
                let ri = sp.start + i;
                let ki = &k[qk_at(p, ri, hk)..][..kd];
                for j in 0..i {
                    let rj = sp.start + j;
                    let kj = &k[qk_at(p, rj, hk)..][..kd];
                    let dot: f64 = ki.iter().zip(kj).map(|(a, b)| a * b).sum();
                    let gamma = (gc[rh_at(p, ri, hv)] - gc[rh_at(p, rj, hv)]).exp();
                    a[rh_at(p, ri, hv) * chunk + j] = beta[rh_at(p, ri, hv)] * dot * gamma;
                }
            }
        }
    }
    a
}

/// Stage 3 (`solve_tril`): `A = (I + A_raw)^-1`, unit lower triangular, by forward substitution:
/// row `i` of `A` is `e_i - sum_{j<i} A_raw[i, j] A[j]`.
///
/// # Panics
/// If `chunk == 0` or `a_raw` is not `[rows, HV, chunk]`.
pub fn solve_tril(p: &Problem, a_raw: &[f64], chunk: usize) -> Vec<f64> {
    let hvn = p.dims.hv;
    let mut a = vec![0.0; p.dims.rows() * hvn * chunk];
    for sp in chunk_spans(p, chunk) {
        for hv in 0..hvn {
            let row = |i: usize| rh_at(p, sp.start + i, hv) * chunk;
            for i in 0..sp.len {
                let mut ai = vec![0.0; chunk];
                ai[i] = 1.0;
                for j in 0..i {
                    let nij = a_raw[row(i) + j];
                    for (m, x) in ai.iter_mut().enumerate().take(j + 1) {
                        *x -= nij * a[row(j) + m];
                    }
                }
                a[row(i)..row(i) + chunk].copy_from_slice(&ai);
            }
        }
    }
    a
}

/// Stage 4 (`recompute_w_u`): `w = A (beta ∘ exp(gc) ∘ K)` (`[rows, HV, K]`) and `u = A (beta ∘ V)`
/// (`[rows, HV, V]`).
///
/// # Panics
/// If `chunk == 0` or a slice does not match `p`.
pub fn recompute_w_u(
    p: &Problem,
    k: &[f64],
    v: &[f64],
    beta: &[f64],
    a: &[f64],
    gc: &[f64],
    chunk: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (hvn, kd, vd) = (p.dims.hv, p.dims.k, p.dims.v);
    let mut w = vec![0.0; p.dims.rows() * hvn * kd];
    let mut u = vec![0.0; p.dims.rows() * hvn * vd];
    for sp in chunk_spans(p, chunk) {
        for hv in 0..hvn {
            let hk = p.dims.key_head(hv);
            for i in 0..sp.len {
                let ri = sp.start + i;
                let wi = rh_at(p, ri, hv) * kd;
                let ui = v_at(p, ri, hv);
                for j in 0..=i {
                    let rj = sp.start + j;
                    let aij = a[rh_at(p, ri, hv) * chunk + j];
                    let bj = beta[rh_at(p, rj, hv)];
                    let fk = aij * bj * gc[rh_at(p, rj, hv)].exp();
                    for (m, kv) in k[qk_at(p, rj, hk)..][..kd].iter().enumerate() {
                        w[wi + m] += fk * kv;
                    }
                    for (m, vv) in v[v_at(p, rj, hv)..][..vd].iter().enumerate() {
                        u[ui + m] += aij * bj * vv;
                    }
                }
            }
        }
    }
    (w, u)
}

/// Output of [`chunk_fwd_h`].
#[derive(Clone, Debug, PartialEq)]
pub struct FwdH {
    /// `[n_chunks, HV, K, V]` (Kv order): the state at the start of each chunk.
    pub h: Vec<f64>,
    /// `[rows, HV, V]`: `u - w S` with `S` the state at the start of the row's chunk.
    pub v_new: Vec<f64>,
    /// Final state per sequence, shape `p.state_shape()` in `p.state_layout`.
    pub ht: Vec<f64>,
}

/// Stage 5 (`chunk_gated_delta_rule_fwd_h`): walk chunk to chunk, `v_new = u - w S`,
/// `S <- exp(gc_last) S + (K ∘ exp(gc_last - gc))^T v_new`. `h0` is in `p.state_layout`.
///
/// # Panics
/// If `chunk == 0` or a slice does not match `p`.
pub fn chunk_fwd_h(p: &Problem, k: &[f64], w: &[f64], u: &[f64], gc: &[f64], h0: Option<&[f64]>, chunk: usize) -> FwdH {
    let (hvn, kd, vd) = (p.dims.hv, p.dims.k, p.dims.v);
    let kv = kd * vd;
    let spans = chunk_spans(p, chunk);
    let mut h = vec![0.0; spans.len() * hvn * kv];
    let mut v_new = vec![0.0; p.dims.rows() * hvn * vd];
    let mut ht = vec![0.0; state_len(p)];
    // Only h0 is read from the inputs here; the rest of the fields are unused by initial_state.
    let x0 = RefInputs { q: &[], k: &[], v: &[], g: &[], beta: &[], h0, mask: None };
    for n in 0..p.n_seqs() {
        for hv in 0..hvn {
            let hk = p.dims.key_head(hv);
            let mut s = initial_state(p, &x0, n, hv);
            for (c, sp) in spans.iter().enumerate().filter(|(_, sp)| sp.seq == n) {
                let hc = (c * hvn + hv) * kv;
                h[hc..hc + kv].copy_from_slice(&s);
                for i in 0..sp.len {
                    let ri = sp.start + i;
                    let wi = &w[rh_at(p, ri, hv) * kd..][..kd];
                    let at = v_at(p, ri, hv);
                    for j in 0..vd {
                        let pred: f64 = (0..kd).map(|m| wi[m] * s[m * vd + j]).sum();
                        v_new[at + j] = u[at + j] - pred;
                    }
                }
                let g_last = gc[rh_at(p, sp.start + sp.len - 1, hv)];
                s.iter_mut().for_each(|x| *x *= g_last.exp());
                for i in 0..sp.len {
                    let ri = sp.start + i;
                    let f = (g_last - gc[rh_at(p, ri, hv)]).exp();
                    let ki = &k[qk_at(p, ri, hk)..][..kd];
                    let vi = &v_new[v_at(p, ri, hv)..][..vd];
                    for (m, km) in ki.iter().enumerate() {
                        for (j, vj) in vi.iter().enumerate() {
                            s[m * vd + j] += f * km * vj;
                        }
                    }
                }
            }
            store_state(p, &s, &mut ht, n, hv);
        }
    }
    FwdH { h, v_new, ht }
}

/// Stage 6 (`chunk_fwd_o`): `o = scale * ((exp(gc) ∘ Q) S + (Q K^T ∘ Γ ∘ causal) v_new)` with `S = h[c]` and
/// `causal` including the diagonal. `h` is `[n_chunks, HV, K, V]` as returned by [`chunk_fwd_h`].
///
/// # Panics
/// If `chunk == 0` or a slice does not match `p`.
pub fn chunk_fwd_o(p: &Problem, q: &[f64], k: &[f64], v_new: &[f64], h: &[f64], gc: &[f64], chunk: usize) -> Vec<f64> {
    let (hvn, kd, vd) = (p.dims.hv, p.dims.k, p.dims.v);
    let kv = kd * vd;
    let scale = f64::from(p.scale);
    let mut o = vec![0.0; p.dims.rows() * hvn * vd];
    for (c, sp) in chunk_spans(p, chunk).iter().enumerate() {
        for hv in 0..hvn {
            let hk = p.dims.key_head(hv);
            let s = &h[(c * hvn + hv) * kv..][..kv];
            for i in 0..sp.len {
                let ri = sp.start + i;
                let qi = &q[qk_at(p, ri, hk)..][..kd];
                let gi = gc[rh_at(p, ri, hv)];
                let oi = &mut o[v_at(p, ri, hv)..][..vd];
                for (m, qm) in qi.iter().enumerate() {
                    for (j, oj) in oi.iter_mut().enumerate() {
                        *oj += scale * gi.exp() * qm * s[m * vd + j];
                    }
                }
                for j in 0..=i {
                    let rj = sp.start + j;
                    let kj = &k[qk_at(p, rj, hk)..][..kd];
                    let dot: f64 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                    let f = scale * dot * (gi - gc[rh_at(p, rj, hv)]).exp();
                    for (oj, vn) in oi.iter_mut().zip(&v_new[v_at(p, rj, hv)..][..vd]) {
                        *oj += f * vn;
                    }
                }
            }
        }
    }
    o
}

/// The chunked forward, stage by stage; must equal [`super::forward`] to rounding.
///
/// Errors (never panics on these): a per-key gate, `chunk == 0`, or a Linear gate with a live decay that is not
/// positive (its log is needed; the token loop has no such limit).
///
/// # Panics
/// If a slice of `x` does not match `p` (see [`RefInputs::check`]).
pub fn forward(p: &Problem, x: &RefInputs, chunk: usize) -> Result<RefOutputs> {
    x.assert_fits(p);
    if p.gate != GateKind::Scalar {
        return Err(Error::Unsupported("the chunked form needs a scalar gate".into()));
    }
    if chunk == 0 {
        return Err(Error::Option { name: "chunk", why: "must be at least 1".into() });
    }
    if p.gate_space == GateSpace::Linear {
        let bad = (0..p.dims.rows())
            .filter(|&r| x.live(r))
            .flat_map(|r| (0..p.dims.hv).map(move |hv| (r, hv)))
            .find(|&(r, hv)| x.g[rh_at(p, r, hv)].partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater));
        if let Some((r, hv)) = bad {
            let why = format!("decay {} at row {r}, value head {hv} has no logarithm", x.g[rh_at(p, r, hv)]);
            return Err(Error::Unsupported(why));
        }
    }
    // A masked token is a step with decay 1 and beta 0 whose output row is dropped (see the module doc).
    let beta: Vec<f64> = match x.mask {
        Some(m) => x.beta.iter().enumerate().map(|(i, &b)| if m[i / p.dims.hv] != 0 { b } else { 0.0 }).collect(),
        None => x.beta.to_vec(),
    };
    let gc = chunk_local_cumsum(p, x.g, x.mask, chunk);
    let a_raw = scaled_dot_kkt(p, x.k, &beta, &gc, chunk);
    let a = solve_tril(p, &a_raw, chunk);
    let (w, u) = recompute_w_u(p, x.k, x.v, &beta, &a, &gc, chunk);
    let fh = chunk_fwd_h(p, x.k, &w, &u, &gc, x.h0, chunk);
    let mut o = chunk_fwd_o(p, x.q, x.k, &fh.v_new, &fh.h, &gc, chunk);
    if let Some(m) = x.mask {
        let row = p.dims.hv * p.dims.v;
        for (r, o_r) in o.chunks_exact_mut(row).enumerate() {
            if m[r] == 0 {
                o_r.fill(0.0);
            }
        }
    }
    Ok(RefOutputs { o, ht: fh.ht })
}
