//! One library entry per subcommand, at the top of the data flow: [`compare`],
//! [`extract_lora`], [`merge`], [`inspect`], [`demo`] and [`regenerate`]. Each opens its
//! models, runs the pipeline's stages in order, writes its outputs and returns an
//! [`Outcome`]: what happened ([`Status`]), the summary document `--json` prints, and
//! the files written. The CLI (and the Python binding) is a thin layer over these:
//! it turns arguments into a job, shows what the [`Observer`] is told, and turns the
//! status into an exit code.

use crate::checkpoint::Checkpoint;
use crate::checkpoint::shard::ReadMode;
use crate::comparison::Comparison;
use crate::error::{Error, Result};
use crate::hub::{self, DownloadProgress};
use crate::parts::{self, Shard};
use crate::pipeline::{self, CompareOptions, LoraOptions, Progress};
use crate::{fsio, journal, lowrank, peft, relatedness, report, synthetic};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub mod summary;
pub use summary::{
    AdapterSummary, CompareSummary, NotExtractedSummary, ShardSummary, Summary, TrajectorySummary,
    WrittenSummary, verdict,
};

/// Tensor errors told one per line before the rest are counted (every one is in the
/// reports).
const TOLD_ERRORS: usize = 10;

/// How a run ended; the CLI maps it to an exit status (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Finished, every tensor compared.
    Done,
    /// Finished and wrote its reports, but some tensors failed (exit 1).
    TensorErrors,
    /// Finished and wrote its reports, but the models are not a base and a derivative
    /// (`unrelated`, `different_architecture`, `nothing_compared`; exit 3).
    NotADerivative,
    /// Stopped by a signal before the end; the outputs say what they hold.
    Stopped,
}

/// What a job did.
#[derive(Debug)]
pub struct Outcome {
    pub status: Status,
    /// The summary document printed by `--json` (none when the job stopped before it had
    /// anything to summarise).
    pub summary: Option<Summary>,
    /// The comparisons made (one per fine-tuned model), when the job compares.
    pub comparisons: Vec<Comparison>,
    /// Files written, in the order they were written.
    pub written: Vec<PathBuf>,
}

/// What a job tells its user while it runs, besides the progress of its stages.
pub trait Observer: Progress {
    /// A line for the user (what a stage does, notes, the final summary); a CLI drops it
    /// under `--quiet` and `--json`.
    fn info(&self, line: &str);
    /// A line the user must see whatever the verbosity (the run stopped).
    fn warn(&self, line: &str);
    /// An error of one tensor, or of the run, shown whatever the verbosity.
    fn error(&self, line: &str);
    /// The job has opened its models and locked its output directory: from now on a
    /// stop request ends it cleanly (a CLI installs its signal handlers here).
    fn started(&self) {}
    /// A stage of work ended (a progress bar is cleared).
    fn stage_done(&self) {}
    /// Progress of downloads from the hub.
    fn downloads(&self) -> &dyn DownloadProgress {
        &hub::Silent
    }
}

/// An observer that keeps quiet (tests, notebooks that only want the result).
pub struct Quiet;

impl Progress for Quiet {
    fn update(&self, _: pipeline::ProgressUpdate<'_>) {}
}

impl Observer for Quiet {
    fn info(&self, _: &str) {}
    fn warn(&self, _: &str) {}
    fn error(&self, _: &str) {}
}

/// `weightdiff compare`: BASE against one fine-tuned model (or several, or one shard).
#[derive(Debug, Clone)]
pub struct CompareJob {
    pub base: PathBuf,
    pub finetuned: Vec<PathBuf>,
    pub output: PathBuf,
    pub options: CompareOptions,
    /// The low-rank stage's options; `None` under `--no-lora`.
    pub lora: Option<LoraOptions>,
    /// Tensors listed in the text reports.
    pub top: usize,
    /// Compare only this shard of the tensors and write a part for [`merge`].
    pub shard: Option<Shard>,
    /// How tensor bytes are read.
    pub read_mode: ReadMode,
}

/// `weightdiff extract-lora`: the fine-tune's change as a PEFT adapter directory.
#[derive(Debug, Clone)]
pub struct ExtractJob {
    pub base: PathBuf,
    pub finetuned: PathBuf,
    pub output: PathBuf,
    pub options: CompareOptions,
    pub lora: LoraOptions,
    pub read_mode: ReadMode,
}

/// Opens a model argument: a path, or a hub id resolved through the Hugging Face cache.
/// `role` ("base", "fine-tuned" or empty) names it in the error.
pub fn open(
    path: &Path,
    role: &str,
    read_mode: ReadMode,
    obs: &dyn Observer,
) -> Result<Checkpoint> {
    let settings = hub::HubSettings::from_env();
    if let Some(id) = hub::hub_candidate(path) {
        obs.info(&format!(
            "note: no file or directory `{}` here; trying it as the Hugging Face hub id {id}",
            path.display()
        ));
    }
    let mut ck = hub::open_model(path, &settings, obs.downloads()).map_err(|e| {
        let what = if role.is_empty() {
            "cannot read the model".to_string()
        } else {
            format!("cannot read the {role} model")
        };
        Error::During {
            what,
            error: Box::new(e),
        }
    })?;
    ck.read_mode = read_mode;
    for c in &ck.caveats {
        obs.warn(&format!("warning: {c}"));
    }
    Ok(ck)
}

/// `Err` wrapped with what the job was doing.
fn during<T>(what: impl FnOnce() -> String, r: Result<T>) -> Result<T> {
    r.map_err(|e| Error::During {
        what: what(),
        error: Box::new(e),
    })
}

fn cancelled(opts: &CompareOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
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

/// The status of a finished comparison (SPEC §5): tensor errors first, then whether the
/// models are a base and a derivative at all.
pub fn status(c: &Comparison) -> Status {
    let lora_errors = c.lora.as_ref().is_some_and(|l| !l.errors.is_empty());
    if !c.errors.is_empty() || lora_errors {
        Status::TensorErrors
    } else if relatedness::assess(c).verdict.is_some() {
        Status::NotADerivative
    } else {
        Status::Done
    }
}

/// The worst of several statuses (several fine-tuned models).
fn worst(a: Status, b: Status) -> Status {
    let rank = |s| match s {
        Status::Done => 0,
        Status::NotADerivative => 1,
        Status::TensorErrors => 2,
        Status::Stopped => 3,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// `weightdiff compare`.
pub fn compare(job: &CompareJob, obs: &dyn Observer) -> Result<Outcome> {
    if job.finetuned.len() > 1 {
        if job.shard.is_some() || job.options.resume {
            return Err(Error::InvalidOption(
                "--shard and --resume take one fine-tuned model".into(),
            ));
        }
        return compare_several(job, obs);
    }
    let Some(ft_path) = job.finetuned.first() else {
        return Err(Error::InvalidOption("no fine-tuned model given".into()));
    };
    let base = open(&job.base, "base", job.read_mode, obs)?;
    let ft = open(ft_path, "fine-tuned", job.read_mode, obs)?;
    let _lock = fsio::lock_output_dir(&job.output)?;
    obs.started();
    let out = &job.output;
    if same_model(&base, &ft) {
        obs.info(&format!(
            "note: {} and {} are the same model (the same files): every tensor will be identical",
            job.base.display(),
            ft_path.display()
        ));
    }
    if let Some(shard) = job.shard {
        return compare_shard(&base, &ft, job, shard, obs);
    }
    let c = compare_pair(&base, &ft, &job.options, job.lora.as_ref(), obs)?;
    let mut outcome = write_reports(c, out, job.top, obs)?;
    if cancelled(&job.options) {
        obs.warn(&format!(
            "stopped: the reports in {} cover the tensors compared so far (complete: false); run again with --resume to finish",
            out.display()
        ));
        outcome.status = Status::Stopped;
        return Ok(outcome);
    }
    // Finished: the reports are the record now, the journal has done its job.
    journal::remove(out)?;
    Ok(outcome)
}

/// The diff, then the low-rank stage when it is asked for and can say something: what
/// `compare` reports for one pair, before it writes anything (the Python binding's
/// `compare()` returns it and writes only on `save`).
pub fn compare_pair(
    base: &Checkpoint,
    ft: &Checkpoint,
    opts: &CompareOptions,
    lora: Option<&LoraOptions>,
    obs: &dyn Observer,
) -> Result<Comparison> {
    let lora = lora.map(|lo| LoraOptions {
        cancel: opts.cancel.clone(),
        journal: opts
            .journal_dir
            .clone()
            .map(|d| (d, pipeline::fingerprint(base, ft, opts), opts.resume)),
        ..lo.clone()
    });
    // The matrices the stage will analyse are analysed as the diff compares them.
    let during = match &lora {
        Some(lo) => Some(pipeline::DuringDiff::new(base, ft, lo)?),
        None => None,
    };
    let mut c = pipeline::compare_during(base, ft, opts, obs, during.as_ref())?;
    obs.stage_done();
    let unsettled = relatedness::needs_low_rank_evidence(&c);
    let quantized = quantization_only(&c, lora.is_some(), "", obs);
    if (unsettled || relatedness::assess(&c).verdict.is_none())
        && !quantized
        && let Some(lo) = lora.as_ref().filter(|_| c.complete)
    {
        obs.info(&format!(
            "analysing {} modified tensors for low rank...",
            c.modified().len()
        ));
        let l = pipeline::analyze_lora_after(base, ft, &c, lo, obs, during.as_ref())?;
        note_during_diff(&mut c, &l);
        obs.stage_done();
        // Stopped during the stage: the reports hold the diff and the tensors analysed.
        c.complete &= l.complete();
        c.lora = Some(l);
        if unsettled {
            relatedness::settle(&mut c);
        }
    }
    not_a_derivative(&c, lora.is_some(), obs);
    Ok(c)
}

/// Records in the diff's figures the analyses that ran during it (their time is in it).
fn note_during_diff(c: &mut Comparison, l: &crate::comparison::LoraReport) {
    let (matrices, worker_time) = l.during_diff;
    if matrices > 0 {
        c.performance.lowrank_during_diff = Some(crate::comparison::DuringDiffTime {
            matrices,
            worker_time,
        });
    }
}

/// The relatedness check before the low-rank stage: true when the two models are not a
/// base and a derivative, which the observer is told (the stage is then skipped).
fn not_a_derivative(c: &Comparison, lora: bool, obs: &dyn Observer) -> bool {
    let Some(v) = relatedness::assess(c).verdict else {
        return false;
    };
    obs.info(&format!(
        "{}: {}{}",
        v.kind.as_str().replace('_', " "),
        v.reason.as_deref().unwrap_or(""),
        if lora {
            "; low-rank analysis and extraction skipped"
        } else {
            ""
        }
    ));
    true
}

/// True when every modified matrix of `c` is stored differently by the two models
/// ([`report::quantization::dominates`]): the low-rank stage is skipped, and when it was
/// asked for (`lora`) the observer is told why, after `prefix`.
fn quantization_only(c: &Comparison, lora: bool, prefix: &str, obs: &dyn Observer) -> bool {
    let Some(q) = report::quantization::dominates(c) else {
        return false;
    };
    if lora {
        obs.info(&format!(
            "{prefix}{}",
            report::quantization::skipped_sentence(&q)
        ));
    }
    true
}

/// Removes what an earlier run left in `out` that this one did not write (a directory
/// holds one run), and says so.
fn remove_stale(out: &Path, written: &[PathBuf], keep: &[&str], obs: &dyn Observer) -> Result<()> {
    let removed = during(
        || {
            format!(
                "cannot remove an earlier run's outputs from {}",
                out.display()
            )
        },
        report::remove_stale(out, written, keep),
    )?;
    if !removed.is_empty() {
        let names: Vec<String> = removed
            .iter()
            .map(|p| p.strip_prefix(out).unwrap_or(p).display().to_string())
            .collect();
        obs.info(&format!(
            "removed {} outputs of an earlier run from {} (this run does not write them): {}",
            removed.len(),
            out.display(),
            names.join(", ")
        ));
    }
    Ok(())
}

/// Tells the first tensor errors, then how many more there are.
fn tell_errors<'a>(
    errors: impl Iterator<Item = (&'a String, &'a String)>,
    prefix: &str,
    all_in: &Path,
    obs: &dyn Observer,
) {
    let errors: Vec<_> = errors.collect();
    for (name, e) in errors.iter().take(TOLD_ERRORS) {
        obs.error(&format!("{prefix}{name}: {e}"));
    }
    if errors.len() > TOLD_ERRORS {
        obs.error(&format!(
            "… and {} more tensor errors (all in {})",
            errors.len() - TOLD_ERRORS,
            all_in.display()
        ));
    }
}

/// Writes every report of `c`, tells the user, and picks the status (SPEC §5).
fn write_reports(c: Comparison, out: &Path, top: usize, obs: &dyn Observer) -> Result<Outcome> {
    let written = during(
        || format!("cannot write reports into {}", out.display()),
        report::write_comparison_reports(&c, out, top),
    )?;
    // A merge may write into one of its part directories: the parts stay.
    remove_stale(out, &written, &[parts::PART_JSON, parts::PART_TENSORS], obs)?;
    tell_errors(
        c.errors.iter(),
        "",
        &out.join(report::WEIGHT_DIFFERENCES_JSON),
        obs,
    );
    for line in report::summary::run_summary(&c, out) {
        obs.info(&line);
    }
    Ok(Outcome {
        status: status(&c),
        summary: Some(Summary::Compare(Box::new(CompareSummary::of(
            &c, &written, top,
        )))),
        comparisons: vec![c],
        written,
    })
}

/// `compare --shard I/N`: this shard's tensors, written as a part for [`merge`].
fn compare_shard(
    base: &Checkpoint,
    ft: &Checkpoint,
    job: &CompareJob,
    shard: Shard,
    obs: &dyn Observer,
) -> Result<Outcome> {
    let opts = &job.options;
    let out = &job.output;
    let c = pipeline::compare(base, ft, opts, obs)?;
    obs.stage_done();
    if cancelled(opts) {
        obs.warn(&format!(
            "stopped: run again with --resume to finish shard {shard}"
        ));
        return Ok(Outcome {
            status: Status::Stopped,
            summary: None,
            comparisons: vec![c],
            written: Vec::new(),
        });
    }
    let lora = job.lora.as_ref();
    let lparts = lora
        .map(|lo| pipeline::analyze_lora_parts(base, ft, &c, lo))
        .transpose()?;
    // Parts of one job must agree on inputs and options, whatever their shard.
    let fp = pipeline::fingerprint(
        base,
        ft,
        &CompareOptions {
            shard: None,
            ..opts.clone()
        },
    );
    let written = parts::write_part(out, shard, &fp, &c, lora.zip(lparts.as_ref()))?;
    remove_stale(out, &written, &[], obs)?;
    journal::remove(out)?;
    tell_errors(c.errors.iter(), "", &out.join(parts::PART_JSON), obs);
    obs.info(&format!(
        "shard {shard}: compared {} tensors; part written to {} (combine with `weightdiff merge`)",
        c.results.len(),
        out.display()
    ));
    Ok(Outcome {
        status: if c.errors.is_empty() {
            Status::Done
        } else {
            Status::TensorErrors
        },
        summary: Some(Summary::Shard(ShardSummary {
            shard: shard.to_string(),
            compared: c.results.len(),
            outputs: written.clone(),
        })),
        comparisons: vec![c],
        written,
    })
}

/// `compare BASE FT1 FT2 …`: one pass over the base for all fine-tuned models, a report
/// directory per model and `trajectory.json` across them.
fn compare_several(job: &CompareJob, obs: &dyn Observer) -> Result<Outcome> {
    let base = open(&job.base, "base", job.read_mode, obs)?;
    let fts = job
        .finetuned
        .iter()
        .map(|p| open(p, "fine-tuned", job.read_mode, obs))
        .collect::<Result<Vec<_>>>()?;
    let out = &job.output;
    let _lock = fsio::lock_output_dir(out)?;
    obs.started();
    let opts = CompareOptions {
        journal_dir: None,
        ..job.options.clone()
    };
    let refs: Vec<&Checkpoint> = fts.iter().collect();
    let mut cs = pipeline::compare_many(&base, &refs, &opts, obs)?;
    obs.stage_done();
    let labels = trajectory_labels(&job.finetuned);
    let mut status_all = Status::Done;
    let mut all_written: Vec<PathBuf> = Vec::new();
    let mut summaries = Vec::new();
    for ((c, ft), label) in cs.iter_mut().zip(&fts).zip(&labels) {
        let quantized = quantization_only(c, job.lora.is_some(), &format!("{label}: "), obs);
        if !not_a_derivative(c, job.lora.is_some(), obs)
            && !quantized
            && let Some(lo) = job.lora.as_ref().filter(|_| c.complete)
        {
            c.lora = Some(pipeline::analyze_lora(&base, ft, c, lo)?);
        }
        let dir = out.join(label);
        let written = during(
            || format!("cannot write reports into {}", dir.display()),
            report::write_comparison_reports(c, &dir, job.top),
        )?;
        remove_stale(&dir, &written, &[], obs)?;
        all_written.extend(written.iter().cloned());
        summaries.push(CompareSummary::of(c, &written, job.top));
        tell_errors(
            c.errors.iter(),
            &format!("{label}: "),
            &dir.join(report::WEIGHT_DIFFERENCES_JSON),
            obs,
        );
        status_all = worst(status_all, status(c));
    }
    let outputs = report::write_trajectory(out, &cs, &labels)?;
    all_written.extend(outputs.iter().cloned());
    remove_stale(out, &all_written, &[], obs)?;
    obs.info(report::trajectory::render_text(&cs).trim_end());
    obs.info(&format!(
        "reports written to {} (one directory per fine-tuned model, trajectory.json)",
        out.display()
    ));
    if cancelled(&opts) {
        status_all = Status::Stopped;
    }
    Ok(Outcome {
        status: status_all,
        summary: Some(Summary::Trajectory(TrajectorySummary {
            overall: report::trajectory::Trajectory::of(&cs).overall,
            checkpoints: summaries,
            outputs,
        })),
        comparisons: cs,
        written: all_written,
    })
}

/// A directory name per fine-tuned model: its last path component, made unique.
pub fn trajectory_labels(paths: &[PathBuf]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let stem = p
            .file_name()
            .map(|n| {
                let n = n.to_string_lossy();
                let n = n.trim_end_matches(".safetensors").trim_end_matches(".gguf");
                n.to_string()
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

/// `weightdiff merge`: the parts of a sharded run, combined into its outputs.
pub fn merge(part_dirs: &[PathBuf], out: &Path, top: usize, obs: &dyn Observer) -> Result<Outcome> {
    let _lock = fsio::lock_output_dir(out)?;
    let mut c = parts::merge(part_dirs)?;
    if not_a_derivative(&c, c.lora.is_some(), obs) {
        c.lora = None;
    }
    write_reports(c, out, top, obs)
}

/// `weightdiff extract-lora`.
pub fn extract_lora(job: &ExtractJob, obs: &dyn Observer) -> Result<Outcome> {
    let base = open(&job.base, "base", job.read_mode, obs)?;
    let ft = open(&job.finetuned, "fine-tuned", job.read_mode, obs)?;
    let out = &job.output;
    let _lock = fsio::lock_output_dir(out)?;
    obs.started();
    let opts = &job.options;
    let lora_opts = LoraOptions {
        cancel: opts.cancel.clone(),
        ..job.lora.clone()
    };
    let stopped = |c: Comparison| {
        obs.warn(&format!("stopped: no adapter written to {}", out.display()));
        Outcome {
            status: Status::Stopped,
            summary: None,
            comparisons: vec![c],
            written: Vec::new(),
        }
    };
    let alongside = pipeline::DuringDiff::new(&base, &ft, &lora_opts)?;
    let mut c = pipeline::compare_during(&base, &ft, opts, obs, Some(&alongside))?;
    obs.stage_done();
    if cancelled(opts) {
        return Ok(stopped(c));
    }
    if relatedness::needs_low_rank_evidence(&c) {
        let l = pipeline::analyze_lora_after(&base, &ft, &c, &lora_opts, obs, Some(&alongside))?;
        note_during_diff(&mut c, &l);
        c.lora = Some(l);
        obs.stage_done();
        relatedness::settle(&mut c);
    }
    if not_a_derivative(&c, true, obs) {
        let related = relatedness::assess(&c);
        return Ok(Outcome {
            status: status(&c),
            summary: Some(Summary::NotExtracted(Box::new(NotExtractedSummary {
                verdict: related.verdict.clone(),
                relatedness: related,
                modules: 0,
                outputs: Vec::new(),
            }))),
            comparisons: vec![c],
            written: Vec::new(),
        });
    }
    let lora = match c.lora.take() {
        Some(l) => l,
        None => {
            let l =
                pipeline::analyze_lora_after(&base, &ft, &c, &lora_opts, obs, Some(&alongside))?;
            note_during_diff(&mut c, &l);
            obs.stage_done();
            l
        }
    };
    if cancelled(opts) && !lora.complete() {
        return Ok(stopped(c));
    }
    let (mut written, verification) = during(
        || format!("cannot write the adapter into {}", out.display()),
        peft::adapter::write_adapter(&lora, out, None),
    )?;
    let docs = [
        (
            report::lora::LORA_METADATA_JSON,
            fsio::to_json(&report::lora::metadata(&lora, &verification)),
        ),
        (
            report::lora::LORA_ANALYSIS_JSON,
            fsio::to_json(&report::lora::analysis(&lora)),
        ),
    ];
    for (name, bytes) in docs {
        let p = out.join(name);
        fsio::write_atomic(&p, &bytes)?;
        written.push(p);
    }
    for (name, e) in c.errors.iter().chain(&lora.errors) {
        obs.error(&format!("{name}: {e}"));
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
    let rank = peft::adapter::default_rank(&lora);
    obs.info(&format!(
        "extracted {} modules (default rank {rank}), mean relative error {mean:.3e}; {} changed tensors not extracted",
        lora.extracted.len(),
        lora.skipped.len()
    ));
    obs.info(&format!(
        "adapter written to {} (task type {})",
        out.display(),
        lora.facts.task_type.map_or("none", |t| t.as_str())
    ));
    for n in &lora.notes {
        obs.info(&format!("note: {n}"));
    }
    let summary = Summary::Adapter(Box::new(AdapterSummary::of(&lora, rank, mean, &written)));
    let status = if c.errors.is_empty() && lora.errors.is_empty() {
        Status::Done
    } else {
        Status::TensorErrors
    };
    c.lora = Some(lora);
    Ok(Outcome {
        status,
        summary: Some(summary),
        comparisons: vec![c],
        written,
    })
}

/// `inspect --json`.
#[derive(Debug, serde::Serialize)]
pub struct InspectDocument<'a> {
    pub structure: &'a report::architecture::ModelStructure,
    pub tensors: &'a [crate::comparison::TensorInfo],
    pub problems: &'a [String],
}

/// What `weightdiff inspect` shows of one model.
#[derive(Debug)]
pub struct Inspection {
    pub info: crate::comparison::ModelInfo,
    /// Module counts, parameter count, bytes, dtypes (`architecture_comparison.json`'s
    /// per-model part).
    pub structure: report::architecture::ModelStructure,
    /// Some tensors cannot be read (exit 1).
    pub broken: bool,
}

impl Inspection {
    /// The `--json` document.
    pub fn to_json(&self) -> InspectDocument<'_> {
        InspectDocument {
            structure: &self.structure,
            tensors: &self.info.tensors,
            problems: &self.info.warnings,
        }
    }

    /// The text listing: a line per tensor, then the model's facts.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let (info, s) = (&self.info, &self.structure);
        let mut out = String::new();
        for t in &info.tensors {
            let _ = writeln!(out, "{:<60} {:<8} {:?}", t.name, t.dtype, t.shape);
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "model:      {}", info.source);
        let _ = writeln!(out, "files:      {}", info.files.len());
        let _ = writeln!(out, "tensors:    {}", info.tensors.len());
        let _ = writeln!(out, "parameters: {}", s.parameter_count);
        let _ = writeln!(out, "bytes:      {}", s.bytes);
        let _ = writeln!(
            out,
            "dtypes:     {}",
            serde_json::to_string(&s.dtype_histogram).unwrap_or_default()
        );
        if let Some(t) = s.model_type.as_ref().and_then(|t| t.as_str()) {
            let _ = writeln!(out, "model_type: {t}");
        }
        for w in &info.warnings {
            let _ = writeln!(out, "problem:    {w}");
        }
        out
    }
}

/// `weightdiff inspect`: a model's tensors and facts, from its headers alone.
pub fn inspect(model: &Path, obs: &dyn Observer) -> Result<Inspection> {
    let ck = open(model, "", ReadMode::default(), obs)?;
    let info = pipeline::model_info(&ck);
    let structure = report::architecture::model_structure(&info);
    Ok(Inspection {
        info,
        structure,
        broken: !ck.broken.is_empty(),
    })
}

/// `weightdiff demo`: a synthetic pair with a known edit, compared with every output.
pub fn demo(out: &Path, obs: &dyn Observer) -> Result<Outcome> {
    let spec = synthetic::demo_spec();
    let pair_dir = out.join("pair");
    obs.info(&format!(
        "building a synthetic pair in {}",
        pair_dir.display()
    ));
    let pair = during(
        || "cannot build the demo pair".into(),
        synthetic::build_pair(&spec, &pair_dir),
    )?;
    obs.info(&format!(
        "the fine-tune edits {} tensors: a rank-4 LoRA merged into q_proj and v_proj, and noise on layer 1's norms",
        pair.edits.len()
    ));
    let base = open(&pair.base, "base", ReadMode::default(), obs)?;
    let ft = open(&pair.finetuned, "fine-tuned", ReadMode::default(), obs)?;
    let reports = out.join("reports");
    let opts = CompareOptions {
        verify: true,
        ..Default::default()
    };
    let lora = LoraOptions {
        extract: true,
        lowrank: lowrank::LowRankOptions {
            rank_rule: lowrank::RankRule::Fixed { rank: 4 },
            ..Default::default()
        },
        ..Default::default()
    };
    let c = compare_pair(&base, &ft, &opts, Some(&lora), obs)?;
    let outcome = write_reports(c, &reports, 20, obs)?;
    obs.info(&format!(
        "start with {} (or open {} in a browser)",
        reports.join(report::COMPARISON_REPORT_TXT).display(),
        reports.join(report::html::REPORT_HTML).display()
    ));
    Ok(outcome)
}

/// `weightdiff report DIR`: one comparison's directory, or the directory of several
/// fine-tunes (`trajectory.json`), whose every comparison is rendered again.
pub fn regenerate(dir: &Path, top: usize, obs: &dyn Observer) -> Result<Outcome> {
    let _lock = fsio::lock_output_dir(dir)?;
    let several = !dir.join(report::WEIGHT_DIFFERENCES_JSON).exists()
        && dir.join(report::TRAJECTORY_JSON).exists();
    let written = during(
        || format!("cannot regenerate the reports in {}", dir.display()),
        if several {
            report::regenerate_trajectory(dir, top)
        } else {
            report::regenerate(dir, top)
        },
    )?;
    for p in &written {
        obs.info(&format!("wrote {}", p.display()));
    }
    Ok(Outcome {
        status: Status::Done,
        summary: Some(Summary::Written(WrittenSummary {
            outputs: written.clone(),
        })),
        comparisons: Vec::new(),
        written,
    })
}
