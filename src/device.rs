//! Adapter choice, granted features and limits, error scopes, and checked/unchecked shader modules.
//!
//! All direct use of wgpu's device-level API lives here and in `graph.rs`/`kernels`, so the next
//! wgpu API change touches few places.

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// Environment variable naming the adapter: an index from `wgdelta info`, a substring of its name,
/// or `cpu` / `software` for the software rasteriser.
pub const ENV_ADAPTER: &str = "WGDELTA_ADAPTER";
/// Environment variable forcing shader bounds checks on (`1`) or off (`0`).
pub const ENV_SHADER_CHECKS: &str = "WGDELTA_SHADER_CHECKS";

/// How to pick and set up the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter selector (see [`ENV_ADAPTER`]); `None` reads the environment, then picks the best.
    pub adapter: Option<String>,
    /// Force wgpu's shader runtime bounds checks. `None`: on in debug/test builds and with the
    /// `checked-shaders` feature or `WGDELTA_SHADER_CHECKS=1`, off in release builds.
    pub shader_checks: Option<bool>,
    /// Do not request optional features (to test the portable fallbacks).
    pub disable_features: wgpu::Features,
}

/// A cooperative-matrix shape the adapter offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub ab: &'static str,
    pub cr: &'static str,
}

/// What the device granted, in the terms the kernels choose variants by.
#[derive(Clone, Debug)]
pub struct Caps {
    pub f16: bool,
    pub f64: bool,
    pub subgroup: bool,
    pub subgroup_min: u32,
    pub subgroup_max: u32,
    pub f32_atomic: bool,
    pub timestamp: bool,
    pub passthrough: bool,
    pub coop_matrix: Vec<CoopShape>,
    pub max_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    pub max_storage_buffers: u32,
    pub max_workgroups_per_dim: u32,
}

impl Caps {
    /// Whether the cooperative matrices of `tile` also accumulate in f16 (`MH` of
    /// [`crate::kernels::mma_header`]).
    pub fn mma_f16_acc(&self, tile: u32) -> bool {
        self.coop_matrix.iter().any(|s| s.m == tile && s.n == tile && s.k == tile && s.ab == "f16" && s.cr == "f16")
    }

    /// The cooperative-matrix tile size the `*_mma` kernels can use here: the first of
    /// [`crate::kernels::MMA_TILES`] offered square with f16 operands and an f32 accumulator, when
    /// f16 and subgroups are granted too.
    pub fn mma_tile(&self) -> Option<u32> {
        if !(self.f16 && self.subgroup) {
            return None;
        }
        crate::kernels::MMA_TILES.into_iter().find(|&t| {
            self.coop_matrix.iter().any(|s| s.m == t && s.n == t && s.k == t && s.ab == "f16" && s.cr == "f32")
        })
    }
}

/// The device, its queue and what it can do. Cheap to clone.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) caps: Caps,
    pub(crate) features: wgpu::Features,
    pub(crate) shader_checks: bool,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("adapter", &self.info.name).field("backend", &self.info.backend).finish()
    }
}

/// One adapter as listed by [`list_adapters`].
#[derive(Clone, Debug)]
pub struct AdapterEntry {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        // Native backends only: the GL backend lacks storage features we need.
        desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    }
    wgpu::Instance::new(desc)
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    }
}

async fn adapters(inst: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut list = inst.enumerate_adapters(wgpu::Backends::all()).await;
    // Best first: discrete, integrated, virtual, other, software; stable within a class.
    list.sort_by_key(|a| std::cmp::Reverse(type_rank(a.get_info().device_type)));
    list
}

/// Lists the adapters wgdelta can use, best first (the order `WGDELTA_ADAPTER=<index>` refers to).
pub fn list_adapters() -> Vec<AdapterEntry> {
    let inst = instance();
    pollster::block_on(adapters(&inst))
        .iter()
        .enumerate()
        .map(|(index, a)| {
            let i = a.get_info();
            AdapterEntry {
                index,
                name: i.name,
                backend: format!("{:?}", i.backend),
                device_type: format!("{:?}", i.device_type),
                driver: format!("{} {}", i.driver, i.driver_info),
            }
        })
        .collect()
}

fn pick(list: Vec<wgpu::Adapter>, selector: Option<&str>) -> Result<wgpu::Adapter> {
    let names: Vec<String> = list.iter().map(|a| a.get_info().name).collect();
    if list.is_empty() {
        return Err(Error::NoAdapter(
            "no Vulkan, Metal or DX12 adapter found (on Linux without a GPU, install mesa-vulkan-drivers)".into(),
        ));
    }
    let Some(sel) = selector.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(list.into_iter().next().expect("non-empty"));
    };
    if let Ok(i) = sel.parse::<usize>() {
        let n = list.len();
        return list
            .into_iter()
            .nth(i)
            .ok_or_else(|| Error::NoAdapter(format!("adapter index {i} out of range ({n} adapters: {names:?})")));
    }
    let lower = sel.to_lowercase();
    let software = lower == "cpu" || lower == "software";
    list.into_iter()
        .find(|a| {
            let i = a.get_info();
            if software {
                i.device_type == wgpu::DeviceType::Cpu
            } else {
                i.name.to_lowercase().contains(&lower)
            }
        })
        .ok_or_else(|| Error::NoAdapter(format!("no adapter matches `{sel}` (have: {names:?})")))
}

/// Optional features wgdelta uses when the adapter has them.
fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16
        | wgpu::Features::SHADER_F64
        | wgpu::Features::SUBGROUP
        | wgpu::Features::SHADER_FLOAT32_ATOMIC
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::PASSTHROUGH_SHADERS
        | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
}

fn scalar_name(t: wgpu::CooperativeScalarType) -> &'static str {
    match format!("{t:?}").as_str() {
        "F16" => "f16",
        "F32" => "f32",
        _ => "other",
    }
}

impl Gpu {
    /// Opens the default device (see [`GpuOptions`]), blocking.
    pub fn new() -> Result<Gpu> {
        Self::with_options(&GpuOptions::default())
    }

    /// Opens a device with explicit options, blocking.
    pub fn with_options(opts: &GpuOptions) -> Result<Gpu> {
        pollster::block_on(Self::open(opts))
    }

    /// Opens a device (async).
    pub async fn open(opts: &GpuOptions) -> Result<Gpu> {
        let inst = instance();
        let env_sel = std::env::var(ENV_ADAPTER).ok();
        let sel = opts.adapter.as_deref().or(env_sel.as_deref());
        let adapter = pick(adapters(&inst).await, sel)?;
        let info = adapter.get_info();
        let features = adapter.features() & wanted_features() & !opts.disable_features;
        let limits = adapter.limits();
        let coop: Vec<CoopShape> = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            adapter
                .cooperative_matrix_properties()
                .iter()
                .map(|p| CoopShape {
                    m: p.m_size,
                    n: p.n_size,
                    k: p.k_size,
                    ab: scalar_name(p.ab_type),
                    cr: scalar_name(p.cr_type),
                })
                .collect()
        } else {
            Vec::new()
        };
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: the experimental feature is used only by the `*_mma` kernels, which bind every
            // coopLoad/coopStore pointer to a `let` and use override-constant strides (naga 30's
            // SPIR-V writer panics otherwise, ../shared/DEVICE.md); a test translates them to SPIR-V.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgdelta"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Device {
                context: format!("request_device on {}", info.name),
                message: e.to_string(),
            })?;

        let lost = Arc::new(Mutex::new(None));
        let lost2 = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = lost2.lock() {
                *l = Some(format!("{reason:?}: {msg}"));
            }
        });
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let unc2 = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut u) = unc2.lock() {
                u.push(e.to_string());
            }
        }));

        let caps = Caps {
            f16: features.contains(wgpu::Features::SHADER_F16),
            f64: features.contains(wgpu::Features::SHADER_F64),
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min: info.subgroup_min_size,
            subgroup_max: info.subgroup_max_size,
            f32_atomic: features.contains(wgpu::Features::SHADER_FLOAT32_ATOMIC),
            timestamp: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            passthrough: features.contains(wgpu::Features::PASSTHROUGH_SHADERS),
            coop_matrix: coop,
            max_binding: limits.max_storage_buffer_binding_size,
            max_buffer: limits.max_buffer_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        };
        let shader_checks = opts.shader_checks.unwrap_or_else(default_shader_checks);
        Ok(Gpu { device, queue, info, caps, features, shader_checks, lost, uncaptured })
    }

    /// What the device granted.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }
    /// The adapter's name, backend and driver.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    /// The wgpu device and queue, for tests that probe the adapter with their own shaders.
    #[doc(hidden)]
    pub fn raw(&self) -> (&wgpu::Device, &wgpu::Queue) {
        (&self.device, &self.queue)
    }
    /// Whether shader modules are created with runtime bounds checks.
    pub fn shader_checks(&self) -> bool {
        self.shader_checks
    }
    /// Granted wgpu features.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    /// A device-lost report or an uncaptured error, as a typed error.
    pub(crate) fn health(&self) -> Result<()> {
        if let Some(l) = self.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(Error::DeviceLost(l));
        }
        if let Some(m) = self.uncaptured.lock().ok().and_then(|mut u| u.pop()) {
            return Err(Error::Device { context: "uncaptured".into(), message: m });
        }
        Ok(())
    }

    /// Runs `f` inside validation and out-of-memory error scopes; a captured error becomes
    /// [`Error::Device`] naming `context`.
    pub(crate) fn scoped<T>(&self, context: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            return Err(Error::Device { context: context.to_string(), message: e.to_string() });
        }
        self.health()?;
        Ok(out)
    }

    /// Creates a shader module from WGSL, checked or unchecked per [`Gpu::shader_checks`].
    pub(crate) fn shader_module(&self, label: &str, source: &str) -> Result<wgpu::ShaderModule> {
        let desc = wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(source.into()) };
        self.scoped(label, || {
            if self.shader_checks {
                self.device.create_shader_module(desc)
            } else {
                // SAFETY: every kernel index is in bounds by construction (shapes validated on the
                // host, grids derived from them); the test suite runs the same kernels checked.
                unsafe { self.device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
            }
        })
    }

    /// Most tokens of one sequence a single dispatch may process. Software rasterisers cap loop
    /// iterations per invocation (llvmpipe: 65535 back-edges, then the loop silently exits), and
    /// GPU watchdogs end long dispatches, so long sequences run as several dispatches.
    pub fn max_tokens_per_dispatch(&self) -> usize {
        if self.info.device_type == wgpu::DeviceType::Cpu {
            1024
        } else {
            65536
        }
    }

    /// Creates a shader module from Metal source through wgpu's passthrough shaders (no naga, no
    /// bounds checks): the hand-written twins in `msl_overrides/`. `workgroup` is the entry point's
    /// threads per workgroup (MSL has no override constants for wgpu to set).
    pub(crate) fn msl_module(
        &self,
        label: &str,
        source: &str,
        entry: &str,
        workgroup: u32,
    ) -> Result<wgpu::ShaderModule> {
        let entries = [wgpu::PassthroughShaderEntryPoint { name: entry.into(), workgroup_size: (workgroup, 1, 1) }];
        let desc = wgpu::ShaderModuleDescriptorPassthrough {
            label: Some(label),
            entry_points: entries[..].into(),
            msl: Some(source.into()),
            ..Default::default()
        };
        // SAFETY: the Metal twins bind exactly the WGSL twin's layout (checked by a test against
        // naga's reflection of the WGSL) and index only inside host-validated shapes.
        self.scoped(label, || unsafe { self.device.create_shader_module_passthrough(desc) })
    }

    /// Longest sequence the recurrent backward handles in one dispatch with `kt` threads per
    /// column (see [`Gpu::max_tokens_per_dispatch`]). On software drivers the budget is 60000 loop
    /// iterations per invocation, about `8 + 4 * (reduction steps)` per token.
    pub fn max_backward_tokens(&self, kt: u32, reduce: crate::kernels::Reduce) -> usize {
        if self.info.device_type != wgpu::DeviceType::Cpu {
            return usize::MAX;
        }
        let steps = match reduce {
            crate::kernels::Reduce::Subgroup => kt.trailing_zeros(),
            crate::kernels::Reduce::Workgroup => kt,
        };
        60_000 / (8 + 4 * steps as usize)
    }

    /// Blocks until all submitted work is done.
    pub(crate) fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device { context: "poll".into(), message: e.to_string() })?;
        self.health()
    }
}

fn default_shader_checks() -> bool {
    match std::env::var(ENV_SHADER_CHECKS).ok().as_deref() {
        Some("1") | Some("true") | Some("on") => true,
        Some("0") | Some("false") | Some("off") => false,
        _ => cfg!(debug_assertions) || cfg!(feature = "checked-shaders"),
    }
}
