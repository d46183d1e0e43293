//! Command-line arguments (clap derive) and their conversion to library options.
//! The library never sees clap.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Compare a base checkpoint with a fine-tuned one, tensor by tensor.
#[derive(Debug, Parser)]
#[command(name = "weightdiff", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compare BASE with FINETUNED and write the reports into the output directory.
    #[command(
        after_help = "Examples:\n  weightdiff compare ./Qwen3-0.6B ./my-finetune -o out\n  weightdiff compare base.safetensors ft.safetensors --verify --include 'layers\\.1[0-9]\\.'"
    )]
    Compare(CompareArgs),
    /// List a model's tensors, dtypes, shapes and parameter count.
    #[command(after_help = "Example:\n  weightdiff inspect ./Qwen3-0.6B")]
    Inspect {
        /// Model directory or .safetensors file.
        model: PathBuf,
        /// Print JSON on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build a small synthetic base/fine-tuned pair and compare it.
    #[command(after_help = "Example:\n  weightdiff demo -o weightdiff-demo")]
    Demo {
        /// Where the pair and the reports go.
        #[arg(short, long, default_value = "weightdiff-demo")]
        output: PathBuf,
        #[command(flatten)]
        display: DisplayArgs,
    },
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Base model: a Hugging Face directory or a .safetensors file.
    pub base: PathBuf,
    /// Fine-tuned model: a Hugging Face directory or a .safetensors file.
    pub finetuned: PathBuf,
    /// Output directory.
    #[arg(short, long, default_value = "model_comparison")]
    pub output: PathBuf,
    /// An element counts as changed when |finetuned - base| exceeds this.
    #[arg(long, default_value_t = 1e-6)]
    pub threshold: f64,
    /// Length of the most-modified lists.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Also run the scalar f64 reference kernel on every tensor and check agreement.
    #[arg(long)]
    pub verify: bool,
    /// Only compare tensors whose name matches this regex.
    #[arg(long, value_name = "RE")]
    pub include: Option<String>,
    /// Skip tensors whose name matches this regex.
    #[arg(long, value_name = "RE")]
    pub exclude: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub display: DisplayArgs,
}

#[derive(Debug, Args, Clone, Copy)]
pub struct DisplayArgs {
    /// No progress or summary on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print a JSON summary on stdout (and nothing else there).
    #[arg(long)]
    pub json: bool,
}

impl CompareArgs {
    /// Library options from the flags.
    pub fn options(&self) -> anyhow::Result<weightdiff::CompareOptions> {
        let re = |s: &Option<String>, flag: &str| -> anyhow::Result<Option<regex::Regex>> {
            s.as_deref()
                .map(|p| {
                    regex::Regex::new(p)
                        .map_err(|e| anyhow::anyhow!("invalid {flag} regex `{p}`: {e}"))
                })
                .transpose()
        };
        if !(self.threshold >= 0.0 && self.threshold.is_finite()) {
            anyhow::bail!(
                "--threshold must be a finite number >= 0, got {}",
                self.threshold
            );
        }
        if self.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        Ok(weightdiff::CompareOptions {
            threshold: self.threshold,
            verify: self.verify,
            include: re(&self.include, "--include")?,
            exclude: re(&self.exclude, "--exclude")?,
            threads: self.threads,
            ..Default::default()
        })
    }
}
