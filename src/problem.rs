//! Shapes, conventions and options of one gated-delta call, and their validation (all before GPU work).

use crate::error::{Error, Result};
use std::fmt;

/// Element type of a tensor. Only the float types are accepted for q, k, v, g and beta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }
    /// True for F32, F16 and BF16: the types the kernels read as inputs.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
    /// Code used by the WGSL loaders (`DT_F32`, `DT_F16`, `DT_BF16` in `wgsl/prelude.wgsl`).
    pub(crate) fn wgsl_code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            _ => u32::MAX,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        };
        f.write_str(s)
    }
}

/// The extents of one call: batch, tokens, key heads, value heads, key and value head dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Batch size `B` (1 with `cu_seqlens`).
    pub b: usize,
    /// Tokens per batch row `T` (the packed length with `cu_seqlens`).
    pub t: usize,
    /// Key heads `H`.
    pub h: usize,
    /// Value heads `HV`, a multiple of `H`.
    pub hv: usize,
    /// Key head dimension `K`.
    pub k: usize,
    /// Value head dimension `V`.
    pub v: usize,
}

impl Dims {
    /// Value heads per key head (`HV / H`).
    pub fn group(&self) -> usize {
        self.hv / self.h
    }
    /// Key head read by value head `hv`.
    pub fn key_head(&self, hv: usize) -> usize {
        hv / self.group()
    }
    /// Token rows of the flattened `[B*T]` axis.
    pub fn rows(&self) -> usize {
        self.b * self.t
    }
}

/// Scalar gate `g: [B,T,HV]` or per-key gate `g: [B,T,HV,K]` (Kimi-Linear / KDA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GateKind {
    Scalar,
    PerKey,
}

/// The space the gate tensor is given in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GateSpace {
    /// `g` is the log-decay; the decay is `exp(g)` (flash-linear-attention, PyTorch).
    #[default]
    Log,
    /// `g` is the decay itself (mlx-lm, MLX Swift).
    Linear,
}

/// Memory layout of the recurrent state `S` (and of `h0`, `ht`, `dht`, `dh0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum StateLayout {
    /// `[N, HV, K, V]` (flash-linear-attention).
    #[default]
    Kv,
    /// `[N, HV, V, K]` (mlx-lm; FLA's `state_v_first`).
    Vk,
}

impl StateLayout {
    /// Offset of element `S[i][j]` (`i` over K, `j` over V) inside one `K x V` state.
    pub fn offset(self, i: usize, j: usize, k: usize, v: usize) -> usize {
        match self {
            StateLayout::Kv => i * v + j,
            StateLayout::Vk => j * k + i,
        }
    }
}

/// How the forward is computed. `Auto` picks per call from the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Chunked (chunk 64) where `ops::auto_chunked` says so (scalar gate and a sequence of at least
    /// `ops::AUTO_CHUNKED_MIN_LEN` tokens), else recurrent.
    #[default]
    Auto,
    /// Token-by-token recurrence with the state on chip. Supports every option.
    Recurrent,
    /// Chunked WY/UT form with chunks of `chunk` tokens (16, 32 or 64); scalar gate only (a per-key
    /// gate is refused with `Error::Unsupported`; `Auto` sends it to the recurrent kernel). Masks,
    /// h0/ht, cu_seqlens, GQA and both conventions are supported.
    Chunked { chunk: u32 },
}

/// Options of one call, named as users know them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    pub gate_space: GateSpace,
    pub state_layout: StateLayout,
    /// Output scale; `None` means `1/sqrt(K)`.
    pub scale: Option<f32>,
    /// Return the final state `ht`.
    pub output_final_state: bool,
    pub algorithm: Algorithm,
    /// Accumulate gradients without atomics (bitwise repeatable).
    pub deterministic: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gate_space: GateSpace::Log,
            state_layout: StateLayout::Kv,
            scale: None,
            output_final_state: false,
            algorithm: Algorithm::Auto,
            deterministic: false,
        }
    }
}

impl Options {
    /// The mlx-lm / MLX Swift convention: linear gate, `vk` state, scale 1.
    pub fn mlx() -> Self {
        Options { gate_space: GateSpace::Linear, state_layout: StateLayout::Vk, scale: Some(1.0), ..Self::default() }
    }
}

/// Shape and dtype of one tensor, as seen by validation (host or device alike).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorMeta {
    pub fn new(shape: &[usize], dtype: DType) -> Self {
        TensorMeta { shape: shape.to_vec(), dtype }
    }
}

/// The metadata of every input of a call, before validation.
#[derive(Clone, Debug, Default)]
pub struct InputsMeta {
    pub q: Option<TensorMeta>,
    pub k: Option<TensorMeta>,
    pub v: Option<TensorMeta>,
    pub g: Option<TensorMeta>,
    pub beta: Option<TensorMeta>,
    pub h0: Option<TensorMeta>,
    pub mask: Option<TensorMeta>,
    /// Upstream gradient of `o` (backward only).
    pub d_o: Option<TensorMeta>,
    /// Upstream gradient of the final state (backward only).
    pub dht: Option<TensorMeta>,
}

/// Sequence boundaries on the flattened `[B*T]` token axis: sequence `n` is rows
/// `offsets[n] .. offsets[n+1]`. Without `cu_seqlens` these are `0, T, 2T, ..., B*T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequences {
    pub offsets: Vec<u32>,
    /// True when the boundaries came from `cu_seqlens`.
    pub varlen: bool,
}

impl Sequences {
    /// Number of sequences `N`.
    pub fn count(&self) -> usize {
        self.offsets.len() - 1
    }
    /// Rows of sequence `n`.
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        self.offsets[n] as usize..self.offsets[n + 1] as usize
    }
    /// Longest sequence.
    pub fn max_len(&self) -> usize {
        (0..self.count()).map(|n| self.range(n).len()).max().unwrap_or(0)
    }
}

/// A validated call: every shape, dtype and option checked; what the planner and kernels read.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub dims: Dims,
    pub gate: GateKind,
    /// dtype of q, k and v.
    pub dtype: DType,
    pub g_dtype: DType,
    pub beta_dtype: DType,
    pub has_h0: bool,
    pub has_mask: bool,
    pub seqs: Sequences,
    pub gate_space: GateSpace,
    pub state_layout: StateLayout,
    /// Resolved scale (default `1/sqrt(K)`).
    pub scale: f32,
    pub output_final_state: bool,
    pub algorithm: Algorithm,
    pub deterministic: bool,
}

fn shape_err(name: &'static str, got: &[usize], expected: String) -> Error {
    Error::Shape { name, got: got.to_vec(), expected }
}

fn expect_shape(name: &'static str, m: &TensorMeta, want: &[usize], pretty: &str) -> Result<()> {
    if m.shape != want {
        return Err(shape_err(name, &m.shape, format!("{pretty} = {want:?}")));
    }
    Ok(())
}

fn expect_float(name: &'static str, m: &TensorMeta) -> Result<()> {
    if !m.dtype.is_float() {
        return Err(Error::DType { name, got: m.dtype, expected: "F32, F16 or BF16".into() });
    }
    Ok(())
}

/// Checks a head dimension: a multiple of 16 from 16 to 256.
pub fn check_head_dim(which: &'static str, d: usize) -> Result<()> {
    if d == 0 || !d.is_multiple_of(16) || d > 256 {
        return Err(Error::HeadDim { which, got: d });
    }
    Ok(())
}

/// Validates `cu_seqlens` against the packed length `t`: starts at 0, non-decreasing, ends at `t`.
pub fn check_cu_seqlens(cu: &[i64], t: usize) -> Result<Sequences> {
    if cu.len() < 2 {
        return Err(Error::CuSeqlens(format!("needs at least 2 entries (N+1 with N >= 1), got {}", cu.len())));
    }
    if cu[0] != 0 {
        return Err(Error::CuSeqlens(format!("must start at 0, starts at {}", cu[0])));
    }
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::CuSeqlens(format!(
                "must be non-decreasing: entry {} is {} after {}",
                i + 1,
                w[1],
                w[0]
            )));
        }
    }
    let last = *cu.last().unwrap_or(&0);
    if last != t as i64 {
        return Err(Error::CuSeqlens(format!("must end at T = {t}, ends at {last}")));
    }
    if t > u32::MAX as usize / 2 {
        return Err(Error::CuSeqlens(format!("T = {t} is too long")));
    }
    Ok(Sequences { offsets: cu.iter().map(|&x| x as u32).collect(), varlen: true })
}

impl Problem {
    /// Validates shapes, dtypes and options. `cu_seqlens` are host values (they must be checked
    /// before any GPU work). `backward` also checks `do` and `dht`.
    pub fn new(m: &InputsMeta, cu_seqlens: Option<&[i64]>, opts: &Options, backward: bool) -> Result<Problem> {
        let q = m.q.as_ref().ok_or(Error::Missing("q"))?;
        let k = m.k.as_ref().ok_or(Error::Missing("k"))?;
        let v = m.v.as_ref().ok_or(Error::Missing("v"))?;
        let g = m.g.as_ref().ok_or(Error::Missing("g"))?;
        let beta = m.beta.as_ref().ok_or(Error::Missing("beta"))?;

        if q.shape.len() != 4 {
            return Err(shape_err("q", &q.shape, "[B, T, H, K]".into()));
        }
        let (b, t, h, kd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
        expect_float("q", q)?;
        if h == 0 {
            return Err(shape_err("q", &q.shape, "[B, T, H, K] with H >= 1".into()));
        }
        if b == 0 {
            return Err(shape_err("q", &q.shape, "[B, T, H, K] with B >= 1".into()));
        }
        expect_shape("k", k, &[b, t, h, kd], "[B, T, H, K]")?;
        if k.dtype != q.dtype {
            return Err(Error::DType { name: "k", got: k.dtype, expected: format!("{} (the dtype of q)", q.dtype) });
        }
        if v.shape.len() != 4 || v.shape[0] != b || v.shape[1] != t {
            return Err(shape_err("v", &v.shape, format!("[B, T, HV, V] with B = {b}, T = {t}")));
        }
        if v.dtype != q.dtype {
            return Err(Error::DType { name: "v", got: v.dtype, expected: format!("{} (the dtype of q)", q.dtype) });
        }
        let (hv, vd) = (v.shape[2], v.shape[3]);
        if hv == 0 || hv % h != 0 {
            return Err(Error::HeadGroups { h, hv });
        }
        check_head_dim("K", kd)?;
        check_head_dim("V", vd)?;
        let dims = Dims { b, t, h, hv, k: kd, v: vd };

        expect_float("g", g)?;
        let gate = if g.shape == [b, t, hv] {
            GateKind::Scalar
        } else if g.shape == [b, t, hv, kd] {
            GateKind::PerKey
        } else {
            return Err(shape_err(
                "g",
                &g.shape,
                format!("[B, T, HV] = {:?} or [B, T, HV, K] = {:?}", [b, t, hv], [b, t, hv, kd]),
            ));
        };
        expect_shape("beta", beta, &[b, t, hv], "[B, T, HV]")?;
        expect_float("beta", beta)?;

        let seqs = match cu_seqlens {
            Some(cu) => {
                if b != 1 {
                    return Err(Error::CuSeqlens(format!("requires B = 1 (packed sequences), got B = {b}")));
                }
                check_cu_seqlens(cu, t)?
            }
            None => Sequences { offsets: (0..=b).map(|i| (i * t) as u32).collect(), varlen: false },
        };
        if b.saturating_mul(t) > (u32::MAX / 2) as usize {
            return Err(shape_err("q", &q.shape, "B*T below 2^31".into()));
        }
        let n = seqs.count();
        let state_shape = match opts.state_layout {
            StateLayout::Kv => [n, hv, kd, vd],
            StateLayout::Vk => [n, hv, vd, kd],
        };
        let state_pretty = match opts.state_layout {
            StateLayout::Kv => "[N, HV, K, V]",
            StateLayout::Vk => "[N, HV, V, K]",
        };
        if let Some(h0) = &m.h0 {
            expect_shape("h0", h0, &state_shape, state_pretty)?;
            if h0.dtype != DType::F32 {
                return Err(Error::DType { name: "h0", got: h0.dtype, expected: "F32".into() });
            }
        }
        if let Some(mask) = &m.mask {
            expect_shape("mask", mask, &[b, t], "[B, T]")?;
            if !matches!(mask.dtype, DType::U8 | DType::Bool) {
                return Err(Error::DType { name: "mask", got: mask.dtype, expected: "U8 or BOOL".into() });
            }
        }
        if backward {
            let d_o = m.d_o.as_ref().ok_or(Error::Missing("do"))?;
            expect_shape("do", d_o, &[b, t, hv, vd], "[B, T, HV, V]")?;
            expect_float("do", d_o)?;
            if let Some(dht) = &m.dht {
                expect_shape("dht", dht, &state_shape, state_pretty)?;
                expect_float("dht", dht)?;
            }
        }

        let scale = match opts.scale {
            Some(s) if !s.is_finite() => {
                return Err(Error::Option { name: "scale", why: format!("must be a finite number, got {s}") })
            }
            Some(s) => s,
            None => 1.0 / (kd as f32).sqrt(),
        };
        if let Algorithm::Chunked { chunk } = opts.algorithm {
            if ![16, 32, 64].contains(&chunk) {
                return Err(Error::Option { name: "chunk", why: format!("must be 16, 32 or 64, got {chunk}") });
            }
        }
        Ok(Problem {
            dims,
            gate,
            dtype: q.dtype,
            g_dtype: g.dtype,
            beta_dtype: beta.dtype,
            has_h0: m.h0.is_some(),
            has_mask: m.mask.is_some(),
            seqs,
            gate_space: opts.gate_space,
            state_layout: opts.state_layout,
            scale,
            output_final_state: opts.output_final_state,
            algorithm: opts.algorithm,
            deterministic: opts.deterministic,
        })
    }

    /// Number of sequences `N` (rows of h0/ht).
    pub fn n_seqs(&self) -> usize {
        self.seqs.count()
    }

    /// Shape of one state tensor (`h0`, `ht`) in this call's layout.
    pub fn state_shape(&self) -> [usize; 4] {
        let d = &self.dims;
        match self.state_layout {
            StateLayout::Kv => [self.n_seqs(), d.hv, d.k, d.v],
            StateLayout::Vk => [self.n_seqs(), d.hv, d.v, d.k],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(b: usize, t: usize, h: usize, hv: usize, k: usize, v: usize) -> InputsMeta {
        InputsMeta {
            q: Some(TensorMeta::new(&[b, t, h, k], DType::F32)),
            k: Some(TensorMeta::new(&[b, t, h, k], DType::F32)),
            v: Some(TensorMeta::new(&[b, t, hv, v], DType::F32)),
            g: Some(TensorMeta::new(&[b, t, hv], DType::F32)),
            beta: Some(TensorMeta::new(&[b, t, hv], DType::F32)),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_resolve() {
        let p = Problem::new(&meta(2, 5, 2, 4, 32, 16), None, &Options::default(), false).unwrap();
        assert_eq!(p.seqs.offsets, vec![0, 5, 10]);
        assert!((p.scale - 1.0 / 32f32.sqrt()).abs() < 1e-7);
        assert_eq!(p.dims.group(), 2);
        assert_eq!(p.state_shape(), [2, 4, 32, 16]);
    }

    #[test]
    fn cu_seqlens_rules() {
        assert!(check_cu_seqlens(&[0, 3, 3, 7], 7).is_ok());
        assert!(matches!(check_cu_seqlens(&[1, 7], 7), Err(Error::CuSeqlens(_))));
        assert!(matches!(check_cu_seqlens(&[0, 5, 3, 7], 7), Err(Error::CuSeqlens(_))));
        assert!(matches!(check_cu_seqlens(&[0, 5], 7), Err(Error::CuSeqlens(_))));
        assert!(matches!(check_cu_seqlens(&[0], 0), Err(Error::CuSeqlens(_))));
    }
}
