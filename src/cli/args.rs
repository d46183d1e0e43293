//! Command-line arguments (clap derive) and their conversion to library options.
//! The library never sees clap.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Compare a base checkpoint with a fine-tuned one, tensor by tensor.
#[derive(Debug, Parser)]
#[command(
    name = "weightdiff",
    version,
    propagate_version = true,
    about,
    long_about = None,
    after_help = "Examples:\n  weightdiff demo -o weightdiff-demo                          # a synthetic pair, compared\n  weightdiff compare Qwen/Qwen3-0.6B ./my-finetune -o out     # reports, verdict, adapter, report.html\n  weightdiff extract-lora ./base ./ft -o adapter --rank 16\n  weightdiff report out                                        # re-render out/report.html\n\nEnvironment: HF_HUB_CACHE, HF_HOME, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE (hub ids), RUST_LOG, NO_COLOR\n\nExit status: 0 done; 1 some tensors failed; 2 unusable arguments or models; 3 done, but the models are not a base and a derivative (unrelated, different_architecture, nothing_compared: no LoRA verdict, no adapter); 130/143 stopped by SIGINT/SIGTERM"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log lines on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compare BASE with FINETUNED and write the reports into the output directory.
    #[command(
        after_help = "Examples:\n  weightdiff compare ./Qwen3-0.6B ./my-finetune -o out\n  weightdiff compare Qwen/Qwen3-0.6B ./my-finetune   # hub id: from the HF cache, downloaded if missing\n  weightdiff compare ./base ./checkpoint-500/pytorch_model.bin\n  weightdiff compare base.safetensors ft.safetensors --verify --include 'layers\\.1[0-9]\\.'"
    )]
    Compare(CompareArgs),
    /// Extract the fine-tune's change as a PEFT LoRA adapter directory.
    #[command(
        after_help = "Examples:\n  weightdiff extract-lora ./base ./ft -o adapter --rank 16\n  weightdiff extract-lora ./base ./ft -o adapter --energy 0.99 --max-rank 64 --modules q_proj,v_proj\n  weightdiff extract-lora ./base ./ft -o adapter --rank 32 --uniform-rank   # one alpha/r for vLLM, llama.cpp"
    )]
    ExtractLora(ExtractArgs),
    /// Combine the parts written by `compare --shard I/N` into the outputs of one run.
    #[command(
        after_help = "Example (3 SLURM array tasks, then one merge job):\n  weightdiff compare ./base ./ft --shard $SLURM_ARRAY_TASK_ID/3 -o parts/$SLURM_ARRAY_TASK_ID\n  weightdiff merge parts/0 parts/1 parts/2 -o out"
    )]
    Merge {
        /// Part directories, one per shard.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// Output directory.
        #[arg(short, long, default_value = "model_comparison")]
        output: PathBuf,
        /// Length of the most-modified lists.
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[command(flatten)]
        display: DisplayArgs,
    },
    /// List a model's tensors, dtypes, shapes and parameter count.
    #[command(
        after_help = "Examples:\n  weightdiff inspect ./Qwen3-0.6B\n  weightdiff inspect Qwen/Qwen3-0.6B@main --json"
    )]
    Inspect {
        /// Model directory, .safetensors or .bin file, or hub id (`ORG/NAME[@REVISION]`).
        model: PathBuf,
        /// Print JSON on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Render report.html, difference.txt and comparison_report.txt again from the JSON
    /// reports in a compare output directory.
    #[command(
        after_help = "Examples:\n  weightdiff report model_comparison\n  weightdiff report model_comparison --top 50   # longer most-modified lists"
    )]
    Report {
        /// Output directory of `weightdiff compare`.
        dir: PathBuf,
        /// Length of the most-modified lists.
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[command(flatten)]
        display: DisplayArgs,
    },
    /// Print a shell completion script on stdout.
    #[command(
        after_help = "Examples:\n  weightdiff completions bash > ~/.local/share/bash-completion/completions/weightdiff\n  weightdiff completions zsh > ~/.zfunc/_weightdiff\n  weightdiff completions fish > ~/.config/fish/completions/weightdiff.fish"
    )]
    Completions {
        /// Shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
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
    /// Base model: a Hugging Face directory, a .safetensors or pytorch_model.bin file,
    /// or a hub id (`ORG/NAME[@REVISION]`) resolved through the Hugging Face cache.
    pub base: PathBuf,
    /// Fine-tuned model(s), given like the base. With several, each gets its own directory under the output
    /// directory, plus trajectory.json across them; each base tensor is read once.
    #[arg(required = true, num_args = 1..)]
    pub finetuned: Vec<PathBuf>,
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
    /// Rank of the extracted LoRA (default 16).
    #[arg(long, value_name = "R", conflicts_with = "lora_energy")]
    pub lora_rank: Option<usize>,
    /// Extract per module the smallest rank keeping this fraction of the delta's energy.
    #[arg(long, value_name = "F")]
    pub lora_energy: Option<f64>,
    /// Skip the low-rank analysis and the LoRA extraction.
    #[arg(long)]
    pub no_lora: bool,
    /// PEFT task type of the adapter (default: from config.json's architectures).
    #[arg(long, value_name = "TYPE")]
    pub task_type: Option<crate::peft::TaskOverride>,
    /// The runtime the adapter is written for: `peft` or `vllm`.
    #[arg(long, default_value = "peft")]
    pub profile: crate::peft::Profile,
    /// Seed of the randomized SVD.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue an interrupted run from the journal in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Compare only shard I of N (0 <= I < N, balanced by bytes) and write a part for
    /// `weightdiff merge` instead of the reports.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::pipeline::plan::Shard>,
    /// How tensor bytes are read: `pread` (positioned reads into buffers, the default)
    /// or `mapped` (each shard mapped once, bytes used in place; a shard that shrinks
    /// during a read is an error for its tensor).
    #[arg(long, value_name = "MODE", default_value = "pread")]
    pub read_mode: crate::checkpoint::shard::ReadMode,
    /// The same as `--read-mode mapped` (kept for existing scripts).
    #[arg(long, hide = true, conflicts_with = "read_mode")]
    pub mmap: bool,
    #[command(flatten)]
    pub display: DisplayArgs,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// Base model: a Hugging Face directory, a .safetensors or .bin file, or a hub id.
    pub base: PathBuf,
    /// Fine-tuned model, given like the base.
    pub finetuned: PathBuf,
    /// Adapter directory to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Fixed rank per module.
    #[arg(long, conflicts_with_all = ["energy", "sv_ratio"])]
    pub rank: Option<usize>,
    /// Per module, the smallest rank keeping this fraction of ||delta||^2.
    #[arg(long, value_name = "F", conflicts_with = "sv_ratio")]
    pub energy: Option<f64>,
    /// Per module, keep singular values >= sigma_1 / X.
    #[arg(long, value_name = "X")]
    pub sv_ratio: Option<f64>,
    /// Upper bound on any module's rank.
    #[arg(long)]
    pub max_rank: Option<usize>,
    /// Give every module exactly --rank (zero-padded), for runtimes with one alpha/r.
    #[arg(long)]
    pub uniform_rank: bool,
    /// Leaf module names to extract, comma-separated (default: every changed matrix).
    #[arg(long, value_delimiter = ',')]
    pub modules: Option<Vec<String>>,
    /// Only tensors whose name matches this regex.
    #[arg(long, value_name = "RE")]
    pub include: Option<String>,
    /// Skip tensors whose name matches this regex.
    #[arg(long, value_name = "RE")]
    pub exclude: Option<String>,
    /// Factor dtype (default: the base model's).
    #[arg(long, value_parser = ["bf16", "f16", "f32"])]
    pub dtype: Option<String>,
    /// Leave changed 1-D tensors (norms, biases) out instead of saving them whole.
    #[arg(long)]
    pub skip_undecomposable: bool,
    /// PEFT task type of the adapter (default: from config.json's architectures; `none`
    /// for PEFT's base PeftModel).
    #[arg(long, value_name = "TYPE")]
    pub task_type: Option<crate::peft::TaskOverride>,
    /// The runtime to write for: `peft` (everything PEFT loads) or `vllm` (linear
    /// modules only, one rank vLLM accepts, no bias, no modules_to_save).
    #[arg(long, default_value = "peft")]
    pub profile: crate::peft::Profile,
    /// Seed of the randomized SVD.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Oversampling of the randomized SVD.
    #[arg(long, default_value_t = 16)]
    pub oversample: usize,
    /// Power iterations of the randomized SVD.
    #[arg(long, default_value_t = 2)]
    pub power_iters: usize,
    /// Singular values computed per tensor for the spectrum and rank detection.
    #[arg(long, default_value_t = 64)]
    pub analysis_rank: usize,
    /// How tensor bytes are read: `pread` (positioned reads into buffers, the default)
    /// or `mapped` (each shard mapped once, bytes used in place; a shard that shrinks
    /// during a read is an error for its tensor).
    #[arg(long, value_name = "MODE", default_value = "pread")]
    pub read_mode: crate::checkpoint::shard::ReadMode,
    /// The same as `--read-mode mapped` (kept for existing scripts).
    #[arg(long, hide = true, conflicts_with = "read_mode")]
    pub mmap: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub display: DisplayArgs,
}

fn regex_opt(s: &Option<String>, flag: &str) -> anyhow::Result<Option<regex::Regex>> {
    s.as_deref()
        .map(|p| {
            regex::Regex::new(p).map_err(|e| anyhow::anyhow!("invalid {flag} regex `{p}`: {e}"))
        })
        .transpose()
}

fn check_fraction(v: Option<f64>, flag: &str) -> anyhow::Result<()> {
    match v {
        Some(f) if !(f > 0.0 && f <= 1.0) => anyhow::bail!("{flag} must be in (0, 1], got {f}"),
        _ => Ok(()),
    }
}

impl ExtractArgs {
    /// Options of the diff that finds the changed tensors, and of the LoRA stage.
    pub fn options(&self) -> anyhow::Result<(crate::CompareOptions, crate::pipeline::LoraOptions)> {
        use crate::checkpoint::dtype::DType;
        use crate::lowrank::{LowRankOptions, RankRule};
        check_fraction(self.energy, "--energy")?;
        if let Some(x) = self.sv_ratio
            && (x.is_nan() || x < 1.0)
        {
            anyhow::bail!("--sv-ratio must be >= 1, got {x}");
        }
        let rule = match (self.rank, self.energy, self.sv_ratio) {
            (Some(0), _, _) => anyhow::bail!("--rank must be at least 1"),
            (Some(r), _, _) => RankRule::Fixed { rank: r },
            (_, Some(f), _) => RankRule::Energy { fraction: f },
            (_, _, Some(x)) => RankRule::SvRatio { ratio: x },
            _ => RankRule::Fixed { rank: 16 },
        };
        if self.uniform_rank && !matches!(rule, RankRule::Fixed { .. }) {
            anyhow::bail!("--uniform-rank needs a fixed --rank, not --energy or --sv-ratio");
        }
        let compare = crate::CompareOptions {
            include: regex_opt(&self.include, "--include")?,
            exclude: regex_opt(&self.exclude, "--exclude")?,
            threads: self.threads,
            ..Default::default()
        };
        let lora = crate::pipeline::LoraOptions {
            lowrank: LowRankOptions {
                rank_rule: rule,
                max_rank: self.max_rank,
                seed: self.seed,
                oversample: self.oversample,
                power_iters: self.power_iters,
                analysis_rank: self.analysis_rank,
                // Extraction is this command's whole job: two more half iterations
                // bring a merged LoRA's factors to mergekit's full-SVD error
                // (BENCHMARKS.md, issue 11).
                refine_iters: 3,
                ..Default::default()
            },
            extract: true,
            modules: self.modules.clone(),
            dtype: self.dtype.as_deref().map(|d| match d {
                "bf16" => DType::BF16,
                "f16" => DType::F16,
                _ => DType::F32,
            }),
            uniform_rank: self.uniform_rank,
            skip_undecomposable: self.skip_undecomposable,
            threads: self.threads,
            task_type: self.task_type,
            profile: self.profile,
            cancel: None,
            journal: None,
        };
        Ok((compare, lora))
    }
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
    /// The LoRA stage's options, `None` under `--no-lora`.
    pub fn lora_options(&self) -> anyhow::Result<Option<crate::pipeline::LoraOptions>> {
        use crate::lowrank::{LowRankOptions, RankRule};
        if self.no_lora {
            return Ok(None);
        }
        check_fraction(self.lora_energy, "--lora-energy")?;
        let rule = match (self.lora_rank, self.lora_energy) {
            (Some(0), _) => anyhow::bail!("--lora-rank must be at least 1"),
            (Some(r), _) => RankRule::Fixed { rank: r },
            (_, Some(f)) => RankRule::Energy { fraction: f },
            _ => RankRule::Fixed { rank: 16 },
        };
        Ok(Some(crate::pipeline::LoraOptions {
            lowrank: LowRankOptions {
                rank_rule: rule,
                seed: self.seed,
                ..Default::default()
            },
            extract: true,
            threads: self.threads,
            task_type: self.task_type,
            profile: self.profile,
            ..Default::default()
        }))
    }

    /// Library options from the flags.
    pub fn options(&self) -> anyhow::Result<crate::CompareOptions> {
        let re = regex_opt;
        if !(self.threshold >= 0.0 && self.threshold.is_finite()) {
            anyhow::bail!(
                "--threshold must be a finite number >= 0, got {}",
                self.threshold
            );
        }
        if self.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        Ok(crate::CompareOptions {
            threshold: self.threshold,
            verify: self.verify,
            include: re(&self.include, "--include")?,
            exclude: re(&self.exclude, "--exclude")?,
            threads: self.threads,
            journal_dir: Some(self.output.clone()),
            resume: self.resume,
            shard: self.shard,
            ..Default::default()
        })
    }
}

impl CompareArgs {
    /// The library job these flags ask for.
    pub fn job(&self) -> anyhow::Result<crate::jobs::CompareJob> {
        Ok(crate::jobs::CompareJob {
            base: self.base.clone(),
            finetuned: self.finetuned.clone(),
            output: self.output.clone(),
            options: self.options()?,
            lora: self.lora_options()?,
            top: self.top,
            shard: self.shard,
            read_mode: if self.mmap {
                crate::checkpoint::shard::ReadMode::Mapped
            } else {
                self.read_mode
            },
        })
    }
}

impl ExtractArgs {
    /// The library job these flags ask for.
    pub fn job(&self) -> anyhow::Result<crate::jobs::ExtractJob> {
        let (options, lora) = self.options()?;
        Ok(crate::jobs::ExtractJob {
            base: self.base.clone(),
            finetuned: self.finetuned.clone(),
            output: self.output.clone(),
            options,
            lora,
            read_mode: if self.mmap {
                crate::checkpoint::shard::ReadMode::Mapped
            } else {
                self.read_mode
            },
        })
    }
}
