//! PassGraph: the passes of one call recorded into one command encoder, scratch buffers from a
//! pool, optional GPU timestamps per pass, and one submission. The only place that submits work.

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::kernels::{Kernel, KernelCache, PipelineKey};
use std::sync::Mutex;

/// One recorded step.
enum Step {
    Pass { label: &'static str, pipeline: wgpu::ComputePipeline, bind_group: wgpu::BindGroup, grid: [u32; 3] },
    Copy { src: wgpu::Buffer, src_off: u64, dst: wgpu::Buffer, dst_off: u64, size: u64 },
    Clear { buffer: wgpu::Buffer, size: u64 },
}

/// A buffer taken from the [`Pool`]; returned to it when the graph that holds it is submitted.
#[derive(Clone, Debug)]
pub struct Scratch {
    pub(crate) buffer: wgpu::Buffer,
    usage: wgpu::BufferUsages,
}

/// Reusable scratch buffers. Once warm, a repeated call allocates nothing.
#[derive(Default)]
pub struct Pool {
    free: Mutex<Vec<Scratch>>,
    live_bytes: Mutex<(u64, u64)>, // (now, peak) bytes held by the pool, free or taken
    uploads: Mutex<Uploads>,
}

/// Small uploads (uniform parameters, index tables) packed at 256-byte offsets into one shared
/// buffer and written to the queue once per submission, not once each: every queue write
/// allocates a staging buffer on the host, which was a third of a decode call's recording time
/// (docs/PERF.md R70). Offsets only grow, so nothing a recorded call reads is overwritten. A full
/// buffer is flushed and let go, never reused: a call on another thread may have its data in it
/// and not be submitted yet (its bind group keeps the buffer alive until the GPU is done with it).
#[derive(Default)]
struct Uploads {
    /// The buffer being filled, the bytes put in it so far, and how many of them are written.
    chunk: Option<(wgpu::Buffer, Vec<u8>, usize)>,
}

/// A range of a buffer holding uploaded data ([`PassGraph::upload`]).
#[derive(Clone, Debug)]
pub struct Upload {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl Upload {
    /// The range as a binding.
    pub fn binding(&self) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding { buffer: &self.buffer, offset: self.offset, size: std::num::NonZeroU64::new(self.size) }
    }
}

/// Size of a shared upload buffer; larger uploads get a buffer of their own.
const UPLOAD_CHUNK: usize = 64 << 10;
const UPLOAD_MAX: usize = 16 << 10;
/// Uniform and storage bindings may start at any multiple of this (the largest alignment WebGPU
/// allows a device to ask for).
pub const BIND_ALIGN: usize = 256;
const UPLOAD_USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::UNIFORM.union(wgpu::BufferUsages::STORAGE).union(wgpu::BufferUsages::COPY_DST);

impl Uploads {
    /// Writes the bytes not yet written to the queue (they land before the next submission).
    fn flush(&mut self, queue: &wgpu::Queue) {
        if let Some((s, host, done)) = self.chunk.as_mut() {
            if *done < host.len() {
                queue.write_buffer(s, *done as u64, &host[*done..]);
                *done = host.len();
            }
        }
    }
}

impl Pool {
    /// A buffer of at least `size` bytes with `usage` (sizes rounded up to powers of two, so a
    /// warm pool serves nearby sizes too).
    pub fn take(&self, gpu: &Gpu, label: &str, size: u64, usage: wgpu::BufferUsages) -> Result<Scratch> {
        let size = size.max(16).next_power_of_two();
        if let Ok(mut free) = self.free.lock() {
            if let Some(i) = free.iter().position(|s| s.usage == usage && s.buffer.size() == size) {
                return Ok(free.swap_remove(i));
            }
        }
        gpu.check_size(label, size)?;
        let buffer = gpu.scoped(label, || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        })?;
        self.count(size as i64);
        Ok(Scratch { buffer, usage })
    }

    /// Adds `bytes` (or takes them away) to the bytes held, keeping the peak.
    fn count(&self, bytes: i64) {
        if let Ok(mut l) = self.live_bytes.lock() {
            l.0 = l.0.saturating_add_signed(bytes);
            l.1 = l.1.max(l.0);
        }
    }

    fn give_back(&self, s: Vec<Scratch>) {
        if let Ok(mut free) = self.free.lock() {
            free.extend(s);
        }
    }

    /// Bytes the pool holds now and at most so far (with the upload buffer being filled).
    pub fn bytes(&self) -> (u64, u64) {
        self.live_bytes.lock().map(|l| *l).unwrap_or((0, 0))
    }
}

fn lock_poisoned() -> Error {
    Error::Device { context: "upload buffer".into(), message: "a thread panicked while holding its lock".into() }
}

/// GPU time of one pass, from timestamp queries.
#[derive(Clone, Debug, PartialEq)]
pub struct PassTime {
    pub label: &'static str,
    pub ns: f64,
}

/// The passes of one call, recorded, then submitted once.
pub struct PassGraph<'a> {
    gpu: &'a Gpu,
    kernels: &'a KernelCache,
    pool: &'a Pool,
    steps: Vec<Step>,
    scratch: Vec<Scratch>,
}

/// The binding of a whole buffer (see [`PassGraph::dispatch_ranges`]).
pub fn whole(b: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
    b.as_entire_buffer_binding()
}

impl<'a> PassGraph<'a> {
    pub fn new(gpu: &'a Gpu, kernels: &'a KernelCache, pool: &'a Pool) -> Self {
        PassGraph { gpu, kernels, pool, steps: Vec::new(), scratch: Vec::new() }
    }

    /// A scratch buffer held until submission.
    pub fn scratch(&mut self, label: &str, size: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let s = self.pool.take(self.gpu, label, size, usage)?;
        let b = s.buffer.clone();
        self.scratch.push(s);
        Ok(b)
    }

    /// `data` for reading (a uniform or read-only storage binding): a range of the shared upload
    /// buffer ([`Uploads`]), or a buffer of its own when large. The range starts at a multiple of
    /// [`BIND_ALIGN`] and is `data` padded with zeros to a multiple of 4 bytes.
    pub fn upload(&mut self, label: &str, data: &[u8]) -> Result<Upload> {
        let len = data.len().div_ceil(4).max(1) * 4;
        if data.len() > UPLOAD_MAX {
            let buffer = self.scratch_with(label, data, UPLOAD_USAGE)?;
            return Ok(Upload { buffer, offset: 0, size: len as u64 });
        }
        let mut up = self.pool.uploads.lock().map_err(|_| lock_poisoned())?;
        let fits = |host: &Vec<u8>| host.len().next_multiple_of(BIND_ALIGN) + len <= UPLOAD_CHUNK;
        if !up.chunk.as_ref().is_some_and(|(_, host, _)| fits(host)) {
            up.flush(&self.gpu.queue);
            // (Counted with the pool's scratch while it is the one being filled.)
            let size = UPLOAD_CHUNK as u64;
            if up.chunk.take().is_some() {
                self.pool.count(-(size as i64));
            }
            let gpu = self.gpu;
            let b = gpu.scoped("wgdelta.uploads", || {
                gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wgdelta.uploads"),
                    size,
                    usage: UPLOAD_USAGE,
                    mapped_at_creation: false,
                })
            })?;
            up.chunk = Some((b, Vec::with_capacity(UPLOAD_CHUNK), 0));
            self.pool.count(size as i64);
        }
        let (b, host, _) = up.chunk.as_mut().expect("a chunk with room");
        let at = host.len().next_multiple_of(BIND_ALIGN);
        host.resize(at, 0);
        host.extend_from_slice(data);
        host.resize(at + len, 0);
        Ok(Upload { buffer: b.clone(), offset: at as u64, size: len as u64 })
    }

    /// A scratch buffer filled with `data` (uniform parameters, index tables).
    pub fn scratch_with(&mut self, label: &str, data: &[u8], usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let b = self.scratch(label, data.len() as u64, usage | wgpu::BufferUsages::COPY_DST)?;
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(4) * 4, 0);
        if !padded.is_empty() {
            self.gpu.queue.write_buffer(&b, 0, &padded);
        }
        Ok(b)
    }

    /// Records one dispatch of the pipeline `key`, binding `buffers` in the kernel's slot order.
    pub fn dispatch(&mut self, key: &PipelineKey, buffers: &[&wgpu::Buffer], grid: [u32; 3]) -> Result<()> {
        let all: Vec<_> = buffers.iter().map(|b| whole(b)).collect();
        self.dispatch_ranges(key, &all, grid)
    }

    /// [`PassGraph::dispatch`] with byte ranges of buffers (a window's slice of a buffer larger
    /// than one binding, as the saved states of a long chunked forward).
    pub fn dispatch_ranges(
        &mut self,
        key: &PipelineKey,
        buffers: &[wgpu::BufferBinding<'_>],
        grid: [u32; 3],
    ) -> Result<()> {
        let kernel: Kernel = key.kernel;
        if buffers.len() != kernel.slots().len() {
            return Err(Error::Device {
                context: kernel.label().into(),
                message: format!("{} buffers bound, kernel has {} slots", buffers.len(), kernel.slots().len()),
            });
        }
        let max = self.gpu.caps.max_workgroups_per_dim;
        if grid.iter().any(|&g| g > max) {
            return Err(Error::TooLarge {
                name: format!("grid {grid:?} of {}", kernel.label()),
                bytes: *grid.iter().max().unwrap_or(&0) as u64,
                limit_name: "max_compute_workgroups_per_dimension",
                limit: max as u64,
            });
        }
        let pipeline = self.kernels.pipeline(self.gpu, key)?;
        let layout = self.kernels.bind_layout(self.gpu, kernel)?;
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(b.clone()),
            })
            .collect();
        let bind_group = self.gpu.scoped(kernel.label(), || {
            self.gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.label()),
                layout: &layout,
                entries: &entries,
            })
        })?;
        if grid.iter().all(|&g| g > 0) {
            self.steps.push(Step::Pass { label: kernel.label(), pipeline, bind_group, grid });
        }
        Ok(())
    }

    /// Records a buffer copy.
    pub fn copy(&mut self, src: &wgpu::Buffer, src_off: u64, dst: &wgpu::Buffer, dst_off: u64, size: u64) {
        if size > 0 {
            self.steps.push(Step::Copy { src: src.clone(), src_off, dst: dst.clone(), dst_off, size });
        }
    }

    /// Records zero-filling the first `size` bytes of a buffer (a multiple of 4).
    pub fn clear(&mut self, buffer: &wgpu::Buffer, size: u64) {
        if size > 0 {
            self.steps.push(Step::Clear { buffer: buffer.clone(), size });
        }
    }

    /// Number of compute passes recorded.
    pub fn passes(&self) -> usize {
        self.steps.iter().filter(|s| matches!(s, Step::Pass { .. })).count()
    }

    /// Appends another graph's recorded steps (and the scratch they hold) after this one's.
    pub(crate) fn append(&mut self, other: Recorded) {
        self.steps.extend(other.steps);
        self.scratch.extend(other.scratch);
    }

    /// The recorded steps and the scratch they hold, to be submitted later with another graph.
    pub(crate) fn into_recorded(self) -> Recorded {
        Recorded { steps: self.steps, scratch: self.scratch }
    }

    /// Encodes every step into one encoder and submits once. With a profile (and an adapter with
    /// timestamp queries) returns the pending GPU times: per pass, or one span for the whole graph.
    pub fn submit(self, profile: Profile) -> Result<Option<PendingTimes>> {
        let gpu = self.gpu;
        let n_pass = self.passes() as u32;
        let profile = if gpu.caps.timestamp && n_pass > 0 { profile } else { Profile::Off };
        let per_pass = profile == Profile::Passes;
        let n_times = match profile {
            Profile::Off => 0,
            Profile::Passes => n_pass,
            Profile::Submission => 1,
        };
        let queries = if n_times > 0 {
            let qs = gpu.scoped("wgdelta.timestamps", || {
                gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("wgdelta.timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2 * n_times,
                })
            })?;
            let size = 16 * n_times as u64;
            let resolve = gpu.scoped("wgdelta.timestamps", || {
                gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wgdelta.timestamps.resolve"),
                    size,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            })?;
            Some((qs, resolve, size))
        } else {
            None
        };
        let last_pass = self.steps.iter().rposition(|s| matches!(s, Step::Pass { .. })).unwrap_or(0);
        let mut labels = Vec::new();
        if profile == Profile::Submission {
            labels.push("wgdelta.submission");
        }
        let encoded = gpu.scoped("wgdelta.graph", || {
            let mut enc =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("wgdelta.graph") });
            let mut pass_i = 0u32;
            let mut first = true;
            let mut i = 0;
            while i < self.steps.len() {
                match &self.steps[i] {
                    Step::Pass { .. } => {
                        // A run of consecutive dispatches shares one compute pass (wgpu still
                        // orders dependent dispatches), except when each pass is timed alone.
                        let end = if per_pass {
                            i + 1
                        } else {
                            self.steps[i..]
                                .iter()
                                .position(|s| !matches!(s, Step::Pass { .. }))
                                .map_or(self.steps.len(), |n| i + n)
                        };
                        let first_label = match &self.steps[i] {
                            Step::Pass { label, .. } => *label,
                            _ => "wgdelta.pass",
                        };
                        let tw = queries.as_ref().and_then(|(qs, _, _)| {
                            let (begin, stop) = if per_pass {
                                (Some(2 * pass_i), Some(2 * pass_i + 1))
                            } else {
                                // One span: from the first pass's start to the last pass's end.
                                (first.then_some(0), (last_pass < end).then_some(1))
                            };
                            (begin.is_some() || stop.is_some()).then_some(wgpu::ComputePassTimestampWrites {
                                query_set: qs,
                                beginning_of_pass_write_index: begin,
                                end_of_pass_write_index: stop,
                            })
                        });
                        first = false;
                        let mut cp = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some(first_label),
                            timestamp_writes: tw,
                        });
                        for step in &self.steps[i..end] {
                            if let Step::Pass { label, pipeline, bind_group, grid } = step {
                                cp.set_pipeline(pipeline);
                                cp.set_bind_group(0, bind_group, &[]);
                                cp.dispatch_workgroups(grid[0], grid[1], grid[2]);
                                if per_pass {
                                    labels.push(*label);
                                }
                                pass_i += 1;
                            }
                        }
                        drop(cp);
                        i = end;
                    }
                    Step::Copy { src, src_off, dst, dst_off, size } => {
                        enc.copy_buffer_to_buffer(src, *src_off, dst, *dst_off, *size);
                        i += 1;
                    }
                    Step::Clear { buffer, size } => {
                        enc.clear_buffer(buffer, 0, Some(*size));
                        i += 1;
                    }
                }
            }
            if let Some((qs, resolve, _)) = &queries {
                enc.resolve_query_set(qs, 0..2 * n_times, resolve, 0);
            }
            enc.finish()
        })?;
        if let Ok(mut up) = self.pool.uploads.lock() {
            up.flush(&gpu.queue);
        }
        gpu.scoped("wgdelta.submit", || gpu.queue.submit([encoded]))?;
        self.pool.give_back(self.scratch);
        Ok(queries.map(|(_, resolve, size)| PendingTimes { labels, resolve, size }))
    }
}

/// What GPU time a submission records (timestamp queries; ignored where the adapter has none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    /// No timestamps.
    #[default]
    Off,
    /// Each dispatch in its own compute pass, timed alone: the per-pass breakdown.
    Passes,
    /// One span per submission, from the start of its first pass to the end of its last, with
    /// dispatches sharing passes as in untimed runs. A [`crate::Engine::batch`] of calls is one
    /// submission, so this is the per-op time of a repeated graph, without per-pass timestamp cost.
    Submission,
}

/// Steps recorded by a graph but not yet submitted, with the scratch they hold (a batch).
#[derive(Default)]
pub(crate) struct Recorded {
    steps: Vec<Step>,
    scratch: Vec<Scratch>,
}

impl Recorded {
    /// Appends `other`'s steps (and scratch) after these.
    pub(crate) fn extend(&mut self, other: Recorded) {
        self.steps.extend(other.steps);
        self.scratch.extend(other.scratch);
    }
}

/// Timestamps of a submitted graph, not yet read back (reading waits for the GPU, so callers that
/// time many calls read them all at the end and keep the GPU busy in between).
pub struct PendingTimes {
    labels: Vec<&'static str>,
    resolve: wgpu::Buffer,
    size: u64,
}

impl PendingTimes {
    /// Waits for the graph and returns each pass's GPU time.
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<PassTime>> {
        let raw = gpu.read_buffer(&self.resolve, self.size)?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let period = gpu.queue.get_timestamp_period() as f64;
        Ok(self
            .labels
            .iter()
            .enumerate()
            .map(|(i, &label)| PassTime { label, ns: ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period })
            .collect())
    }
}
