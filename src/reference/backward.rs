//! Exact float64 gradients of the token loop (SPEC section 4): store every state, walk back carrying dS.

use super::recurrent::{initial_state, step};
use super::{decays, load_state, qk_at, rh_at, store_state, v_at, RefGrads, RefInputs};
use crate::problem::{GateKind, GateSpace, Problem};

/// Gradients of `L = sum(o * d_o) + sum(ht * dht)` with respect to every input of [`super::forward`].
///
/// `d_o` is `[B,T,HV,V]`; `dht`, if given, has the shape and layout of `ht`. Masked steps get zero
/// gradients and pass dS through unchanged. `dg` is taken in the gate's own space: `dL/dg` with
/// decay = `exp(g)` (Log), `dL/d(decay)` (Linear).
///
/// # Panics
/// If a slice of `x`, `d_o` or `dht` does not match `p`.
pub fn backward(p: &Problem, x: &RefInputs, d_o: &[f64], dht: Option<&[f64]>) -> RefGrads {
    x.assert_fits(p);
    assert_eq!(d_o.len(), super::v_len(p), "do must be [B,T,HV,V]");
    if let Some(dht) = dht {
        assert_eq!(dht.len(), super::state_len(p), "dht must have the shape of ht");
    }
    let d = p.dims;
    let (kd, vd) = (d.k, d.v);
    let kv = kd * vd;
    let scale = f64::from(p.scale);
    let mut gr = RefGrads::zeros(p);
    let (mut dec, mut e) = (vec![0.0; kd], vec![0.0; vd]);
    // Per-step scratch: S' (decayed previous state), S_t, dS' and the two V-vectors k^T dS and dL/de.
    let (mut sp, mut st, mut dsp) = (vec![0.0; kv], vec![0.0; kv], vec![0.0; kv]);
    let (mut kds, mut de, mut dd) = (vec![0.0; vd], vec![0.0; vd], vec![0.0; kd]);

    for n in 0..p.n_seqs() {
        let rows = p.seqs.range(n);
        for hv in 0..d.hv {
            let hk = d.key_head(hv);
            // Forward, keeping the state before every step: the reference trades memory for clarity.
            let mut s = initial_state(p, x, n, hv);
            let mut before = Vec::with_capacity(rows.len() * kv);
            for r in rows.clone() {
                before.extend_from_slice(&s);
                if x.live(r) {
                    step(p, x, r, hv, &mut s, &mut dec, &mut e);
                }
            }
            // dS = dL/dS_t, starting from dL/dht.
            let mut ds = vec![0.0; kv];
            if let Some(dht) = dht {
                load_state(p, dht, n, hv, &mut ds);
            }
            for (t, r) in rows.clone().enumerate().rev() {
                if !x.live(r) {
                    continue;
                }
                let prev = &before[t * kv..(t + 1) * kv];
                let q = &x.q[qk_at(p, r, hk)..][..kd];
                let k = &x.k[qk_at(p, r, hk)..][..kd];
                let v = &x.v[v_at(p, r, hv)..][..vd];
                let dov = &d_o[v_at(p, r, hv)..][..vd];
                let beta = x.beta[rh_at(p, r, hv)];

                // Recompute S' = D ∘ S_{t-1}, e = v - S'^T k and S_t = S' + beta k e^T.
                decays(p, x.g, r, hv, &mut dec);
                for i in 0..kd {
                    for j in 0..vd {
                        sp[i * vd + j] = dec[i] * prev[i * vd + j];
                    }
                }
                e.copy_from_slice(v);
                for i in 0..kd {
                    for j in 0..vd {
                        e[j] -= sp[i * vd + j] * k[i];
                    }
                }
                for i in 0..kd {
                    for j in 0..vd {
                        st[i * vd + j] = sp[i * vd + j] + beta * k[i] * e[j];
                    }
                }

                // o = scale S_t^T q: dq = scale S_t do, dS_t += scale q do^T.
                let dq = &mut gr.dq[qk_at(p, r, hk)..][..kd];
                for i in 0..kd {
                    for j in 0..vd {
                        dq[i] += scale * st[i * vd + j] * dov[j];
                        ds[i * vd + j] += scale * q[i] * dov[j];
                    }
                }

                // S_t = S' + beta k e^T: with kds = dS^T k, de = beta kds, dbeta = e . kds, dk += beta dS e.
                kds.fill(0.0);
                for i in 0..kd {
                    for j in 0..vd {
                        kds[j] += k[i] * ds[i * vd + j];
                    }
                }
                for j in 0..vd {
                    de[j] = beta * kds[j];
                }
                gr.dbeta[rh_at(p, r, hv)] = e.iter().zip(&kds).map(|(a, b)| a * b).sum();
                let dk = &mut gr.dk[qk_at(p, r, hk)..][..kd];
                for i in 0..kd {
                    let mut acc = 0.0;
                    for j in 0..vd {
                        // beta dS e (the write) minus S' de (the prediction inside e).
                        acc += beta * ds[i * vd + j] * e[j] - sp[i * vd + j] * de[j];
                    }
                    dk[i] += acc;
                }
                // e = v - S'^T k: dv = de, dS' = dS - k de^T.
                gr.dv[v_at(p, r, hv)..][..vd].copy_from_slice(&de);
                for i in 0..kd {
                    for j in 0..vd {
                        dsp[i * vd + j] = ds[i * vd + j] - k[i] * de[j];
                    }
                }

                // S' = D ∘ S_{t-1}: dD_i = sum_j dS'_ij S_{t-1,ij}, dS_{t-1} = D ∘ dS'.
                for i in 0..kd {
                    dd[i] = (0..vd).map(|j| dsp[i * vd + j] * prev[i * vd + j]).sum();
                    for j in 0..vd {
                        ds[i * vd + j] = dec[i] * dsp[i * vd + j];
                    }
                }
                // Back to the gate's own space: decay = exp(g) gives dg = dD * decay; a linear gate is the decay.
                let chain = |i: usize| match p.gate_space {
                    GateSpace::Log => dd[i] * dec[i],
                    GateSpace::Linear => dd[i],
                };
                match p.gate {
                    GateKind::Scalar => gr.dg[rh_at(p, r, hv)] = (0..kd).map(chain).sum(),
                    GateKind::PerKey => {
                        let base = rh_at(p, r, hv) * kd;
                        for i in 0..kd {
                            gr.dg[base + i] = chain(i);
                        }
                    }
                }
            }
            if let Some(dh0) = gr.dh0.as_mut() {
                store_state(p, &ds, dh0, n, hv);
            }
        }
    }
    gr
}
