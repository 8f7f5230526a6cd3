//! # wgdelta
//!
//! A portable GPU engine for the **gated delta rule**, the linear-attention recurrence of
//! Qwen3.5, Qwen3-Next and Kimi-Linear (GatedDeltaNet). Kernels are WGSL run through wgpu on
//! Metal, Vulkan, DX12; every kernel is checked against a float64 CPU reference ([`reference`]).
//!
//! ```no_run
//! use wgdelta::{Engine, HostTensor, Inputs, Options, DType, Rng};
//! # fn main() -> Result<(), wgdelta::Error> {
//! let eng = Engine::new()?; // best adapter, else the software Vulkan driver
//! let (b, t, h, hv, k, v) = (1, 64, 2, 4, 64, 64);
//! let mut rng = Rng::new(0);
//! let mut up = |name: &str, shape: &[usize], lo: f64, hi: f64| {
//!     let n = shape.iter().product();
//!     eng.upload(name, &HostTensor::from_f64(shape, &rng.uniforms(n, lo, hi), DType::BF16))
//! };
//! let q = up("q", &[b, t, h, k], -1.0, 1.0)?;
//! let kk = up("k", &[b, t, h, k], -0.2, 0.2)?;
//! let vv = up("v", &[b, t, hv, v], -1.0, 1.0)?;
//! let g = up("g", &[b, t, hv], -0.1, 0.0)?;      // log-decay (FLA convention)
//! let beta = up("beta", &[b, t, hv], 0.0, 1.0)?;
//! let opts = Options { output_final_state: true, ..Options::default() };
//! let out = eng.forward(&Inputs::new(&q, &kk, &vv, &g, &beta), &opts)?;
//! let o: Vec<f32> = eng.download(&out.o)?.to_f32();     // [B, T, HV, V]
//! let ht = eng.download(out.ht.as_ref().unwrap())?;      // [N, HV, K, V]
//! # let _ = (o, ht);
//! # Ok(()) }
//! ```
//!
//! The data flow is one way: [`Problem::new`] validates shapes, dtypes and options (typed
//! [`Error`]s, no GPU work yet), [`ops::plan`] picks the algorithm, a [`graph::PassGraph`] records
//! the passes into one submission, and the outputs stay on the device until downloaded.

pub mod case;
pub mod device;
pub mod engine;
pub mod error;
pub mod graph;
pub mod kernels;
pub mod ops;
pub mod problem;
pub mod reference;
pub mod rng;
pub mod synth;
pub mod tensor;

pub use device::{Caps, Gpu, GpuOptions};
pub use engine::{Engine, Settings};
pub use error::{Error, Result};
pub use graph::Profile;
pub use kernels::Accum;
pub use ops::backward::{Grads, Saved};
pub use ops::{Inputs, Outputs};
pub use problem::{Algorithm, DType, Dims, GateKind, GateSpace, Options, Problem, StateLayout};
pub use rng::Rng;
pub use tensor::{HostTensor, Tensor, TensorFile};
