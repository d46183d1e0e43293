//! The library's errors, one type per rule that can be broken: a safetensors shard
//! ([`ShardError`]), a PyTorch checkpoint ([`TorchError`]), a part file of a sharded run
//! ([`PartError`]), a resume journal ([`JournalError`]), an option ([`Error::InvalidOption`])
//! and so on. Every one names the file it concerns, and the tensor when there is one, as
//! a field rather than inside the text, so that the message printed at the CLI edge is
//! enough to act on and a caller can tell which tensor failed.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

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
    #[error(transparent)]
    Shard(#[from] ShardError),

    /// A PyTorch checkpoint (`pytorch_model.bin`, `*.pt`) could not be read, or its pickle
    /// asks for something other than tensors.
    #[error(transparent)]
    Torch(#[from] TorchError),

    /// A part written by `compare --shard` is unreadable or does not fit the others.
    #[error(transparent)]
    Part(#[from] PartError),

    /// A resume journal is corrupt or belongs to another run.
    #[error(transparent)]
    Journal(#[from] JournalError),

    /// A hub id could not be resolved or downloaded.
    #[error("{repo}: {reason}")]
    Hub { repo: String, reason: String },

    /// `model.safetensors.index.json` is malformed or inconsistent with the shards.
    #[error("{}: invalid index: {}{reason}", path.display(), tensor_prefix(tensor))]
    InvalidIndex {
        path: PathBuf,
        tensor: Option<String>,
        reason: String,
    },

    /// A JSON side file (`config.json`, a report read back, …) could not be parsed.
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

    /// One failure met by several tensors at once (a window of the base read for every
    /// fine-tuned model): each of them reports it.
    #[error("{0}")]
    Shared(Arc<Error>),

    /// What a job was doing when `error` happened ("cannot read the base model").
    #[error("{what}: {error}")]
    During { what: String, error: Box<Error> },

    /// The run was asked to stop (SIGINT/SIGTERM) before this work started.
    #[error("cancelled")]
    Cancelled,

    /// Another run holds the output directory's lock.
    #[error("{}: another weightdiff run is writing into this directory (it holds {})", dir.display(), lock.display())]
    Locked { dir: PathBuf, lock: PathBuf },

    /// The worker threads could not be started.
    #[error("cannot start worker threads: {0}")]
    Threads(String),

    /// An option value is unusable (bad regex, bad preset name, options that exclude
    /// each other).
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// A file of a format with its own error type (GGUF, …) breaks that format's rules,
    /// or one of its tensors cannot be read or decoded. The format's module implements
    /// [`FormatError`] and `From<its error> for Error`; nothing here names it, so `error`
    /// stays at the bottom of the data flow.
    #[error("{0}")]
    Format(Box<dyn FormatError>),
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

    /// The tensor this error concerns, when it concerns one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            Error::Tensor { tensor, .. }
            | Error::Numerical { tensor, .. }
            | Error::VerifyMismatch { tensor, .. } => Some(tensor),
            Error::Shard(e) => e.tensor.as_deref(),
            Error::Torch(e) => e.tensor.as_deref(),
            Error::Part(e) => e.tensor.as_deref(),
            Error::InvalidIndex { tensor, .. } => tensor.as_deref(),
            Error::Shared(e) => e.tensor(),
            Error::During { error, .. } => error.tensor(),
            Error::Format(e) => e.tensor(),
            _ => None,
        }
    }
}

/// The error type of one file format's rules: it names the file and, when there is one,
/// the tensor, and becomes an [`Error::Format`].
pub trait FormatError: std::error::Error + Send + Sync + 'static {
    /// The file.
    fn path(&self) -> &std::path::Path;
    /// The tensor concerned, if the problem is one tensor's.
    fn tensor(&self) -> Option<&str>;
}

/// "tensor `x`: " when there is a tensor, else nothing.
fn tensor_prefix(tensor: &Option<String>) -> String {
    tensor
        .as_ref()
        .map_or_else(String::new, |t| format!("tensor `{t}`: "))
}

/// Defines an error of one file rule: the file, the tensor when there is one, what is
/// wrong with it, and the words that say which kind of file it is.
macro_rules! file_error {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// The file.
            pub path: PathBuf,
            /// The tensor concerned, if the problem is one tensor's.
            pub tensor: Option<String>,
            /// What is wrong.
            pub problem: String,
        }

        impl $name {
            /// A problem of the file as a whole.
            pub fn new(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
                $name { path: path.into(), tensor: None, problem: problem.into() }
            }

            /// A problem of one tensor of the file.
            pub fn tensor(
                path: impl Into<PathBuf>,
                tensor: impl Into<String>,
                problem: impl Into<String>,
            ) -> Self {
                $name { path: path.into(), tensor: Some(tensor.into()), problem: problem.into() }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    concat!("{}: ", $what, ": {}{}"),
                    self.path.display(),
                    tensor_prefix(&self.tensor),
                    self.problem
                )
            }
        }

        impl std::error::Error for $name {}
    };
}

file_error!(
    /// A safetensors file (or the part of one a tensor occupies) breaks the format.
    ShardError,
    "invalid safetensors file"
);
file_error!(
    /// A PyTorch checkpoint breaks the format, or its pickle asks for more than tensors.
    TorchError,
    "invalid PyTorch checkpoint"
);
file_error!(
    /// A part of a sharded run (`part.json`, `part.safetensors`) is unreadable or does not
    /// fit the other parts.
    PartError,
    "cannot use this part"
);
file_error!(
    /// A resume journal is corrupt or was written for other inputs.
    JournalError,
    "invalid journal"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_the_file_and_the_tensor() {
        let e: Error = ShardError::tensor("/m/a.safetensors", "w", "ends past the file").into();
        assert_eq!(
            e.to_string(),
            "/m/a.safetensors: invalid safetensors file: tensor `w`: ends past the file"
        );
        assert_eq!(e.tensor(), Some("w"));
        let e: Error = PartError::new("/p/part.json", "`tensors` missing").into();
        assert_eq!(
            e.to_string(),
            "/p/part.json: cannot use this part: `tensors` missing"
        );
        assert_eq!(e.tensor(), None);
    }
}
