//! PyTorch checkpoints (`pytorch_model.bin`): the committed fixtures were written by
//! torch itself (`tests/fixtures/torch/make_fixtures.py`), in the zip and the legacy
//! format, sharded, next to training state, and each model also as `model.safetensors`
//! by the `safetensors` package — the independent reference the tests compare with.

use crate::common::*;
use std::path::{Path, PathBuf};
use weightdiff::pipeline::NoProgress;
use weightdiff::{Checkpoint, CompareOptions};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(rel)
}

fn compare(base: &Path, ft: &Path) -> weightdiff::Comparison {
    let opts = CompareOptions {
        verify: true,
        ..Default::default()
    };
    let (b, f) = (
        Checkpoint::open(base).unwrap(),
        Checkpoint::open(ft).unwrap(),
    );
    weightdiff::compare(&b, &f, &opts, &NoProgress).unwrap()
}

#[test]
fn every_torch_layout_reads_the_same_bytes_as_safetensors() {
    let reference = fixture("safetensors");
    for layout in [
        "zip",
        "legacy",
        "sharded",
        "trainer",
        "zip/pytorch_model.bin",
        "legacy/pytorch_model.bin",
    ] {
        let c = compare(&reference, &fixture(layout));
        assert!(c.errors.is_empty(), "{layout}: {:?}", c.errors);
        assert!(c.only_in_base.is_empty() && c.only_in_finetuned.is_empty());
        assert!(c.mismatches.is_empty(), "{layout}: {:?}", c.mismatches);
        // 14 tensors: views at storage offsets (q/k of a fused qkv), a transposed view,
        // a strided slice, tied embeddings, a 0-d scalar, bool/int/f16/bf16/f64.
        assert_eq!(c.results.len(), 14, "{layout}");
        for (name, m) in &c.results {
            assert!(
                m.identical,
                "{layout}: {name} differs from the safetensors copy"
            );
        }
    }
}

#[test]
fn strided_and_tied_tensors_are_what_torch_holds() {
    let ck = Checkpoint::open(&fixture("zip")).unwrap();
    let t = &ck.tensors()["model.layers.0.mlp.down_proj.weight"];
    assert_eq!(t.shape, [8, 16]);
    let st = Checkpoint::open(&fixture("safetensors")).unwrap();
    let s = &st.tensors()["model.layers.0.mlp.down_proj.weight"];
    // Read in two windows, as the pipeline does for large tensors.
    let half = t.nbytes() / 2;
    let mut got = ck.read(t, 0, half).unwrap().to_vec();
    got.extend_from_slice(&ck.read(t, half, t.nbytes() - half).unwrap());
    assert_eq!(got, st.read(s, 0, s.nbytes()).unwrap().to_vec());
    let (e, l) = (
        &ck.tensors()["model.embed_tokens.weight"],
        &ck.tensors()["lm_head.weight"],
    );
    assert_eq!(
        ck.read(e, 0, e.nbytes()).unwrap().to_vec(),
        ck.read(l, 0, l.nbytes()).unwrap().to_vec()
    );
}

#[test]
fn a_torch_finetune_gives_the_metrics_of_its_safetensors_copy() {
    let via_bin = compare(&fixture("zip"), &fixture("finetuned/pytorch_model.bin"));
    let via_st = compare(
        &fixture("safetensors"),
        &fixture("finetuned/model.safetensors"),
    );
    assert_eq!(
        results_without_times(&via_bin),
        results_without_times(&via_st)
    );
    let modified = via_bin.modified();
    assert_eq!(
        modified,
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight"
        ]
    );
    // The CLI runs the whole job on .bin inputs, LoRA stage and adapter included.
    let dir = tempfile::tempdir().unwrap();
    compare_cli(
        dir.path(),
        fixture("legacy"),
        fixture("finetuned/pytorch_model.bin"),
    )
    .assert()
    .success();
    let meta = read_json(&dir.path().join("lora_metadata.json"));
    assert!(meta["modules"]["model.layers.0.self_attn.q_proj"].is_object());
}

#[test]
fn code_in_a_pickle_is_refused_not_run() {
    let marker = Path::new("/tmp/weightdiff-fixture-pwned");
    let _ = std::fs::remove_file(marker);
    weightdiff()
        .arg("inspect")
        .arg(fixture("malicious.bin"))
        .assert()
        .code(2)
        .stderr(predicates::str::contains("malicious.bin"))
        .stderr(predicates::str::contains("refusing global `posix.system`"));
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn training_state_next_to_the_weights_is_skipped() {
    let ck = Checkpoint::open(&fixture("trainer")).unwrap();
    assert_eq!(ck.shard_paths().count(), 1);
    assert!(
        ck.shard_paths()
            .all(|p| p.file_name().unwrap() == "pytorch_model.bin")
    );
    // Alone, the training state is not a model.
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "training_args.bin",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    ] {
        std::fs::copy(fixture("trainer").join(f), dir.path().join(f)).unwrap();
    }
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("pytorch_model.bin"), "{e}");
}

/// Every truncation and a sweep of byte flips of both formats: an error naming the
/// file, or tensors whose values still decode — never a panic or an out-of-bounds read.
#[test]
fn damaged_torch_files_give_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = Checkpoint::open(&fixture("safetensors")).unwrap();
    for format in ["zip", "legacy"] {
        let bytes = std::fs::read(fixture(format).join("pytorch_model.bin")).unwrap();
        let path = dir.path().join(format!("{format}.bin"));
        let check = |data: &[u8], what: &str| {
            std::fs::write(&path, data).unwrap();
            match Checkpoint::open(&path) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("{format}.bin")), "{what}: {msg}");
                }
                Ok(ck) => {
                    let c =
                        weightdiff::compare(&good, &ck, &CompareOptions::default(), &NoProgress)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(c.results.len() + c.errors.len() + c.only_in_base.len() >= 1);
                }
            }
        };
        for cut in (0..bytes.len()).step_by(37) {
            check(&bytes[..cut], &format!("{format} cut at {cut}"));
        }
        let mut rng = 0x9e3779b97f4a7c15u64;
        for i in 0..300 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut m = bytes.clone();
            let at = (rng as usize) % m.len();
            m[at] ^= 1 << (i % 8);
            check(&m, &format!("{format} flip at {at}"));
        }
    }
}

/// Found by the `torch_file` fuzz target: a pickle naming one tensor twice used to index
/// past the shard list while reporting the duplicate.
#[test]
fn a_name_repeated_in_one_pickle_is_a_warning() {
    let path = fixture("fuzz/duplicate-name.bin");
    let ck = Checkpoint::open(&path).unwrap();
    assert!(
        ck.warnings
            .iter()
            .any(|w| w.contains("q_proj.weight") && w.contains("the first is used")),
        "{:?}",
        ck.warnings
    );
    let c = weightdiff::compare(&ck, &ck, &CompareOptions::default(), &NoProgress).unwrap();
    assert!(c.errors.is_empty());
}
