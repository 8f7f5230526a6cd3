//! The token loop of SPEC section 1 in float64: the definition every other path must reproduce.

use super::{decays, load_state, qk_at, rh_at, state_len, store_state, v_at, RefInputs, RefOutputs};
use crate::problem::Problem;

/// One step of the recurrence for row `r`, value head `hv`, on the `K x V` row-major state `s`:
/// `S' = D ∘ S`, `e = v - S'^T k`, `S = S' + beta k e^T`. `dec` and `e` are `K`- and `V`-long scratch.
/// Masking is the caller's business (a masked step is simply not taken).
pub(crate) fn step(p: &Problem, x: &RefInputs, r: usize, hv: usize, s: &mut [f64], dec: &mut [f64], e: &mut [f64]) {
    let (kd, vd) = (p.dims.k, p.dims.v);
    let k = &x.k[qk_at(p, r, p.dims.key_head(hv))..][..kd];
    let v = &x.v[v_at(p, r, hv)..][..vd];
    let beta = x.beta[rh_at(p, r, hv)];
    decays(p, x.g, r, hv, dec);
    for (row, d) in s.chunks_exact_mut(vd).zip(dec.iter()) {
        row.iter_mut().for_each(|x| *x *= d);
    }
    e.copy_from_slice(v);
    for (row, ki) in s.chunks_exact(vd).zip(k) {
        for (ej, sij) in e.iter_mut().zip(row) {
            *ej -= sij * ki;
        }
    }
    for (row, ki) in s.chunks_exact_mut(vd).zip(k) {
        for (sij, ej) in row.iter_mut().zip(e.iter()) {
            *sij += beta * ki * ej;
        }
    }
}

/// `o = scale * S^T q` for row `r`, value head `hv`, written to `out` (`V`-long).
pub(crate) fn readout(p: &Problem, x: &RefInputs, r: usize, hv: usize, s: &[f64], out: &mut [f64]) {
    let (kd, vd) = (p.dims.k, p.dims.v);
    let q = &x.q[qk_at(p, r, p.dims.key_head(hv))..][..kd];
    let scale = f64::from(p.scale);
    out.fill(0.0);
    for (row, qi) in s.chunks_exact(vd).zip(q) {
        for (oj, sij) in out.iter_mut().zip(row) {
            *oj += scale * sij * qi;
        }
    }
}

/// The initial `K x V` state of (`n`, `hv`): `h0[n, hv]` or zeros.
pub(crate) fn initial_state(p: &Problem, x: &RefInputs, n: usize, hv: usize) -> Vec<f64> {
    let mut s = vec![0.0; p.dims.k * p.dims.v];
    if let Some(h0) = x.h0 {
        load_state(p, h0, n, hv, &mut s);
    }
    s
}

/// The gated delta rule, token by token (SPEC section 1), for every sequence and value head.
///
/// # Panics
/// If a slice of `x` does not match `p` (see [`RefInputs::check`]).
pub fn forward(p: &Problem, x: &RefInputs) -> RefOutputs {
    x.assert_fits(p);
    let d = p.dims;
    let mut o = vec![0.0; super::v_len(p)];
    let mut ht = vec![0.0; state_len(p)];
    let (mut dec, mut e) = (vec![0.0; d.k], vec![0.0; d.v]);
    for n in 0..p.n_seqs() {
        for hv in 0..d.hv {
            let mut s = initial_state(p, x, n, hv);
            for r in p.seqs.range(n) {
                // A masked token does not exist for the recurrence; its output row stays zero.
                if x.live(r) {
                    step(p, x, r, hv, &mut s, &mut dec, &mut e);
                    readout(p, x, r, hv, &s, &mut o[v_at(p, r, hv)..][..d.v]);
                }
            }
            store_state(p, &s, &mut ht, n, hv);
        }
    }
    RefOutputs { o, ht }
}

/// Number of `every`-token blocks of the longest sequence: `ceil(max_len / every)` (0 when every sequence is empty).
///
/// # Panics
/// If `every == 0`.
pub fn n_blocks(p: &Problem, every: usize) -> usize {
    assert!(every > 0, "checkpoint interval must be at least 1");
    p.seqs.max_len().div_ceil(every)
}

/// States at the start of every `every`-token block of each sequence, for replaying a block in a backward.
///
/// Layout `[N, HV, NB, K, V]` (always Kv order, whatever `p.state_layout`), `NB = n_blocks(p, every)`:
/// entry `[n, hv, c]` is the state before row `offsets[n] + c * every` is processed (so `c = 0` is `h0[n]`
/// or zeros). Blocks at or past the end of a shorter sequence are zero. Masked tokens are skipped as in
/// [`forward`].
///
/// # Panics
/// If `every == 0` or a slice of `x` does not match `p`.
pub fn checkpoints(p: &Problem, x: &RefInputs, every: usize) -> Vec<f64> {
    x.assert_fits(p);
    let d = p.dims;
    let kv = d.k * d.v;
    let nb = n_blocks(p, every);
    let mut out = vec![0.0; p.n_seqs() * d.hv * nb * kv];
    let (mut dec, mut e) = (vec![0.0; d.k], vec![0.0; d.v]);
    for n in 0..p.n_seqs() {
        let rows = p.seqs.range(n);
        for hv in 0..d.hv {
            let mut s = initial_state(p, x, n, hv);
            for (t, r) in rows.clone().enumerate() {
                if t % every == 0 {
                    let at = ((n * d.hv + hv) * nb + t / every) * kv;
                    out[at..at + kv].copy_from_slice(&s);
                }
                if x.live(r) {
                    step(p, x, r, hv, &mut s, &mut dec, &mut e);
                }
            }
        }
    }
    out
}
