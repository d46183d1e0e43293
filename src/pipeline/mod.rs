//! The pipeline: checkpoints → pairs → windows → kernels → a [`Comparison`].
//!
//! Every tensor pair is cut into windows of at most [`CompareOptions::window_bytes`]
//! per side. Windows of all tensors are processed in parallel by a rayon pool; each
//! window is read, reduced to an [`Accum`], and dropped, so resident memory is
//! bounded by `threads × 2 × window_bytes` whatever the model size. Window results are
//! merged per tensor in window order, so the numbers do not depend on the thread count.
//!
//! A tensor that fails (unreadable bytes, unsupported dtype, `--verify` disagreement)
//! gets an entry in `errors`; the others go on.

pub mod plan;

use crate::checkpoint::Checkpoint;
use crate::checkpoint::dtype::{DType, decode_f64};
use crate::checkpoint::shard::Window;
use crate::comparison::{
    Comparison, ExtractedModule, LoraReport, ModelInfo, ModuleKind, Performance, SavedTensor,
    Second, TensorInfo, TensorMetrics, metrics_from_accum,
};
use crate::error::{Error, Result};
use crate::journal::{Fingerprint, Journal, LowRankJournal};
use crate::kernels::{self, Accum};
use crate::lowrank::detect::{Evidence, verdict};
use crate::lowrank::extract::{Factors, Target};
use crate::lowrank::{self, DeltaRows, LowRankOptions, RankRule, TensorSpectrum};
use crate::pairing::{self, TensorPair, natural_cmp};
use crate::peft::{self, ModelFacts, Profile};
use plan::Shard;
use rayon::prelude::*;
use regex::Regex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Default window: 8 MiB per side keeps mapping overhead under 1 % while two threads
/// hold at most 32 MiB of tensor data.
pub const DEFAULT_WINDOW_BYTES: u64 = 8 << 20;

/// Options of a comparison (the library side of `weightdiff compare`'s flags).
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// An element is changed when |d| > threshold.
    pub threshold: f64,
    /// Run the reference kernel too and check agreement.
    pub verify: bool,
    /// Only tensors whose (aligned) name matches.
    pub include: Option<Regex>,
    /// Leave out tensors whose name matches.
    pub exclude: Option<Regex>,
    /// Worker threads; `None` for all cores.
    pub threads: Option<usize>,
    /// Largest window read at once per side, in bytes.
    pub window_bytes: u64,
    /// Keep a journal of finished tensors in this directory (the output directory).
    pub journal_dir: Option<PathBuf>,
    /// Continue from the journal in `journal_dir` instead of starting over.
    pub resume: bool,
    /// Set (by a signal handler) to stop: windows not yet started are skipped and the
    /// comparison comes back with `complete: false`.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Compare only this shard's share of the pairs (`--shard I/N`).
    pub shard: Option<Shard>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            threshold: 1e-6,
            verify: false,
            include: None,
            exclude: None,
            threads: None,
            window_bytes: DEFAULT_WINDOW_BYTES,
            journal_dir: None,
            resume: false,
            cancel: None,
            shard: None,
        }
    }
}

/// Progress as tensors complete.
#[derive(Debug, Clone, Copy)]
pub struct ProgressUpdate<'a> {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The tensor that just completed.
    pub tensor: &'a str,
}

/// Progress of the low-rank stage as tensors finish, weighted by elements (the stage's
/// cost is proportional to them).
#[derive(Debug, Clone, Copy)]
pub struct LowRankUpdate<'a> {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub elements_done: u64,
    pub elements_total: u64,
    /// The tensor that just finished.
    pub tensor: &'a str,
}

/// Receives progress; called from worker threads.
pub trait Progress: Sync {
    fn update(&self, update: ProgressUpdate<'_>);
    /// Progress of the low-rank stage (ignored unless implemented).
    fn lowrank(&self, _update: LowRankUpdate<'_>) {}
}

/// Ignores progress.
pub struct NoProgress;
impl Progress for NoProgress {
    fn update(&self, _: ProgressUpdate<'_>) {}
}

/// Summarises a checkpoint's headers for the reports.
pub fn model_info(ck: &Checkpoint) -> ModelInfo {
    let mut tensors: Vec<TensorInfo> = ck
        .tensors()
        .values()
        .map(|t| TensorInfo {
            name: t.name.clone(),
            dtype: t.dtype_name(),
            shape: t.shape.clone(),
            nbytes: t.nbytes(),
        })
        .collect();
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    let mut warnings = ck.warnings.clone();
    warnings.extend(
        ck.broken
            .iter()
            .map(|(name, e)| format!("tensor `{name}`: {e}")),
    );
    ModelInfo {
        source: ck.source.display().to_string(),
        files: ck.shard_paths().map(|p| p.display().to_string()).collect(),
        config: ck.config.clone(),
        generation_config: ck.generation_config.clone(),
        tensors,
        warnings,
        hub: ck.hub.clone(),
    }
}

/// One window of one pair.
struct Unit {
    /// The group of jobs sharing this base tensor.
    group: usize,
    /// Position among the group's windows.
    idx: usize,
    /// First element.
    start: u64,
    /// Elements.
    len: u64,
}

/// What a window produced.
#[derive(Default)]
struct UnitOut {
    fast: Accum,
    reference: Option<Accum>,
    identical: bool,
    total: Second,
    compute: Second,
    reference_time: Second,
}

/// Compares two opened checkpoints.
pub fn compare(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    opts: &CompareOptions,
    progress: &dyn Progress,
) -> Result<Comparison> {
    let mut v = compare_many(base, &[finetuned], opts, progress)?;
    Ok(v.pop().expect("one comparison per fine-tuned model"))
}

/// Compares several fine-tuned checkpoints with one base, reading each base window once
/// for all of them. Returns one comparison per fine-tuned model, in the order given.
/// The journal (`--resume`) and `--shard` take a single fine-tuned model.
pub fn compare_many(
    base: &Checkpoint,
    finetuned: &[&Checkpoint],
    opts: &CompareOptions,
    progress: &dyn Progress,
) -> Result<Vec<Comparison>> {
    if finetuned.len() != 1 && (opts.journal_dir.is_some() || opts.shard.is_some()) {
        return Err(Error::InvalidOption(
            "--resume and --shard work with one fine-tuned model at a time".into(),
        ));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Threads(e.to_string()))?;
    let threads = pool.current_num_threads();
    pool.install(|| compare_in_pool(base, finetuned, opts, progress, threads))
}

/// What one fine-tuned model contributes before the work starts.
struct Side {
    paired: pairing::Pairing,
    errors: BTreeMap<String, String>,
    filtered_out: usize,
    /// Indices into `paired.pairs` of the pairs to compare (selected, decodable, this shard's).
    selected: Vec<usize>,
    /// Results a resumed run takes from its journal.
    recovered: BTreeMap<String, TensorMetrics>,
    overlap: crate::comparison::Overlap,
}

/// One pair of one fine-tuned model to compare.
struct Job {
    ft: usize,
    pair: usize,
    /// Windows of this job.
    windows: usize,
    bytes: u64,
}

fn prepare_side(base: &Checkpoint, ft: &Checkpoint, opts: &CompareOptions) -> Side {
    let paired = pairing::pair(base.tensors(), ft.tensors());
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    for (name, why) in base.broken.iter().chain(ft.broken.iter()) {
        errors.insert(name.clone(), why.clone());
    }
    let wanted = |name: &str| {
        opts.include.as_ref().is_none_or(|r| r.is_match(name))
            && !opts.exclude.as_ref().is_some_and(|r| r.is_match(name))
    };
    let mut filtered_out = 0;
    let mut selected = Vec::new();
    for (i, p) in paired.pairs.iter().enumerate() {
        if !wanted(&p.name) {
            filtered_out += 1;
            continue;
        }
        match (&p.base.dtype, &p.finetuned.dtype) {
            (Ok(_), Ok(_)) => selected.push(i),
            (Err(d), _) | (_, Err(d)) => {
                let path = if p.base.dtype.is_err() {
                    base.path_of(&p.base)
                } else {
                    ft.path_of(&p.finetuned)
                };
                errors.insert(
                    p.name.clone(),
                    format!("{}: unsupported dtype {d}", path.display()),
                );
            }
        }
    }
    // A shard keeps its share of the pairs (module `shards` says how it is chosen).
    if let Some(sh) = opts.shard {
        let items: Vec<(&str, u64)> = selected
            .iter()
            .map(|&i| {
                let p = &paired.pairs[i];
                let (sa, sb) = sizes(p);
                (p.name.as_str(), p.compared_elements() * (sa + sb) as u64)
            })
            .collect();
        let owner = plan::assign(&items, sh.count);
        selected = selected
            .into_iter()
            .zip(owner)
            .filter(|(_, o)| *o == sh.index)
            .map(|(i, _)| i)
            .collect();
    }
    Side {
        overlap: crate::relatedness::overlap(base, ft, &paired),
        paired,
        errors,
        filtered_out,
        selected,
        recovered: BTreeMap::new(),
    }
}

fn compare_in_pool(
    base: &Checkpoint,
    fts: &[&Checkpoint],
    opts: &CompareOptions,
    progress: &dyn Progress,
    threads: usize,
) -> Result<Vec<Comparison>> {
    let t_start = Instant::now();
    let mut sides: Vec<Side> = fts.iter().map(|ft| prepare_side(base, ft, opts)).collect();

    // A resumed run takes the results its journal holds and computes the rest.
    let journal = match &opts.journal_dir {
        None => None,
        Some(dir) => {
            let fp = fingerprint(base, fts[0], opts);
            let (j, done) = if opts.resume {
                Journal::resume(dir, &fp)?
            } else {
                (Journal::create(dir, &fp)?, BTreeMap::new())
            };
            sides[0].recovered = done;
            Some(Mutex::new(j))
        }
    };

    // Jobs grouped by base tensor, so that each base window is read once for all of them.
    let mut jobs: Vec<Job> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (f, side) in sides.iter().enumerate() {
        for &i in &side.selected {
            let p = &side.paired.pairs[i];
            if side.recovered.contains_key(&p.name) {
                continue;
            }
            let g = *group_of.entry(p.base.name.as_str()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(jobs.len());
            let (sa, sb) = sizes(p);
            jobs.push(Job {
                ft: f,
                pair: i,
                windows: 0,
                bytes: p.compared_elements() * (sa + sb) as u64,
            });
        }
    }
    tracing::info!(
        tensors = jobs.len(),
        bytes = jobs.iter().map(|j| j.bytes).sum::<u64>(),
        threads,
        "comparing"
    );
    let pair_of = |j: &Job| &sides[j.ft].paired.pairs[j.pair];
    // Cut every group into windows sized for the widest dtype among its pairs.
    let mut units = Vec::new();
    for (g, members) in groups.iter().enumerate() {
        let sa = sizes(pair_of(&jobs[members[0]])).0;
        let sb = members
            .iter()
            .map(|&j| sizes(pair_of(&jobs[j])).1)
            .max()
            .expect("non-empty group");
        let per = (opts.window_bytes / sa.max(sb) as u64).max(1);
        let n_max = members
            .iter()
            .map(|&j| pair_of(&jobs[j]).compared_elements())
            .max()
            .expect("non-empty");
        // A tensor with no elements still gets one (empty) window, so it is reported.
        for idx in 0..n_max.div_ceil(per).max(1) {
            units.push(Unit {
                group: g,
                idx: idx as usize,
                start: idx * per,
                len: per,
            });
        }
        for &j in members {
            jobs[j].windows = pair_of(&jobs[j]).compared_elements().div_ceil(per).max(1) as usize;
        }
    }
    let remaining: Vec<AtomicUsize> = jobs.iter().map(|j| AtomicUsize::new(j.windows)).collect();
    let slots: Vec<Mutex<Vec<Option<Result<UnitOut>>>>> = jobs
        .iter()
        .map(|j| Mutex::new((0..j.windows).map(|_| None).collect()))
        .collect();
    let finals: Vec<Mutex<Option<Result<TensorMetrics>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let journal_failure: Mutex<Option<Error>> = Mutex::new(None);
    let recovered_total: usize = sides.iter().map(|s| s.recovered.len()).sum();
    let done = AtomicUsize::new(recovered_total);
    let bytes_done = AtomicU64::new(0);
    let bytes_total: u64 = jobs.iter().map(|j| j.bytes).sum();
    let tensors_total = jobs.len() + recovered_total;
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };

    units.par_iter().for_each(|u| {
        let members = &groups[u.group];
        let outs = run_group_unit(base, fts, &sides, &jobs, members, u, opts, cancelled());
        for (&j, out) in members.iter().zip(outs) {
            let Some(out) = out else { continue };
            lock(&slots[j])[u.idx] = Some(out);
            if remaining[j].fetch_sub(1, Ordering::AcqRel) != 1 {
                continue;
            }
            // The last window of this job: merge its windows in order and finish it.
            let p = pair_of(&jobs[j]);
            let outs = std::mem::take(&mut *lock(&slots[j]));
            let result = merge_units(outs).and_then(|o| finish_tensor(p, o, opts.verify));
            match &result {
                Ok(m) => tracing::debug!(
                    tensor = %p.name,
                    relative_diff = ?m.relative_diff,
                    seconds = m.total_time,
                    "compared"
                ),
                Err(e) => tracing::warn!(tensor = %p.name, "{e}"),
            }
            if let (Ok(m), Some(jr)) = (&result, &journal)
                && let Err(e) = lock(jr).record(&p.name, m)
            {
                lock(&journal_failure).get_or_insert(e);
            }
            *lock(&finals[j]) = Some(result);
            let d = done.fetch_add(1, Ordering::AcqRel) + 1;
            let b = bytes_done.fetch_add(jobs[j].bytes, Ordering::AcqRel) + jobs[j].bytes;
            progress.update(ProgressUpdate {
                tensors_done: d,
                tensors_total,
                bytes_done: b,
                bytes_total,
                tensor: &p.name,
            });
        }
    });
    if let Some(e) = journal_failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e);
    }
    if let Some(jr) = &journal {
        lock(jr).sync()?;
    }

    // Assemble each comparison in pair order: journaled results, then this run's.
    let mut finals: Vec<Option<Result<TensorMetrics>>> = finals
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect();
    let mut job_of: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for (j, job) in jobs.iter().enumerate() {
        job_of.insert((job.ft, job.pair), j);
    }
    let wall = t_start.elapsed().as_secs_f64();
    let mut filters = Vec::new();
    if let Some(r) = &opts.include {
        filters.push(format!("include {}", r.as_str()));
    }
    if let Some(r) = &opts.exclude {
        filters.push(format!("exclude {}", r.as_str()));
    }
    let mut out = Vec::new();
    for (f, side) in sides.into_iter().enumerate() {
        let Side {
            paired,
            mut errors,
            filtered_out,
            selected,
            recovered,
            overlap,
        } = side;
        let mut results = Vec::new();
        let mut bytes_read = 0;
        let mut complete = true;
        for &i in &selected {
            let p = &paired.pairs[i];
            if let Some(m) = recovered.get(&p.name) {
                results.push((p.name.clone(), m.clone()));
                continue;
            }
            let j = job_of[&(f, i)];
            match finals[j].take().expect("every job was finished") {
                Ok(m) => {
                    bytes_read += jobs[j].bytes;
                    results.push((p.name.clone(), m));
                }
                Err(Error::Cancelled) => complete = false,
                Err(e) => {
                    errors.insert(p.name.clone(), e.to_string());
                }
            }
        }
        let performance = performance(&results, bytes_read, wall, threads, opts.verify);
        out.push(Comparison {
            base: model_info(base),
            finetuned: model_info(fts[f]),
            threshold: opts.threshold,
            verify: opts.verify,
            filters: filters.clone(),
            prefix: paired.prefix.clone(),
            results,
            only_in_base: paired.only_in_base,
            only_in_finetuned: paired.only_in_finetuned,
            mismatches: paired.mismatches,
            errors,
            filtered_out,
            performance,
            complete,
            overlap,
            lora: None,
        });
    }
    Ok(out)
}

/// Locks a mutex, taking the data even if another worker panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Merges a tensor's window results in window order (so sums do not depend on which
/// thread finished first); the first error wins.
fn merge_units(outs: Vec<Option<Result<UnitOut>>>) -> Result<UnitOut> {
    let mut acc: Option<UnitOut> = None;
    for o in outs {
        let o = o.expect("every window reported")?;
        acc = Some(match acc {
            None => o,
            Some(mut a) => {
                a.fast.merge(&o.fast);
                if let (Some(r), Some(or)) = (a.reference.as_mut(), o.reference.as_ref()) {
                    r.merge(or);
                }
                a.identical &= o.identical;
                a.total += o.total;
                a.compute += o.compute;
                a.reference_time += o.reference_time;
                a
            }
        });
    }
    Ok(acc.expect("a tensor has at least one window"))
}

/// What identifies a run for `--resume`: every input file with its size and
/// modification time, and the options that change results.
pub fn fingerprint(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    opts: &CompareOptions,
) -> Fingerprint {
    let mut d = String::new();
    for (role, ck) in [("base", base), ("finetuned", finetuned)] {
        d.push_str(&format!("{role}={} [", ck.source.display()));
        for p in ck.shard_paths() {
            let (len, mtime) = std::fs::metadata(p)
                .map(|m| {
                    let t = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                    (m.len(), t.map_or(0, |t| t.as_nanos()))
                })
                .unwrap_or((0, 0));
            d.push_str(&format!("{}:{len}:{mtime} ", p.display()));
        }
        d.push_str("] ");
    }
    if let Some(sh) = opts.shard {
        d.push_str(&format!("shard={sh} "));
    }
    d.push_str(&format!(
        "threshold={:e} verify={} include={} exclude={}",
        opts.threshold,
        opts.verify,
        opts.include.as_ref().map_or("", |r| r.as_str()),
        opts.exclude.as_ref().map_or("", |r| r.as_str())
    ));
    Fingerprint::new(d)
}

fn sizes(p: &TensorPair) -> (usize, usize) {
    let da = p.base.dtype.as_ref().expect("dtype checked before cutting");
    let db = p
        .finetuned
        .dtype
        .as_ref()
        .expect("dtype checked before cutting");
    (da.size(), db.size())
}

/// Runs one window of a group: reads the base window once, then compares it with the
/// same window of every job (fine-tuned model) of the group that reaches this far.
/// Returns, per member, `None` when the job has no such window.
#[allow(clippy::too_many_arguments)]
fn run_group_unit(
    base: &Checkpoint,
    fts: &[&Checkpoint],
    sides: &[Side],
    jobs: &[Job],
    members: &[usize],
    u: &Unit,
    opts: &CompareOptions,
    cancelled: bool,
) -> Vec<Option<Result<UnitOut>>> {
    let pair = |j: usize| &sides[jobs[j].ft].paired.pairs[jobs[j].pair];
    let in_window = |j: usize| u.idx < jobs[j].windows;
    // Elements of this window that job j compares (its tensor may be shorter: resized rows).
    let len_of = |j: usize| {
        pair(j)
            .compared_elements()
            .saturating_sub(u.start)
            .min(u.len)
    };
    if cancelled {
        return members
            .iter()
            .map(|&j| in_window(j).then_some(Err(Error::Cancelled)))
            .collect();
    }
    let t0 = Instant::now();
    let first = pair(members[0]);
    let da = *first.base.dtype.as_ref().expect("checked");
    let sa = da.size() as u64;
    let len = members
        .iter()
        .filter(|&&j| in_window(j))
        .map(|&j| len_of(j))
        .max()
        .unwrap_or(0);
    let wa = match base.read(&first.base, u.start * sa, len * sa) {
        Ok(w) => w,
        Err(e) => {
            let shared = Arc::new(e);
            return members
                .iter()
                .map(|&j| in_window(j).then(|| Err(Error::Shared(shared.clone()))))
                .collect();
        }
    };
    let base_time = t0.elapsed().as_secs_f64();
    members
        .iter()
        .map(|&j| {
            if !in_window(j) {
                return None;
            }
            let p = pair(j);
            let n = len_of(j);
            let wa = &wa[..(n * sa) as usize];
            Some(
                compare_window(fts[jobs[j].ft], p, wa, u.start, n, opts).map(|mut o| {
                    o.total += base_time;
                    o
                }),
            )
        })
        .collect()
}

/// Compares a base window (already read) with the same elements of the fine-tuned tensor.
fn compare_window(
    finetuned: &Checkpoint,
    p: &TensorPair,
    wa: &[u8],
    start: u64,
    len: u64,
    opts: &CompareOptions,
) -> Result<UnitOut> {
    let t0 = Instant::now();
    let da = *p.base.dtype.as_ref().expect("checked");
    let db = *p.finetuned.dtype.as_ref().expect("checked");
    let sb = db.size() as u64;
    let wb = finetuned.read(&p.finetuned, start * sb, len * sb)?;
    let t1 = Instant::now();
    let identical = da == db && wa[..] == wb[..];
    let fast = if identical {
        kernels::fast::identical(wa, da)
    } else {
        kernels::fast::diff(wa, da, &wb, db, opts.threshold)
    };
    let t2 = Instant::now();
    let reference = opts
        .verify
        .then(|| kernels::reference::diff(wa, da, &wb, db, opts.threshold));
    let t3 = Instant::now();
    Ok(UnitOut {
        fast,
        reference,
        identical,
        total: (t3 - t0).as_secs_f64(),
        compute: (t2 - t1).as_secs_f64(),
        reference_time: (t3 - t2).as_secs_f64(),
    })
}

fn finish_tensor(p: &TensorPair, o: UnitOut, verify: bool) -> Result<TensorMetrics> {
    let da = *p.base.dtype.as_ref().expect("checked");
    let db = *p.finetuned.dtype.as_ref().expect("checked");
    if let Some(r) = &o.reference {
        kernels::check_agreement(&o.fast, r, kernels::is_f32_domain(da, db)).map_err(
            |(metric, fast, reference)| Error::VerifyMismatch {
                tensor: p.name.clone(),
                metric,
                fast,
                reference,
            },
        )?;
    }
    let mut m = metrics_from_accum(&o.fast);
    m.shape = p.base.shape.clone();
    if p.finetuned.shape != p.base.shape {
        m.finetuned_shape = Some(p.finetuned.shape.clone());
    }
    // The storage (`Q4_K`, `F8_E4M3, F32 scales 128×128`), not only the decoded dtype.
    let (sa, sb) = (p.base.dtype_name(), p.finetuned.dtype_name());
    if sa != sb || da != db {
        m.finetuned_dtype = Some(sb);
    }
    m.dtype = sa;
    m.compared_rows = p.leading_rows;
    m.identical = o.identical && p.leading_rows.is_none();
    m.total_time = o.total;
    m.compute_time = o.compute;
    if verify {
        m.reference_time = Some(o.reference_time);
        m.speedup = (o.compute > 0.0).then(|| o.reference_time / o.compute);
    }
    Ok(m)
}

pub(crate) fn performance(
    results: &[(String, TensorMetrics)],
    bytes_read: u64,
    wall: Second,
    threads: usize,
    verify: bool,
) -> Performance {
    let n = results.len().max(1) as f64;
    let sum: f64 = results.iter().map(|(_, m)| m.total_time).sum();
    let slowest = results
        .iter()
        .max_by(|a, b| a.1.total_time.total_cmp(&b.1.total_time));
    let compute: f64 = results.iter().map(|(_, m)| m.compute_time).sum();
    let reference: f64 = results.iter().filter_map(|(_, m)| m.reference_time).sum();
    Performance {
        total_time: wall,
        avg_layer_time: sum / n,
        max_layer_time: slowest.map_or(0.0, |s| s.1.total_time),
        slowest_tensor: slowest.map(|s| s.0.clone()),
        bytes_read,
        throughput_gbps: if wall > 0.0 {
            bytes_read as f64 / wall / 1e9
        } else {
            0.0
        },
        threads,
        compute_time: compute,
        reference_time: verify.then_some(reference),
        speedup: (verify && compute > 0.0).then(|| reference / compute),
    }
}

/// Options of the low-rank stage (`compare` without `--no-lora`, and `extract-lora`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LoraOptions {
    pub lowrank: LowRankOptions,
    /// Extract factors; when false the deltas are only analysed.
    pub extract: bool,
    /// Leaf module names to extract (`None`: every changed matrix).
    pub modules: Option<Vec<String>>,
    /// Storage dtype of the factors (`None`: the base tensor's, F32 for non-16-bit bases).
    pub dtype: Option<DType>,
    /// Give every module exactly the fixed rank of the rank rule.
    pub uniform_rank: bool,
    /// Leave changed 1-D tensors out of the adapter (with a note) instead of saving them
    /// whole through `modules_to_save`.
    pub skip_undecomposable: bool,
    /// Worker threads; `None` for all cores.
    pub threads: Option<usize>,
    /// `--task-type`: overrides the task type read from `config.json`.
    #[serde(default)]
    pub task_type: Option<crate::peft::TaskOverride>,
    /// The runtime the adapter is written for.
    #[serde(default)]
    pub profile: crate::peft::Profile,
    /// Set (by a signal handler) to stop: the stage ends within a row block, the tensors
    /// not finished are listed in [`LoraParts::not_analysed`] and the report is marked
    /// incomplete.
    #[serde(skip)]
    pub cancel: Option<Arc<AtomicBool>>,
    /// Journal finished matrices in this directory (with the diff's fingerprint), and
    /// with `true` take the ones a journal there holds instead of redoing them
    /// (`--resume`). The journal is keyed by the diff's fingerprint plus these options.
    #[serde(skip)]
    pub journal: Option<(PathBuf, Fingerprint, bool)>,
}

/// Δ rows of a pair, decoded from windows of both checkpoints.
struct PairDelta<'a> {
    base: &'a Checkpoint,
    finetuned: &'a Checkpoint,
    pair: &'a TensorPair,
    m: usize,
    n: usize,
}

/// Stored mantissa bits and smallest normal exponent of a float dtype, for the rounding
/// error of a stored value: ulp(x) = 2^(max(⌊log₂|x|⌋, e_min) − bits).
fn rounding_model(d: DType) -> Option<(i32, i32)> {
    match d {
        DType::BF16 => Some((7, -126)),
        DType::F16 => Some((10, -14)),
        DType::F32 => Some((23, -126)),
        DType::F64 => Some((52, -1022)),
        DType::F8E4M3 => Some((3, -6)),
        DType::F8E5M2 => Some((2, -14)),
        _ => None,
    }
}

impl PairDelta<'_> {
    fn dtypes(&self) -> (DType, DType) {
        (
            *self.pair.base.dtype.as_ref().expect("checked"),
            *self.pair.finetuned.dtype.as_ref().expect("checked"),
        )
    }

    /// The stored bytes of rows `r0..r1` of both tensors.
    fn windows(&self, r0: usize, r1: usize) -> Result<(Window, Window)> {
        let (da, db) = self.dtypes();
        let (start, len) = ((r0 * self.n) as u64, ((r1 - r0) * self.n) as u64);
        let (sa, sb) = (da.size() as u64, db.size() as u64);
        let wa = self.base.read(&self.pair.base, start * sa, len * sa)?;
        let wb = self
            .finetuned
            .read(&self.pair.finetuned, start * sb, len * sb)?;
        Ok((wa, wb))
    }
}

impl DeltaRows for PairDelta<'_> {
    fn nrows(&self) -> usize {
        self.m
    }
    fn ncols(&self) -> usize {
        self.n
    }
    fn read_rows(&self, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)> {
        let (da, db) = self.dtypes();
        let (wa, wb) = self.windows(r0, r1)?;
        let (wa, wb) = (&wa[..], &wb[..]);
        let sb = db.size();
        decode_f64(da, wa, out);
        let (bits, emin) = rounding_model(db).unwrap_or((52, -1022));
        let mut tmp = [0f64; 1024];
        let (mut f2, mut var) = (0.0, 0.0);
        for (o, c) in out.chunks_mut(1024).zip(wb.chunks(1024 * sb)) {
            let t = &mut tmp[..o.len()];
            decode_f64(db, c, t);
            for (x, &y) in o.iter_mut().zip(t.iter()) {
                let d = y - *x;
                // Non-finite values cannot be decomposed; treat them as no change.
                *x = if d.is_finite() { d } else { 0.0 };
                f2 += *x * *x;
                let e = ((((y.to_bits() >> 52) & 0x7ff) as i32) - 1023).max(emin) - bits;
                // ulp² = (2^e)², built from the exponent bits.
                var += f64::from_bits(((2 * e + 1023).max(1) as u64) << 52);
            }
        }
        // A rounding error uniform in ±ulp/2 has variance ulp²/12.
        Ok((f2, var / 12.0))
    }

    fn read_rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<(f64, f64)> {
        let (da, db) = self.dtypes();
        if !self.single_precision() {
            let mut tmp = vec![0f64; out.len()];
            let st = self.read_rows(r0, r1, &mut tmp)?;
            out.iter_mut().zip(tmp).for_each(|(o, t)| *o = t as f32);
            return Ok(st);
        }
        let (wa, wb) = self.windows(r0, r1)?;
        let (wa, wb) = (&wa[..], &wb[..]);
        let (bits, emin) = rounding_model(db).expect("a float dtype of at most 16 bits");
        let (f2, var) = kernels::fast::delta_f32(wa, da, wb, db, out, bits, emin);
        // A rounding error uniform in ±ulp/2 has variance ulp²/12.
        Ok((f2, var / 12.0))
    }

    fn single_precision(&self) -> bool {
        let (da, db) = self.dtypes();
        let narrow =
            |d: DType| matches!(d, DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2);
        narrow(da) && narrow(db)
    }
}

/// Runs the low-rank stage over the modified tensors of a comparison.
pub fn analyze_lora(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
) -> Result<LoraReport> {
    analyze_lora_with(base, finetuned, c, opts, &NoProgress)
}

/// [`analyze_lora`], reporting progress.
pub fn analyze_lora_with(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
) -> Result<LoraReport> {
    let parts = analyze_lora_parts_with(base, finetuned, c, opts, progress)?;
    Ok(assemble_lora(c, opts, parts))
}

/// The per-tensor half of [`analyze_lora`], for a shard's part.
pub fn analyze_lora_parts(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
) -> Result<LoraParts> {
    analyze_lora_parts_with(base, finetuned, c, opts, &NoProgress)
}

/// [`analyze_lora_parts`], reporting progress.
pub fn analyze_lora_parts_with(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
) -> Result<LoraParts> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Threads(e.to_string()))?;
    // Tensors run in parallel; each one's linear algebra stays on its thread.
    faer::set_global_parallelism(faer::Par::Seq);
    pool.install(|| lora_parts(base, finetuned, c, opts, progress))
}

/// `--uniform-rank` as a rank, checked against the rank rule.
pub fn uniform_rank(opts: &LoraOptions) -> Result<Option<usize>> {
    match (opts.uniform_rank, opts.lowrank.rank_rule) {
        (false, _) => Ok(None),
        (true, RankRule::Fixed { rank }) => Ok(Some(rank)),
        (true, _) => Err(Error::InvalidOption(
            "--uniform-rank needs a fixed rank (--rank), not an energy or ratio rule".into(),
        )),
    }
}

/// The adapter-side name of an aligned tensor name: the fine-tuned model's own name,
/// which is the one the PEFT model built from that checkpoint's class uses.
pub fn adapter_name(c: &Comparison, aligned: &str) -> String {
    match &c.prefix {
        Some(p) if p.side == pairing::Side::Finetuned => format!("{}{aligned}", p.prefix),
        _ => aligned.to_string(),
    }
}

/// The facts of the fine-tuned model (its config, else the base's) the adapter follows.
pub fn model_facts(c: &Comparison, opts: &LoraOptions) -> ModelFacts {
    let config = c.finetuned.config.as_ref().or(c.base.config.as_ref());
    ModelFacts::from_config(config, opts.task_type)
}

/// Modified embedding tables and LM heads that are one storage under several names
/// (a checkpoint that stores tied weights twice): every name but the canonical one →
/// the canonical one. Equal shapes and bit-equal metrics in both models identify them.
fn tied_duplicates(c: &Comparison, facts: &ModelFacts) -> BTreeMap<String, String> {
    let tieable =
        |n: &str| facts.kind_of(n) == ModuleKind::Embedding || pairing::module_type(n) == "lm_head";
    let key = |m: &TensorMetrics| {
        (
            m.shape.clone(),
            m.l2_diff.to_bits(),
            m.base_l2.to_bits(),
            m.finetuned_l2.to_bits(),
            m.max_abs_diff.to_bits(),
            m.mean_abs_diff.to_bits(),
        )
    };
    let mut groups: BTreeMap<_, Vec<&str>> = BTreeMap::new();
    for (n, m) in c
        .results
        .iter()
        .filter(|(n, m)| m.is_modified() && tieable(n))
    {
        groups.entry(key(m)).or_default().push(n.as_str());
    }
    let mut out = BTreeMap::new();
    for names in groups.into_values().filter(|g| g.len() > 1) {
        // The input embedding is where PEFT applies a tied adapter.
        let rank = |n: &str| match pairing::module_type(n).as_str() {
            "shared" => 0,
            "lm_head" => 2,
            _ => 1,
        };
        let canon = *names
            .iter()
            .min_by(|a, b| rank(a).cmp(&rank(b)).then(natural_cmp(a, b)))
            .expect("groups are not empty");
        for n in names.iter().filter(|n| **n != canon) {
            out.insert(n.to_string(), canon.to_string());
        }
    }
    out
}

/// The per-tensor work of the low-rank stage (run in the caller's thread pool).
pub fn lora_parts(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
) -> Result<LoraParts> {
    let t0 = Instant::now();
    let facts = model_facts(c, opts);
    let paired = pairing::pair(base.tensors(), finetuned.tensors());
    let by_name: BTreeMap<&str, &TensorPair> =
        paired.pairs.iter().map(|p| (p.name.as_str(), p)).collect();
    let has_prefix = |prefix: &str| paired.pairs.iter().any(|q| q.name.starts_with(prefix));
    let tied = tied_duplicates(c, &facts);
    let uniform_rank = uniform_rank(opts)?;
    let mut skipped = Vec::new();
    let mut matrices: Vec<(&TensorPair, ModuleKind, Option<Target>)> = Vec::new();
    let mut vectors: Vec<&TensorPair> = Vec::new();
    let mut saved_whole: Vec<String> = Vec::new();
    for (name, m) in c.results.iter().filter(|(_, m)| m.is_modified()) {
        let p = by_name[name.as_str()];
        let da = *p.base.dtype.as_ref().expect("compared tensors have dtypes");
        let db = *p
            .finetuned
            .dtype
            .as_ref()
            .expect("compared tensors have dtypes");
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        let head = facts.head_of(name).is_some();
        if head || (facts.fused_experts() && peft::is_router(module, has_prefix)) {
            // Saved whole (a task head with the rest of its head, below); its matrices
            // are still analysed for the report.
            if !head {
                push_unique(&mut saved_whole, adapter_name(c, module));
            }
            if p.base.shape.len() == 2 && m.compared_rows.is_none() && !da.is_integer() {
                matrices.push((p, facts.kind_of(name), None));
            }
            continue;
        }
        if m.compared_rows.is_some() {
            skipped.push((
                name.clone(),
                "shape changed (resized): the delta of the new rows has no base; not extracted"
                    .into(),
            ));
        } else if da.is_integer() || db.is_integer() {
            skipped.push((name.clone(), "integer tensor: not decomposable".into()));
        } else if let Some(canon) = tied.get(name) {
            skipped.push((
                name.clone(),
                format!(
                    "tied to `{canon}` (one storage, stored twice): adapted once, through `{canon}`"
                ),
            ));
        } else if p.base.shape.len() == 2 {
            let module = pairing::module_type(name);
            let wanted =
                opts.extract && opts.modules.as_ref().is_none_or(|ms| ms.contains(&module));
            let dtype = opts
                .dtype
                .unwrap_or(if matches!(da, DType::BF16 | DType::F16) {
                    da
                } else {
                    DType::F32
                });
            matrices.push((
                p,
                facts.kind_of(name),
                wanted.then_some(Target {
                    dtype,
                    uniform_rank,
                }),
            ));
        } else if p.base.shape.len() <= 1 {
            vectors.push(p);
        } else {
            skipped.push((
                name.clone(),
                format!(
                    "{}-D tensor (fused experts or a convolution): not extracted; PEFT's \
                     target_parameters form for fused parameters is not written by weightdiff",
                    p.base.shape.len()
                ),
            ));
        }
    }

    tracing::info!(
        matrices = matrices.len(),
        vectors = vectors.len(),
        "low-rank analysis"
    );
    let (journal, recovered) = match &opts.journal {
        None => (None, BTreeMap::new()),
        Some((dir, fp, resume)) => {
            let options = serde_json::to_string(opts).unwrap_or_default();
            let fp = Fingerprint::new(format!("{} lowrank={options}", fp.description));
            let (j, done) = LowRankJournal::open(dir, &fp, *resume)?;
            (Some(Mutex::new(j)), done)
        }
    };
    let journal_failure: Mutex<Option<Error>> = Mutex::new(None);
    let cancel = lowrank::Cancel::new(opts.cancel.as_deref());
    let elements = |p: &TensorPair| p.base.shape.iter().product::<usize>() as u64;
    let elements_total: u64 = matrices.iter().map(|(p, _, _)| elements(p)).sum();
    let (tensors_done, elements_done) = (AtomicUsize::new(0), AtomicU64::new(0));
    let outs: Vec<Result<(TensorSpectrum, Option<Factors>)>> = matrices
        .par_iter()
        .map(|(p, _, target)| {
            let journaled = recovered.get(&p.name).cloned();
            if journaled.is_none() {
                cancel.check()?;
            }
            let src = PairDelta {
                base,
                finetuned,
                pair: p,
                m: p.base.shape[0],
                n: p.base.shape[1],
            };
            let out = match journaled {
                Some(done) => Ok(done),
                None => {
                    let out = lowrank::analyze(&src, &p.name, &opts.lowrank, *target, cancel);
                    if let (Ok((spectrum, factors)), Some(j)) = (&out, &journal)
                        && let Err(e) = lock(j).record(&p.name, spectrum, factors.as_ref())
                    {
                        lock(&journal_failure).get_or_insert(e);
                    }
                    out
                }
            };
            if !matches!(out, Err(Error::Cancelled)) {
                let e = elements(p);
                progress.lowrank(LowRankUpdate {
                    tensors_done: tensors_done.fetch_add(1, Ordering::AcqRel) + 1,
                    tensors_total: matrices.len(),
                    elements_done: elements_done.fetch_add(e, Ordering::AcqRel) + e,
                    elements_total,
                    tensor: &p.name,
                });
            }
            out
        })
        .collect();

    if let Some(e) = journal_failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e);
    }
    if let Some(j) = &journal {
        lock(j).sync()?;
    }
    let mut spectra = Vec::new();
    let mut extracted = Vec::new();
    let mut errors = BTreeMap::new();
    let mut not_analysed = Vec::new();
    for ((p, kind, _), out) in matrices.iter().zip(outs) {
        match out {
            Ok((spectrum, factors)) => {
                tracing::debug!(
                    tensor = %p.name,
                    detected_rank = ?spectrum.detected_rank,
                    method = %spectrum.method,
                    seconds = spectrum.time,
                    "low-rank analysis"
                );
                spectra.push((p.name.clone(), spectrum));
                if let Some(factors) = factors {
                    let tensor = adapter_name(c, &p.name);
                    extracted.push(ExtractedModule {
                        module: tensor
                            .strip_suffix(".weight")
                            .unwrap_or(&tensor)
                            .to_string(),
                        tensor: p.name.clone(),
                        kind: *kind,
                        factors,
                        bias: None,
                    });
                }
            }
            Err(Error::Cancelled) => not_analysed.push(p.name.clone()),
            Err(e) => {
                errors.insert(p.name.clone(), e.to_string());
            }
        }
    }

    // Bias deltas of the extracted modules, for PEFT's `lora_bias` (whether the adapter
    // can use it depends on every module: decided in `assemble_lora`).
    let mut bias_deltas = Vec::new();
    let extracted_tensors: std::collections::BTreeSet<&str> =
        extracted.iter().map(|e| e.tensor.as_str()).collect();
    for v in &vectors {
        let Some(module) = v.name.strip_suffix(".bias") else {
            continue;
        };
        if extracted_tensors.contains(format!("{module}.weight").as_str()) {
            let src = PairDelta {
                base,
                finetuned,
                pair: v,
                m: 1,
                n: v.base.shape.iter().product(),
            };
            let mut delta = vec![0.0; src.n];
            src.read_rows(0, 1, &mut delta)?;
            bias_deltas.push((adapter_name(c, module), delta));
        }
    }

    // Candidates for saving whole: the modules of changed 1-D tensors (whether each is
    // saved depends on every tensor: is it extracted as a LoRA somewhere? decided in
    // `assemble_lora`, which a merge of shards runs too), task heads and routers.
    let mut candidates: Vec<SavedTensor> = Vec::new();
    let ft_names: Vec<&str> = finetuned.tensors().keys().map(String::as_str).collect();
    if opts.extract {
        // The PEFT task model saves its head whole by itself: the adapter must carry it,
        // changed or not, compared or only in the fine-tune.
        for head in facts.task_type.map_or(&[][..], |t| t.head_modules()) {
            let prefix = format!("{head}.");
            if ft_names.iter().any(|n| n.starts_with(&prefix)) {
                push_unique(&mut saved_whole, head.to_string());
            }
        }
        for module in &saved_whole {
            let prefix = format!("{module}.");
            for n in ft_names.iter().filter(|n| n.starts_with(&prefix)) {
                push_candidate(&mut candidates, finetuned, n)?;
            }
        }
        if !opts.skip_undecomposable {
            for v in &vectors {
                // A module extracted here as a LoRA is never saved whole as well: its
                // weight need not be read into memory (`assemble_lora` decides the rest).
                let aligned = v.name.rsplit_once('.').map_or("", |(m, _)| m);
                if extracted_tensors.contains(format!("{aligned}.weight").as_str()) {
                    continue;
                }
                let name = adapter_name(c, &v.name);
                let Some((module, _)) = name.rsplit_once('.') else {
                    continue;
                };
                let prefix = format!("{module}.");
                for n in ft_names
                    .iter()
                    .filter(|n| n.strip_prefix(&prefix).is_some_and(|r| !r.contains('.')))
                {
                    push_candidate(&mut candidates, finetuned, n)?;
                }
            }
        }
    }
    let parts = LoraParts {
        spectra,
        extracted,
        vectors: vectors.iter().map(|p| p.name.clone()).collect(),
        candidates,
        saved_whole,
        bias_deltas,
        skipped,
        errors,
        not_analysed,
        total_time: t0.elapsed().as_secs_f64(),
    };
    Ok(parts)
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// Adds the fine-tuned tensor `name` (stored bytes) as a candidate for saving whole.
fn push_candidate(out: &mut Vec<SavedTensor>, finetuned: &Checkpoint, name: &str) -> Result<()> {
    let key = format!("base_model.model.{name}");
    if out.iter().any(|c| c.key == key) {
        return Ok(());
    }
    let Some(t) = finetuned.tensors().get(name) else {
        return Ok(());
    };
    let dtype = *t.dtype.as_ref().map_err(|d| Error::Tensor {
        path: finetuned.path_of(t).to_path_buf(),
        tensor: name.to_string(),
        reason: format!("unsupported dtype {d}"),
    })?;
    out.push(SavedTensor {
        key,
        dtype,
        shape: t.shape.clone(),
        bytes: finetuned.read(t, 0, t.nbytes())?.to_vec(),
    });
    Ok(())
}

/// What the low-rank stage computed for some tensors, before the decisions that need all
/// of them (which modules are saved whole, whether biases go in, the verdict). A shard
/// stores this; a merge concatenates the shards' parts and assembles them as a single run
/// would.
#[derive(Debug, Clone, Default)]
pub struct LoraParts {
    pub spectra: Vec<(String, TensorSpectrum)>,
    pub extracted: Vec<ExtractedModule>,
    /// Changed 1-D tensors (aligned names).
    pub vectors: Vec<String>,
    /// Fine-tuned tensors of modules that may be saved whole (`modules_to_save`).
    pub candidates: Vec<SavedTensor>,
    /// Modules saved whole whatever else is extracted: task heads, MoE routers.
    pub saved_whole: Vec<String>,
    /// Δ of the bias of extracted modules (module path → values).
    pub bias_deltas: Vec<(String, Vec<f64>)>,
    pub skipped: Vec<(String, String)>,
    pub errors: BTreeMap<String, String>,
    /// Matrices left unanalysed because the stage was stopped (`cancel`).
    pub not_analysed: Vec<String>,
    pub total_time: Second,
}

impl LoraParts {
    /// Adds another shard's parts.
    pub fn extend(&mut self, o: LoraParts) {
        self.spectra.extend(o.spectra);
        self.extracted.extend(o.extracted);
        self.vectors.extend(o.vectors);
        for c in o.candidates {
            if !self.candidates.iter().any(|x| x.key == c.key) {
                self.candidates.push(c);
            }
        }
        for m in o.saved_whole {
            push_unique(&mut self.saved_whole, m);
        }
        self.bias_deltas.extend(o.bias_deltas);
        self.skipped.extend(o.skipped);
        self.errors.extend(o.errors);
        self.not_analysed.extend(o.not_analysed);
        self.total_time += o.total_time;
    }
}

/// Why a profile leaves an extracted module out, if it does.
fn profile_excludes(profile: Profile, e: &ExtractedModule) -> Option<&'static str> {
    match profile {
        Profile::Peft => None,
        Profile::Vllm if e.kind == ModuleKind::Embedding => {
            Some("left out (--profile vllm): vLLM loads no LoRA on embedding tables")
        }
        Profile::Vllm if pairing::module_type(&e.tensor) == "lm_head" => {
            Some("left out (--profile vllm): vLLM loads no LoRA on the LM head")
        }
        Profile::Vllm => None,
    }
}

/// Turns parts into the report: natural order everywhere, `modules_to_save`, `lora_bias`
/// and the profile's rules decided over all tensors, the verdict computed from the
/// comparison and the spectra.
pub fn assemble_lora(c: &Comparison, opts: &LoraOptions, mut parts: LoraParts) -> LoraReport {
    let facts = model_facts(c, opts);
    let profile = opts.profile;
    parts.spectra.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    parts
        .extracted
        .sort_by(|a, b| natural_cmp(&a.tensor, &b.tensor));
    parts.vectors.sort_by(|a, b| natural_cmp(a, b));
    let mut skipped = parts.skipped;
    let mut notes: Vec<String> = facts.task_note.iter().cloned().collect();

    // The profile's exclusions.
    let mut extracted = Vec::new();
    for e in parts.extracted {
        match profile_excludes(profile, &e) {
            Some(why) => skipped.push((e.tensor.clone(), why.to_string())),
            None => extracted.push(e),
        }
    }
    let mut saved_whole = parts.saved_whole;
    if profile == Profile::Vllm {
        for m in saved_whole.drain(..) {
            skipped.push((
                m,
                "left out (--profile vllm): vLLM does not load modules_to_save".into(),
            ));
        }
    }

    // Biases of extracted modules: through `lora_bias` when PEFT can take it for every
    // module of the adapter (it is one flag; embedding layers reject it, and a module
    // without a bias could not be merged).
    let lora_modules: std::collections::BTreeSet<String> =
        extracted.iter().map(|e| e.module.clone()).collect();
    let compared: std::collections::BTreeSet<&str> =
        c.results.iter().map(|(n, _)| n.as_str()).collect();
    let bias_deltas: BTreeMap<String, Vec<f64>> = parts
        .bias_deltas
        .into_iter()
        .filter(|(m, _)| lora_modules.contains(m))
        .collect();
    let no_bias_reason = if bias_deltas.is_empty() {
        None
    } else if profile == Profile::Vllm {
        Some("left out (--profile vllm): vLLM loads no LoRA bias".to_string())
    } else if let Some(e) = extracted.iter().find(|e| e.kind == ModuleKind::Embedding) {
        Some(format!(
            "bias of a module extracted as a LoRA, left out: PEFT's lora_bias is one flag for the adapter and its embedding layers reject it (`{}` is an embedding LoRA)",
            e.module
        ))
    } else {
        extracted
            .iter()
            .find(|e| {
                let t = e.tensor.strip_suffix(".weight").unwrap_or(&e.tensor);
                !compared.contains(format!("{t}.bias").as_str())
            })
            .map(|e| format!(
                "bias of a module extracted as a LoRA, left out: PEFT's lora_bias is one flag for the adapter, and `{}` has no bias to merge it into",
                e.module
            ))
    };
    let lora_bias = !bias_deltas.is_empty() && no_bias_reason.is_none();
    if lora_bias {
        for e in &mut extracted {
            let out = match e.kind {
                ModuleKind::Conv1d => e.factors.n,
                _ => e.factors.m,
            };
            e.bias = Some(
                bias_deltas
                    .get(&e.module)
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; out]),
            );
        }
    }

    // Changed 1-D tensors: a bias in the LoRA, a module saved whole, or left out.
    let in_saved = |aligned: &str| {
        let n = adapter_name(c, aligned);
        saved_whole.iter().any(|m| {
            n.strip_prefix(m.as_str())
                .is_some_and(|r| r.starts_with('.'))
        })
    };
    let mut modules_to_save: Vec<String> = saved_whole.clone();
    for v in &parts.vectors {
        if in_saved(v) {
            continue;
        }
        let module = adapter_name(c, v)
            .rsplit_once('.')
            .map_or(String::new(), |(m, _)| m.to_string());
        let why = if !opts.extract {
            "1-D tensor: analysed as changed, not decomposable".to_string()
        } else if lora_modules.contains(&module) {
            if lora_bias && v.ends_with(".bias") {
                continue;
            }
            no_bias_reason.clone().filter(|_| v.ends_with(".bias")).unwrap_or_else(|| {
                "1-D tensor of a module extracted as a LoRA: PEFT cannot also save that module whole".into()
            })
        } else if opts.skip_undecomposable {
            "1-D tensor left out (--skip-undecomposable)".into()
        } else if profile == Profile::Vllm {
            "left out (--profile vllm): vLLM does not load modules_to_save".into()
        } else if module.is_empty() {
            "top-level tensor without a module: not representable in PEFT".into()
        } else {
            push_unique(&mut modules_to_save, module);
            continue;
        };
        skipped.push((v.clone(), why));
    }
    skipped.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    let mut saved: Vec<SavedTensor> = parts
        .candidates
        .into_iter()
        .filter(|t| {
            let name = t.key.strip_prefix("base_model.model.").unwrap_or(&t.key);
            modules_to_save.iter().any(|m| {
                let rest = name
                    .strip_prefix(m.as_str())
                    .and_then(|r| r.strip_prefix('.'));
                // A head or router is saved with everything under it; a module of a
                // 1-D tensor with its own parameters only.
                rest.is_some_and(|r| saved_whole.contains(m) || !r.contains('.'))
            })
        })
        .collect();
    saved.sort_by(|a, b| a.key.cmp(&b.key));

    // transformers 5 stacks the experts of a fused-expert model into one 3-D parameter per
    // projection, and PEFT converts a per-expert adapter to it by stacking the factors:
    // every expert needs the same rank (padding with zero components is exact).
    if facts.fused_experts() {
        let is_expert = |e: &ExtractedModule| peft::expert_of(&e.tensor).is_some();
        let top = extracted
            .iter()
            .filter(|e| is_expert(e))
            .map(|e| e.factors.rank)
            .max();
        if let Some(top) = top {
            for e in extracted.iter_mut().filter(|e| is_expert(e)) {
                e.factors.pad_to(top);
            }
        }
    }

    // One rank for every module where the runtime takes one.
    let mut uniform = uniform_rank(opts).ok().flatten();
    if profile == Profile::Vllm {
        let top = extracted.iter().map(|e| e.factors.rank).max().unwrap_or(0);
        let r = uniform.unwrap_or(top).max(top);
        match crate::peft::vllm_rank(r) {
            Some(v) => {
                for e in &mut extracted {
                    e.factors.pad_to(v);
                }
                uniform = Some(v);
            }
            None => notes.push(format!(
                "rank {r} is above the largest rank vLLM accepts (512): ranks left as extracted"
            )),
        }
    }

    let all_modules: Vec<String> = c
        .finetuned
        .tensors
        .iter()
        .filter_map(|t| t.name.rsplit_once('.').map(|(m, _)| m.to_string()))
        .collect();
    let target_names: Vec<String> = extracted.iter().map(|e| e.module.clone()).collect();
    let target_modules = crate::peft::target_modules(&target_names, &all_modules);

    let detected: BTreeMap<&str, Option<usize>> = parts
        .spectra
        .iter()
        .map(|(n, s)| (n.as_str(), s.detected_rank))
        .collect();
    // Thin matrices changed in every direction cannot tell a LoRA from a dense change.
    let uninformative: std::collections::BTreeSet<&str> = parts
        .spectra
        .iter()
        .filter(|(_, s)| {
            crate::lowrank::detect::is_full_spectrum(
                &s.singular_values,
                s.noise_floor,
                s.shape[0],
                s.shape[1],
            )
        })
        .map(|(n, _)| n.as_str())
        .collect();
    let modified: Vec<(&String, &TensorMetrics)> = c
        .results
        .iter()
        .filter(|(_, m)| m.is_modified())
        .map(|(n, m)| (n, m))
        .collect();
    let modules: Vec<String> = modified
        .iter()
        .map(|(n, _)| pairing::module_type(n))
        .collect();
    // A task head is trained whole by design (PEFT's task models save it whole), and a
    // thin matrix changed in every direction looks the same under a LoRA and a dense
    // change: neither says whether the rest was a LoRA.
    let evidence: Vec<Evidence> = modified
        .iter()
        .zip(&modules)
        .filter(|((n, _), _)| facts.head_of(n).is_none() && !uninformative.contains(n.as_str()))
        .map(|((n, m), module)| Evidence {
            module,
            is_matrix: m.shape.len() == 2,
            detected_rank: detected.get(n.as_str()).copied().flatten(),
        })
        .collect();
    LoraReport {
        options: opts.lowrank.clone(),
        dtype: opts.dtype,
        uniform_rank: uniform,
        base_model: c
            .base
            .hub
            .as_ref()
            .map_or_else(|| c.base.source.clone(), |h| h.repo_id.clone()),
        base_revision: c.base.hub.as_ref().map(|h| h.commit.clone()),
        verdict: verdict(&evidence),
        spectra: parts.spectra,
        extracted,
        modules_to_save,
        saved,
        skipped,
        errors: parts.errors,
        not_analysed: parts.not_analysed,
        total_time: parts.total_time,
        facts,
        profile,
        lora_bias,
        target_modules,
        notes,
    }
}
