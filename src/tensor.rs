//! Tensors: host data with shape and dtype, device buffers with shape and dtype, safetensors in/out.

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::problem::{DType, TensorMeta};
use half::{bf16, f16};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

/// A tensor in host memory: little-endian bytes with a shape and dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    /// Wraps raw bytes, checking their length against shape and dtype.
    pub fn from_bytes(name: &str, shape: &[usize], dtype: DType, bytes: Vec<u8>) -> Result<Self> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if bytes.len() != want {
            return Err(Error::SafeTensors(format!(
                "tensor `{name}`: {} bytes for shape {shape:?} {dtype}, expected {want}",
                bytes.len()
            )));
        }
        Ok(HostTensor { shape: shape.to_vec(), dtype, bytes })
    }

    /// An F32 tensor.
    pub fn from_f32(shape: &[usize], data: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape does not match data length");
        HostTensor { shape: shape.to_vec(), dtype: DType::F32, bytes: bytemuck::cast_slice(data).to_vec() }
    }

    /// Rounds float64 values to `dtype` (F32, F16, BF16, I32, I64, U8).
    pub fn from_f64(shape: &[usize], data: &[f64], dtype: DType) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape does not match data length");
        let bytes: Vec<u8> = match dtype {
            DType::F32 => data.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            DType::F16 => data.iter().flat_map(|&x| f16::from_f64(x).to_le_bytes()).collect(),
            DType::BF16 => data.iter().flat_map(|&x| bf16::from_f64(x).to_le_bytes()).collect(),
            DType::I32 => data.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
            DType::I64 => data.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
            DType::U8 | DType::Bool => data.iter().map(|&x| x as u8).collect(),
        };
        HostTensor { shape: shape.to_vec(), dtype, bytes }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Shape and dtype.
    pub fn meta(&self) -> TensorMeta {
        TensorMeta { shape: self.shape.clone(), dtype: self.dtype }
    }

    /// Values widened to float64 (integers and booleans too).
    pub fn to_f64(&self) -> Vec<f64> {
        let b = &self.bytes;
        match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
            DType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
                .collect(),
            DType::U8 | DType::Bool => b.iter().map(|&x| x as f64).collect(),
        }
    }

    /// Values as float32.
    pub fn to_f32(&self) -> Vec<f32> {
        if self.dtype == DType::F32 {
            return bytemuck::pod_collect_to_vec(&self.bytes);
        }
        self.to_f64().into_iter().map(|x| x as f32).collect()
    }

    /// Integer values (for `cu_seqlens`); `None` for float dtypes.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let b = &self.bytes;
        match self.dtype {
            DType::I32 => {
                Some(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect())
            }
            DType::I64 => Some(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// A tensor on the device: a storage buffer with shape and dtype. Its buffer is padded to whole
/// 32-bit words; 16-bit data is read in WGSL as packed words.
///
/// Clones share the buffer. The results an [`crate::Engine`] returns give their buffer back to the
/// engine when the last clone is dropped, for its next results of the same size (see [`Recycler`]).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    /// Set on engine results: returns the buffer to the engine's recycler on the last drop.
    pub(crate) recycle: Option<Arc<GiveBack>>,
}

/// The buffers of an engine's dropped results, kept for its next results of the same size.
///
/// Fresh device memory is expensive to get: on the H100 through Vulkan a call's wall time grew by
/// about 20 ms per GiB of new results (docs/PERF.md, R22: the chunked forward at B=8 T=8192 takes
/// 23 ms of GPU time and 47 ms of wall time, its output being 1 GiB), so a training loop that drops
/// each step's results would pay that every step. At most [`Recycler::KEEP`] buffers are kept
/// (oldest dropped first); a recycled buffer holds stale data, so only results every element of
/// which the passes write are recycled (the test suite poisons them to check that).
#[derive(Debug, Default)]
pub(crate) struct Recycler {
    free: Mutex<Vec<wgpu::Buffer>>,
}

impl Recycler {
    pub(crate) const KEEP: usize = 16;

    /// A kept buffer of exactly `size` bytes, if there is one.
    fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut free = self.free.lock().ok()?;
        let i = free.iter().position(|b| b.size() == size)?;
        Some(free.remove(i))
    }

    fn keep(&self, b: wgpu::Buffer) {
        if let Ok(mut free) = self.free.lock() {
            if free.len() == Self::KEEP {
                free.remove(0);
            }
            free.push(b);
        }
    }

    pub(crate) fn clear(&self) {
        if let Ok(mut free) = self.free.lock() {
            free.clear();
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.free.lock().map(|f| f.iter().map(|b| b.size()).sum()).unwrap_or(0)
    }
}

/// Gives a result's buffer back to its engine's [`Recycler`] when the last clone of the tensor is
/// dropped (the engine may be gone: then the buffer is simply freed).
#[derive(Debug)]
pub(crate) struct GiveBack {
    buffer: wgpu::Buffer,
    to: Weak<Recycler>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some(r) = self.to.upgrade() {
            r.keep(self.buffer.clone());
        }
    }
}

/// Buffer size for `bytes` of data: whole words, at least one.
pub(crate) fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn meta(&self) -> TensorMeta {
        TensorMeta { shape: self.shape.clone(), dtype: self.dtype }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data (without padding).
    pub fn byte_len(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }
    /// The underlying wgpu buffer, for callers that share buffers with their own pipelines. Use it
    /// only while this tensor (or a clone) lives: an engine result's buffer is reused for the
    /// engine's later results once its last clone is dropped.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

/// Usage of every tensor buffer: bound as storage, copied in and out.
pub(crate) const TENSOR_USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

impl Gpu {
    /// Checks that `bytes` fit in one storage binding and one buffer of this device.
    pub fn check_size(&self, name: &str, bytes: u64) -> Result<()> {
        let p = padded(bytes);
        if p > self.caps.max_binding {
            return Err(Error::TooLarge {
                name: name.into(),
                bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: self.caps.max_binding,
            });
        }
        if p > self.caps.max_buffer {
            return Err(Error::TooLarge {
                name: name.into(),
                bytes,
                limit_name: "max_buffer_size",
                limit: self.caps.max_buffer,
            });
        }
        Ok(())
    }

    /// Creates an uninitialised device tensor.
    pub fn empty(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        self.check_size(name, bytes)?;
        self.alloc(name, shape, dtype, bytes)
    }

    /// [`Gpu::empty`] (`sliced`: [`Gpu::empty_sliced`]) for a result every element of which the
    /// passes write: a buffer of the same size from `recycler` when it has one, which goes back
    /// there when the tensor's last clone is dropped.
    pub(crate) fn empty_recycled(
        &self,
        name: &str,
        shape: &[usize],
        sliced: bool,
        recycler: &Arc<Recycler>,
    ) -> Result<Tensor> {
        let dtype = DType::F32;
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        let mut t = match recycler.take(padded(bytes)) {
            Some(buffer) => Tensor { buffer, shape: shape.to_vec(), dtype, recycle: None },
            None if sliced => self.empty_sliced(name, shape, dtype)?,
            None => self.empty(name, shape, dtype)?,
        };
        t.recycle = Some(Arc::new(GiveBack { buffer: t.buffer.clone(), to: Arc::downgrade(recycler) }));
        Ok(t)
    }

    /// Creates a device tensor that kernels only ever bind in slices (the saved states of a long
    /// chunked forward, one window at a time): bounded by one buffer, not by one binding.
    pub(crate) fn empty_sliced(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        if padded(bytes) > self.caps.max_buffer {
            return Err(Error::TooLarge {
                name: name.into(),
                bytes,
                limit_name: "max_buffer_size",
                limit: self.caps.max_buffer,
            });
        }
        self.alloc(name, shape, dtype, bytes)
    }

    fn alloc(&self, name: &str, shape: &[usize], dtype: DType, bytes: u64) -> Result<Tensor> {
        let buffer = self.scoped(name, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(name),
                size: padded(bytes),
                usage: TENSOR_USAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(Tensor { buffer, shape: shape.to_vec(), dtype, recycle: None })
    }

    /// Copies a host tensor to the device.
    pub fn upload(&self, name: &str, t: &HostTensor) -> Result<Tensor> {
        let dev = self.empty(name, &t.shape, t.dtype)?;
        let mut data = Cow::Borrowed(&t.bytes[..]);
        if !t.bytes.len().is_multiple_of(4) || t.bytes.is_empty() {
            let mut v = t.bytes.clone();
            v.resize(padded(t.bytes.len() as u64) as usize, 0);
            data = Cow::Owned(v);
        }
        self.queue.write_buffer(&dev.buffer, 0, &data);
        Ok(dev)
    }

    /// Uploads float32 values.
    pub fn upload_f32(&self, name: &str, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        self.upload(name, &HostTensor::from_f32(shape, data))
    }

    /// Copies a device tensor back to the host (waits for all submitted work).
    pub fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let bytes = self.read_buffer(&t.buffer, padded(t.byte_len()))?;
        Ok(HostTensor { shape: t.shape.clone(), dtype: t.dtype, bytes: bytes[..t.byte_len() as usize].to_vec() })
    }

    /// Reads `size` bytes of a buffer through a staging copy.
    pub(crate) fn read_buffer(&self, buffer: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let staging = self.scoped("wgdelta.readback", || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgdelta.readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let mut enc =
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("wgdelta.readback") });
        enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.scoped("wgdelta.readback", || self.queue.submit([enc.finish()]))?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| Error::Device { context: "readback".into(), message: e.to_string() })?
            .map_err(|e| Error::Device { context: "readback map".into(), message: e.to_string() })?;
        let out = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Device { context: "readback range".into(), message: e.to_string() })?
            .to_vec();
        staging.unmap();
        Ok(out)
    }
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        _ => return None,
    })
}

fn to_st_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::I32 => S::I32,
        DType::I64 => S::I64,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        to_st_dtype(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The tensors and string metadata of one safetensors file.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: HashMap<String, HostTensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Parses safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::SafeTensors(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::SafeTensors(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let dtype = st_dtype(view.dtype()).ok_or_else(|| {
                Error::SafeTensors(format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))
            })?;
            let t = HostTensor::from_bytes(&name, view.shape(), dtype, view.data().to_vec())?;
            tensors.insert(name, t);
        }
        Ok(TensorFile { tensors, metadata: meta.metadata().clone().unwrap_or_default() })
    }

    /// Reads a safetensors file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        Self::from_bytes(&bytes)
    }

    /// Serialises to safetensors bytes (tensors sorted by name, so output is byte-stable).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut items: Vec<(&String, &HostTensor)> = self.tensors.iter().collect();
        items.sort_by(|a, b| a.0.cmp(b.0));
        let meta = if self.metadata.is_empty() { None } else { Some(self.metadata.clone()) };
        safetensors::serialize(items, meta).map_err(|e| Error::SafeTensors(e.to_string()))
    }

    /// Writes a safetensors file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| Error::Io { path: path.display().to_string(), source: e })
    }
}
