//! The library's error type. Every variant names the file it concerns, and the tensor
//! when there is one, so that a message printed at the CLI edge is enough to act on.

use std::path::PathBuf;

/// Convenience alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while resolving, reading or comparing checkpoints,
/// or while writing outputs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call on `path` failed. The OS error is part of the message rather than a
    /// `source()`: with both, `{:#}` (the CLI's error line) printed it twice.
    #[error("{}: {action}: {error}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: std::io::Error,
    },

    /// A safetensors file failed validation (header, dtypes, offsets, sizes).
    #[error("{}: invalid safetensors file: {reason}", path.display())]
    InvalidSafetensors { path: PathBuf, reason: String },

    /// A PyTorch checkpoint (`pytorch_model.bin`, `*.pt`) could not be read, or its pickle
    /// asks for something other than tensors.
    #[error("{}: invalid PyTorch checkpoint: {reason}", path.display())]
    InvalidPytorch { path: PathBuf, reason: String },

    /// A hub id could not be resolved or downloaded.
    #[error("{repo}: {reason}")]
    Hub { repo: String, reason: String },

    /// `model.safetensors.index.json` is malformed or inconsistent with the shards.
    #[error("{}: invalid index: {reason}", path.display())]
    InvalidIndex { path: PathBuf, reason: String },

    /// A JSON side file (`config.json`, …) could not be parsed.
    #[error("{}: invalid JSON: {reason}", path.display())]
    InvalidJson { path: PathBuf, reason: String },

    /// The model argument does not point at anything weightdiff can read.
    #[error("{}: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },

    /// A tensor cannot be read or compared (unsupported dtype, file changed, …).
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A numerical routine failed on a tensor (an SVD that did not converge).
    #[error("tensor `{tensor}`: {reason}")]
    Numerical { tensor: String, reason: String },

    /// The two kernels disagree on a tensor under `--verify`.
    #[error(
        "tensor `{tensor}`: fast and reference kernels disagree on {metric}: {fast} vs {reference}"
    )]
    VerifyMismatch {
        tensor: String,
        metric: &'static str,
        fast: f64,
        reference: f64,
    },

    /// The run was asked to stop (SIGINT/SIGTERM) before this work started.
    #[error("cancelled")]
    Cancelled,

    /// Another run holds the output directory's lock.
    #[error("{}: another weightdiff run is writing into this directory (it holds {})", dir.display(), lock.display())]
    Locked { dir: PathBuf, lock: PathBuf },

    /// An error already rendered to text (shared by several tensors that met it).
    #[error("{0}")]
    Message(String),

    /// An option value is unusable (bad regex, bad preset name, …).
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// A GGUF file failed validation, or one of its tensors cannot be read or decoded.
    #[error(transparent)]
    Gguf(#[from] crate::checkpoint::gguf::GgufError),
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            error: source,
        }
    }
}
