//! The one error type of wgdelta: every bad input, missing feature and device failure is a variant.

use crate::problem::DType;

/// Everything that can go wrong in wgdelta. Validation errors are returned before any GPU work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong number of dimensions or a wrong extent.
    #[error("tensor `{name}`: shape {got:?}, expected {expected}")]
    Shape { name: &'static str, got: Vec<usize>, expected: String },

    /// A tensor has a dtype the operation does not accept.
    #[error("tensor `{name}`: dtype {got}, expected {expected}")]
    DType { name: &'static str, got: DType, expected: String },

    /// A required tensor is missing.
    #[error("missing tensor `{0}`")]
    Missing(&'static str),

    /// Head counts do not form valid groups (HV must be a positive multiple of H).
    #[error("value heads HV={hv} must be a positive multiple of key heads H={h}")]
    HeadGroups { h: usize, hv: usize },

    /// A head dimension outside what the kernels support.
    #[error("{which} = {got} is not supported: head dimensions must be multiples of 16 from 16 to 256")]
    HeadDim { which: &'static str, got: usize },

    /// `cu_seqlens` is malformed.
    #[error("cu_seqlens: {0}")]
    CuSeqlens(String),

    /// A decode slot index names no slot of the state pool.
    #[error("slot index {index} at batch row {row} is out of range for a pool of {slots} slots")]
    SlotOutOfRange { row: usize, index: i64, slots: usize },

    /// An option has a value that makes no sense (NaN scale, chunk size not in {16,32,64}, ...).
    #[error("invalid option {name}: {why}")]
    Option { name: &'static str, why: String },

    /// A metadata entry of a case file has a bad value.
    #[error("metadata `{key}` = `{value}`: expected {expected}")]
    Metadata { key: String, value: String, expected: &'static str },

    /// The requested combination is not implemented by the chosen algorithm.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A tensor or buffer is larger than the device allows in one binding.
    #[error("tensor `{name}` needs {bytes} bytes, above the device's {limit_name} of {limit} bytes")]
    TooLarge { name: String, bytes: u64, limit_name: &'static str, limit: u64 },

    /// The adapter lacks a feature or limit this operation needs, with no fallback.
    #[error("the adapter lacks {0}")]
    MissingFeature(String),

    /// No adapter could be found or the requested one does not exist.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// The device refused to create something (shader, pipeline, buffer) or reported a validation error.
    #[error("device error in {context}: {message}")]
    Device { context: String, message: String },

    /// The device was lost (driver reset, out of memory, removed).
    #[error("device lost: {0}")]
    DeviceLost(String),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file could not be parsed or written.
    #[error("safetensors: {0}")]
    SafeTensors(String),
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
