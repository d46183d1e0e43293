//! The diff: every pair's windows compared in parallel by a rayon pool, each window read,
//! reduced to an [`Accum`] and dropped, the results merged per tensor in window order
//! (so the numbers do not depend on the thread count), journaled as they finish.

use super::lora_stage::Capture;
use super::plan::{Job, Side, prepare_side, sizes};
use super::*;
use crate::comparison::ResultSink;

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
    /// max |Δ| / step, when exactly one side is encoded.
    max_error_steps: Option<f64>,
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
    compare_during(base, finetuned, opts, progress, None)
}

/// [`compare`], running the low-rank analyses of `during` as their tensors are compared.
pub fn compare_during(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    opts: &CompareOptions,
    progress: &dyn Progress,
    during: Option<&DuringDiff>,
) -> Result<Comparison> {
    let mut v = compare_many_during(base, &[finetuned], opts, progress, during)?;
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
    compare_many_during(base, finetuned, opts, progress, None)
}

fn compare_many_during(
    base: &Checkpoint,
    finetuned: &[&Checkpoint],
    opts: &CompareOptions,
    progress: &dyn Progress,
    during: Option<&DuringDiff>,
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
    // The analyses during the diff belong to one fine-tuned model's stage.
    let during = during.filter(|_| finetuned.len() == 1);
    pool.install(|| compare_in_pool(base, finetuned, opts, progress, threads, during))
}

/// What one fine-tuned model contributes before the work starts.
/// One pair of one fine-tuned model to compare.
fn compare_in_pool(
    base: &Checkpoint,
    fts: &[&Checkpoint],
    opts: &CompareOptions,
    progress: &dyn Progress,
    threads: usize,
    during: Option<&DuringDiff>,
) -> Result<Vec<Comparison>> {
    let t_start = Instant::now();
    let mut sides: Vec<Side> = fts.iter().map(|ft| prepare_side(base, ft, opts)).collect();

    // A resumed run takes the results its journal holds and computes the rest; the
    // journal is then where this run's results go as they finish.
    let journal: Option<Mutex<Box<dyn ResultSink>>> = match &opts.journal_dir {
        None => None,
        Some(dir) => {
            let fp = fingerprint(base, fts[0], opts);
            let (j, done) = if opts.resume {
                Journal::resume(dir, &fp)?
            } else {
                (Journal::create(dir, &fp)?, BTreeMap::new())
            };
            sides[0].recovered = done;
            Some(Mutex::new(Box::new(j)))
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
    // Δ of the matrices analysed during the diff, taken from the windows as they are
    // compared (see `Capture`).
    let captures: Vec<Option<Capture>> = jobs
        .iter()
        .map(|j| during.and_then(|d| d.capture(pair_of(j))))
        .collect();
    // Cut every group into windows sized for the widest dtype among its pairs, or at the
    // blocks a capture needs.
    let mut units = Vec::new();
    for (g, members) in groups.iter().enumerate() {
        let sa = sizes(pair_of(&jobs[members[0]])).0;
        let sb = members
            .iter()
            .map(|&j| sizes(pair_of(&jobs[j])).1)
            .max()
            .expect("non-empty group");
        let per = match members[..] {
            [j] => captures[j].as_ref().and_then(|c| c.window_elements()),
            _ => None,
        }
        .unwrap_or((opts.window_bytes / sa.max(sb) as u64).max(1));
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
        let outs = run_group_unit(
            base,
            fts,
            &sides,
            &jobs,
            &captures,
            members,
            u,
            opts,
            cancelled(),
        );
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
            let compared = result.as_ref().ok().cloned();
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
            // Its low-rank analysis now, by this worker, while its bytes are in the page
            // cache. (Spawned as a rayon task instead, it waits in the deque behind the
            // rest of this worker's windows: the diff runs ahead and a pair larger than
            // memory is read from disk again; BENCHMARKS.md, "Analyses during the diff".)
            if let (Some(s), Some(m)) = (during, compared) {
                s.tensor_compared(p, &m, captures[j].as_ref());
            }
            if let Some(c) = &captures[j] {
                c.release();
            }
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
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
                a.max_error_steps = match (a.max_error_steps, o.max_error_steps) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    (x, y) => x.or(y),
                };
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

/// Runs one window of a group: reads the base window once, then compares it with the
/// same window of every job (fine-tuned model) of the group that reaches this far.
/// Returns, per member, `None` when the job has no such window.
#[allow(clippy::too_many_arguments)]
fn run_group_unit(
    base: &Checkpoint,
    fts: &[&Checkpoint],
    sides: &[Side],
    jobs: &[Job],
    captures: &[Option<Capture>],
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
    let mut outs: Vec<_> = members
        .iter()
        .map(|&j| {
            if !in_window(j) {
                return None;
            }
            let p = pair(j);
            let n = len_of(j);
            let wa = &wa[..(n * sa) as usize];
            let capture = captures[j].as_ref();
            Some(
                compare_window(base, fts[jobs[j].ft], p, wa, u.start, n, opts, capture).map(
                    |mut o| {
                        o.total += base_time;
                        o
                    },
                ),
            )
        })
        .collect();
    // The base window was read in place: fail its users if its shard shrank meanwhile.
    if let Err(e) = base.check(&first.base, &wa) {
        let shared = Arc::new(e);
        for o in outs.iter_mut().flatten() {
            *o = Err(Error::Shared(shared.clone()));
        }
    }
    outs
}

/// Compares a base window (already read) with the same elements of the fine-tuned tensor.
#[allow(clippy::too_many_arguments)]
fn compare_window(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    p: &TensorPair,
    wa: &[u8],
    start: u64,
    len: u64,
    opts: &CompareOptions,
    capture: Option<&Capture>,
) -> Result<UnitOut> {
    let t0 = Instant::now();
    let da = *p.base.dtype.as_ref().expect("checked");
    let db = *p.finetuned.dtype.as_ref().expect("checked");
    let sb = db.size() as u64;
    // The error in quantization steps is computed only for a pair of which one side is
    // encoded (a quant against its original): other pairs pay nothing. An encoded
    // fine-tuned side decodes its values and steps in one pass.
    let one_encoded = p.base.is_encoded() != p.finetuned.is_encoded();
    let (wb, steps_b) = if one_encoded && p.finetuned.is_encoded() {
        finetuned.read_with_steps(&p.finetuned, start * sb, len * sb)?
    } else {
        (finetuned.read(&p.finetuned, start * sb, len * sb)?, None)
    };
    let t1 = Instant::now();
    let identical = da == db && wa[..] == wb[..];
    let fast = if identical {
        if let Some(c) = capture {
            c.skip();
        }
        kernels::fast::identical(wa, da)
    } else if let Some(acc) = capture.and_then(|c| c.diff_window(start, wa, &wb, opts.threshold)) {
        acc
    } else {
        kernels::fast::diff(wa, da, &wb, db, opts.threshold)
    };
    let max_error_steps = if !one_encoded {
        None
    } else {
        let steps = match steps_b {
            Some(s) => Some(s),
            None if p.base.is_encoded() => {
                let sa = da.size() as u64;
                base.read_steps(&p.base, start * sa, len * sa)?
            }
            None => None,
        };
        steps.map(|s| kernels::max_error_steps(wa, da, &wb, db, &s))
    };
    let t2 = Instant::now();
    let reference = opts
        .verify
        .then(|| kernels::reference::diff(wa, da, &wb, db, opts.threshold));
    let t3 = Instant::now();
    finetuned.check(&p.finetuned, &wb)?;
    Ok(UnitOut {
        fast,
        reference,
        max_error_steps,
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
    m.max_error_steps = o.max_error_steps;
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
        lowrank_during_diff: None,
    }
}
