//! `compare --shard I/N` + `merge` give exactly the outputs of a single run (timings
//! aside), for several N including more shards than tensors; bad sets of parts are refused.

use crate::common::*;
use predicates::prelude::PredicateBooleanExt;
use serde_json::Value;
use std::path::{Path, PathBuf};
use weightdiff::synthetic::{build_pair, demo_spec};

fn strip(v: &Value) -> Value {
    const TIMING: &[&str] = &[
        "total_time",
        "compute_time",
        "reference_time",
        "speedup",
        "time",
        "performance",
        "timings",
    ];
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| !TIMING.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        _ => v.clone(),
    }
}

fn text_without_timings(p: &Path) -> Vec<String> {
    let re =
        regex::Regex::new(r"(?i)time|slowest|GB/s|speedup|read in|low-rank stage:|/tmp/").unwrap();
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !re.is_match(l))
        .map(String::from)
        .collect()
}

fn run(args: &[&str], pair: &weightdiff::synthetic::BuiltPair, out: &Path) {
    compare_cli(out, &pair.base, &pair.finetuned)
        .args(args)
        .assert()
        .success();
}

fn merge(parts: &[PathBuf], out: &Path) -> assert_cmd::assert::Assert {
    weightdiff()
        .args(["merge", "--quiet", "-o"])
        .arg(out)
        .args(parts)
        .assert()
}

#[test]
fn sharded_and_merged_outputs_equal_a_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let single = dir.path().join("single");
    run(&[], &pair, &single);
    for n in [1usize, 2, 3, 40] {
        let parts: Vec<PathBuf> = (0..n)
            .map(|i| dir.path().join(format!("n{n}-part{i}")))
            .collect();
        // Parts in reverse order, to show order does not matter.
        for (i, p) in parts.iter().enumerate().rev() {
            run(&["--shard", &format!("{i}/{n}")], &pair, p);
        }
        let merged = dir.path().join(format!("merged{n}"));
        merge(&parts, &merged).success();
        for f in [
            "weight_differences.json",
            "lora_analysis.json",
            "lora_metadata.json",
            "architecture_comparison.json",
            "config_comparison.json",
            "lora_adapter/adapter_config.json",
        ] {
            assert_eq!(
                strip(&read_json(&merged.join(f))),
                strip(&read_json(&single.join(f))),
                "N={n}: {f}"
            );
        }
        for f in [
            "lora_adapter/adapter_model.safetensors",
            "extracted_lora_weights.safetensors",
        ] {
            assert_eq!(
                std::fs::read(merged.join(f)).unwrap(),
                std::fs::read(single.join(f)).unwrap(),
                "N={n}: {f}"
            );
        }
        for f in ["difference.txt", "comparison_report.txt"] {
            assert_eq!(
                text_without_timings(&merged.join(f)),
                text_without_timings(&single.join(f)),
                "N={n}: {f}"
            );
        }
    }
}

#[test]
fn shards_split_the_tensors_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let mut names = Vec::new();
    for i in 0..3 {
        let p = dir.path().join(format!("p{i}"));
        run(&["--shard", &format!("{i}/3"), "--no-lora"], &pair, &p);
        let part = read_json(&p.join("part.json"));
        let results = part["comparison"]["results"].as_array().unwrap();
        assert!(
            !results.is_empty(),
            "bytes are balanced: every shard gets tensors"
        );
        names.extend(results.iter().map(|r| r[0].as_str().unwrap().to_string()));
    }
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!((n, names.len()), (25, 25));
}

#[test]
fn incomplete_duplicated_or_mismatched_parts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let p = |name: &str| dir.path().join(name);
    run(&["--shard", "0/2"], &pair, &p("a0"));
    run(&["--shard", "1/2"], &pair, &p("a1"));
    run(&["--shard", "1/2", "--threshold", "1e-3"], &pair, &p("b1"));
    run(&["--shard", "1/3"], &pair, &p("c1"));
    let out = p("out");
    merge(&[p("a0")], &out)
        .code(2)
        .stderr(predicates::str::contains("missing shard(s) 1/2"));
    merge(&[p("a0"), p("a1"), p("a1")], &out)
        .code(2)
        .stderr(predicates::str::contains("appears twice"));
    merge(&[p("a0"), p("b1")], &out)
        .code(2)
        .stderr(predicates::str::contains("other inputs or options"));
    merge(&[p("a0"), p("c1")], &out)
        .code(2)
        .stderr(predicates::str::contains("shard 1/3"));
    merge(&[p("pair")], &out)
        .code(2)
        .stderr(predicates::str::contains("part.json"));
    merge(&[p("a0"), p("a1")], &out).success();
    weightdiff()
        .args(["compare", "--shard", "2/2"])
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .code(2);
}

#[test]
fn a_part_whose_factor_dtype_was_edited_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let p = |name: &str| dir.path().join(name);
    run(&["--shard", "0/2"], &pair, &p("a0"));
    run(&["--shard", "1/2"], &pair, &p("a1"));
    // Every extracted module's factor dtype, edited from a float to an integer type.
    let mut edited = 0;
    for part in ["a0", "a1"] {
        let path = p(part).join("part.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let new = text.replace("\"dtype\": \"BF16\"", "\"dtype\": \"I8\"");
        edited += usize::from(new != text);
        std::fs::write(&path, new).unwrap();
    }
    assert!(edited > 0, "the demo's parts hold extracted factors");
    merge(&[p("a0"), p("a1")], &p("out"))
        .code(2)
        .stderr(predicates::str::contains("part.json"))
        .stderr(predicates::str::contains("factor dtype I8"))
        .stderr(predicates::str::contains("tensor `model.layers."))
        .stderr(predicates::str::contains("panicked").not());
}
