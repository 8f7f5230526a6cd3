//! Specialisation of `wgsl/recurrent_bwd.wgsl` (and its Metal twin) and `wgsl/reduce_partials.wgsl`.

use super::recurrent::common_constants;
use super::recurrent::Tiles;
use super::{Accum, Kernel, PipelineKey, Reduce};
use crate::problem::{DType, Problem};

/// Largest `K * BV` the backward's per-row reduction buffer holds (`ROWS_MAX` in the WGSL).
pub const ROWS_MAX: u32 = 512;

/// Everything that selects one compiled variant of the recurrent backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardSpec {
    pub tiles: Tiles,
    pub accum: Accum,
    /// Checkpoint interval C (tokens per replayed block).
    pub every: u32,
    pub do_dtype: DType,
    /// dtype of `dht`, when given.
    pub dht: Option<DType>,
    pub dh0: bool,
}

impl BackwardSpec {
    /// The pipeline key for problem `p`.
    pub fn key(&self, p: &Problem) -> PipelineKey {
        let t = &self.tiles;
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        PipelineKey::new(
            Kernel::RecurrentBwd,
            t.reduce,
            [
                common_constants(p, t),
                vec![
                    ("DO_DT", self.do_dtype.wgsl_code() as f64),
                    ("DHT_DT", self.dht.unwrap_or(DType::F32).wgsl_code() as f64),
                    ("HAS_DHT", b(self.dht.is_some())),
                    ("HAS_DH0", b(self.dh0)),
                    ("C", self.every as f64),
                ],
            ]
            .concat(),
        )
        .with_accum(self.accum)
    }
}

/// Uniform parameters of the backward, laid out as `struct Params` in `wgsl/recurrent_bwd.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_seqs: u32,
    pub seq_base: u32,
    pub mask_off: u32,
    pub wg_per_row: u32,
    pub scale: f32,
    pub ck_blocks: u32,
    pub dh0_off: u32,
    pub qk_len: u32,
    pub g_len: u32,
    pub b_len: u32,
    pub dq_off: u32,
    pub dk_off: u32,
    pub dg_off: u32,
    pub dbeta_off: u32,
    pub _pad: [u32; 2],
}

/// Threads per workgroup of the partials reduction.
pub const REDUCE_WG: u32 = 256;

/// Pipeline key of `wgsl/reduce_partials.wgsl`.
pub fn reduce_partials_key() -> PipelineKey {
    PipelineKey::new(Kernel::ReducePartials, Reduce::Workgroup, vec![("WG", REDUCE_WG as f64)])
}

/// Uniform parameters of `wgsl/reduce_partials.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReduceParams {
    pub len: u32,
    pub slices: u32,
    pub off: u32,
    pub _pad: u32,
}
