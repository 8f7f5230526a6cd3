//! Kernels: the WGSL sources, the typed specialisations that become override constants, and the
//! pipeline cache keyed by them.
//!
//! One templating mechanism only: a module is `prelude + one reduction variant + one accumulation
//! variant + the pass's file`, each part a whole file (the chunked passes take `chunk_common.wgsl`,
//! their shared parameters and chunk table, instead). The reduction variant is chosen by source
//! because subgroup builtins fail validation on a device without subgroups even in dead code, which
//! an override cannot switch off; the accumulation variant because atomics change a binding's type.
//! Everything else (dims, dtypes, flags, tile sizes) is a WGSL `override` constant.
//!
//! A kernel may have a hand-written Metal twin in `msl_overrides/` ([`Kernel::msl_override`]), used
//! through wgpu's passthrough shaders on Metal; its constants come from the same [`PipelineKey`]
//! ([`msl_constants`]), and a test checks that its bindings match the WGSL twin's.

pub mod backward;
pub mod chunked;
pub mod recurrent;

use crate::device::Gpu;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// WGSL sources, embedded at build time.
pub mod src {
    pub const PRELUDE: &str = include_str!("../../wgsl/prelude.wgsl");
    pub const REDUCE_SUBGROUP: &str = include_str!("../../wgsl/reduce_subgroup.wgsl");
    pub const REDUCE_WORKGROUP: &str = include_str!("../../wgsl/reduce_workgroup.wgsl");
    pub const RECURRENT_COMMON: &str = include_str!("../../wgsl/recurrent_common.wgsl");
    pub const RECURRENT_FWD: &str = include_str!("../../wgsl/recurrent_fwd.wgsl");
    pub const CHUNK_COMMON: &str = include_str!("../../wgsl/chunk_common.wgsl");
    pub const CHUNK_KKT_SOLVE: &str = include_str!("../../wgsl/chunk_kkt_solve.wgsl");
    pub const CHUNK_WU: &str = include_str!("../../wgsl/chunk_wu.wgsl");
    pub const CHUNK_PACK16: &str = include_str!("../../wgsl/chunk_pack16.wgsl");
    pub const CHUNK_STATE_COMMON: &str = include_str!("../../wgsl/chunk_state_common.wgsl");
    pub const CHUNK_QK: &str = include_str!("../../wgsl/chunk_qk.wgsl");
    pub const CHUNK_STATE: &str = include_str!("../../wgsl/chunk_state.wgsl");
    pub const CHUNK_STATE_MMA: &str = include_str!("../../wgsl/chunk_state_mma.wgsl");
    pub const CHUNK_MMA_STAGE: &str = include_str!("../../wgsl/chunk_mma_stage.wgsl");
    pub const CHUNK_OUTPUT: &str = include_str!("../../wgsl/chunk_output.wgsl");
    pub const CHUNK_OUTPUT_MMA: &str = include_str!("../../wgsl/chunk_output_mma.wgsl");
    pub const CHUNK_BWD_LOCAL_MMA: &str = include_str!("../../wgsl/chunk_bwd_local_mma.wgsl");
    pub const CHUNK_MMA_QK: &str = include_str!("../../wgsl/chunk_mma_qk.wgsl");
    pub const CHUNK_BWD_COMMON: &str = include_str!("../../wgsl/chunk_bwd_common.wgsl");
    pub const CHUNK_BWD_LOCAL: &str = include_str!("../../wgsl/chunk_bwd_local.wgsl");
    pub const CHUNK_BWD_STATE: &str = include_str!("../../wgsl/chunk_bwd_state.wgsl");
    pub const CHUNK_BWD_STATE_MMA: &str = include_str!("../../wgsl/chunk_bwd_state_mma.wgsl");
    pub const CHUNK_BWD_STATE_COMMON: &str = include_str!("../../wgsl/chunk_bwd_state_common.wgsl");
    pub const CHUNK_BWD_DQKWG: &str = include_str!("../../wgsl/chunk_bwd_dqkwg.wgsl");
    pub const CHUNK_BWD_WY: &str = include_str!("../../wgsl/chunk_bwd_wy.wgsl");
    pub const CHUNK_BWD_REDUCE: &str = include_str!("../../wgsl/chunk_bwd_reduce.wgsl");
    pub const RECURRENT_BWD: &str = include_str!("../../wgsl/recurrent_bwd.wgsl");
    pub const REDUCE_PARTIALS: &str = include_str!("../../wgsl/reduce_partials.wgsl");
    pub const ACCUM_F32_ATOMIC: &str = include_str!("../../wgsl/accum_f32_atomic.wgsl");
    pub const ACCUM_CAS: &str = include_str!("../../wgsl/accum_cas.wgsl");
    pub const ACCUM_PARTIALS: &str = include_str!("../../wgsl/accum_partials.wgsl");
    /// Metal twin of `RECURRENT_BWD` with the `ACCUM_F32_ATOMIC` variant.
    pub const RECURRENT_BWD_MSL: &str = include_str!("../../msl_overrides/recurrent_bwd.metal");
}

/// Every compute pass wgdelta has, one per WGSL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    RecurrentFwd,
    /// Chunked forward, steps 1-2: the in-chunk cumulative log-decay, K K^T with its decay mask, and
    /// A = (I + N)^-1 (the gates only with `SOLVE` = false, for a backward).
    ChunkKktSolve,
    /// Chunked forward, step 3: w = A (beta exp(gc) K), u = A (beta V).
    ChunkWu,
    /// Before step 5 on cooperative matrices: q as f16 (the other f16 operands come from w/u and the
    /// state walk).
    ChunkPack16,
    /// Chunked forward, step 4: the chunk-to-chunk state walk (per-chunk states, v_new, ht).
    ChunkState,
    /// Step 4 on cooperative matrices (f16 operands, f32 accumulation): same bindings and outputs,
    /// except that binding 4 is the f16 operands `chunk_wu.wgsl` writes (W16) instead of w.
    ChunkStateMma,
    /// Chunked forward, step 5: the output.
    ChunkOutput,
    /// Step 5 on cooperative matrices, from f16 operands that the pack and state passes write
    /// with `OUT16` (q, k; S, v_new).
    ChunkOutputMma,
    /// Chunked backward, step 1: v_new from the saved state, and the chunk-local dv.
    ChunkBwdLocal,
    /// Step 1 on cooperative matrices, from the f16 operands of the recompute passes (q, k from the
    /// pack and w/u passes, -w from w/u) instead of q, k and w.
    ChunkBwdLocalMma,
    /// Chunked backward, step 2: the reverse walk of dS over chunks (dh per chunk, dv_new, dh0).
    ChunkBwdState,
    /// Step 2 on cooperative matrices, from the f16 operands of the recompute passes (-w and
    /// K ∘ decay from w/u, q from the pack pass) instead of w, k and q.
    ChunkBwdStateMma,
    /// Chunked backward, step 3: dq, dk per value head, dw, and the gate's terms.
    ChunkBwdDqkwg,
    /// Chunked backward, step 4: back through A; dv, dbeta, dg.
    ChunkBwdWy,
    /// Chunked backward, step 5: dq, dk summed over the value heads of each key head.
    ChunkBwdReduce,
    RecurrentBwd,
    ReducePartials,
}

/// How the threads sharing a state column reduce: subgroup shuffles or workgroup memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduce {
    Subgroup,
    Workgroup,
}

/// How a backward kernel adds up gradients that several workgroups contribute to (dq, dk over the
/// V tiles and the value heads of a key head; dg, dbeta over the V tiles). Every variant first sums
/// over the workgroup's own columns in workgroup memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accum {
    /// WGSL `atomic<f32>` adds (needs `SHADER_FLOAT32_ATOMIC`).
    F32Atomic,
    /// A compare-and-swap loop on `atomic<u32>` words: needs nothing.
    CasLoop,
    /// No atomics: per-slice partials, then a fixed-order reduction pass. Bitwise repeatable.
    Deterministic,
}

/// How a kernel's resources are bound, in binding order (group 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Uniform,
    Read,
    ReadWrite,
}

impl Kernel {
    /// All kernels, for tests that compile every one.
    pub const ALL: [Kernel; 17] = [
        Kernel::RecurrentFwd,
        Kernel::RecurrentBwd,
        Kernel::ReducePartials,
        Kernel::ChunkKktSolve,
        Kernel::ChunkWu,
        Kernel::ChunkPack16,
        Kernel::ChunkState,
        Kernel::ChunkStateMma,
        Kernel::ChunkOutput,
        Kernel::ChunkOutputMma,
        Kernel::ChunkBwdLocal,
        Kernel::ChunkBwdLocalMma,
        Kernel::ChunkBwdState,
        Kernel::ChunkBwdStateMma,
        Kernel::ChunkBwdDqkwg,
        Kernel::ChunkBwdWy,
        Kernel::ChunkBwdReduce,
    ];

    /// Label used on every wgpu object made for this kernel.
    pub fn label(self) -> &'static str {
        match self {
            Kernel::RecurrentFwd => "wgdelta.recurrent.fwd",
            Kernel::ChunkKktSolve => "wgdelta.chunk.kkt_solve",
            Kernel::ChunkWu => "wgdelta.chunk.wu",
            Kernel::ChunkPack16 => "wgdelta.chunk.pack16",
            Kernel::ChunkState => "wgdelta.chunk.state",
            Kernel::ChunkStateMma => "wgdelta.chunk.state_mma",
            Kernel::ChunkOutput => "wgdelta.chunk.output",
            Kernel::ChunkOutputMma => "wgdelta.chunk.output_mma",
            Kernel::ChunkBwdLocal => "wgdelta.chunk.bwd_local",
            Kernel::ChunkBwdLocalMma => "wgdelta.chunk.bwd_local_mma",
            Kernel::ChunkBwdState => "wgdelta.chunk.bwd_state",
            Kernel::ChunkBwdStateMma => "wgdelta.chunk.bwd_state_mma",
            Kernel::ChunkBwdDqkwg => "wgdelta.chunk.bwd_dqkwg",
            Kernel::ChunkBwdWy => "wgdelta.chunk.bwd_wy",
            Kernel::ChunkBwdReduce => "wgdelta.chunk.bwd_reduce",
            Kernel::RecurrentBwd => "wgdelta.recurrent.bwd",
            Kernel::ReducePartials => "wgdelta.reduce_partials",
        }
    }
    /// The pass's own WGSL file.
    pub fn body(self) -> &'static str {
        match self {
            Kernel::RecurrentFwd => src::RECURRENT_FWD,
            Kernel::ChunkKktSolve => src::CHUNK_KKT_SOLVE,
            Kernel::ChunkWu => src::CHUNK_WU,
            Kernel::ChunkPack16 => src::CHUNK_PACK16,
            Kernel::ChunkState => src::CHUNK_STATE,
            Kernel::ChunkStateMma => src::CHUNK_STATE_MMA,
            Kernel::ChunkOutput => src::CHUNK_OUTPUT,
            Kernel::ChunkOutputMma => src::CHUNK_OUTPUT_MMA,
            Kernel::ChunkBwdLocal => src::CHUNK_BWD_LOCAL,
            Kernel::ChunkBwdLocalMma => src::CHUNK_BWD_LOCAL_MMA,
            Kernel::ChunkBwdState => src::CHUNK_BWD_STATE,
            Kernel::ChunkBwdStateMma => src::CHUNK_BWD_STATE_MMA,
            Kernel::ChunkBwdDqkwg => src::CHUNK_BWD_DQKWG,
            Kernel::ChunkBwdWy => src::CHUNK_BWD_WY,
            Kernel::ChunkBwdReduce => src::CHUNK_BWD_REDUCE,
            Kernel::RecurrentBwd => src::RECURRENT_BWD,
            Kernel::ReducePartials => src::REDUCE_PARTIALS,
        }
    }
    /// Binding layout, in order.
    pub fn slots(self) -> &'static [Slot] {
        use Slot::*;
        match self {
            // u, q, k, v, g, beta, info, h0 | o, state, ckpt
            Kernel::RecurrentFwd => {
                &[Uniform, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite]
            }
            // u, q, k, v, g, beta, info, do, dht, ckpt | dv, work, acc
            Kernel::RecurrentBwd => {
                &[Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite]
            }
            Kernel::ReducePartials => &[Uniform, Read, ReadWrite],
            // Chunked passes: params, chunk table, then the pass's own buffers (see its WGSL).
            // k | gc, bm, a | g, beta
            Kernel::ChunkKktSolve => &[Uniform, Read, Read, ReadWrite, ReadWrite, ReadWrite, Read, Read],
            // k, v, gc, bm, a | w, u, wk16, qk16
            Kernel::ChunkWu => {
                &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite, ReadWrite]
            }
            // q | qk16
            Kernel::ChunkPack16 => &[Uniform, Read, Read, ReadWrite],
            Kernel::ChunkState => &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite],
            // k, gc, wk16, u, h0 | h, vn, state, h16, vn16 | u as f16 (the same buffer as u)
            Kernel::ChunkStateMma => &[
                Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite, ReadWrite, ReadWrite,
                Read,
            ],
            Kernel::ChunkOutput => &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite],
            // qk16, gc, h16, vn16 | o
            Kernel::ChunkOutputMma => &[Uniform, Read, Read, Read, Read, Read, ReadWrite, Read, Read],
            // q, k, gc, w, u, ck, do | vn, dvn
            Kernel::ChunkBwdLocal => &[Uniform, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite],
            // qk16, gc, wk16, u, ck, do | vn, dvn
            Kernel::ChunkBwdLocalMma => &[Uniform, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite],
            // q, k, gc, w, do, dht | dvn, dh, carry
            Kernel::ChunkBwdState => {
                &[Uniform, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite]
            }
            // qk16, gc, wk16, do, dht | dvn, dh, carry
            Kernel::ChunkBwdStateMma => &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite],
            // q, k, gc, ck, dh, vn, dvn, do | dqp, dkp, dw, dgc
            Kernel::ChunkBwdDqkwg => &[
                Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite,
                ReadWrite,
            ],
            // k, v, g, gc, bm, a, dw, dvn, dgc | dkp, dm, dv, dbeta, dg
            Kernel::ChunkBwdWy => &[
                Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite,
                ReadWrite,
            ],
            // dqp, dkp | dq, dk
            Kernel::ChunkBwdReduce => &[Uniform, Read, Read, Read, ReadWrite, ReadWrite],
        }
    }
    /// Whether the kernel contains a KT-wide column reduction (and so takes a [`Reduce`] variant).
    pub fn reduces(self) -> bool {
        matches!(self, Kernel::RecurrentFwd | Kernel::RecurrentBwd)
    }
    /// Whether the kernel accumulates across workgroups (and so takes an [`Accum`] variant).
    pub fn accumulates(self) -> bool {
        matches!(self, Kernel::RecurrentBwd)
    }
    /// The hand-written Metal twin of this kernel, if any: (MSL source, entry point). It implements
    /// the [`Accum::F32Atomic`] variant only.
    pub fn msl_override(self) -> Option<(&'static str, &'static str)> {
        match self {
            Kernel::RecurrentBwd => Some((src::RECURRENT_BWD_MSL, "wgdelta_recurrent_bwd")),
            _ => None,
        }
    }
    /// Whether the kernel is one of the chunked passes (assembled with `chunk_common.wgsl`).
    pub fn chunked(self) -> bool {
        matches!(
            self,
            Kernel::ChunkKktSolve
                | Kernel::ChunkWu
                | Kernel::ChunkPack16
                | Kernel::ChunkState
                | Kernel::ChunkStateMma
                | Kernel::ChunkOutput
                | Kernel::ChunkOutputMma
        ) || self.chunk_bwd()
    }
    /// Whether the kernel is a chunked backward pass (assembled with `chunk_bwd_common.wgsl` too).
    pub fn chunk_bwd(self) -> bool {
        matches!(
            self,
            Kernel::ChunkBwdLocal
                | Kernel::ChunkBwdLocalMma
                | Kernel::ChunkBwdState
                | Kernel::ChunkBwdStateMma
                | Kernel::ChunkBwdDqkwg
                | Kernel::ChunkBwdWy
                | Kernel::ChunkBwdReduce
        )
    }
    /// Whether the kernel runs on cooperative matrices (assembled after [`mma_header`]).
    pub fn mma(self) -> bool {
        matches!(
            self,
            Kernel::ChunkStateMma | Kernel::ChunkOutputMma | Kernel::ChunkBwdLocalMma | Kernel::ChunkBwdStateMma
        )
    }
}

/// Tile sizes the cooperative-matrix kernels are written for: 16x16x16 (NVIDIA, AMD, Intel through
/// Vulkan) and 8x8x8 (Apple's simdgroup matrices).
pub const MMA_TILES: [u32; 2] = [16, 8];

/// The header of a cooperative-matrix kernel with `tile` x `tile` matrices: the `enable`s and the
/// tile types `MA`, `MB` (f16 operands), `MC` (f32 accumulator) and `MH` (f16 accumulator), and `CT`.
/// The only thing that differs between tile sizes is this text, because WGSL spells the size in the
/// type's name.
pub fn mma_header(tile: u32) -> String {
    format!(
        "enable f16;\nenable wgpu_cooperative_matrix;\n\
         alias MA = coop_mat{tile}x{tile}<f16, A>;\nalias MB = coop_mat{tile}x{tile}<f16, B>;\n\
         alias MC = coop_mat{tile}x{tile}<f32, C>;\nalias MH = coop_mat{tile}x{tile}<f16, C>;\n\
         const CT: u32 = {tile}u;\n"
    )
}

/// Assembles the full WGSL module of `kernel` with the given reduction and accumulation variants
/// (each ignored by kernels that do not take it; an accumulating kernel defaults to [`Accum::CasLoop`]).
/// A cooperative-matrix kernel is assembled with 16x16 tiles; see [`assemble_mma`].
pub fn assemble(kernel: Kernel, reduce: Reduce, accum: Option<Accum>) -> String {
    assemble_mma(kernel, reduce, accum, MMA_TILES[0])
}

/// [`assemble`] with `tile` x `tile` cooperative matrices for the kernels that use them.
pub fn assemble_mma(kernel: Kernel, reduce: Reduce, accum: Option<Accum>, tile: u32) -> String {
    let mut s = if kernel.mma() { mma_header(tile) } else { String::new() };
    s.push_str(src::PRELUDE);
    if kernel.reduces() {
        s.push_str(match reduce {
            Reduce::Subgroup => src::REDUCE_SUBGROUP,
            Reduce::Workgroup => src::REDUCE_WORKGROUP,
        });
    }
    if matches!(kernel, Kernel::RecurrentFwd | Kernel::RecurrentBwd) {
        s.push_str(src::RECURRENT_COMMON);
    }
    if kernel.chunked() {
        s.push_str(src::CHUNK_COMMON);
    }
    if matches!(kernel, Kernel::ChunkState | Kernel::ChunkStateMma) {
        s.push_str(src::CHUNK_STATE_COMMON);
    }
    if kernel.chunk_bwd() {
        s.push_str(src::CHUNK_BWD_COMMON);
    }
    if matches!(kernel, Kernel::ChunkBwdState | Kernel::ChunkBwdStateMma) {
        s.push_str(src::CHUNK_BWD_STATE_COMMON);
    }
    if matches!(kernel, Kernel::ChunkStateMma | Kernel::ChunkBwdStateMma) {
        s.push_str(src::CHUNK_MMA_STAGE);
    }
    if matches!(kernel, Kernel::ChunkOutputMma | Kernel::ChunkBwdLocalMma) {
        s.push_str(src::CHUNK_MMA_QK);
    }
    if matches!(kernel, Kernel::ChunkOutput | Kernel::ChunkBwdLocal) {
        s.push_str(src::CHUNK_QK);
    }
    if kernel.accumulates() {
        s.push_str(match accum.unwrap_or(Accum::CasLoop) {
            Accum::F32Atomic => src::ACCUM_F32_ATOMIC,
            Accum::CasLoop => src::ACCUM_CAS,
            Accum::Deterministic => src::ACCUM_PARTIALS,
        });
    }
    s.push_str(kernel.body());
    s
}

/// The Metal twin's constants: one `constant constexpr uint NAME = value;` line per override
/// constant of `key` (booleans as 0/1), prepended to the `.metal` source. The MSL derives the
/// defaulted overrides (GROUP, WG) itself, as the WGSL does.
pub fn msl_constants(key: &PipelineKey) -> String {
    key.constants_f64().iter().map(|(n, v)| format!("constant constexpr uint {n} = {}u;\n", *v as u64)).collect()
}

/// Whether `key` runs through the Metal twin on `gpu`: Metal backend, passthrough granted, the
/// kernel has a twin and the key asks for its accumulation variant.
pub fn uses_msl(gpu: &Gpu, key: &PipelineKey) -> bool {
    gpu.info.backend == wgpu::Backend::Metal
        && gpu.caps.passthrough
        && key.accum == Some(Accum::F32Atomic)
        && key.kernel.msl_override().is_some()
}

/// A fully specialised pipeline: kernel, source variant and override constants (sorted by name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub kernel: Kernel,
    pub reduce: Reduce,
    /// Accumulation variant (kernels that accumulate only).
    pub accum: Option<Accum>,
    /// Cooperative-matrix tile size (kernels that use them only).
    pub mma: Option<u32>,
    /// (name, value bits as f64) — f64 because that is how wgpu takes override values.
    pub constants: Vec<(&'static str, u64)>,
}

impl PipelineKey {
    pub fn new(kernel: Kernel, reduce: Reduce, mut constants: Vec<(&'static str, f64)>) -> Self {
        constants.sort_by(|a, b| a.0.cmp(b.0));
        PipelineKey {
            kernel,
            reduce,
            accum: None,
            mma: None,
            constants: constants.into_iter().map(|(n, v)| (n, v.to_bits())).collect(),
        }
    }
    /// The same key with accumulation variant `accum`.
    pub fn with_accum(mut self, accum: Accum) -> Self {
        self.accum = Some(accum);
        self
    }
    /// The key with one more override constant (kept sorted, as [`PipelineKey::new`] keeps them).
    pub fn with_constant(self, name: &'static str, value: f64) -> Self {
        let mut c = self.constants_f64();
        c.push((name, value));
        PipelineKey { constants: PipelineKey::new(self.kernel, self.reduce, c).constants, ..self }
    }
    /// The same key with `tile` x `tile` cooperative matrices.
    pub fn with_mma(mut self, tile: u32) -> Self {
        self.mma = Some(tile);
        self
    }
    pub fn constants_f64(&self) -> Vec<(&'static str, f64)> {
        self.constants.iter().map(|&(n, b)| (n, f64::from_bits(b))).collect()
    }
}

/// One WGSL module per source variant.
type ModuleKey = (Kernel, Reduce, Option<Accum>, Option<u32>);

/// Caches shader modules, bind group layouts and pipelines, so each specialisation compiles once.
#[derive(Default)]
pub struct KernelCache {
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    layouts: Mutex<HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
}

impl KernelCache {
    /// The bind group layout of `kernel`.
    pub fn bind_layout(&self, gpu: &Gpu, kernel: Kernel) -> Result<wgpu::BindGroupLayout> {
        Ok(self.layouts(gpu, kernel)?.0)
    }

    fn layouts(&self, gpu: &Gpu, kernel: Kernel) -> Result<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        let mut map = self.layouts.lock().map_err(|_| poisoned())?;
        if let Some(l) = map.get(&kernel) {
            return Ok(l.clone());
        }
        let storage = kernel.slots().iter().filter(|s| **s != Slot::Uniform).count() as u32;
        if storage > gpu.caps.max_storage_buffers {
            return Err(Error::MissingFeature(format!(
                "{storage} storage buffers per shader stage for {} (max_storage_buffers_per_shader_stage = {})",
                kernel.label(),
                gpu.caps.max_storage_buffers
            )));
        }
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .slots()
            .iter()
            .enumerate()
            .map(|(i, s)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match s {
                        Slot::Uniform => wgpu::BufferBindingType::Uniform,
                        Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Slot::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let label = kernel.label();
        let l = gpu.scoped(label, || {
            let bgl = gpu
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(label), entries: &entries });
            let pl = gpu.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(label),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
            (bgl, pl)
        })?;
        map.insert(kernel, l.clone());
        Ok(l)
    }

    /// The pipeline for `key`, compiled on first use.
    pub fn pipeline(&self, gpu: &Gpu, key: &PipelineKey) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.pipelines.lock().map_err(|_| poisoned())?.get(key) {
            return Ok(p.clone());
        }
        if key.reduce == Reduce::Subgroup && key.kernel.reduces() && !gpu.caps.subgroup {
            return Err(Error::MissingFeature(format!("SUBGROUP (for {})", key.kernel.label())));
        }
        if key.accum == Some(Accum::F32Atomic) && !gpu.caps.f32_atomic {
            return Err(Error::MissingFeature(format!("SHADER_FLOAT32_ATOMIC (for {})", key.kernel.label())));
        }
        if key.kernel.mma() && key.mma.is_none_or(|t| gpu.caps.mma_tile() != Some(t)) {
            return Err(Error::MissingFeature(format!(
                "EXPERIMENTAL_COOPERATIVE_MATRIX with {0}x{0}x{0} f16 -> f32 tiles, SHADER_F16 and SUBGROUP (for {1})",
                key.mma.unwrap_or(MMA_TILES[0]),
                key.kernel.label()
            )));
        }
        let (_, layout) = self.layouts(gpu, key.kernel)?;
        let label = key.kernel.label();
        let msl = uses_msl(gpu, key);
        let (module, entry, constants) = if let (true, Some((source, entry))) = (msl, key.kernel.msl_override()) {
            // The Metal twin: constants are compiled in, so one module per key.
            let wg: u32 =
                key.constants_f64().iter().filter(|(n, _)| *n == "KT" || *n == "BV").map(|(_, v)| *v as u32).product();
            let m = gpu.msl_module(label, &(msl_constants(key) + source), entry, wg)?;
            (m, entry, Vec::new())
        } else {
            let vkey = (key.kernel, key.reduce, key.accum, key.mma);
            let mut mods = self.modules.lock().map_err(|_| poisoned())?;
            let m = match mods.get(&vkey) {
                Some(m) => m.clone(),
                None => {
                    let src = assemble_mma(key.kernel, key.reduce, key.accum, key.mma.unwrap_or(MMA_TILES[0]));
                    let m = gpu.shader_module(label, &src)?;
                    mods.insert(vkey, m.clone());
                    m
                }
            };
            (m, "main", key.constants_f64())
        };
        let p = gpu.scoped(label, || {
            gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        })?;
        self.pipelines.lock().map_err(|_| poisoned())?.insert(key.clone(), p.clone());
        Ok(p)
    }

    /// The keys of the pipelines compiled so far (for diagnostics such as `examples/kernel_stats.rs`).
    pub fn keys(&self) -> Vec<PipelineKey> {
        self.pipelines.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Number of pipelines compiled so far.
    pub fn len(&self) -> usize {
        self.pipelines.lock().map(|m| m.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn poisoned() -> Error {
    Error::Device { context: "kernel cache".into(), message: "a thread panicked while holding the cache lock".into() }
}
