//! The `weightdiff` binary: parse flags, call the library, print, choose the exit code.

mod cli;
mod progress;

use anyhow::Context;
use clap::Parser;
use cli::{Cli, Command, CompareArgs, DisplayArgs};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use weightdiff::{Checkpoint, Comparison, pipeline, report, synthetic};

/// Exit status when some tensors failed but the run finished (SPEC §5).
const EXIT_TENSOR_ERRORS: u8 = 1;
/// Exit status for unusable arguments or unreadable models (SPEC §5).
const EXIT_UNUSABLE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // A closed stdout (`weightdiff ... --json | head`) is not an error.
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_UNUSABLE)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Compare(args) => compare(&args),
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Demo { output, display } => demo(&output, display),
    }
}

fn open(path: &Path, role: &str) -> anyhow::Result<Checkpoint> {
    Checkpoint::open(path).with_context(|| format!("cannot read the {role} model"))
}

fn compare(args: &CompareArgs) -> anyhow::Result<ExitCode> {
    let opts = args.options()?;
    let base = open(&args.base, "base")?;
    let ft = open(&args.finetuned, "fine-tuned")?;
    run_compare(&base, &ft, &opts, &args.output, args.top, args.display)
}

fn run_compare(
    base: &Checkpoint,
    ft: &Checkpoint,
    opts: &weightdiff::CompareOptions,
    out: &Path,
    top: usize,
    display: DisplayArgs,
) -> anyhow::Result<ExitCode> {
    let progress = progress::Reporter::new(display.quiet);
    let c = pipeline::compare(base, ft, opts, &progress)?;
    progress.finish();
    let written = report::write_comparison_reports(&c, out, top)
        .with_context(|| format!("cannot write reports into {}", out.display()))?;
    // Tensor errors always reach stderr, whatever --quiet and --json say.
    for (name, e) in &c.errors {
        eprintln!("error: {name}: {e}");
    }
    if display.json {
        print_json(&summary_json(&c, &written, top))?;
    } else if !display.quiet {
        print_summary(&c, out);
    }
    Ok(if c.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TENSOR_ERRORS)
    })
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn summary_json(c: &Comparison, written: &[PathBuf], top: usize) -> serde_json::Value {
    serde_json::json!({
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
        "outputs": written,
    })
}

fn print_summary(c: &Comparison, out: &Path) {
    let p = &c.performance;
    eprintln!(
        "compared {} tensors in {:.2}s ({:.2} GB/s): {} modified, {} identical, {} failed",
        c.results.len(),
        p.total_time,
        p.throughput_gbps,
        c.modified().len(),
        c.results.iter().filter(|(_, m)| m.identical).count(),
        c.errors.len()
    );
    eprintln!("reports written to {}", out.display());
}

fn inspect(model: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let ck = open(model, "")?;
    let info = pipeline::model_info(&ck);
    let structure = report::architecture::model_structure(&info);
    if json {
        print_json(&serde_json::json!({
            "structure": structure,
            "tensors": info.tensors,
            "problems": info.warnings,
        }))?;
    } else {
        let mut out = std::io::stdout().lock();
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
        eprintln!("building a synthetic pair in {}", pair_dir.display());
    }
    let pair = synthetic::build_pair(&spec, &pair_dir).context("cannot build the demo pair")?;
    if !display.quiet && !display.json {
        eprintln!(
            "the fine-tune edits {} tensors: a rank-4 LoRA merged into q_proj and v_proj, and noise on layer 1's norms",
            pair.edits.len()
        );
    }
    let base = open(&pair.base, "base")?;
    let ft = open(&pair.finetuned, "fine-tuned")?;
    let reports = out.join("reports");
    let opts = weightdiff::CompareOptions {
        verify: true,
        ..Default::default()
    };
    let code = run_compare(&base, &ft, &opts, &reports, 20, display)?;
    if !display.quiet && !display.json {
        eprintln!(
            "start with {}",
            reports.join(report::COMPARISON_REPORT_TXT).display()
        );
    }
    Ok(code)
}
