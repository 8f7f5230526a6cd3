//! Operations on the engine: the public entry points, validation first, then the plan (which
//! algorithm), then the passes. `forward` chooses between algorithms; nothing is rebound at run time.

pub mod backward;
pub mod chunked;
pub mod chunked_backward;
pub mod cost;
pub mod decode;
pub mod recurrent;

use crate::device::Caps;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::problem::{Algorithm, GateKind, InputsMeta, Options, Problem};
use crate::tensor::Tensor;

/// Device tensors of one call, in either convention (see [`Options`]).
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// `[B, T, H, K]`, F32/F16/BF16.
    pub q: &'a Tensor,
    /// `[B, T, H, K]`, same dtype as q.
    pub k: &'a Tensor,
    /// `[B, T, HV, V]`, same dtype as q.
    pub v: &'a Tensor,
    /// `[B, T, HV]` (scalar gate) or `[B, T, HV, K]` (per-key gate), in `Options::gate_space`.
    pub g: &'a Tensor,
    /// `[B, T, HV]`.
    pub beta: &'a Tensor,
    /// Initial state `[N, HV, K, V]` (kv) or `[N, HV, V, K]` (vk), F32.
    pub h0: Option<&'a Tensor>,
    /// Padding mask `[B, T]`, U8/BOOL, nonzero = real token.
    pub mask: Option<&'a Tensor>,
    /// Packed sequence boundaries `[N+1]` (host values: they are validated before GPU work), B = 1.
    pub cu_seqlens: Option<&'a [i64]>,
}

impl<'a> Inputs<'a> {
    /// The required inputs; add options with the `with_*` methods.
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, g: &'a Tensor, beta: &'a Tensor) -> Self {
        Inputs { q, k, v, g, beta, h0: None, mask: None, cu_seqlens: None }
    }
    pub fn with_h0(mut self, h0: &'a Tensor) -> Self {
        self.h0 = Some(h0);
        self
    }
    pub fn with_mask(mut self, mask: &'a Tensor) -> Self {
        self.mask = Some(mask);
        self
    }
    pub fn with_cu_seqlens(mut self, cu: &'a [i64]) -> Self {
        self.cu_seqlens = Some(cu);
        self
    }

    /// Shapes and dtypes, for validation.
    pub fn meta(&self) -> InputsMeta {
        InputsMeta {
            q: Some(self.q.meta()),
            k: Some(self.k.meta()),
            v: Some(self.v.meta()),
            g: Some(self.g.meta()),
            beta: Some(self.beta.meta()),
            h0: self.h0.map(Tensor::meta),
            mask: self.mask.map(Tensor::meta),
            d_o: None,
            dht: None,
        }
    }
}

/// Results of a forward call, on the device.
#[derive(Debug)]
pub struct Outputs {
    /// `[B, T, HV, V]`, F32.
    pub o: Tensor,
    /// Final state in the call's layout, when `output_final_state` was set.
    pub ht: Option<Tensor>,
}

/// The algorithm a call will run, after `Auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Recurrent,
    /// The chunked WY/UT passes with chunks of `chunk` tokens.
    Chunked {
        chunk: u32,
    },
}

/// Chunk size `Algorithm::Auto` uses when it picks the chunked algorithm.
pub const AUTO_CHUNK: u32 = 64;
/// Shortest longest-sequence at which `Algorithm::Auto` picks the chunked algorithm (where it runs
/// on cooperative matrices). Measured on an H100, bf16 (docs/PERF.md, run R59): chunked wins at every
/// length of the sweep, T=256 included (B=1: 0.130 against 0.157 ms; B=4: 0.33 against 0.60 ms);
/// shorter sequences were not measured and stay recurrent.
pub const AUTO_CHUNKED_MIN_LEN: usize = 256;

/// What the chunked algorithm cannot do for `p`, if anything.
pub fn chunked_unsupported(p: &Problem) -> Option<String> {
    (p.gate == GateKind::PerKey).then(|| {
        "the chunked algorithm needs a scalar gate [B, T, HV]; the per-key gate runs on the recurrent algorithm".into()
    })
}

/// Whether `Algorithm::Auto` picks the chunked algorithm for `p` on a device with `caps`: where its
/// state walk runs on cooperative matrices (f16/bf16 inputs, an adapter with f16 -> f32 tiles, the
/// tiles fit) and the longest sequence has at least [`AUTO_CHUNKED_MIN_LEN`] tokens.
///
/// Measured on an H100 (docs/PERF.md, run R59), bf16: chunked is 3.6x faster than the recurrent
/// kernel at B=1 T=4096 and 2.1x at B=16 T=4096. Without cooperative matrices (f32
/// inputs, the software driver) the chunked passes are slower at every length measured (f32 B=1
/// T=16384: 12.7 against 10.7 ms), so Auto stays recurrent there.
pub fn auto_chunked(p: &Problem, caps: &Caps) -> bool {
    let mma = crate::kernels::chunked::ChunkSpec::choose(AUTO_CHUNK, p.dims.k, p.dims.v).mma_for(p, caps).is_some();
    mma && chunked_unsupported(p).is_none() && p.seqs.max_len() >= AUTO_CHUNKED_MIN_LEN
}

/// Resolves the algorithm for a validated problem on a device with `caps`.
pub fn plan(p: &Problem, caps: &Caps) -> Result<Plan> {
    match p.algorithm {
        Algorithm::Recurrent => Ok(Plan::Recurrent),
        Algorithm::Auto if auto_chunked(p, caps) => Ok(Plan::Chunked { chunk: AUTO_CHUNK }),
        Algorithm::Auto => Ok(Plan::Recurrent),
        Algorithm::Chunked { chunk } => match chunked_unsupported(p) {
            Some(why) => Err(Error::Unsupported(why)),
            None => Ok(Plan::Chunked { chunk }),
        },
    }
}

impl Engine {
    /// The gated delta rule forward: `o` (and `ht` when asked), validated before any GPU work.
    ///
    /// ```no_run
    /// use wgdelta::{Engine, HostTensor, Inputs, Options};
    /// let eng = Engine::new()?;
    /// let (b, t, h, hv, k, v) = (1, 4, 1, 2, 16, 16);
    /// let up = |n: &str, s: &[usize]| eng.upload(n, &HostTensor::from_f32(s, &vec![0.1; s.iter().product()]));
    /// let (q, kk, vv) = (up("q", &[b, t, h, k])?, up("k", &[b, t, h, k])?, up("v", &[b, t, hv, v])?);
    /// let (g, beta) = (up("g", &[b, t, hv])?, up("beta", &[b, t, hv])?);
    /// let out = eng.forward(&Inputs::new(&q, &kk, &vv, &g, &beta), &Options::default())?;
    /// let o = eng.download(&out.o)?.to_f32();
    /// assert_eq!(o.len(), b * t * hv * v);
    /// # Ok::<(), wgdelta::Error>(())
    /// ```
    pub fn forward(&self, x: &Inputs, opts: &Options) -> Result<Outputs> {
        let p = Problem::new(&x.meta(), x.cu_seqlens, opts, false)?;
        match plan(&p, &self.gpu.caps)? {
            Plan::Recurrent => recurrent::forward(self, &p, x, None),
            Plan::Chunked { chunk } => chunked::forward(self, &p, x, chunk, None),
        }
    }
}
