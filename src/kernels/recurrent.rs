//! Specialisation of `wgsl/recurrent_fwd.wgsl`: tile sizes chosen from the device, flags from the problem.

use super::{Kernel, PipelineKey, Reduce};
use crate::device::Caps;
use crate::problem::{GateKind, GateSpace, Problem, StateLayout};

/// Where the initial state comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateSrc {
    Zeros = 0,
    /// The read-only `h0` binding.
    H0 = 1,
    /// The read-write `state` binding itself (decode against a state pool, in place).
    InPlace = 2,
}

/// Thread layout of one workgroup: KT threads per value column, KR rows each, BV columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    pub kt: u32,
    pub kr: u32,
    pub bv: u32,
    pub reduce: Reduce,
}

/// Largest rows-per-thread the kernel's register arrays hold (`MAX_KR` in the WGSL).
pub const MAX_KR: u32 = 16;
/// Largest K * BV the kernel's staging tile holds (`TILE_MAX` in the WGSL).
pub const TILE_MAX: u32 = 4096;
/// Largest workgroup the workgroup-memory reduction supports (`RED_SLOTS`).
pub const MAX_WG: u32 = 256;
/// Sequences up to this many tokens use the decode layout and tilings (see [`Tiles::choose`]).
pub const DECODE_MAX_LEN: usize = 16;
/// Decode with at least this many (sequence, value head) pairs uses [`Tiles::decode_wide`] (32
/// columns per workgroup), fewer [`Tiles::choose`]'s decode tiles (16). On an H100 (docs/PERF.md,
/// R64-R65, per call in a repeated graph): 4 to 64 pairs run fastest with 16 columns (B=2 of 32
/// heads 4.55 us against 4.74), 96 pairs and more with 32 (B=3 5.46 against 6.16 us); one
/// sequence of 32 heads is a tie (3.74 against 3.71 us).
pub const DECODE_WIDE_MIN_HEADS: usize = 96;

impl Tiles {
    /// Default tiling for head dims `k`, `v` on a device and the longest sequence `max_len`.
    ///
    /// Long sequences: about 8 rows per thread and 16 value columns per workgroup (the per-token
    /// reduction chain dominates: more columns share its latency). Measured on an H100
    /// (docs/PERF.md): (KT, KR, BV) = (16, 8, 16) prefills T=1024 in 0.70 ms against 0.96 ms for
    /// (16, 8, 8). Decode (a few tokens, moving the state dominates): 16 rows per thread and 16
    /// columns, (8, 16, 16) for K = 128: one sequence of 32 heads decodes in 3.74 us per call
    /// against 4.38 us for (16, 8, 8) and 4.04 for (8, 16, 8) (R64); many sequences take
    /// [`Tiles::decode_wide`]. Subgroup reduction when a column's threads fit in the smallest
    /// subgroup.
    pub fn choose(k: usize, v: usize, max_len: usize, caps: &Caps) -> Tiles {
        if max_len <= DECODE_MAX_LEN {
            Self::fit(k, v, 16, 16, caps)
        } else {
            Self::fit(k, v, 8, 16, caps)
        }
    }

    /// About `rows` rows per thread and at most `bv` columns per workgroup, narrowed until the
    /// workgroup, the staging tile and V's divisibility allow it.
    fn fit(k: usize, v: usize, rows: u32, bv: u32, caps: &Caps) -> Tiles {
        let k = k as u32;
        let kt = k.div_ceil(rows).next_power_of_two().max(2);
        let kr = k.div_ceil(kt);
        let mut bv = bv;
        while bv > 1
            && (kt * bv > MAX_WG.min(caps.max_invocations) || k * bv > TILE_MAX || !(v as u32).is_multiple_of(bv))
        {
            bv /= 2;
        }
        let reduce = if caps.subgroup && kt <= caps.subgroup_min { Reduce::Subgroup } else { Reduce::Workgroup };
        Tiles { kt, kr, bv, reduce }
    }

    /// The backward's tiling from this one: the same threads per column, with BV halved until the
    /// workgroup's per-row reduction buffer (`K * BV <= ROWS_MAX` in `wgsl/recurrent_bwd.wgsl`) fits.
    pub fn for_backward(self, k: usize) -> Tiles {
        let mut t = self;
        while t.bv > 1 && k as u32 * t.bv > super::backward::ROWS_MAX {
            t.bv /= 2;
        }
        t
    }

    /// Decode tiling (the state traffic dominates): 16 rows per thread and 32 columns per
    /// workgroup, so the columns-fastest decode layout moves each state row as one 128-byte
    /// segment. Measured on an H100: B=256 decodes in 0.40 ms (90% of the bandwidth floor) against
    /// 0.66 ms with (16, 8, 8); see [`DECODE_WIDE_MIN_HEADS`].
    pub fn decode_wide(k: usize, v: usize, caps: &Caps) -> Tiles {
        Self::fit(k, v, 16, 32, caps)
    }

    /// Whether this tiling is valid for `k`, `v` (used to vet user overrides).
    pub fn valid(&self, k: usize, v: usize, caps: &Caps) -> bool {
        let (k, v) = (k as u32, v as u32);
        self.kt.is_power_of_two()
            && self.kt >= 2
            && self.kr >= 1
            && self.kr <= MAX_KR
            && self.kt * self.kr >= k
            && self.bv >= 1
            && v.is_multiple_of(self.bv)
            && k * self.bv <= TILE_MAX
            && self.kt * self.bv <= MAX_WG.min(caps.max_invocations)
            && (self.reduce == Reduce::Workgroup || (caps.subgroup && self.kt <= caps.subgroup_min))
    }
}

/// Everything that selects one compiled variant of the recurrent forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecurrentSpec {
    pub tiles: Tiles,
    pub state_src: StateSrc,
    pub store_state: bool,
    pub use_slots: bool,
    /// Decode layout: state straight to registers, columns fastest for kv (see `COL_FAST`, `STAGE`).
    pub decode: bool,
    /// Save the state every this many tokens into the checkpoint binding (0: off).
    pub checkpoint: u32,
    /// The grid's y extent whenever it has more than one z layer: the device's
    /// `max_workgroups_per_dim` (see `ops::recurrent::record`). An override rather than a uniform
    /// so the sequence index, and the slot read that depends on it, wait for no uniform load.
    pub max_y: u32,
}

/// The override constants `wgsl/recurrent_common.wgsl` declares (shapes, tiling, input dtypes,
/// conventions), shared by the recurrent forward's and backward's keys.
pub(crate) fn common_constants(p: &Problem, t: &Tiles) -> Vec<(&'static str, f64)> {
    let d = &p.dims;
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    vec![
        ("H", d.h as f64),
        ("HV", d.hv as f64),
        ("K", d.k as f64),
        ("V", d.v as f64),
        ("BV", t.bv as f64),
        ("KT", t.kt as f64),
        ("KR", t.kr as f64),
        ("QKV_DT", p.dtype.wgsl_code() as f64),
        ("G_DT", p.g_dtype.wgsl_code() as f64),
        ("BETA_DT", p.beta_dtype.wgsl_code() as f64),
        ("GATE_PER_KEY", b(p.gate == GateKind::PerKey)),
        ("GATE_LINEAR", b(p.gate_space == GateSpace::Linear)),
        ("LAYOUT_VK", b(p.state_layout == StateLayout::Vk)),
        ("HAS_MASK", b(p.has_mask)),
    ]
}

impl RecurrentSpec {
    /// The pipeline key for problem `p`.
    pub fn key(&self, p: &Problem) -> PipelineKey {
        let d = &p.dims;
        let t = &self.tiles;
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        let col_fast = self.decode && p.state_layout == StateLayout::Kv;
        // Columns-fastest spreads a column's threads over the workgroup: workgroup-memory reduction.
        let reduce = if col_fast { Reduce::Workgroup } else { t.reduce };
        let stage = !self.decode;
        PipelineKey::new(
            Kernel::RecurrentFwd,
            reduce,
            [
                common_constants(p, t),
                vec![
                    ("STATE_SRC", self.state_src as u32 as f64),
                    ("STORE_STATE", b(self.store_state)),
                    ("USE_SLOTS", b(self.use_slots)),
                    ("COL_FAST", b(col_fast)),
                    ("STAGE", b(stage)),
                    ("TILE_LEN", if stage { (d.k as u32 * t.bv) as f64 } else { 1.0 }),
                    ("VARLEN", b(p.seqs.varlen)),
                    ("CHECKPOINT", self.checkpoint as f64),
                    ("MAX_Y", self.max_y as f64),
                ],
            ]
            .concat(),
        )
    }
}

/// Uniform parameters, laid out as `struct Params` in the WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_seqs: u32,
    /// First seq offset in `info` (after the slots; 0 without).
    pub seq_off: u32,
    pub mask_off: u32,
    pub scale: f32,
    pub t: u32,
    pub seg_start: u32,
    pub seg_len: u32,
    /// Checkpoint blocks per (sequence, head) in the checkpoint binding.
    pub ck_blocks: u32,
}

// A uniform struct's size is a multiple of 16 bytes.
const _: () = assert!(std::mem::size_of::<Params>().is_multiple_of(16));
