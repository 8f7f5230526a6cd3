//! Kernels: the WGSL sources, the typed specialisations that become override constants, and the
//! pipeline cache keyed by them.
//!
//! One templating mechanism only: a module is `prelude + one reduction variant + the pass's file`
//! (the chunked passes take `chunk_common.wgsl` in place of a reduction variant).
//! The reduction variant is chosen by source because subgroup builtins fail validation on a device
//! without subgroups even in dead code, which an override cannot switch off. Everything else (dims,
//! dtypes, flags, tile sizes) is a WGSL `override` constant.

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
    pub const RECURRENT_FWD: &str = include_str!("../../wgsl/recurrent_fwd.wgsl");
    pub const CHUNK_COMMON: &str = include_str!("../../wgsl/chunk_common.wgsl");
    pub const CHUNK_CUMSUM: &str = include_str!("../../wgsl/chunk_cumsum.wgsl");
    pub const CHUNK_KKT_SOLVE: &str = include_str!("../../wgsl/chunk_kkt_solve.wgsl");
    pub const CHUNK_WU: &str = include_str!("../../wgsl/chunk_wu.wgsl");
    pub const CHUNK_STATE: &str = include_str!("../../wgsl/chunk_state.wgsl");
    pub const CHUNK_OUTPUT: &str = include_str!("../../wgsl/chunk_output.wgsl");
}

/// Every compute pass wgdelta has, one per WGSL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    RecurrentFwd,
    /// Chunked forward, step 1: in-chunk cumulative log-decay.
    ChunkCumsum,
    /// Chunked forward, step 2: K K^T with its decay mask, and A = (I + N)^-1.
    ChunkKktSolve,
    /// Chunked forward, step 3: w = A (beta exp(gc) K), u = A (beta V).
    ChunkWu,
    /// Chunked forward, step 4: the chunk-to-chunk state walk (per-chunk states, v_new, ht).
    ChunkState,
    /// Chunked forward, step 5: the output.
    ChunkOutput,
}

/// How the threads sharing a state column reduce: subgroup shuffles or workgroup memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduce {
    Subgroup,
    Workgroup,
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
    pub const ALL: [Kernel; 6] = [
        Kernel::RecurrentFwd,
        Kernel::ChunkCumsum,
        Kernel::ChunkKktSolve,
        Kernel::ChunkWu,
        Kernel::ChunkState,
        Kernel::ChunkOutput,
    ];

    /// Label used on every wgpu object made for this kernel.
    pub fn label(self) -> &'static str {
        match self {
            Kernel::RecurrentFwd => "wgdelta.recurrent.fwd",
            Kernel::ChunkCumsum => "wgdelta.chunk.cumsum",
            Kernel::ChunkKktSolve => "wgdelta.chunk.kkt_solve",
            Kernel::ChunkWu => "wgdelta.chunk.wu",
            Kernel::ChunkState => "wgdelta.chunk.state",
            Kernel::ChunkOutput => "wgdelta.chunk.output",
        }
    }
    /// The pass's own WGSL file.
    pub fn body(self) -> &'static str {
        match self {
            Kernel::RecurrentFwd => src::RECURRENT_FWD,
            Kernel::ChunkCumsum => src::CHUNK_CUMSUM,
            Kernel::ChunkKktSolve => src::CHUNK_KKT_SOLVE,
            Kernel::ChunkWu => src::CHUNK_WU,
            Kernel::ChunkState => src::CHUNK_STATE,
            Kernel::ChunkOutput => src::CHUNK_OUTPUT,
        }
    }
    /// Binding layout, in order.
    pub fn slots(self) -> &'static [Slot] {
        use Slot::*;
        match self {
            Kernel::RecurrentFwd => &[Uniform, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite],
            // Chunked passes: params, chunk table, then the pass's own buffers (see its WGSL).
            Kernel::ChunkCumsum => &[Uniform, Read, Read, Read, ReadWrite, ReadWrite],
            Kernel::ChunkKktSolve => &[Uniform, Read, Read, Read, Read, ReadWrite],
            Kernel::ChunkWu => &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite],
            Kernel::ChunkState => &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite],
            Kernel::ChunkOutput => &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite],
        }
    }
    /// Whether the kernel contains a KT-wide column reduction (and so takes a [`Reduce`] variant).
    pub fn reduces(self) -> bool {
        matches!(self, Kernel::RecurrentFwd)
    }
    /// Whether the kernel is one of the chunked passes (assembled with `chunk_common.wgsl`).
    pub fn chunked(self) -> bool {
        matches!(
            self,
            Kernel::ChunkCumsum | Kernel::ChunkKktSolve | Kernel::ChunkWu | Kernel::ChunkState | Kernel::ChunkOutput
        )
    }
}

/// Assembles the full WGSL module of `kernel` with the given reduction variant.
pub fn assemble(kernel: Kernel, reduce: Reduce) -> String {
    let mut s = String::from(src::PRELUDE);
    if kernel.reduces() {
        s.push_str(match reduce {
            Reduce::Subgroup => src::REDUCE_SUBGROUP,
            Reduce::Workgroup => src::REDUCE_WORKGROUP,
        });
    }
    if kernel.chunked() {
        s.push_str(src::CHUNK_COMMON);
    }
    s.push_str(kernel.body());
    s
}

/// A fully specialised pipeline: kernel, source variant and override constants (sorted by name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub kernel: Kernel,
    pub reduce: Reduce,
    /// (name, value bits as f64) — f64 because that is how wgpu takes override values.
    pub constants: Vec<(&'static str, u64)>,
}

impl PipelineKey {
    pub fn new(kernel: Kernel, reduce: Reduce, mut constants: Vec<(&'static str, f64)>) -> Self {
        constants.sort_by(|a, b| a.0.cmp(b.0));
        PipelineKey { kernel, reduce, constants: constants.into_iter().map(|(n, v)| (n, v.to_bits())).collect() }
    }
    fn constants_f64(&self) -> Vec<(&'static str, f64)> {
        self.constants.iter().map(|&(n, b)| (n, f64::from_bits(b))).collect()
    }
}

/// Caches shader modules, bind group layouts and pipelines, so each specialisation compiles once.
#[derive(Default)]
pub struct KernelCache {
    modules: Mutex<HashMap<(Kernel, Reduce), wgpu::ShaderModule>>,
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
        let module = {
            let mut mods = self.modules.lock().map_err(|_| poisoned())?;
            match mods.get(&(key.kernel, key.reduce)) {
                Some(m) => m.clone(),
                None => {
                    let m = gpu.shader_module(key.kernel.label(), &assemble(key.kernel, key.reduce))?;
                    mods.insert((key.kernel, key.reduce), m.clone());
                    m
                }
            }
        };
        let (_, layout) = self.layouts(gpu, key.kernel)?;
        let constants = key.constants_f64();
        let label = key.kernel.label();
        let p = gpu.scoped(label, || {
            gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: Some(&layout),
                module: &module,
                entry_point: Some("main"),
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
