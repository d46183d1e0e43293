//! The same pair stored as one file, as shards with an index, and as shards without an
//! index gives identical numbers.

use crate::common::*;
use weightdiff::synthetic::{build_pair, demo_spec};

fn compare_dir(
    base: &std::path::Path,
    ft: &std::path::Path,
    out: &std::path::Path,
) -> serde_json::Value {
    compare_cli(out, base, ft).assert().success();
    read_json(&out.join("weight_differences.json"))
}

#[test]
fn single_file_sharded_and_unindexed_layouts_give_identical_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (label, shard, index) in [
        ("single", None, true),
        ("indexed", Some(60_000), true),
        ("loose", Some(60_000), false),
    ] {
        let mut spec = demo_spec();
        spec.max_shard_bytes = shard;
        spec.write_index = index;
        let pair = build_pair(&spec, &dir.path().join(label)).unwrap();
        let files = std::fs::read_dir(&pair.base).unwrap().count();
        match label {
            "single" => assert!(pair.base.join("model.safetensors").exists()),
            "indexed" => {
                assert!(pair.base.join("model.safetensors.index.json").exists() && files > 3)
            }
            _ => assert!(!pair.base.join("model.safetensors.index.json").exists() && files > 3),
        }
        let wd = compare_dir(
            &pair.base,
            &pair.finetuned,
            &dir.path().join(format!("{label}-out")),
        );
        results.push(metrics_without_times(&wd));
    }
    assert!(!results[0].as_object().unwrap().is_empty());
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

#[test]
fn a_single_safetensors_file_is_a_model_argument() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), dir.path()).unwrap();
    weightdiff()
        .arg("inspect")
        .arg(&pair.base)
        .assert()
        .success()
        .stdout(predicates::str::contains(
            "model.layers.1.mlp.down_proj.weight",
        ))
        .stdout(predicates::str::contains("parameters: 226688"));
    let f = write_file(
        &dir.path().join("x.safetensors"),
        &[f32_tensor("a", &[2], &[1.0, 2.0])],
    );
    weightdiff()
        .args(["inspect", "--json"])
        .arg(&f)
        .assert()
        .success()
        .stdout(predicates::str::contains("\"parameter_count\": 2"));
}

#[test]
fn positioned_reads_give_the_same_numbers_as_mapped_windows() {
    use weightdiff::checkpoint::shard::ReadMode;
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), dir.path()).unwrap();
    let run = |mode| {
        let mut b = weightdiff::Checkpoint::open(&pair.base).unwrap();
        let mut f = weightdiff::Checkpoint::open(&pair.finetuned).unwrap();
        b.read_mode = mode;
        f.read_mode = mode;
        let opts = weightdiff::CompareOptions {
            window_bytes: 5000,
            ..Default::default()
        };
        results_without_times(
            &weightdiff::compare(&b, &f, &opts, &weightdiff::pipeline::NoProgress).unwrap(),
        )
    };
    assert_eq!(run(ReadMode::Mapped), run(ReadMode::Pread));
}

#[test]
fn model_safetensors_is_read_alone_and_other_weight_files_beside_it_are_reported() {
    // Mistral's repositories hold `consolidated.safetensors` (other names, same weights)
    // beside the Hugging Face files; transformers reads only `model.safetensors`.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    write_file(
        &model.join("model.safetensors"),
        &[f32_tensor("model.norm.weight", &[2], &[1.0, 2.0])],
    );
    write_file(
        &model.join("consolidated.safetensors"),
        &[f32_tensor("norm.weight", &[2], &[1.0, 2.0])],
    );
    let out = weightdiff()
        .args(["inspect", "--json"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc = stdout_json(&out);
    let names: Vec<&str> = doc["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["model.norm.weight"]);
    let problems = doc["problems"].to_string();
    assert!(
        problems.contains("consolidated.safetensors: not part of this layout; ignored"),
        "{problems}"
    );
}
