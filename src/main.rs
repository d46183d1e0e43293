//! The `weightdiff` binary: parse flags, call the library, print, choose the exit code.

/// A line on stderr. Never panics: with stderr closed (`weightdiff … 2>&1 | head -3`),
/// progress and notes are dropped and the run goes on to write its reports.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// [`say!`] without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

mod cli;
mod progress;

use anyhow::Context;
use clap::Parser;
use cli::{Cli, Command, CompareArgs, DisplayArgs};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use weightdiff::checkpoint::shard::ReadMode;
use weightdiff::{Checkpoint, Comparison, pipeline, report, synthetic};

/// Exit status when some tensors failed but the run finished (SPEC §5).
const EXIT_TENSOR_ERRORS: u8 = 1;
/// Exit status for unusable arguments or unreadable models (SPEC §5).
const EXIT_UNUSABLE: u8 = 2;
/// Exit status of a run that finished and wrote its reports, but whose models are not a
/// base and a derivative (`unrelated`, `different_architecture`, `nothing_compared`): no
/// LoRA verdict, no adapter. Tensor errors (1) take precedence.
const EXIT_NOT_A_DERIVATIVE: u8 = 3;
/// Tensor errors printed one per line on stderr before the rest are counted.
const STDERR_ERRORS: usize = 10;
/// Exit statuses after a clean stop on SIGINT / SIGTERM (128 + signal number).
const EXIT_SIGINT: u8 = 130;
const EXIT_SIGTERM: u8 = 143;

/// Which stop signal arrived; the pipeline watches `cancel`.
struct Signals {
    cancel: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
}

/// SIGINT and SIGTERM ask the run to stop cleanly (finish the outputs, mark them
/// incomplete); a second one while stopping ends the process at once.
fn install_signals() -> anyhow::Result<Signals> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let cancel = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    for (sig, code) in [(SIGINT, EXIT_SIGINT), (SIGTERM, EXIT_SIGTERM)] {
        // Registered before the flag setter: it sees the flag as the previous signal left it.
        flag::register_conditional_shutdown(sig, code as i32, cancel.clone())?;
        flag::register(sig, cancel.clone())?;
    }
    flag::register(SIGTERM, term.clone())?;
    Ok(Signals { cancel, term })
}

impl Signals {
    fn stop_code(&self) -> Option<ExitCode> {
        self.cancel.load(Ordering::Relaxed).then(|| {
            ExitCode::from(if self.term.load(Ordering::Relaxed) {
                EXIT_SIGTERM
            } else {
                EXIT_SIGINT
            })
        })
    }
}

/// Colour on stderr only for a terminal, and never when `NO_COLOR` is set to anything
/// non-empty (<https://no-color.org>).
fn use_color() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Log lines on stderr through `tracing`: warnings by default, `-v` info, `-vv` debug,
/// `-vvv` trace; a `RUST_LOG` filter, when set, wins.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("weightdiff={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_color())
        .with_target(false)
        // Its own report of a failed write would panic on a closed stderr.
        .log_internal_errors(false)
        .try_init();
}

/// `error:` in bold red when colour is on.
fn error_label() -> &'static str {
    if use_color() {
        "\x1b[1;31merror:\x1b[0m"
    } else {
        "error:"
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // A closed stdout (`weightdiff ... --json | head`) is not an error.
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            say!("{} {e:#}", error_label());
            ExitCode::from(EXIT_UNUSABLE)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Compare(args) => compare(&args),
        Command::ExtractLora(args) => extract_lora(&args),
        Command::Merge {
            parts,
            output,
            top,
            display,
        } => merge(&parts, &output, top, display),
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Demo { output, display } => demo(&output, display),
        Command::Report { dir, top, display } => regenerate_reports(&dir, top, display),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Into a buffer first: the generator panics on a closed stdout.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "weightdiff", &mut script);
            print_stdout(&script)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How a subcommand opens its models.
#[derive(Clone, Copy)]
struct Opening {
    /// Read through memory maps (`--mmap`).
    mmap: bool,
    /// No download progress on stderr (`--quiet`, `--json`).
    quiet: bool,
}

impl Opening {
    fn new(mmap: bool, display: DisplayArgs) -> Opening {
        Opening {
            mmap,
            quiet: display.quiet || display.json,
        }
    }
}

/// Opens a model argument: a path, or a hub id resolved through the Hugging Face cache.
/// `role` ("base", "fine-tuned" or empty) names it in the error.
fn open(path: &Path, role: &str, how: Opening) -> anyhow::Result<Checkpoint> {
    let settings = weightdiff::hub::HubSettings::from_env();
    let downloads = progress::Downloads::new();
    let progress: &dyn weightdiff::hub::DownloadProgress = if how.quiet {
        &weightdiff::hub::Silent
    } else {
        &downloads
    };
    if let Some(id) = weightdiff::hub::hub_candidate(path)
        && !how.quiet
    {
        say!(
            "note: no file or directory `{}` here; trying it as the Hugging Face hub id {id}",
            path.display()
        );
    }
    let mut ck = weightdiff::hub::open_model(path, &settings, progress).with_context(|| {
        if role.is_empty() {
            "cannot read the model".to_string()
        } else {
            format!("cannot read the {role} model")
        }
    })?;
    if how.mmap {
        ck.read_mode = ReadMode::Mmap;
    }
    Ok(ck)
}

fn open_pair(base: &Path, ft: &Path, how: Opening) -> anyhow::Result<(Checkpoint, Checkpoint)> {
    Ok((open(base, "base", how)?, open(ft, "fine-tuned", how)?))
}

/// Both checkpoints read the same files (a model compared with itself).
fn same_model(base: &Checkpoint, ft: &Checkpoint) -> bool {
    let files = |ck: &Checkpoint| -> Vec<Option<PathBuf>> {
        ck.shard_paths()
            .map(|p| std::fs::canonicalize(p).ok())
            .collect()
    };
    let a = files(base);
    !a.is_empty() && a.iter().all(Option::is_some) && a == files(ft)
}

fn compare(args: &CompareArgs) -> anyhow::Result<ExitCode> {
    let mut opts = args.options()?;
    let lora = args.lora_options()?;
    if args.finetuned.len() > 1 {
        if args.shard.is_some() || args.resume {
            anyhow::bail!("--shard and --resume take one fine-tuned model");
        }
        return compare_trajectory(args, opts, lora.as_ref());
    }
    let (base, ft) = open_pair(
        &args.base,
        &args.finetuned[0],
        Opening::new(args.mmap, args.display),
    )?;
    let _lock = report::lock_output_dir(&args.output)?;
    let signals = install_signals()?;
    opts.cancel = Some(signals.cancel.clone());
    let out = &args.output;
    if !args.display.quiet && !args.display.json && same_model(&base, &ft) {
        say!(
            "note: {} and {} are the same model (the same files): every tensor will be identical",
            args.base.display(),
            args.finetuned[0].display()
        );
    }
    if let Some(shard) = args.shard {
        return compare_shard(
            &base,
            &ft,
            &opts,
            lora.as_ref(),
            out,
            shard,
            &signals,
            args.display,
        );
    }
    let code = run_compare(
        &base,
        &ft,
        &opts,
        lora.as_ref(),
        out,
        args.top,
        args.display,
    )?;
    if let Some(stop) = signals.stop_code() {
        say!(
            "stopped: the reports in {} cover the tensors compared so far (complete: false); run again with --resume to finish",
            out.display()
        );
        return Ok(stop);
    }
    // Finished: the reports are the record now, the journal has done its job.
    weightdiff::journal::remove(out)?;
    Ok(code)
}

fn run_compare(
    base: &Checkpoint,
    ft: &Checkpoint,
    opts: &weightdiff::CompareOptions,
    lora: Option<&pipeline::LoraOptions>,
    out: &Path,
    top: usize,
    display: DisplayArgs,
) -> anyhow::Result<ExitCode> {
    let progress = progress::Reporter::new(display.quiet);
    let mut c = pipeline::compare(base, ft, opts, &progress)?;
    progress.finish();
    let unsettled = weightdiff::relatedness::needs_low_rank_evidence(&c);
    if (unsettled || weightdiff::relatedness::assess(&c).verdict.is_none())
        && let Some(lo) = lora.filter(|_| c.complete)
    {
        if !display.quiet && !display.json {
            say!(
                "analysing {} modified tensors for low rank...",
                c.modified().len()
            );
        }
        let lo = pipeline::LoraOptions {
            cancel: opts.cancel.clone(),
            journal: opts
                .journal_dir
                .clone()
                .map(|d| (d, pipeline::fingerprint(base, ft, opts), opts.resume)),
            ..lo.clone()
        };
        let l = pipeline::analyze_lora_with(base, ft, &c, &lo, &progress)?;
        progress.finish();
        // Stopped during the stage: the reports hold the diff and the tensors analysed.
        c.complete &= l.complete();
        c.lora = Some(l);
        if unsettled {
            weightdiff::relatedness::settle(&mut c);
        }
    }
    not_a_derivative(&c, lora.is_some(), display);
    write_reports(&c, out, top, display)
}

/// The relatedness check before the low-rank stage: true when the two models are not a
/// base and a derivative, which it says on stderr (the stage is then skipped).
fn not_a_derivative(c: &Comparison, lora: bool, display: DisplayArgs) -> bool {
    let Some(v) = weightdiff::relatedness::assess(c).verdict else {
        return false;
    };
    if !display.quiet && !display.json {
        say!(
            "{}: {}{}",
            v.kind.replace('_', " "),
            v.reason.as_deref().unwrap_or(""),
            if lora {
                "; low-rank analysis and extraction skipped"
            } else {
                ""
            }
        );
    }
    true
}

/// The exit status of a finished run (SPEC §5, and [`EXIT_NOT_A_DERIVATIVE`]).
fn exit_status(c: &Comparison) -> ExitCode {
    let lora_errors = c.lora.as_ref().is_some_and(|l| !l.errors.is_empty());
    if !c.errors.is_empty() || lora_errors {
        ExitCode::from(EXIT_TENSOR_ERRORS)
    } else if weightdiff::relatedness::assess(c).verdict.is_some() {
        ExitCode::from(EXIT_NOT_A_DERIVATIVE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Removes what an earlier run left in `out` that this one did not write (a directory
/// holds one run), and says so.
fn remove_stale(
    out: &Path,
    written: &[PathBuf],
    keep: &[&str],
    display: DisplayArgs,
) -> anyhow::Result<()> {
    let removed = report::remove_stale(out, written, keep).with_context(|| {
        format!(
            "cannot remove an earlier run's outputs from {}",
            out.display()
        )
    })?;
    if !removed.is_empty() && !display.quiet && !display.json {
        let names: Vec<String> = removed
            .iter()
            .map(|p| p.strip_prefix(out).unwrap_or(p).display().to_string())
            .collect();
        say!(
            "removed {} outputs of an earlier run from {} (this run does not write them): {}",
            removed.len(),
            out.display(),
            names.join(", ")
        );
    }
    Ok(())
}

/// Writes every report of `c`, tells the user, and picks the exit status (SPEC §5).
fn write_reports(
    c: &Comparison,
    out: &Path,
    top: usize,
    display: DisplayArgs,
) -> anyhow::Result<ExitCode> {
    let written = report::write_comparison_reports(c, out, top)
        .with_context(|| format!("cannot write reports into {}", out.display()))?;
    // A merge may write into one of its part directories: the parts stay.
    let parts = [
        weightdiff::shards::PART_JSON,
        weightdiff::shards::PART_TENSORS,
    ];
    remove_stale(out, &written, &parts, display)?;
    // Tensor errors always reach stderr, whatever --quiet and --json say; the first few,
    // then a count (every one is in the reports).
    for (name, e) in c.errors.iter().take(STDERR_ERRORS) {
        say!("{} {name}: {e}", error_label());
    }
    if c.errors.len() > STDERR_ERRORS {
        say!(
            "{} … and {} more tensor errors (all in {})",
            error_label(),
            c.errors.len() - STDERR_ERRORS,
            out.join(report::WEIGHT_DIFFERENCES_JSON).display()
        );
    }
    if display.json {
        print_json(&summary_json(c, &written, top))?;
    } else if !display.quiet {
        print_summary(c, out);
    }
    Ok(exit_status(c))
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    print_stdout(&report::to_json(v))
}

/// Writes `bytes` to stdout. A closed stdout (`--json | head -c 20`) is not an error of
/// the run: the bytes are dropped and the exit status stays the run's.
fn print_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn summary_json(c: &Comparison, written: &[PathBuf], top: usize) -> serde_json::Value {
    let related = weightdiff::relatedness::assess(c);
    serde_json::json!({
        "verdict": related.verdict.as_ref().or(c.lora.as_ref().map(|l| &l.verdict)),
        "relatedness": related,
        "base": c.base.source,
        "finetuned": c.finetuned.source,
        "compared": c.results.len(),
        "modified": c.modified().len(),
        "identical": c.results.iter().filter(|(_, m)| m.identical).count(),
        "errors": c.errors,
        "only_in_base": c.only_in_base.len(),
        "only_in_finetuned": c.only_in_finetuned.len(),
        "mismatches": c.mismatches.len(),
        "top_modified": c.top_modified(top).iter().map(|(n, m)| serde_json::json!({
            "name": n, "relative_diff": m.relative_diff
        })).collect::<Vec<_>>(),
        "throughput_gbps": c.performance.throughput_gbps,
        "total_time": c.performance.total_time,
        "lowrank_time": c.lora.as_ref().map(|l| l.total_time),
        "outputs": written,
    })
}

fn print_summary(c: &Comparison, out: &Path) {
    let p = &c.performance;
    say!(
        "compared {} tensors in {:.2}s ({:.2} GB/s): {} modified, {} identical, {} failed",
        c.results.len(),
        p.total_time,
        p.throughput_gbps,
        c.modified().len(),
        c.results.iter().filter(|(_, m)| m.identical).count(),
        c.errors.len()
    );
    if let Some(l) = &c.lora {
        say!(
            "low-rank stage: {} matrices in {:.2}s",
            l.spectra.len(),
            l.total_time
        );
    }
    let related = weightdiff::relatedness::assess(c);
    say!(
        "whole model: ‖Δ‖/‖W‖ {}, parameter-weighted cosine {}",
        related
            .relative_diff
            .map_or("n/a".into(), |r| format!("{r:.3e}")),
        related
            .cosine_similarity
            .map_or("n/a".into(), |r| format!("{r:.4}"))
    );
    if let Some(v) = &related.verdict {
        say!(
            "verdict: {} ({})",
            v.kind,
            v.reason.as_deref().unwrap_or("")
        );
    } else if let Some(l) = &c.lora {
        let v = &l.verdict;
        say!(
            "verdict: {}{}{} (confidence {:.2}); {} modules extracted",
            v.kind,
            v.rank.map_or(String::new(), |r| format!(", rank {r}")),
            if v.target_modules.is_empty() {
                String::new()
            } else {
                format!(" on {}", v.target_modules.join(", "))
            },
            v.confidence,
            l.extracted.len()
        );
        let kept = report::summary::adapter_kept_share(
            c,
            l.extracted
                .iter()
                .map(|e| (e.tensor.as_str(), e.factors.residual_stored)),
        );
        let rank = serde_json::json!(weightdiff::peft::adapter::default_rank(l));
        if let Some(caveat) = kept.and_then(|k| report::summary::low_rank_caveat(k, &rank)) {
            say!("{caveat}");
        }
    }
    say!("reports written to {}", out.display());
}

fn inspect(model: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let ck = open(
        model,
        "",
        Opening {
            mmap: false,
            quiet: json,
        },
    )?;
    let info = pipeline::model_info(&ck);
    let structure = report::architecture::model_structure(&info);
    if json {
        print_json(&serde_json::json!({
            "structure": structure,
            "tensors": info.tensors,
            "problems": info.warnings,
        }))?;
    } else {
        // Into a buffer, then stdout: see `print_stdout`.
        let mut out = Vec::new();
        for t in &info.tensors {
            writeln!(out, "{:<60} {:<8} {:?}", t.name, t.dtype, t.shape)?;
        }
        writeln!(out)?;
        writeln!(out, "model:      {}", info.source)?;
        writeln!(out, "files:      {}", info.files.len())?;
        writeln!(out, "tensors:    {}", info.tensors.len())?;
        writeln!(out, "parameters: {}", structure["parameter_count"])?;
        writeln!(out, "bytes:      {}", structure["bytes"])?;
        writeln!(out, "dtypes:     {}", structure["dtype_histogram"])?;
        if let Some(t) = structure["model_type"].as_str() {
            writeln!(out, "model_type: {t}")?;
        }
        for w in &info.warnings {
            writeln!(out, "problem:    {w}")?;
        }
        print_stdout(&out)?;
    }
    Ok(if ck.broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TENSOR_ERRORS)
    })
}

fn demo(out: &Path, display: DisplayArgs) -> anyhow::Result<ExitCode> {
    let spec = synthetic::demo_spec();
    let pair_dir = out.join("pair");
    if !display.quiet && !display.json {
        say!("building a synthetic pair in {}", pair_dir.display());
    }
    let pair = synthetic::build_pair(&spec, &pair_dir).context("cannot build the demo pair")?;
    if !display.quiet && !display.json {
        say!(
            "the fine-tune edits {} tensors: a rank-4 LoRA merged into q_proj and v_proj, and noise on layer 1's norms",
            pair.edits.len()
        );
    }
    let how = Opening::new(false, display);
    let (base, ft) = open_pair(&pair.base, &pair.finetuned, how)?;
    let reports = out.join("reports");
    let opts = weightdiff::CompareOptions {
        verify: true,
        ..Default::default()
    };
    let lora = pipeline::LoraOptions {
        extract: true,
        lowrank: weightdiff::lowrank::LowRankOptions {
            rank_rule: weightdiff::lowrank::RankRule::Fixed { rank: 4 },
            ..Default::default()
        },
        ..Default::default()
    };
    let code = run_compare(&base, &ft, &opts, Some(&lora), &reports, 20, display)?;
    if !display.quiet && !display.json {
        say!(
            "start with {} (or open {} in a browser)",
            reports.join(report::COMPARISON_REPORT_TXT).display(),
            reports.join(report::html::REPORT_HTML).display()
        );
    }
    Ok(code)
}

/// `weightdiff report DIR`: one comparison's directory, or the directory of several
/// fine-tunes (`trajectory.json`), whose every comparison is rendered again.
fn regenerate_reports(dir: &Path, top: usize, display: DisplayArgs) -> anyhow::Result<ExitCode> {
    let _lock = report::lock_output_dir(dir)?;
    let several = !dir.join(report::WEIGHT_DIFFERENCES_JSON).exists()
        && dir.join(report::TRAJECTORY_JSON).exists();
    let written = if several {
        report::regenerate_trajectory(dir, top)
    } else {
        report::regenerate(dir, top)
    }
    .with_context(|| format!("cannot regenerate the reports in {}", dir.display()))?;
    if display.json {
        print_json(&serde_json::json!({ "outputs": written }))?;
    } else if !display.quiet {
        for p in &written {
            say!("wrote {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn extract_lora(args: &cli::ExtractArgs) -> anyhow::Result<ExitCode> {
    let (opts, lora_opts) = args.options()?;
    let (base, ft) = open_pair(
        &args.base,
        &args.finetuned,
        Opening::new(args.mmap, args.display),
    )?;
    let _lock = report::lock_output_dir(&args.output)?;
    let signals = install_signals()?;
    let opts = weightdiff::CompareOptions {
        cancel: Some(signals.cancel.clone()),
        ..opts
    };
    let lora_opts = pipeline::LoraOptions {
        cancel: Some(signals.cancel.clone()),
        ..lora_opts
    };
    let progress = progress::Reporter::new(args.display.quiet);
    let mut c = pipeline::compare(&base, &ft, &opts, &progress)?;
    progress.finish();
    let out = &args.output;
    if let Some(stop) = signals.stop_code() {
        say!("stopped: no adapter written to {}", out.display());
        return Ok(stop);
    }
    if weightdiff::relatedness::needs_low_rank_evidence(&c) {
        c.lora = Some(pipeline::analyze_lora_with(
            &base, &ft, &c, &lora_opts, &progress,
        )?);
        progress.finish();
        weightdiff::relatedness::settle(&mut c);
    }
    if not_a_derivative(&c, true, args.display) {
        if args.display.json {
            let related = weightdiff::relatedness::assess(&c);
            print_json(&serde_json::json!({
                "verdict": related.verdict,
                "relatedness": related,
                "modules": 0,
                "outputs": [],
            }))?;
        }
        return Ok(exit_status(&c));
    }
    let lora = match c.lora.take() {
        Some(l) => l,
        None => {
            let l = pipeline::analyze_lora_with(&base, &ft, &c, &lora_opts, &progress)?;
            progress.finish();
            l
        }
    };
    if let Some(stop) = signals.stop_code().filter(|_| !lora.complete()) {
        say!("stopped: no adapter written to {}", out.display());
        return Ok(stop);
    }
    let (mut written, verification) = report::lora::write_adapter(&lora, out, None)
        .with_context(|| format!("cannot write the adapter into {}", out.display()))?;
    for (name, body) in [
        (
            report::lora::LORA_METADATA_JSON,
            report::lora::metadata(&lora, &verification),
        ),
        (
            report::lora::LORA_ANALYSIS_JSON,
            report::lora::analysis(&lora),
        ),
    ] {
        let p = out.join(name);
        report::write_atomic(&p, &report::to_json(&body))?;
        written.push(p);
    }
    for (name, e) in c.errors.iter().chain(&lora.errors) {
        say!("{} {name}: {e}", error_label());
    }
    let mean = if lora.extracted.is_empty() {
        0.0
    } else {
        lora.extracted
            .iter()
            .map(|e| e.factors.residual_stored)
            .sum::<f64>()
            / lora.extracted.len() as f64
    };
    if args.display.json {
        print_json(&serde_json::json!({
            "verdict": lora.verdict,
            "modules": lora.extracted.len(),
            "default_rank": weightdiff::peft::adapter::default_rank(&lora),
            "mean_residual": mean,
            "modules_to_save": lora.modules_to_save,
            "skipped": lora.skipped.len(),
            "task_type": lora.facts.task_type,
            "notes": lora.notes,
            "outputs": written,
        }))?;
    } else if !args.display.quiet {
        say!(
            "extracted {} modules (default rank {}), mean relative error {mean:.3e}; {} changed tensors not extracted",
            lora.extracted.len(),
            weightdiff::peft::adapter::default_rank(&lora),
            lora.skipped.len()
        );
        say!(
            "adapter written to {} (task type {})",
            out.display(),
            lora.facts.task_type.map_or("none", |t| t.as_str())
        );
        for n in &lora.notes {
            say!("note: {n}");
        }
    }
    Ok(if c.errors.is_empty() && lora.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TENSOR_ERRORS)
    })
}

/// `compare --shard I/N`: this shard's tensors, written as a part for `merge`.
#[allow(clippy::too_many_arguments)]
fn compare_shard(
    base: &Checkpoint,
    ft: &Checkpoint,
    opts: &weightdiff::CompareOptions,
    lora: Option<&pipeline::LoraOptions>,
    out: &Path,
    shard: weightdiff::shards::Shard,
    signals: &Signals,
    display: DisplayArgs,
) -> anyhow::Result<ExitCode> {
    let progress = progress::Reporter::new(display.quiet);
    let c = pipeline::compare(base, ft, opts, &progress)?;
    progress.finish();
    if let Some(stop) = signals.stop_code() {
        say!("stopped: run again with --resume to finish shard {shard}");
        return Ok(stop);
    }
    let parts = lora
        .map(|lo| pipeline::analyze_lora_parts(base, ft, &c, lo))
        .transpose()?;
    // Parts of one job must agree on inputs and options, whatever their shard.
    let fp = pipeline::fingerprint(
        base,
        ft,
        &weightdiff::CompareOptions {
            shard: None,
            ..opts.clone()
        },
    );
    let written = weightdiff::shards::write_part(out, shard, &fp, &c, lora.zip(parts.as_ref()))?;
    remove_stale(out, &written, &[], display)?;
    weightdiff::journal::remove(out)?;
    for (name, e) in &c.errors {
        say!("{} {name}: {e}", error_label());
    }
    if display.json {
        print_json(&serde_json::json!({
            "shard": shard.to_string(),
            "compared": c.results.len(),
            "outputs": written,
        }))?;
    } else if !display.quiet {
        say!(
            "shard {shard}: compared {} tensors; part written to {} (combine with `weightdiff merge`)",
            c.results.len(),
            out.display()
        );
    }
    Ok(if c.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TENSOR_ERRORS)
    })
}

fn merge(
    parts: &[PathBuf],
    out: &Path,
    top: usize,
    display: DisplayArgs,
) -> anyhow::Result<ExitCode> {
    let _lock = report::lock_output_dir(out)?;
    let mut c = weightdiff::shards::merge(parts)?;
    if not_a_derivative(&c, c.lora.is_some(), display) {
        c.lora = None;
    }
    write_reports(&c, out, top, display)
}

/// `compare BASE FT1 FT2 …`: one pass over the base for all fine-tuned models, a report
/// directory per model and `trajectory.json` across them.
fn compare_trajectory(
    args: &CompareArgs,
    mut opts: weightdiff::CompareOptions,
    lora: Option<&pipeline::LoraOptions>,
) -> anyhow::Result<ExitCode> {
    let how = Opening::new(args.mmap, args.display);
    let base = open(&args.base, "base", how)?;
    let fts = args
        .finetuned
        .iter()
        .map(|p| open(p, "fine-tuned", how))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = &args.output;
    let _lock = report::lock_output_dir(out)?;
    let signals = install_signals()?;
    opts.cancel = Some(signals.cancel.clone());
    opts.journal_dir = None;
    let refs: Vec<&Checkpoint> = fts.iter().collect();
    let progress = progress::Reporter::new(args.display.quiet);
    let mut cs = pipeline::compare_many(&base, &refs, &opts, &progress)?;
    progress.finish();
    let labels = trajectory_labels(&args.finetuned);
    let (mut failed, mut unrelated) = (false, false);
    let mut all_written: Vec<PathBuf> = Vec::new();
    let mut summaries = Vec::new();
    for ((c, ft), label) in cs.iter_mut().zip(&fts).zip(&labels) {
        if !not_a_derivative(c, lora.is_some(), args.display)
            && let Some(lo) = lora.filter(|_| c.complete)
        {
            c.lora = Some(pipeline::analyze_lora(&base, ft, c, lo)?);
        }
        let dir = out.join(label);
        let written = report::write_comparison_reports(c, &dir, args.top)
            .with_context(|| format!("cannot write reports into {}", dir.display()))?;
        remove_stale(&dir, &written, &[], args.display)?;
        all_written.extend(written.iter().cloned());
        summaries.push(summary_json(c, &written, args.top));
        for (name, e) in &c.errors {
            say!("{} {label}: {name}: {e}", error_label());
        }
        let code = exit_status(c);
        failed |= code == ExitCode::from(EXIT_TENSOR_ERRORS);
        unrelated |= code == ExitCode::from(EXIT_NOT_A_DERIVATIVE);
    }
    let outputs = report::write_trajectory(out, &cs, &labels)?;
    all_written.extend(outputs.iter().cloned());
    remove_stale(out, &all_written, &[], args.display)?;
    let table = report::trajectory::render_text(&cs);
    if args.display.json {
        print_json(&serde_json::json!({
            "overall": report::trajectory::render(&cs)["overall"],
            "checkpoints": summaries,
            "outputs": outputs,
        }))?;
    } else if !args.display.quiet {
        say_raw!("{table}");
        say!(
            "reports written to {} (one directory per fine-tuned model, trajectory.json)",
            out.display()
        );
    }
    if let Some(stop) = signals.stop_code() {
        return Ok(stop);
    }
    Ok(if failed {
        ExitCode::from(EXIT_TENSOR_ERRORS)
    } else if unrelated {
        ExitCode::from(EXIT_NOT_A_DERIVATIVE)
    } else {
        ExitCode::SUCCESS
    })
}

/// A directory name per fine-tuned model: its last path component, made unique.
fn trajectory_labels(paths: &[PathBuf]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let stem = p
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(".safetensors")
                    .to_string()
            })
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .unwrap_or_else(|| format!("finetuned-{}", i + 1));
        let label = if labels.contains(&stem) {
            format!("{}-{stem}", i + 1)
        } else {
            stem
        };
        labels.push(label);
    }
    labels
}
