//! Float64 twin of the chunked backward (flash-linear-attention's `chunk_gated_delta_rule_bwd`), stage
//! by stage as the GPU passes compute it; must equal [`super::backward`] (the token loop's exact
//! gradients) to rounding.
//!
//! Per chunk (positions `i, j < len`, value head `hv`), with the forward's `gc`, `A`, `w`, `u`, the state
//! `h` at the chunk's start and `v_new = u - w h` (see [`super::chunked`]), and `Γ_ij = exp(gc_i - gc_j)`,
//! `P_ij = scale Γ_ij q_i·k_j` (i >= j), `Kd_i = exp(gc_last - gc_i) k_i`, `Qg_i = scale exp(gc_i) q_i`:
//!
//! 1. local dv: `dvl_j = Σ_{i>=j} P_ij do_i` (masked rows of `do` are zero: their output row is dropped);
//! 2. the reverse walk over chunks carrying `dS` (from `dht`, or zero): `dh = dS` (the gradient of the
//!    chunk's final state), `dvn = dvl + Kd dS`, `dS <- exp(gc_last) dS + Qgᵀ do - wᵀ dvn`; at the
//!    sequence's start `dh0 = dS`;
//! 3. `dq`, `dk`, `dw` and the gate terms: with `dP_ij = do_i·v_new_j` (i >= j),
//!    `dq_i = scale exp(gc_i) h do_i + scale Σ_j dP_ij Γ_ij k_j`,
//!    `dk_j = scale Σ_i dP_ij Γ_ij q_i + exp(gc_last - gc_j) dh v_new_j`, `dw_i = -h dvn_i`;
//! 4. through the WY form: `dX = Aᵀ dw`, `dY = Aᵀ dvn` (X = β exp(gc) K, Y = β V), `dv = β dY`,
//!    `dA = dw Xᵀ + dvn Yᵀ`, `dM = StrictLower(-Aᵀ dA Aᵀ)` for `M_ij = β_i Γ_ij k_i·k_j`, and from `dM`
//!    the terms of `dk`, `dβ` and the gate;
//! 5. the gate: the per-position log-decay gradient `dgc` summed in reverse inside the chunk (`gc` is
//!    an inclusive cumulative sum), zero for masked tokens, divided by the decay for a Linear gate.
//!
//! `dq`, `dk` are summed over the value heads of a key head.

// Index loops mirror the formulas (and the WGSL passes) one to one.
#![allow(clippy::needless_range_loop)]

use super::chunked::{chunk_fwd_h, chunk_local_cumsum, chunk_spans, recompute_w_u, scaled_dot_kkt, solve_tril};
use super::{load_state, qk_at, rh_at, store_state, v_at, RefGrads, RefInputs};
use crate::error::{Error, Result};
use crate::problem::{GateKind, GateSpace, Problem};

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Gradients of `L = sum(o * d_o) + sum(ht * dht)` by the chunked algorithm with chunks of `chunk`.
///
/// Errors as [`super::chunked::forward`]: a per-key gate, `chunk == 0`.
///
/// # Panics
/// If a slice of `x`, `d_o` or `dht` does not match `p`.
pub fn backward(p: &Problem, x: &RefInputs, d_o: &[f64], dht: Option<&[f64]>, chunk: usize) -> Result<RefGrads> {
    x.assert_fits(p);
    assert_eq!(d_o.len(), super::v_len(p), "do must be [B,T,HV,V]");
    if p.gate != GateKind::Scalar {
        return Err(Error::Unsupported("the chunked form needs a scalar gate".into()));
    }
    if chunk == 0 {
        return Err(Error::Option { name: "chunk", why: "must be at least 1".into() });
    }
    // The forward's intermediates (the GPU recomputes them per window).
    let live = |r: usize| x.live(r);
    let beta: Vec<f64> = x.beta.iter().enumerate().map(|(i, &b)| if live(i / p.dims.hv) { b } else { 0.0 }).collect();
    let d_o: Vec<f64> =
        d_o.iter().enumerate().map(|(i, &g)| if live(i / (p.dims.hv * p.dims.v)) { g } else { 0.0 }).collect();
    let gc = chunk_local_cumsum(p, x.g, x.mask, chunk);
    let a_raw = scaled_dot_kkt(p, x.k, &beta, &gc, chunk);
    let a = solve_tril(p, &a_raw, chunk);
    let (w, u) = recompute_w_u(p, x.k, x.v, &beta, &a, &gc, chunk);
    let fh = chunk_fwd_h(p, x.k, &w, &u, &gc, x.h0, chunk);

    let (hvn, kd, vd) = (p.dims.hv, p.dims.k, p.dims.v);
    let kv = kd * vd;
    let scale = f64::from(p.scale);
    let spans = chunk_spans(p, chunk);
    let mut gr = RefGrads::zeros(p);
    let q_of = |r: usize, hk: usize| &x.q[qk_at(p, r, hk)..][..kd];
    let k_of = |r: usize, hk: usize| &x.k[qk_at(p, r, hk)..][..kd];
    let g_at = |r: usize, hv: usize| gc[rh_at(p, r, hv)];

    // 1. Local dv.
    let mut dvl = vec![0.0; super::v_len(p)];
    for sp in &spans {
        for hv in 0..hvn {
            let hk = p.dims.key_head(hv);
            for j in 0..sp.len {
                let rj = sp.start + j;
                for i in j..sp.len {
                    let ri = sp.start + i;
                    let pij = scale * (g_at(ri, hv) - g_at(rj, hv)).exp() * dot(q_of(ri, hk), k_of(rj, hk));
                    for c in 0..vd {
                        dvl[v_at(p, rj, hv) + c] += pij * d_o[v_at(p, ri, hv) + c];
                    }
                }
            }
        }
    }

    // 2. The reverse walk: dh per chunk (gradient of its final state), dvn, dh0.
    let mut dh = vec![0.0; spans.len() * hvn * kv];
    let mut dvn = vec![0.0; super::v_len(p)];
    for n in 0..p.n_seqs() {
        for hv in 0..hvn {
            let hk = p.dims.key_head(hv);
            let mut ds = vec![0.0; kv];
            if let Some(dht) = dht {
                load_state(p, dht, n, hv, &mut ds);
            }
            for (c, sp) in spans.iter().enumerate().rev().filter(|(_, sp)| sp.seq == n) {
                dh[(c * hvn + hv) * kv..][..kv].copy_from_slice(&ds);
                let gl = g_at(sp.start + sp.len - 1, hv);
                for i in 0..sp.len {
                    let ri = sp.start + i;
                    let f = (gl - g_at(ri, hv)).exp();
                    let ki = k_of(ri, hk);
                    for col in 0..vd {
                        let kds: f64 = (0..kd).map(|m| ki[m] * ds[m * vd + col]).sum();
                        dvn[v_at(p, ri, hv) + col] = dvl[v_at(p, ri, hv) + col] + f * kds;
                    }
                }
                ds.iter_mut().for_each(|e| *e *= gl.exp());
                for i in 0..sp.len {
                    let ri = sp.start + i;
                    let fq = scale * g_at(ri, hv).exp();
                    let (qi, wi) = (q_of(ri, hk), &w[rh_at(p, ri, hv) * kd..][..kd]);
                    let (doi, dvi) = (&d_o[v_at(p, ri, hv)..][..vd], &dvn[v_at(p, ri, hv)..][..vd]);
                    for m in 0..kd {
                        for col in 0..vd {
                            ds[m * vd + col] += fq * qi[m] * doi[col] - wi[m] * dvi[col];
                        }
                    }
                }
            }
            if let Some(dh0) = gr.dh0.as_mut() {
                store_state(p, &ds, dh0, n, hv);
            }
        }
    }

    // 3-5, chunk by chunk.
    let mut dw = vec![0.0; kd];
    for (c, sp) in spans.iter().enumerate() {
        for hv in 0..hvn {
            let hk = p.dims.key_head(hv);
            let h = &fh.h[(c * hvn + hv) * kv..][..kv];
            let dhc = &dh[(c * hvn + hv) * kv..][..kv];
            let len = sp.len;
            let row = |i: usize| sp.start + i;
            let gl = g_at(row(len - 1), hv);
            let mut dgc = vec![0.0; len];
            // `h x` for a V-vector x: a K-vector.
            let hx = |s: &[f64], xv: &[f64]| -> Vec<f64> { (0..kd).map(|m| dot(&s[m * vd..][..vd], xv)).collect() };
            let vn_of = |i: usize| &fh.v_new[v_at(p, row(i), hv)..][..vd];
            let do_of = |i: usize| &d_o[v_at(p, row(i), hv)..][..vd];
            let dvn_of = |i: usize| &dvn[v_at(p, row(i), hv)..][..vd];
            let gam = |i: usize, j: usize| (g_at(row(i), hv) - g_at(row(j), hv)).exp();

            // 3. dq, dk (output and state-update terms), dw; gate terms.
            let mut dkl = vec![vec![0.0; kd]; len];
            let mut dwl = vec![vec![0.0; kd]; len];
            for i in 0..len {
                let hdo = hx(h, do_of(i));
                let fq = scale * g_at(row(i), hv).exp();
                let dq = &mut gr.dq[qk_at(p, row(i), hk)..][..kd];
                for m in 0..kd {
                    dq[m] += fq * hdo[m];
                }
                dgc[i] += fq * dot(q_of(row(i), hk), &hdo);
                for j in 0..=i {
                    let dp = dot(do_of(i), vn_of(j));
                    let pij = scale * gam(i, j) * dot(q_of(row(i), hk), k_of(row(j), hk));
                    let f = scale * dp * gam(i, j);
                    for m in 0..kd {
                        dq[m] += f * k_of(row(j), hk)[m];
                        dkl[j][m] += f * q_of(row(i), hk)[m];
                    }
                    dgc[i] += dp * pij;
                    dgc[j] -= dp * pij;
                }
                let hdvn = hx(h, dvn_of(i));
                for m in 0..kd {
                    dwl[i][m] = -hdvn[m];
                }
            }
            let mut dgl = gl.exp() * dot(h, dhc);
            for (i, dk_i) in dkl.iter_mut().enumerate() {
                let f = (gl - g_at(row(i), hv)).exp();
                let dkd = hx(dhc, vn_of(i));
                let t = f * dot(k_of(row(i), hk), &dkd);
                dgc[i] -= t;
                dgl += t;
                for m in 0..kd {
                    dk_i[m] += f * dkd[m];
                }
            }
            dgc[len - 1] += dgl;

            // 4. Through A: X_j = β_j exp(gc_j) k_j, Y_j = β_j v_j.
            let b_of = |i: usize| beta[rh_at(p, row(i), hv)];
            let a_of = |i: usize, j: usize| a[rh_at(p, row(i), hv) * chunk + j];
            let x_of = |j: usize| -> Vec<f64> {
                let f = b_of(j) * g_at(row(j), hv).exp();
                k_of(row(j), hk).iter().map(|e| f * e).collect()
            };
            let v_of = |j: usize| &x.v[v_at(p, row(j), hv)..][..vd];
            let mut da = vec![vec![0.0; len]; len];
            for j in 0..len {
                dw.fill(0.0);
                let mut dy = vec![0.0; vd];
                for i in j..len {
                    for m in 0..kd {
                        dw[m] += a_of(i, j) * dwl[i][m];
                    }
                    for col in 0..vd {
                        dy[col] += a_of(i, j) * dvn_of(i)[col];
                    }
                }
                let xj = x_of(j);
                let fx = b_of(j) * g_at(row(j), hv).exp();
                for m in 0..kd {
                    dkl[j][m] += fx * dw[m];
                }
                for col in 0..vd {
                    gr.dv[v_at(p, row(j), hv) + col] = b_of(j) * dy[col];
                }
                let dxk = dot(&dw, k_of(row(j), hk));
                gr.dbeta[rh_at(p, row(j), hv)] = g_at(row(j), hv).exp() * dxk + dot(&dy, v_of(j));
                dgc[j] += dot(&dw, &xj);
                for (i, da_i) in da.iter_mut().enumerate() {
                    da_i[j] = dot(&dwl[i], &xj) + b_of(j) * dot(dvn_of(i), v_of(j));
                }
            }
            // dM = StrictLower(-Aᵀ dA Aᵀ).
            let mut t1 = vec![vec![0.0; len]; len]; // dA Aᵀ
            for i in 0..len {
                for j in 0..len {
                    t1[i][j] = (0..len).map(|b| da[i][b] * a_of(j, b)).sum();
                }
            }
            for i in 0..len {
                for j in 0..i {
                    let dm = -(0..len).map(|r| a_of(r, i) * t1[r][j]).sum::<f64>();
                    let kk = dot(k_of(row(i), hk), k_of(row(j), hk));
                    let g = gam(i, j);
                    let mij = b_of(i) * kk * g;
                    gr.dbeta[rh_at(p, row(i), hv)] += dm * kk * g;
                    for m in 0..kd {
                        dkl[i][m] += dm * b_of(i) * g * k_of(row(j), hk)[m];
                        dkl[j][m] += dm * b_of(i) * g * k_of(row(i), hk)[m];
                    }
                    dgc[i] += dm * mij;
                    dgc[j] -= dm * mij;
                }
            }
            for (i, dk_i) in dkl.iter().enumerate() {
                let dk = &mut gr.dk[qk_at(p, row(i), hk)..][..kd];
                for m in 0..kd {
                    dk[m] += dk_i[m];
                }
            }

            // 5. The gate: reverse cumulative sum of dgc; masked tokens have none.
            let mut acc = 0.0;
            for i in (0..len).rev() {
                acc += dgc[i];
                let r = row(i);
                let at = rh_at(p, r, hv);
                gr.dg[at] = match (live(r), p.gate_space) {
                    (false, _) => 0.0,
                    (true, GateSpace::Log) => acc,
                    (true, GateSpace::Linear) => acc / x.g[at],
                };
                if !live(r) {
                    gr.dbeta[at] = 0.0;
                }
            }
        }
    }
    Ok(gr)
}
