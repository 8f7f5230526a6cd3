//! The engine: a device plus its pipeline cache, scratch pool and settings. Every operation
//! (`forward`, `decode`, ...) is a method on it, defined in `ops/`.

use crate::device::{Gpu, GpuOptions};
use crate::error::Result;
use crate::graph::{PassGraph, PassTime, PendingTimes, Pool, Profile, Recorded};
use crate::kernels::recurrent::Tiles;
use crate::kernels::{Accum, KernelCache};
use crate::tensor::{HostTensor, Recycler, Tensor};
use std::sync::{Arc, Mutex};

/// Settings that change how (not what) the engine computes. Defaults suit production.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Fill outputs with NaN before kernels run, so an element a kernel fails to write cannot pass a
    /// comparison. `None`: on when shader bounds checks are on (debug and test builds).
    pub poison_outputs: Option<bool>,
    /// GPU time from timestamp queries, per pass or per submission (read it with
    /// [`Engine::last_profile`] or [`Engine::take_profiles`]).
    pub profile: Profile,
    /// Force the recurrent kernels' tiling (tests and tuning); invalid values are rejected.
    pub recurrent_tiles: Option<Tiles>,
    /// Scratch bytes the chunked forward may hold for one window of chunks; longer inputs are
    /// walked window by window. `None`: [`crate::kernels::chunked::DEFAULT_WINDOW_BYTES`] (1 GiB) for
    /// an inference forward, [`crate::kernels::chunked::DEFAULT_TRAIN_WINDOW_BYTES`] (2 GiB) for a
    /// training forward and the chunked backward.
    pub chunk_window_bytes: Option<u64>,
    /// Force the backward's accumulation variant (tests and tuning). `None`: deterministic when
    /// `Options::deterministic`, else float atomics when granted, else the compare-and-swap loop.
    pub accum: Option<Accum>,
    /// Tokens between the forward's saved states for the backward (`None`: 64).
    pub checkpoint_every: Option<usize>,
}

/// A device with compiled kernels and reusable scratch memory. Create one and reuse it.
pub struct Engine {
    pub(crate) gpu: Gpu,
    pub(crate) kernels: KernelCache,
    pub(crate) pool: Pool,
    /// Buffers of dropped results, for the next results of the same size.
    pub(crate) recycler: Arc<Recycler>,
    pub(crate) settings: Settings,
    /// Bound where a kernel's read-only slot is unused by this specialisation.
    pub(crate) dummy_read: wgpu::Buffer,
    /// Bound where a kernel's read-write slot is unused.
    pub(crate) dummy_write: wgpu::Buffer,
    /// Timestamps of profiled calls not yet read back (oldest first).
    profile: Mutex<Vec<PendingTimes>>,
    /// While [`Engine::batch`] runs: the calls recorded so far, submitted together at its end.
    batch: Mutex<Option<Recorded>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("gpu", &self.gpu).field("settings", &self.settings).finish()
    }
}

impl Engine {
    /// An engine on the default adapter (see [`GpuOptions`]).
    pub fn new() -> Result<Engine> {
        Ok(Self::with_gpu(Gpu::with_options(&GpuOptions::default())?))
    }

    /// An engine on an opened device.
    pub fn with_gpu(gpu: Gpu) -> Engine {
        Self::with_settings(gpu, Settings::default())
    }

    /// An engine with explicit settings.
    pub fn with_settings(gpu: Gpu, settings: Settings) -> Engine {
        let mk = |label| {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let dummy_read = mk("wgdelta.unused.read");
        let dummy_write = mk("wgdelta.unused.write");
        Engine {
            gpu,
            kernels: KernelCache::default(),
            pool: Pool::default(),
            recycler: Arc::default(),
            settings,
            dummy_read,
            dummy_write,
            profile: Mutex::new(Vec::new()),
            batch: Mutex::new(None),
        }
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The specialisations compiled so far, one key per pipeline: what a driver-side inspection
    /// (register counts, `examples/kernel_stats.rs`) needs to rebuild exactly the kernels a call ran.
    pub fn compiled_kernels(&self) -> Vec<crate::kernels::PipelineKey> {
        self.kernels.keys()
    }

    /// Settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Per-pass GPU times of the last call, when [`Settings::profile`] is on and the adapter has
    /// timestamp queries.
    pub fn last_profile(&self) -> Option<Vec<PassTime>> {
        self.flush().ok()?;
        let last = self.profile.lock().ok().and_then(|mut p| p.drain(..).next_back())?;
        last.read(&self.gpu).ok()
    }

    /// Per-pass GPU times of every profiled call since the last read, oldest first. Profiled
    /// calls do not wait for the GPU; this does, once.
    pub fn take_profiles(&self) -> Result<Vec<Vec<PassTime>>> {
        self.flush()?;
        let pending: Vec<PendingTimes> = self.profile.lock().map(|mut p| p.drain(..).collect()).unwrap_or_default();
        pending.iter().map(|p| p.read(&self.gpu)).collect()
    }

    /// Bytes of scratch memory the engine holds now and at its peak.
    pub fn scratch_bytes(&self) -> (u64, u64) {
        self.pool.bytes()
    }

    /// Bytes of device memory held for reuse: the buffers of results (outputs, gradients, saved
    /// states) whose tensors were dropped, kept for the next results of the same size.
    pub fn recycled_bytes(&self) -> u64 {
        self.recycler.bytes()
    }

    /// Frees the buffers held for reuse ([`Engine::recycled_bytes`]).
    pub fn free_recycled(&self) {
        self.recycler.clear();
    }

    /// Uploads a host tensor.
    pub fn upload(&self, name: &str, t: &HostTensor) -> Result<Tensor> {
        self.gpu.upload(name, t)
    }

    /// Downloads a device tensor (waits for submitted work).
    pub fn download(&self, t: &Tensor) -> Result<HostTensor> {
        self.flush()?;
        self.gpu.download(t)
    }

    /// Waits until all work submitted so far has finished.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.gpu.wait()
    }

    /// Runs `f` with every call it makes on this engine recorded into one command buffer, submitted
    /// once when `f` returns (also when it fails: the calls that were recorded still run). A model's
    /// layers decoding one token each then cost one submission, and the GPU runs them back to back.
    ///
    /// Anything that needs finished results inside `f` ([`Engine::download`], [`Engine::sync`])
    /// first submits what is recorded so far, so a batch never changes results, only when work is
    /// handed to the GPU. Nested batches join the outermost one.
    ///
    /// ```no_run
    /// # fn main() -> wgdelta::Result<()> {
    /// # let eng = wgdelta::Engine::new()?;
    /// # let layers: Vec<(wgdelta::Inputs, wgdelta::Tensor)> = Vec::new();
    /// let opts = wgdelta::Options::default();
    /// let outs = eng.batch(|| layers.iter().map(|(x, pool)| eng.decode(x, pool, &[0], &opts)).collect::<Result<Vec<_>, _>>())?;
    /// # Ok(()) }
    /// ```
    pub fn batch<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let outer = match self.batch.lock() {
            Ok(mut b) if b.is_none() => {
                *b = Some(Recorded::default());
                true
            }
            _ => false,
        };
        // Closes the batch even if `f` panics, so later calls are not deferred forever.
        struct Close<'a>(&'a Engine, bool);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                if self.1 {
                    let _ = self.0.close_batch();
                }
            }
        }
        let mut guard = Close(self, outer);
        let r = f();
        if outer {
            guard.1 = false;
            let closed = self.close_batch();
            let r = r?;
            closed?;
            return Ok(r);
        }
        r
    }

    /// Submits what the open batch holds and ends it.
    fn close_batch(&self) -> Result<()> {
        let rec = self.batch.lock().ok().and_then(|mut b| b.take());
        match rec {
            Some(rec) => self.submit_recorded(rec),
            None => Ok(()),
        }
    }

    /// Submits what the open batch holds so far and keeps it open (results are about to be read).
    fn flush(&self) -> Result<()> {
        let rec = self.batch.lock().ok().and_then(|mut b| b.as_mut().map(std::mem::take));
        match rec {
            Some(rec) => self.submit_recorded(rec),
            None => Ok(()),
        }
    }

    fn submit_recorded(&self, rec: Recorded) -> Result<()> {
        let mut g = self.graph();
        g.append(rec);
        self.submit_now(g)
    }

    pub(crate) fn graph(&self) -> PassGraph<'_> {
        PassGraph::new(&self.gpu, &self.kernels, &self.pool)
    }

    /// Submits a call's graph, or adds it to the open batch.
    pub(crate) fn submit(&self, graph: PassGraph<'_>) -> Result<()> {
        if let Ok(mut b) = self.batch.lock() {
            if let Some(rec) = b.as_mut() {
                rec.extend(graph.into_recorded());
                return Ok(());
            }
        }
        self.submit_now(graph)
    }

    fn submit_now(&self, graph: PassGraph<'_>) -> Result<()> {
        if let Some(times) = graph.submit(self.settings.profile)? {
            if let Ok(mut p) = self.profile.lock() {
                p.push(times);
            }
        }
        Ok(())
    }

    fn poison(&self) -> bool {
        self.settings.poison_outputs.unwrap_or(self.gpu.shader_checks)
    }

    /// A new f32 output tensor; NaN-filled when poisoning is on.
    pub(crate) fn output(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.output_with(name, shape, false)
    }

    /// [`Engine::output`]; `sliced`: bounded by one buffer, not one binding ([`Gpu::empty_sliced`]).
    pub(crate) fn output_with(&self, name: &str, shape: &[usize], sliced: bool) -> Result<Tensor> {
        let t = self.gpu.empty_recycled(name, shape, sliced, &self.recycler)?;
        if self.poison() {
            let words = (crate::tensor::padded(t.byte_len()) / 4) as usize;
            let nan = vec![u32::MAX; words];
            self.gpu.queue.write_buffer(&t.buffer, 0, bytemuck::cast_slice(&nan));
        }
        Ok(t)
    }
}
