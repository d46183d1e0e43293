//! Reliability: files changing under a run, interrupted and resumed runs, output safety
//! (locks, full disks, planted symlinks), path confinement and concurrent runs.

use crate::common::*;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use weightdiff::pipeline::{NoProgress, Progress, ProgressUpdate};
use weightdiff::synthetic::{PairSpec, build_pair, demo_spec};
use weightdiff::{Checkpoint, CompareOptions, compare};

/// A pair with many small tensors, sharded so that several files are involved.
fn many_tensor_pair(dir: &Path) -> weightdiff::synthetic::BuiltPair {
    let mut spec = demo_spec();
    spec.shape.num_hidden_layers = 12;
    spec.max_shard_bytes = Some(200_000);
    build_pair(&spec, dir).unwrap()
}

/// Calls a closure when the k-th tensor completes.
struct After<F: Fn() + Sync> {
    k: usize,
    seen: AtomicUsize,
    f: F,
}
impl<F: Fn() + Sync> Progress for After<F> {
    fn update(&self, _: ProgressUpdate<'_>) {
        if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.k {
            (self.f)();
        }
    }
}

#[test]
fn a_shard_truncated_during_the_run_fails_only_its_remaining_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let pair = many_tensor_pair(dir.path());
    let b = Checkpoint::open(&pair.base).unwrap();
    let f = Checkpoint::open(&pair.finetuned).unwrap();
    // The shard holding the last layer: its tensors come late in the (natural) order.
    let victim = f
        .path_of(&f.tensors()["model.layers.11.mlp.up_proj.weight"])
        .to_path_buf();
    let opts = CompareOptions {
        threads: Some(1),
        ..Default::default()
    };
    let hook = After {
        k: 3,
        seen: AtomicUsize::new(0),
        f: || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&victim)
                .unwrap();
            file.set_len(100).unwrap();
        },
    };
    let c = compare(&b, &f, &opts, &hook).unwrap();
    assert!(!c.errors.is_empty(), "tensors of the truncated shard fail");
    for e in c.errors.values() {
        assert!(e.contains("changed size"), "{e}");
        assert!(
            e.contains(&victim.file_name().unwrap().to_string_lossy().to_string()),
            "{e}"
        );
    }
    assert!(
        c.results.len() >= 3,
        "tensors compared before the truncation and in other shards are kept"
    );
    assert_eq!(c.results.len() + c.errors.len(), 12 * 11 + 3);
}

/// The fault really happens: the shard is truncated after one of its windows was mapped
/// and populated and before the diff touches it (a hook of `checkpoint::mapped`). The
/// SIGBUS guard answers with zeros, that tensor is an error naming the shard ("shrank
/// while it was being read"), the shard's later tensors fail on the length check, and
/// every other tensor completes; the process lives.
#[test]
fn a_shard_truncated_while_a_mapped_window_is_read_fails_that_tensor_not_the_process() {
    use weightdiff::checkpoint::{mapped, shard::ReadMode};
    let dir = tempfile::tempdir().unwrap();
    let pair = many_tensor_pair(dir.path());
    let mut b = Checkpoint::open(&pair.base).unwrap();
    let mut f = Checkpoint::open(&pair.finetuned).unwrap();
    b.read_mode = ReadMode::Mapped;
    f.read_mode = ReadMode::Mapped;
    let victim = f
        .path_of(&f.tensors()["model.layers.11.mlp.up_proj.weight"])
        .to_path_buf();
    let fired = Arc::new(AtomicBool::new(false));
    let (v, fd) = (victim.clone(), fired.clone());
    mapped::set_window_hook(Some(Box::new(move |path, _, _| {
        if path == v && !fd.swap(true, Ordering::SeqCst) {
            let file = std::fs::OpenOptions::new().write(true).open(&v).unwrap();
            // Every page of the mapping is now past the end of the file.
            file.set_len(0).unwrap();
        }
    })));
    let faults = mapped::faults_handled();
    let opts = CompareOptions {
        threads: Some(1),
        ..Default::default()
    };
    let c = compare(&b, &f, &opts, &NoProgress);
    mapped::set_window_hook(None);
    let c = c.unwrap();
    assert!(fired.load(Ordering::SeqCst), "the hook truncated the shard");
    assert!(
        mapped::faults_handled() > faults,
        "the read faulted and the guard answered"
    );
    let shard_name = victim.file_name().unwrap().to_string_lossy().to_string();
    let during: Vec<_> = c
        .errors
        .iter()
        .filter(|(_, e)| e.contains("shrank while it was being read"))
        .collect();
    assert_eq!(
        during.len(),
        1,
        "exactly the tensor being read: {:?}",
        c.errors
    );
    for e in c.errors.values() {
        assert!(e.contains(&shard_name), "{e}");
        assert!(
            e.contains("shrank while") || e.contains("changed size"),
            "{e}"
        );
    }
    let in_victim = f
        .tensors()
        .values()
        .filter(|t| f.path_of(t) == victim)
        .count();
    assert!(c.errors.len() <= in_victim);
    assert_eq!(c.results.len() + c.errors.len(), 12 * 11 + 3);
    assert!(
        c.results.len() >= 12 * 11 + 3 - in_victim,
        "other shards complete"
    );
}

fn journal_opts(out: &Path, cancel: Option<Arc<AtomicBool>>, resume: bool) -> CompareOptions {
    CompareOptions {
        threads: Some(1),
        journal_dir: Some(out.to_path_buf()),
        resume,
        cancel,
        ..Default::default()
    }
}

#[test]
fn a_cancelled_run_resumes_to_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let pair = many_tensor_pair(&dir.path().join("pair"));
    let b = Checkpoint::open(&pair.base).unwrap();
    let f = Checkpoint::open(&pair.finetuned).unwrap();
    let full = compare(&b, &f, &CompareOptions::default(), &NoProgress).unwrap();

    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let hook = After {
        k: 40,
        seen: AtomicUsize::new(0),
        f: || cancel.store(true, Ordering::SeqCst),
    };
    let partial = compare(
        &b,
        &f,
        &journal_opts(&out, Some(cancel.clone()), false),
        &hook,
    )
    .unwrap();
    assert!(!partial.complete);
    assert_eq!(partial.results.len(), 40);
    assert!(
        partial.errors.is_empty(),
        "cancelled tensors are not errors"
    );

    // A torn last line, as a SIGKILL during a write leaves it, is ignored.
    use std::io::Write;
    let mut j = std::fs::OpenOptions::new()
        .append(true)
        .open(out.join(weightdiff::journal::JOURNAL_FILE))
        .unwrap();
    j.write_all(br#"{"kind":"tensor","name":"model.la"#)
        .unwrap();
    drop(j);

    let resumed = compare(&b, &f, &journal_opts(&out, None, true), &NoProgress).unwrap();
    assert!(resumed.complete);
    assert!(
        resumed.performance.bytes_read < full.performance.bytes_read,
        "finished tensors are not read again"
    );
    for (n, m) in &partial.results {
        let r = resumed.results.iter().find(|(x, _)| x == n).unwrap();
        assert_eq!(
            r.1.total_time, m.total_time,
            "{n} comes from the journal, timings included"
        );
    }
    let (r, f) = (
        results_without_times(&resumed),
        results_without_times(&full),
    );
    assert_eq!(r.len(), f.len());
    for (a, b) in r.iter().zip(&f) {
        assert_eq!(a, b, "{} differs after resume", a.0);
    }
}

#[test]
fn resuming_with_other_inputs_or_options_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let b = Checkpoint::open(&pair.base).unwrap();
    let f = Checkpoint::open(&pair.finetuned).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    compare(&b, &f, &journal_opts(&out, None, false), &NoProgress).unwrap();
    let other = CompareOptions {
        threshold: 1e-3,
        ..journal_opts(&out, None, true)
    };
    let e = compare(&b, &f, &other, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other inputs or options") && e.contains("threshold=1e-3"),
        "{e}"
    );
    // Swapping the models changes the fingerprint too.
    let e = compare(&f, &b, &journal_opts(&out, None, true), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("without --resume"), "{e}");
}

fn compare_cmd(pair: &weightdiff::synthetic::BuiltPair, out: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("weightdiff"));
    c.args(["compare", "--no-lora", "--verify", "--threads", "1", "-o"])
        .arg(out)
        .arg(&pair.base)
        .arg(&pair.finetuned);
    c
}

fn wait_for_progress(child: &mut std::process::Child) {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // Progress lines come every 10 tensors; the first one means the run is under way.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("[10/") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
}

#[test]
fn sigterm_stops_cleanly_and_resume_finishes_with_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = PairSpec {
        shape: weightdiff::synthetic::ModelShape::preset("tiny").unwrap(),
        ..demo_spec()
    };
    spec.shape.num_hidden_layers = 40;
    spec.shape.hidden_size = 256;
    spec.shape.intermediate_size = 512;
    spec.max_shard_bytes = Some(4_000_000);
    let pair = build_pair(&spec, &dir.path().join("pair")).unwrap();
    let reference = dir.path().join("reference");
    assert!(
        compare_cmd(&pair, &reference)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    );

    let out = dir.path().join("out");
    let mut child = compare_cmd(&pair, &out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_progress(&mut child);
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "exit status after SIGTERM");
    let wd = read_json(&out.join("weight_differences.json"));
    assert_eq!(wd["complete"], false);
    let n_partial = wd["all_differences"].as_object().unwrap().len();
    assert!((10..40 * 11 + 3).contains(&n_partial), "{n_partial}");
    assert!(
        std::fs::read_to_string(out.join("comparison_report.txt"))
            .unwrap()
            .contains("DID NOT COMPLETE")
    );

    let status = compare_cmd(&pair, &out)
        .arg("--resume")
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let wd = read_json(&out.join("weight_differences.json"));
    assert_eq!(wd["complete"], true);
    assert_eq!(
        metrics_without_times(&wd),
        metrics_without_times(&read_json(&reference.join("weight_differences.json")))
    );
    assert!(
        !out.join(weightdiff::journal::JOURNAL_FILE).exists(),
        "a finished run removes its journal"
    );
}

#[test]
fn sigkill_at_any_point_loses_nothing_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let pair = many_tensor_pair(&dir.path().join("pair"));
    let reference = dir.path().join("reference");
    assert!(
        compare_cmd(&pair, &reference)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let expected = metrics_without_times(&read_json(&reference.join("weight_differences.json")));
    for delay_ms in [0u64, 30, 120] {
        let out = dir.path().join(format!("out{delay_ms}"));
        let mut child = compare_cmd(&pair, &out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let status = compare_cmd(&pair, &out)
            .arg("--resume")
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "resume after SIGKILL at {delay_ms} ms");
        let wd = read_json(&out.join("weight_differences.json"));
        assert_eq!(
            metrics_without_times(&wd),
            expected,
            "SIGKILL at {delay_ms} ms"
        );
    }
}

#[test]
fn a_second_run_into_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    let _held = weightdiff::fsio::lock_output_dir(&out).unwrap();
    weightdiff()
        .args(["compare", "-o"])
        .arg(&out)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .code(2)
        .stderr(predicates::str::contains(
            "another weightdiff run is writing into this directory",
        ));
    drop(_held);
    compare_cli(&out, &pair.base, &pair.finetuned)
        .assert()
        .success();
}

#[test]
fn planted_symlinks_in_the_output_directory_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, "precious").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("difference.txt")).unwrap();
    weightdiff()
        .args(["compare", "--quiet", "--no-lora", "-o"])
        .arg(&out)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .success();
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious");
    assert!(
        !std::fs::symlink_metadata(out.join("difference.txt"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // A directory symlink where the adapter goes is refused.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("lora_adapter")).unwrap();
    compare_cli(&out, &pair.base, &pair.finetuned)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("symbolic link"));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn a_shard_symlinked_outside_the_model_is_refused_but_the_hf_cache_layout_works() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(
        &PairSpec {
            max_shard_bytes: Some(100_000),
            ..demo_spec()
        },
        &dir.path().join("pair"),
    )
    .unwrap();
    // A model directory whose shard is a symlink to a file elsewhere.
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(&pair.base).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name == "model-00001-of-00004.safetensors" {
            std::os::unix::fs::symlink(&p, model.join(&name)).unwrap();
        } else {
            std::fs::copy(&p, model.join(&name)).unwrap();
        }
    }
    weightdiff()
        .arg("inspect")
        .arg(&model)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("outside the model directory"));

    // The Hugging Face cache: snapshots/REV/* are symlinks into blobs/.
    let repo = dir.path().join("hub/models--org--tiny");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, e) in std::fs::read_dir(&pair.base).unwrap().enumerate() {
        let p = e.unwrap().path();
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::copy(&p, &blob).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/blob{i}"),
            snap.join(p.file_name().unwrap()),
        )
        .unwrap();
    }
    weightdiff()
        .arg("inspect")
        .arg(&snap)
        .assert()
        .success()
        .stdout(predicates::str::contains("tensors:    25"));
}

#[test]
fn a_full_disk_gives_a_clear_error_and_keeps_earlier_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    // A first run fits (diff reports only) ...
    weightdiff()
        .args(["compare", "--quiet", "--no-lora", "-o"])
        .arg(&mnt)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .success();
    let before = std::fs::read(mnt.join("weight_differences.json")).unwrap();
    // ... then fill the disk and run again.
    let filler = std::fs::File::create(mnt.join("filler")).unwrap();
    use std::io::Write;
    let mut w = std::io::BufWriter::new(filler);
    while w.write_all(&[0u8; 4096]).and_then(|_| w.flush()).is_ok() {}
    drop(w);
    weightdiff()
        .args(["compare", "--quiet", "--no-lora", "-o"])
        .arg(&mnt)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("No space left on device"));
    assert_eq!(
        std::fs::read(mnt.join("weight_differences.json")).unwrap(),
        before,
        "earlier complete outputs are intact"
    );
    let stray: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "no temporary files left behind");
}

#[test]
fn concurrent_runs_of_one_pair_agree() {
    let dir = tempfile::tempdir().unwrap();
    let pair = many_tensor_pair(&dir.path().join("pair"));
    let outs: Vec<_> = (0..3).map(|i| dir.path().join(format!("out{i}"))).collect();
    let children: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(i, out)| {
            let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("weightdiff"));
            c.args(["compare", "--quiet", "-o"])
                .arg(out)
                .arg(&pair.base)
                .arg(&pair.finetuned);
            if i == 2 {
                c.args(["--threads", "1"]);
            }
            c.spawn().unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let first = metrics_without_times(&read_json(&outs[0].join("weight_differences.json")));
    for out in &outs[1..] {
        assert_eq!(
            metrics_without_times(&read_json(&out.join("weight_differences.json"))),
            first
        );
        assert_eq!(
            std::fs::read(out.join("lora_adapter/adapter_model.safetensors")).unwrap(),
            std::fs::read(outs[0].join("lora_adapter/adapter_model.safetensors")).unwrap()
        );
    }
}
