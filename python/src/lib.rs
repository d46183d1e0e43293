//! `weightdiff._native`: the Python binding's compiled part. Conversions only: arguments
//! become the same library jobs and options the command line builds (through its own
//! argument structs, so the checks and messages are the CLI's), results become Python
//! objects (through serde, so every field the reports have is there), library errors
//! become `weightdiff.Error`s. The Python package (`python/weightdiff/`) wraps this in
//! the public API.
//!
//! Every job runs on a worker thread while the calling thread, without the GIL, waits
//! for it in steps of [`POLL`]: between two steps it hands progress and messages to the
//! Python reporter and runs Python's signal handlers, so Ctrl-C (`KeyboardInterrupt`,
//! also a notebook's interrupt) sets the job's cancel flag, waits for the job to stop
//! (the pipeline checks the flag often) and re-raises.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pythonize::pythonize;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weightdiff::cli::args::{CompareArgs, DisplayArgs, ExtractArgs};
use weightdiff::hub::DownloadProgress;
use weightdiff::jobs::{self, Observer};
use weightdiff::pipeline::{LowRankUpdate, Progress, ProgressUpdate};
use weightdiff::{Comparison, pairing, report};

create_exception!(
    weightdiff,
    Error,
    PyException,
    "Base class of every error weightdiff raises; the message is the command line's."
);
create_exception!(
    weightdiff,
    ModelError,
    Error,
    "A model cannot be read: missing, malformed, or a hub id that cannot be resolved."
);
create_exception!(
    weightdiff,
    OptionError,
    Error,
    "An argument is unusable (a bad regex, a threshold out of range, options that exclude each other)."
);

/// How often the waiting thread wakes: progress is shown and Ctrl-C is seen this often
/// (well inside SPEC §6's second).
const POLL: Duration = Duration::from_millis(100);

/// The library error as the Python exception of its kind, with the CLI's message (the
/// whole chain, as `weightdiff` prints it after `error:`).
fn py_error(e: weightdiff::Error) -> PyErr {
    use weightdiff::Error as E;
    let mut inner = &e;
    while let E::During { error, .. } = inner {
        inner = error;
    }
    // What anyhow's `{:#}` prints at the CLI edge: the error, then each source.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    match inner {
        E::Shard(_)
        | E::Torch(_)
        | E::Hub { .. }
        | E::InvalidIndex { .. }
        | E::NotAModel { .. } => ModelError::new_err(message),
        E::InvalidOption(_) => OptionError::new_err(message),
        _ => Error::new_err(message),
    }
}

/// An argument check of the CLI's argument structs failed.
fn option_error(e: anyhow::Error) -> PyErr {
    OptionError::new_err(format!("{e:#}"))
}

/// What a running job tells Python: progress of the current stage, and lines.
#[derive(Default)]
struct Watch {
    cancel: Arc<AtomicBool>,
    /// 0: no stage reported yet or the last one ended; 1: the diff; 2: the low-rank stage.
    stage: AtomicU64,
    done: AtomicU64,
    total: AtomicU64,
    items_done: AtomicU64,
    items_total: AtomicU64,
    /// Stages ended so far (a reporter closes its bar when this moves).
    stages_done: AtomicU64,
    lines: Mutex<Vec<(&'static str, String)>>,
}

impl Watch {
    fn set(&self, stage: u64, done: u64, total: u64, items_done: usize, items_total: usize) {
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.items_done.store(items_done as u64, Ordering::Relaxed);
        self.items_total
            .store(items_total as u64, Ordering::Relaxed);
        self.stage.store(stage, Ordering::Release);
    }

    fn line(&self, level: &'static str, line: &str) {
        self.lines
            .lock()
            .expect("lines lock")
            .push((level, line.to_string()));
    }

    /// Hands what happened since the last call to `reporter` (a `weightdiff._progress.Reporter`).
    fn flush(&self, reporter: &Bound<'_, PyAny>) -> PyResult<()> {
        let lines = std::mem::take(&mut *self.lines.lock().expect("lines lock"));
        for (level, line) in lines {
            reporter.call_method1("message", (level, line))?;
        }
        let stage = match self.stage.load(Ordering::Acquire) {
            1 => "diff",
            2 => "low rank",
            _ => "",
        };
        reporter.call_method1(
            "progress",
            (
                stage,
                self.done.load(Ordering::Relaxed),
                self.total.load(Ordering::Relaxed),
                self.items_done.load(Ordering::Relaxed),
                self.items_total.load(Ordering::Relaxed),
                self.stages_done.load(Ordering::Relaxed),
            ),
        )?;
        Ok(())
    }
}

impl Progress for Watch {
    fn update(&self, u: ProgressUpdate<'_>) {
        self.set(
            1,
            u.bytes_done,
            u.bytes_total,
            u.tensors_done,
            u.tensors_total,
        );
    }
    fn lowrank(&self, u: LowRankUpdate<'_>) {
        self.set(
            2,
            u.elements_done,
            u.elements_total,
            u.tensors_done,
            u.tensors_total,
        );
    }
}

impl Observer for Watch {
    fn info(&self, line: &str) {
        self.line("info", line);
    }
    fn warn(&self, line: &str) {
        self.line("warning", line);
    }
    fn error(&self, line: &str) {
        self.line("error", line);
    }
    fn stage_done(&self) {
        self.stage.store(0, Ordering::Release);
        self.stages_done.fetch_add(1, Ordering::Relaxed);
    }
    fn downloads(&self) -> &dyn DownloadProgress {
        &weightdiff::hub::Silent
    }
}

/// Runs `job` on a worker thread and waits for it without the GIL, showing progress and
/// answering Ctrl-C every [`POLL`] (see the module docs).
fn run<T: Send>(
    py: Python<'_>,
    reporter: &Bound<'_, PyAny>,
    job: impl FnOnce(&Watch) -> weightdiff::Result<T> + Send,
) -> PyResult<T> {
    let watch = Watch::default();
    let result = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        let w = &watch;
        let worker = s.spawn(move || {
            let r = job(w);
            let _ = tx.send(());
            r
        });
        // A Python error met while waiting (Ctrl-C, a failing reporter): stop the job,
        // wait for it, then raise that error.
        let mut raised = None;
        loop {
            let finished = py.detach(|| {
                let rx = rx.lock().expect("receiver lock");
                !matches!(rx.recv_timeout(POLL), Err(RecvTimeoutError::Timeout))
            });
            if finished {
                break;
            }
            if let Err(e) = py.check_signals().and_then(|()| watch.flush(reporter)) {
                watch.cancel.store(true, Ordering::Relaxed);
                raised = Some(e);
                break;
            }
        }
        let joined = py.detach(|| worker.join());
        match (raised, joined) {
            (Some(e), _) => Err(e),
            (None, Ok(r)) => Ok(r),
            (None, Err(panic)) => std::panic::resume_unwind(panic),
        }
    });
    watch.flush(reporter)?;
    result?.map_err(py_error)
}

/// One comparison, as `weightdiff.Comparison` holds it.
#[pyclass(module = "weightdiff._native", frozen)]
struct NativeComparison {
    c: Comparison,
}

#[pymethods]
impl NativeComparison {
    /// One list per column, one row per compared tensor: `name`, `module_type`,
    /// `layer_index`, then every key of the tensor's entry in `weight_differences.json`
    /// (a key some tensors lack, such as `note`, is `None` for the others).
    fn columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let n = self.c.results.len();
        let mut order: Vec<String> = Vec::new();
        let mut cols: std::collections::HashMap<String, Vec<Py<PyAny>>> = Default::default();
        for (i, (name, m)) in self.c.results.iter().enumerate() {
            let mut row: Vec<(String, Py<PyAny>)> = vec![
                ("name".into(), name.into_pyobject(py)?.into_any().unbind()),
                (
                    "module_type".into(),
                    pairing::module_type(name)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                ),
                (
                    "layer_index".into(),
                    pairing::layer_index(name)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                ),
            ];
            let metrics = pythonize(py, m)?.cast_into::<PyDict>()?;
            for (k, v) in metrics.iter() {
                row.push((k.extract()?, v.unbind()));
            }
            for (k, v) in row {
                let col = cols.entry(k.clone()).or_insert_with(|| {
                    order.push(k.clone());
                    (0..i).map(|_| py.None()).collect()
                });
                col.push(v);
            }
            for col in cols.values_mut() {
                if col.len() < i + 1 {
                    col.push(py.None());
                }
            }
        }
        let out = PyDict::new(py);
        for k in order {
            let col = cols
                .remove(&k)
                .unwrap_or_else(|| (0..n).map(|_| py.None()).collect());
            out.set_item(k, PyList::new(py, col)?)?;
        }
        Ok(out)
    }

    /// `weight_differences.json`, as a dict.
    fn document<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pythonize(
            py,
            &report::json::WeightDifferences::of(&self.c),
        )?)
    }

    /// The verdict of the `--json` summary (`None` without a low-rank stage on related
    /// models).
    fn verdict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pythonize(py, &jobs::verdict(&self.c))?)
    }

    /// `lora_analysis.json`, as a dict; `None` when the low-rank stage did not run.
    fn lora_analysis<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.c
            .lora
            .as_ref()
            .map(|l| Ok(pythonize(py, &report::lora::analysis(l))?))
            .transpose()
    }

    /// `ok`, `tensor_errors` or `not_a_derivative`: what the CLI's exit status 0, 1 or
    /// 3 says, or `stopped`.
    fn status(&self) -> &'static str {
        match jobs::status(&self.c) {
            jobs::Status::Done => "ok",
            jobs::Status::TensorErrors => "tensor_errors",
            jobs::Status::NotADerivative => "not_a_derivative",
            jobs::Status::Stopped => "stopped",
        }
    }

    /// `report.html`, the self-contained page the CLI writes.
    fn html(&self, top: usize) -> String {
        let docs = self.c.lora.as_ref().map(|l| report::lora::LoraDocs {
            analysis: report::lora::analysis(l),
            metadata: None,
        });
        report::html::render(&self.c, docs.as_ref(), top)
    }

    /// Writes every report file of `weightdiff compare` into `dir`; returns their paths.
    fn save(&self, py: Python<'_>, dir: PathBuf, top: usize) -> PyResult<Vec<PathBuf>> {
        py.detach(|| {
            let _lock = weightdiff::fsio::lock_output_dir(&dir)?;
            report::write_comparison_reports(&self.c, &dir, top)
        })
        .map_err(py_error)
    }
}

/// `weightdiff.compare`: BASE against each fine-tuned model. The options are the CLI's
/// `compare` flags, checked by the CLI's own code.
#[pyfunction]
#[pyo3(signature = (base, finetuned, *, threshold, lora, include, exclude, threads, lora_rank, seed, verify, mmap, reporter))]
#[allow(clippy::too_many_arguments)]
fn compare(
    py: Python<'_>,
    base: PathBuf,
    finetuned: Vec<PathBuf>,
    threshold: f64,
    lora: bool,
    include: Option<String>,
    exclude: Option<String>,
    threads: Option<usize>,
    lora_rank: Option<usize>,
    seed: u64,
    verify: bool,
    mmap: bool,
    reporter: Bound<'_, PyAny>,
) -> PyResult<Vec<NativeComparison>> {
    let args = CompareArgs {
        base,
        finetuned,
        output: PathBuf::new(),
        threshold,
        top: 20,
        verify,
        include,
        exclude,
        threads,
        lora_rank,
        lora_energy: None,
        no_lora: !lora,
        task_type: None,
        profile: Default::default(),
        seed,
        resume: false,
        shard: None,
        mmap,
        read_mode: Default::default(),
        display: DisplayArgs {
            quiet: true,
            json: false,
        },
    };
    let mut options = args.options().map_err(option_error)?;
    // Nothing is written before `save`: no resume journal.
    options.journal_dir = None;
    let lora = args.lora_options().map_err(option_error)?;
    let cs = run(py, &reporter, |w| {
        options.cancel = Some(w.cancel.clone());
        let base = jobs::open(&args.base, "base", args.read_mode, w)?;
        let mut out = Vec::new();
        // One pair after the other: each gets exactly what `weightdiff compare BASE FT`
        // reports for it.
        for ft in &args.finetuned {
            let ft = jobs::open(ft, "fine-tuned", args.read_mode, w)?;
            w.started();
            out.push(jobs::compare_pair(&base, &ft, &options, lora.as_ref(), w)?);
            if options
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                break;
            }
        }
        Ok(out)
    })?;
    Ok(cs.into_iter().map(|c| NativeComparison { c }).collect())
}

/// A string option parsed as the CLI parses its flag.
fn parse<T: std::str::FromStr<Err = String>>(what: &str, v: &str) -> PyResult<T> {
    v.parse()
        .map_err(|e| OptionError::new_err(format!("invalid value '{v}' for {what}: {e}")))
}

/// `weightdiff.extract_lora`: `weightdiff extract-lora`, with the same flags. Returns
/// `(status, summary, written, errors)`.
#[pyfunction]
#[pyo3(signature = (base, finetuned, out, *, rank, energy, sv_ratio, max_rank, uniform_rank, modules, include, exclude, dtype, skip_undecomposable, task_type, profile, seed, threads, reporter))]
#[allow(clippy::too_many_arguments)]
fn extract_lora<'py>(
    py: Python<'py>,
    base: PathBuf,
    finetuned: PathBuf,
    out: PathBuf,
    rank: Option<usize>,
    energy: Option<f64>,
    sv_ratio: Option<f64>,
    max_rank: Option<usize>,
    uniform_rank: bool,
    modules: Option<Vec<String>>,
    include: Option<String>,
    exclude: Option<String>,
    dtype: Option<String>,
    skip_undecomposable: bool,
    task_type: Option<String>,
    profile: String,
    seed: u64,
    threads: Option<usize>,
    reporter: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let task_type = task_type.map(|t| parse("task_type", &t)).transpose()?;
    let profile = parse("profile", &profile)?;
    if let Some(d) = &dtype
        && !["bf16", "f16", "f32"].contains(&d.as_str())
    {
        return Err(OptionError::new_err(format!(
            "invalid value '{d}' for dtype: one of bf16, f16, f32"
        )));
    }
    let args = ExtractArgs {
        base,
        finetuned,
        output: out,
        rank,
        energy,
        sv_ratio,
        max_rank,
        uniform_rank,
        modules,
        include,
        exclude,
        dtype,
        skip_undecomposable,
        task_type,
        profile,
        seed,
        oversample: 16,
        power_iters: 2,
        analysis_rank: 64,
        mmap: false,
        read_mode: Default::default(),
        threads,
        display: DisplayArgs {
            quiet: true,
            json: false,
        },
    };
    let mut job = args.job().map_err(option_error)?;
    let outcome = run(py, &reporter, |w| {
        job.options.cancel = Some(w.cancel.clone());
        jobs::extract_lora(&job, w)
    })?;
    let d = PyDict::new(py);
    let status = match outcome.status {
        jobs::Status::Done => "ok",
        jobs::Status::TensorErrors => "tensor_errors",
        jobs::Status::NotADerivative => "not_a_derivative",
        jobs::Status::Stopped => "stopped",
    };
    d.set_item("status", status)?;
    d.set_item("summary", pythonize(py, &outcome.summary)?)?;
    d.set_item("written", outcome.written)?;
    let errors = PyDict::new(py);
    for c in &outcome.comparisons {
        let lora_errors = c.lora.iter().flat_map(|l| &l.errors);
        for (name, e) in c.errors.iter().chain(lora_errors) {
            errors.set_item(name, e)?;
        }
    }
    d.set_item("errors", errors)?;
    Ok(d)
}

/// `weightdiff.inspect`: `weightdiff inspect --json`'s document plus `text` (the table
/// it prints without `--json`) and `broken`.
#[pyfunction]
fn inspect<'py>(
    py: Python<'py>,
    model: PathBuf,
    reporter: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let found = run(py, &reporter, |w| jobs::inspect(&model, w))?;
    let doc = pythonize(py, &found.to_json())?;
    doc.set_item("text", found.to_text())?;
    doc.set_item("broken", found.broken)?;
    Ok(doc)
}

/// The `weightdiff` command line with these arguments (program name first); returns
/// its exit status. Its own signal handling applies (the console script restores the
/// default SIGINT action first, so Ctrl-C acts as on the binary).
#[pyfunction]
fn run_cli(py: Python<'_>, args: Vec<OsString>) -> u8 {
    py.detach(|| weightdiff::cli::main(args))
}

#[pymodule]
mod _native {
    #[pymodule_export]
    use super::{
        Error, ModelError, NativeComparison, OptionError, compare, extract_lora, inspect, run_cli,
    };

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
