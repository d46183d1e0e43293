//! Every comparison output of SPEC §4 exists, parses, has the schema keys, and matches
//! the builder's ground truth.

use crate::common::*;
use std::collections::BTreeSet;
use weightdiff::synthetic::{build_pair, demo_spec};

#[test]
fn compare_writes_every_report_and_finds_exactly_the_edited_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    weightdiff()
        .args(["compare", "--quiet", "--verify", "-o"])
        .arg(&out)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .success();

    let wd = read_json(&out.join("weight_differences.json"));
    for key in [
        "schema_version",
        "complete",
        "base",
        "finetuned",
        "threshold",
        "modified_layers",
        "all_differences",
        "only_in_base",
        "only_in_finetuned",
        "mismatches",
        "errors",
        "performance",
    ] {
        assert!(
            wd.get(key).is_some(),
            "weight_differences.json lacks `{key}`"
        );
    }
    for key in [
        "total_time",
        "avg_layer_time",
        "max_layer_time",
        "bytes_read",
        "throughput_gbps",
        "layer_times",
    ] {
        assert!(
            wd["performance"].get(key).is_some(),
            "performance lacks `{key}`"
        );
    }
    assert_eq!(wd["complete"], true);
    let modified: BTreeSet<&str> = wd["modified_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let edited: BTreeSet<&str> = pair.edits.keys().map(String::as_str).collect();
    assert_eq!(modified, edited);
    let all = wd["all_differences"].as_object().unwrap();
    assert_eq!(all.len(), 25);
    for (name, m) in all {
        for key in [
            "shape",
            "dtype",
            "mean_abs_diff",
            "max_abs_diff",
            "rms_diff",
            "l2_diff",
            "base_l2",
            "finetuned_l2",
            "relative_diff",
            "cosine_similarity",
            "changed_ratio",
            "identical",
            "nan_count",
            "inf_count",
            "total_time",
            "compute_time",
            "reference_time",
        ] {
            assert!(m.get(key).is_some(), "{name} lacks `{key}`");
        }
        assert_eq!(
            m["identical"].as_bool().unwrap(),
            !edited.contains(name.as_str()),
            "{name}"
        );
        assert!(wd["performance"]["layer_times"][name]["reference_time"].is_number());
    }

    let arch = read_json(&out.join("architecture_comparison.json"));
    assert_eq!(arch["base"]["tensor_count"], 25);
    assert_eq!(arch["base"]["parameter_count"], 226688);
    assert_eq!(arch["base"]["layer_count"], 2);
    assert_eq!(arch["base"]["model_type"], "qwen3");
    assert_eq!(arch["base"]["dtype_histogram"]["BF16"], 25);
    assert_eq!(arch["base"]["module_types"]["q_proj"]["tensors"], 2);

    let cfg = read_json(&out.join("config_comparison.json"));
    assert_eq!(cfg["config"]["identical"], true);

    let diff = std::fs::read_to_string(out.join("difference.txt")).unwrap();
    assert!(diff.contains("PERFORMANCE SUMMARY"));
    assert!(diff.contains("TOP 20 MOST MODIFIED"));
    assert!(diff.contains("Layer: model.layers.1.self_attn.q_proj.weight"));
    assert!(diff.contains("Speedup (reference / fast)"));
    let summary = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    assert!(summary.contains("8 of 25 compared tensors were modified"));
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn config_changes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let cfg_path = pair.finetuned.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["rope_theta"] = serde_json::json!(500000);
    cfg["use_cache"] = serde_json::json!(false);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = dir.path().join("out");
    compare_cli(&out, &pair.base, &pair.finetuned)
        .assert()
        .success();
    let c = read_json(&out.join("config_comparison.json"));
    assert_eq!(c["config"]["changed"]["rope_theta"]["finetuned"], 500000);
    assert_eq!(c["config"]["only_in_finetuned"]["use_cache"], false);
}

#[test]
fn json_flag_prints_only_json_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let out = weightdiff()
        .args(["demo", "--json", "-o"])
        .arg(dir.path())
        .output()
        .unwrap();
    let v = stdout_json(&out);
    assert_eq!(v["modified"], 8);
    assert_eq!(v["compared"], 25);
}

#[test]
fn include_and_exclude_filter_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    weightdiff()
        .args([
            "compare",
            "--quiet",
            "--include",
            r"layers\.0\.",
            "--exclude",
            "norm",
            "-o",
        ])
        .arg(&out)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .success();
    let wd = read_json(&out.join("weight_differences.json"));
    let names: Vec<&String> = wd["all_differences"].as_object().unwrap().keys().collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.contains("layers.0.") && !n.contains("norm"))
    );
}
