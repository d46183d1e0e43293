//! weightdiff compares a base checkpoint with a fine-tuned one, tensor by tensor, and
//! reports what the fine-tune changed.
//!
//! # Overview
//!
//! Data flows one way, bottom to top (ARCHITECTURE.md; `tests/it/architecture.rs`
//! fails when a module uses one above it):
//!
//! ```text
//! files ──checkpoint──▶ tensors ──pairing──▶ pairs ──pipeline (kernels, lowrank)──▶ comparison ──report──▶ files
//! ```
//!
//! - [`error`], [`fsio`], [`rng`]: errors per rule; atomic writes, locks, bounded reads.
//! - [`checkpoint`]: resolves a model argument, validates safetensors and PyTorch files
//!   and the index, and hands out bounded windows onto tensor bytes (never a whole
//!   model). [`hub`] resolves hub ids to a cache snapshot.
//! - [`pairing`]: pairs tensors by name, infers wrapping prefixes, reports one-sided
//!   names and shape/dtype mismatches.
//! - [`kernels`]: the fast SIMD kernel and the scalar f64 reference.
//! - [`lowrank`]: randomized SVD, merged-LoRA detection and LoRA factors.
//! - [`peft`]: the adapter policy, the adapter's contents and its writer.
//! - [`comparison`]: the result types every report is rendered from.
//! - [`relatedness`]: are the two a base and a derivative at all? (shared shapes, cosine)
//! - [`synthetic`]: builds checkpoint pairs with known edits (tests, demo, benchmarks).
//! - [`journal`]: per-tensor results on disk, so a killed run can resume.
//! - [`pipeline`]: the plan and the parallel work with bounded memory.
//! - [`parts`]: part files of a sharded run, and their merge.
//! - [`report`]: one renderer per output file, and the registry of outputs.
//! - [`jobs`]: one entry per subcommand, as the CLI runs them.
//!
//! # Example
//!
//! ```
//! use weightdiff::{Checkpoint, CompareOptions, pipeline, synthetic};
//!
//! let dir = tempfile::tempdir()?;
//! let pair = synthetic::build_pair(&synthetic::demo_spec(), dir.path())?;
//! let base = Checkpoint::open(&pair.base)?;
//! let ft = Checkpoint::open(&pair.finetuned)?;
//! let c = pipeline::compare(&base, &ft, &CompareOptions::default(), &pipeline::NoProgress)?;
//! let modified: Vec<&str> = c.modified();
//! assert_eq!(modified.len(), pair.edits.len());
//! weightdiff::report::write_comparison_reports(&c, &dir.path().join("out"), 20)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
pub mod comparison;
pub mod error;
pub mod fsio;
pub mod hub;
pub mod jobs;
pub mod journal;
pub mod kernels;
pub mod lowrank;
pub mod pairing;
pub mod parts;
pub mod peft;
pub mod pipeline;
pub mod relatedness;
pub mod report;
pub mod rng;
pub mod synthetic;

pub use checkpoint::Checkpoint;
pub use comparison::{Comparison, TensorMetrics};
pub use error::{Error, Result};
pub use pipeline::{CompareOptions, compare};
