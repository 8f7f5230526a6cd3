//! Synthetic inputs shaped like a real model's (normalised keys, sigmoid betas, log-sigmoid
//! decays), seeded, for the demo, the benchmarks and examples.

use crate::engine::Engine;
use crate::error::Result;
use crate::ops::Inputs;
use crate::problem::{DType, Dims, GateSpace, StateLayout};
use crate::rng::Rng;
use crate::tensor::{HostTensor, Tensor};

/// Host inputs of one call.
#[derive(Clone, Debug)]
pub struct HostInputs {
    pub q: HostTensor,
    pub k: HostTensor,
    pub v: HostTensor,
    pub g: HostTensor,
    pub beta: HostTensor,
    pub h0: Option<HostTensor>,
}

/// Device inputs of one call.
#[derive(Clone, Debug)]
pub struct DeviceInputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub g: Tensor,
    pub beta: Tensor,
    pub h0: Option<Tensor>,
}

impl DeviceInputs {
    /// Borrowed as [`Inputs`].
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            g: &self.g,
            beta: &self.beta,
            h0: self.h0.as_ref(),
            mask: None,
            cu_seqlens: None,
        }
    }
}

/// L2-normalises each row of `width` values in place (as models normalise keys).
pub fn normalize_rows(x: &mut [f64], width: usize) {
    for r in x.chunks_mut(width.max(1)) {
        let n = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= n);
    }
}

/// Random model-like inputs (scalar gate) in `dtype`, the gate in `space`, h0 in `layout` if asked.
pub fn model_like(d: Dims, dtype: DType, space: GateSpace, layout: StateLayout, h0: bool, seed: u64) -> HostInputs {
    let mut rng = Rng::new(seed);
    let rows = d.b * d.t;
    let q = rng.normals(rows * d.h * d.k);
    let mut k = rng.normals(rows * d.h * d.k);
    normalize_rows(&mut k, d.k);
    let v = rng.normals(rows * d.hv * d.v);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let beta: Vec<f64> = rng.normals(rows * d.hv).into_iter().map(sig).collect();
    let g: Vec<f64> = rng
        .normals(rows * d.hv)
        .into_iter()
        .map(|x| match space {
            GateSpace::Log => sig(x).ln(),
            GateSpace::Linear => sig(x),
        })
        .collect();
    let sshape = match layout {
        StateLayout::Kv => [d.b, d.hv, d.k, d.v],
        StateLayout::Vk => [d.b, d.hv, d.v, d.k],
    };
    let h0 = h0.then(|| HostTensor::from_f64(&sshape, &rng.normals(sshape.iter().product()), DType::F32));
    HostInputs {
        q: HostTensor::from_f64(&[d.b, d.t, d.h, d.k], &q, dtype),
        k: HostTensor::from_f64(&[d.b, d.t, d.h, d.k], &k, dtype),
        v: HostTensor::from_f64(&[d.b, d.t, d.hv, d.v], &v, dtype),
        g: HostTensor::from_f64(&[d.b, d.t, d.hv], &g, dtype),
        beta: HostTensor::from_f64(&[d.b, d.t, d.hv], &beta, dtype),
        h0,
    }
}

impl HostInputs {
    /// Uploads every tensor.
    pub fn upload(&self, eng: &Engine) -> Result<DeviceInputs> {
        Ok(DeviceInputs {
            q: eng.upload("q", &self.q)?,
            k: eng.upload("k", &self.k)?,
            v: eng.upload("v", &self.v)?,
            g: eng.upload("g", &self.g)?,
            beta: eng.upload("beta", &self.beta)?,
            h0: self.h0.as_ref().map(|h| eng.upload("h0", h)).transpose()?,
        })
    }
}
