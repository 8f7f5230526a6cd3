//! float64 CPU reference: the oracle every kernel is checked against.

use crate::error::{Error, Result};
use crate::problem::{GateKind, GateSpace, Problem};

pub mod backward;
pub mod chunked;
pub mod chunked_backward;
pub mod recurrent;

pub use backward::backward;
pub use recurrent::forward;

/// Inputs in the caller's native layout and convention (exactly as the [`Problem`] describes them):
/// `q, k: [B,T,H,K]`; `v: [B,T,HV,V]`; `g: [B,T,HV]` or `[B,T,HV,K]` in `p.gate_space`
/// (Log: decay = `exp(g)`; Linear: decay = `g`); `beta: [B,T,HV]`; `h0: [N,HV,K,V]` (Kv) or
/// `[N,HV,V,K]` (Vk) where `N = p.n_seqs()`; `mask: [B,T]` (nonzero = real token).
#[derive(Clone, Copy, Debug)]
pub struct RefInputs<'a> {
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub g: &'a [f64],
    pub beta: &'a [f64],
    pub h0: Option<&'a [f64]>,
    pub mask: Option<&'a [u8]>,
}

/// Forward results.
#[derive(Clone, Debug, PartialEq)]
pub struct RefOutputs {
    /// `[B,T,HV,V]`; rows of masked tokens are zero.
    pub o: Vec<f64>,
    /// Final state per sequence, shape `p.state_shape()` in `p.state_layout` (always computed).
    pub ht: Vec<f64>,
}

/// Gradients of `L` with respect to every input, each in the shape (and, for `g`, the space) of that input.
#[derive(Clone, Debug, PartialEq)]
pub struct RefGrads {
    /// `[B,T,H,K]`, summed over the value heads sharing a key head.
    pub dq: Vec<f64>,
    /// `[B,T,H,K]`, summed over the value heads sharing a key head.
    pub dk: Vec<f64>,
    /// `[B,T,HV,V]`.
    pub dv: Vec<f64>,
    /// Shape of `g`, with respect to `g` in its own gate space (Log: `dL/dg`; Linear: `dL/d(decay)`).
    pub dg: Vec<f64>,
    /// `[B,T,HV]`.
    pub dbeta: Vec<f64>,
    /// Shape of `h0`; `Some` iff `p.has_h0`.
    pub dh0: Option<Vec<f64>>,
}

impl RefGrads {
    /// All-zero gradients in the shapes of `p`'s inputs (`dh0` iff `p.has_h0`).
    pub fn zeros(p: &Problem) -> RefGrads {
        RefGrads {
            dq: vec![0.0; qk_len(p)],
            dk: vec![0.0; qk_len(p)],
            dv: vec![0.0; v_len(p)],
            dg: vec![0.0; g_len(p)],
            dbeta: vec![0.0; beta_len(p)],
            dh0: p.has_h0.then(|| vec![0.0; state_len(p)]),
        }
    }
}

/// Elements of `q` (and `k`): `B*T*H*K`.
pub fn qk_len(p: &Problem) -> usize {
    p.dims.rows() * p.dims.h * p.dims.k
}

/// Elements of `v` (and `o`, `do`): `B*T*HV*V`.
pub fn v_len(p: &Problem) -> usize {
    p.dims.rows() * p.dims.hv * p.dims.v
}

/// Elements of `g`: `B*T*HV` (scalar gate) or `B*T*HV*K` (per-key gate).
pub fn g_len(p: &Problem) -> usize {
    match p.gate {
        GateKind::Scalar => p.dims.rows() * p.dims.hv,
        GateKind::PerKey => p.dims.rows() * p.dims.hv * p.dims.k,
    }
}

/// Elements of `beta`: `B*T*HV`.
pub fn beta_len(p: &Problem) -> usize {
    p.dims.rows() * p.dims.hv
}

/// Elements of one state tensor (`h0`, `ht`, `dht`): `N*HV*K*V`.
pub fn state_len(p: &Problem) -> usize {
    p.n_seqs() * p.dims.hv * p.dims.k * p.dims.v
}

impl RefInputs<'_> {
    /// Checks that every slice has the length `p` implies (and that `h0`/`mask` are present iff
    /// `p.has_h0`/`p.has_mask`). [`forward()`] and [`backward()`] panic where this returns an error.
    pub fn check(&self, p: &Problem) -> Result<()> {
        let len = |name: &'static str, got: usize, want: usize| -> Result<()> {
            if got != want {
                return Err(Error::Shape { name, got: vec![got], expected: format!("{want} elements") });
            }
            Ok(())
        };
        len("q", self.q.len(), qk_len(p))?;
        len("k", self.k.len(), qk_len(p))?;
        len("v", self.v.len(), v_len(p))?;
        len("g", self.g.len(), g_len(p))?;
        len("beta", self.beta.len(), beta_len(p))?;
        match (self.h0, p.has_h0) {
            (Some(h0), true) => len("h0", h0.len(), state_len(p))?,
            (None, false) => {}
            (Some(_), false) => return Err(Error::Unsupported("h0 given but the problem has has_h0 = false".into())),
            (None, true) => return Err(Error::Missing("h0")),
        }
        match (self.mask, p.has_mask) {
            (Some(m), true) => len("mask", m.len(), p.dims.rows())?,
            (None, false) => {}
            (Some(_), false) => {
                return Err(Error::Unsupported("mask given but the problem has has_mask = false".into()))
            }
            (None, true) => return Err(Error::Missing("mask")),
        }
        Ok(())
    }

    /// Panics with the validation message: the reference is a test oracle, a bad slice is a bug in the caller.
    pub(crate) fn assert_fits(&self, p: &Problem) {
        if let Err(e) = self.check(p) {
            panic!("reference inputs do not match the problem: {e}");
        }
    }

    /// True when row `r` of the flattened `[B*T]` axis is a real token.
    pub(crate) fn live(&self, r: usize) -> bool {
        self.mask.is_none_or(|m| m[r] != 0)
    }
}

/// Start of the `K`-vector of `q`/`k` for row `r`, key head `hk`.
pub(crate) fn qk_at(p: &Problem, r: usize, hk: usize) -> usize {
    (r * p.dims.h + hk) * p.dims.k
}

/// Start of the `V`-vector of `v`/`o`/`do` for row `r`, value head `hv`.
pub(crate) fn v_at(p: &Problem, r: usize, hv: usize) -> usize {
    (r * p.dims.hv + hv) * p.dims.v
}

/// Index of `beta` (and of a scalar `g`) for row `r`, value head `hv`.
pub(crate) fn rh_at(p: &Problem, r: usize, hv: usize) -> usize {
    r * p.dims.hv + hv
}

/// Decays of row `r`, value head `hv`, one per key row of the state (all equal for a scalar gate),
/// written to `out` (length `K`). The gate is read in its own space.
pub(crate) fn decays(p: &Problem, g: &[f64], r: usize, hv: usize, out: &mut [f64]) {
    for (i, d) in out.iter_mut().enumerate() {
        let raw = match p.gate {
            GateKind::Scalar => g[rh_at(p, r, hv)],
            GateKind::PerKey => g[rh_at(p, r, hv) * p.dims.k + i],
        };
        *d = match p.gate_space {
            GateSpace::Log => raw.exp(),
            GateSpace::Linear => raw,
        };
    }
}

/// Start of the state of sequence `n`, value head `hv` inside an `[N,HV,...]` state tensor.
fn state_at(p: &Problem, n: usize, hv: usize) -> usize {
    (n * p.dims.hv + hv) * p.dims.k * p.dims.v
}

/// Reads the state of (`n`, `hv`) from `buf` (in `p.state_layout`) into a `K x V` row-major matrix.
pub(crate) fn load_state(p: &Problem, buf: &[f64], n: usize, hv: usize, out: &mut [f64]) {
    let (kd, vd) = (p.dims.k, p.dims.v);
    let base = state_at(p, n, hv);
    for i in 0..kd {
        for j in 0..vd {
            out[i * vd + j] = buf[base + p.state_layout.offset(i, j, kd, vd)];
        }
    }
}

/// Writes a `K x V` row-major matrix as the state of (`n`, `hv`) into `buf` (in `p.state_layout`).
pub(crate) fn store_state(p: &Problem, s: &[f64], buf: &mut [f64], n: usize, hv: usize) {
    let (kd, vd) = (p.dims.k, p.dims.v);
    let base = state_at(p, n, hv);
    for i in 0..kd {
        for j in 0..vd {
            buf[base + p.state_layout.offset(i, j, kd, vd)] = s[i * vd + j];
        }
    }
}

/// Converts a whole state tensor from `p.state_layout` to `[N,HV,K,V]` (a copy when already Kv).
pub fn state_to_kv(p: &Problem, s: &[f64]) -> Vec<f64> {
    let kv = p.dims.k * p.dims.v;
    let mut out = vec![0.0; state_len(p)];
    for n in 0..p.n_seqs() {
        for hv in 0..p.dims.hv {
            let at = state_at(p, n, hv);
            load_state(p, s, n, hv, &mut out[at..at + kv]);
        }
    }
    out
}

/// Converts a whole `[N,HV,K,V]` state tensor to `p.state_layout` (a copy when that is Kv).
pub fn state_from_kv(p: &Problem, s_kv: &[f64]) -> Vec<f64> {
    let kv = p.dims.k * p.dims.v;
    let mut out = vec![0.0; state_len(p)];
    for n in 0..p.n_seqs() {
        for hv in 0..p.dims.hv {
            let at = state_at(p, n, hv);
            store_state(p, &s_kv[at..at + kv], &mut out, n, hv);
        }
    }
    out
}
