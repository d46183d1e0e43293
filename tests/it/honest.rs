//! Issue 16: honest, readable answers on every pair — models that are not a base and a
//! derivative, real resize rules, one run per output directory, closed pipes, long lists
//! summarised, messages that point to the fix.
//!
//! See: `issues show 16`.

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use weightdiff::CompareOptions;
use weightdiff::synthetic::{ModelShape, PairSpec, build_pair, demo_spec};

/// Exit status of a finished run whose models are not a base and a derivative.
const EXIT_NOT_A_DERIVATIVE: i32 = 3;

/// The base model of `tiny` built with `seed`: same architecture, independent weights.
fn tiny_base(dir: &Path, seed: u64) -> PathBuf {
    let spec = PairSpec {
        seed,
        ..PairSpec::tiny()
    };
    build_pair(&spec, &dir.join(format!("seed{seed}")))
        .unwrap()
        .base
}

fn relatedness(out: &Path) -> Value {
    read_json(&out.join("weight_differences.json"))["relatedness"].clone()
}

#[test]
fn unrelated_models_of_one_architecture_get_the_unrelated_verdict_and_no_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tiny_base(dir.path(), 1), tiny_base(dir.path(), 2));
    let out = dir.path().join("out");
    let run = compare_cli(&out, &a, &b).arg("--json").output().unwrap();
    assert_eq!(
        run.status.code(),
        Some(EXIT_NOT_A_DERIVATIVE),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["verdict"]["kind"], "unrelated", "{summary:#}");
    assert!(
        summary["relatedness"]["cosine_similarity"]
            .as_f64()
            .unwrap()
            < 0.2
    );
    let r = relatedness(&out);
    assert_eq!(r["verdict"]["kind"], "unrelated", "{r:#}");
    assert_eq!(r["parameters_paired_share"], 1.0);
    assert!(
        r["cosine_similarity"].as_f64().unwrap().abs() < 0.2,
        "{r:#}"
    );
    assert!(
        !out.join("lora_adapter").exists(),
        "no adapter for unrelated models"
    );
    assert!(!out.join("lora_analysis.json").exists());
    let text = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    assert!(text.contains("not a base and its fine-tune"), "{text}");
    assert!(
        text.contains("low-rank analysis and extraction were skipped"),
        "{text}"
    );
    assert!(!text.contains("full fine-tune"), "{text}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("data-kind=\"unrelated\""));
}

#[test]
fn models_with_few_shapes_in_common_are_a_different_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_base(dir.path(), 1);
    let wide = PairSpec {
        shape: ModelShape {
            hidden_size: 96,
            intermediate_size: 256,
            ..ModelShape::preset("tiny").unwrap()
        },
        ..PairSpec::tiny()
    };
    let b = build_pair(&wide, &dir.path().join("wide")).unwrap().base;
    let out = dir.path().join("out");
    let run = compare_cli(&out, &a, &b).output().unwrap();
    assert_eq!(run.status.code(), Some(EXIT_NOT_A_DERIVATIVE));
    let r = relatedness(&out);
    assert_eq!(r["verdict"]["kind"], "different_architecture", "{r:#}");
    assert!(r["parameters_paired_share"].as_f64().unwrap() < 0.5);
    assert!(
        r["config_differences"]["hidden_size"].is_array(),
        "the configs' sizes are evidence: {r:#}"
    );
    assert!(!out.join("lora_adapter").exists());
}

#[test]
fn one_name_in_common_is_a_different_architecture_not_a_confident_fine_tune() {
    let dir = tempfile::tempdir().unwrap();
    let v = values(1, 64);
    let w = values(2, 64);
    let mut base = vec![f32_tensor("embeddings.word_embeddings.weight", &[8, 8], &v)];
    let mut ft = vec![f32_tensor("embeddings.word_embeddings.weight", &[8, 8], &w)];
    for i in 0..20 {
        base.push(f32_tensor(
            &format!("encoder.layer.{i}.dense.weight"),
            &[8, 8],
            &v,
        ));
        ft.push(f32_tensor(
            &format!("albert.group.{i}.ffn.weight"),
            &[8, 8],
            &v,
        ));
    }
    let a = write_file(&dir.path().join("a.safetensors"), &base);
    let b = write_file(&dir.path().join("b.safetensors"), &ft);
    let out = dir.path().join("out");
    let run = compare_cli(&out, &a, &b).output().unwrap();
    assert_eq!(run.status.code(), Some(EXIT_NOT_A_DERIVATIVE));
    assert_eq!(
        relatedness(&out)["verdict"]["kind"],
        "different_architecture"
    );
    assert!(!out.join("lora_adapter").exists());
}

#[test]
fn an_include_that_matches_nothing_is_nothing_compared() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    let run = compare_cli(&out, &pair.base, &pair.finetuned)
        .args(["--include", "no_such_module", "--json"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(EXIT_NOT_A_DERIVATIVE));
    let summary: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["verdict"]["kind"], "nothing_compared");
    assert!(
        summary["verdict"]["reason"]
            .as_str()
            .unwrap()
            .contains("--include"),
        "{summary:#}"
    );
}

#[test]
fn a_fine_tune_is_related_and_reports_whole_model_change() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    let run = compare_cli(&out, &pair.base, &pair.finetuned)
        .arg("--json")
        .output()
        .unwrap();
    let summary = stdout_json(&run);
    assert_eq!(summary["verdict"]["kind"], "mixed");
    let r = relatedness(&out);
    assert!(r["verdict"].is_null(), "{r:#}");
    assert!(r["cosine_similarity"].as_f64().unwrap() > 0.99, "{r:#}");
    assert_eq!(r["names_paired_share"], 1.0);
    let rel = r["relative_diff"].as_f64().unwrap();
    assert!(rel > 0.0 && rel < 0.1, "{r:#}");
    assert_eq!(summary["relatedness"]["relative_diff"], rel);
    let text = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    assert!(text.contains("Whole model: ‖Δ‖/‖W‖"), "{text}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("whole-model ‖Δ‖/‖W‖"));
}

fn run_lib(base: &[T], ft: &[T]) -> weightdiff::Comparison {
    compare_files(base, ft, &CompareOptions::default())
}

#[test]
fn norms_of_different_widths_are_a_plain_mismatch() {
    let c = run_lib(
        &[f32_tensor(
            "encoder.layer.0.LayerNorm.weight",
            &[384],
            &values(1, 384),
        )],
        &[f32_tensor(
            "encoder.layer.0.LayerNorm.weight",
            &[256],
            &values(1, 256),
        )],
    );
    assert!(c.results.is_empty(), "{:?}", c.results);
    assert!(c.mismatches[0].compared.starts_with("nothing"));
    // A 2-D weight that is not a vocabulary table is not compared on leading rows either.
    let c = run_lib(
        &[f32_tensor(
            "layers.0.mlp.up_proj.weight",
            &[6, 4],
            &values(1, 24),
        )],
        &[f32_tensor(
            "layers.0.mlp.up_proj.weight",
            &[8, 4],
            &values(1, 32),
        )],
    );
    assert!(c.results.is_empty(), "{:?}", c.results);
}

#[test]
fn a_resized_vocabulary_still_compares_the_leading_rows() {
    let base_v = values(2, 10 * 4);
    let mut ft_v = base_v.clone();
    ft_v.extend(values(3, 2 * 4));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let c = run_lib(
            &[f32_tensor(name, &[10, 4], &base_v)],
            &[f32_tensor(name, &[12, 4], &ft_v)],
        );
        assert_eq!(c.results[0].1.compared_rows, Some(10), "{name}");
    }
}

#[test]
fn a_prefix_on_a_few_names_is_not_stripped() {
    let v = values(6, 16);
    let mut base = Vec::new();
    let mut ft = Vec::new();
    for i in 0..30 {
        let n = format!("bert.encoder.layer.{i}.weight");
        base.push(f32_tensor(&n, &[16], &v));
        ft.push(f32_tensor(&n, &[16], &v));
    }
    // `cls.` wraps 2 of the fine-tune's 32 names, and stripping it would pair them.
    base.push(f32_tensor("predictions.bias", &[16], &v));
    base.push(f32_tensor("predictions.decoder.weight", &[16], &v));
    ft.push(f32_tensor("cls.predictions.bias", &[16], &v));
    ft.push(f32_tensor("cls.predictions.decoder.weight", &[16], &v));
    let c = run_lib(&base, &ft);
    assert!(c.prefix.is_none(), "{:?}", c.prefix);
    assert_eq!(c.only_in_finetuned.len(), 2);
}

#[test]
fn a_run_replaces_an_earlier_runs_outputs_and_report_renders_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    compare_cli(&out, &pair.base, &pair.finetuned)
        .assert()
        .success();
    assert!(out.join("lora_adapter").exists());
    // Another pair (base with itself), without the LoRA stage.
    let run = weightdiff()
        .args(["compare", "--no-lora", "-o"])
        .arg(&out)
        .arg(&pair.base)
        .arg(&pair.base)
        .output()
        .unwrap();
    assert!(run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("removed"), "says what it removed: {err}");
    for stale in [
        "lora_adapter",
        "lora_analysis.json",
        "lora_metadata.json",
        "extracted_lora_weights.safetensors",
    ] {
        assert!(
            !out.join(stale).exists(),
            "{stale} of the first run is left"
        );
    }
    weightdiff()
        .args(["report", "--quiet"])
        .arg(&out)
        .assert()
        .success();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("data-kind=\"\""),
        "no LoRA verdict of the first run"
    );
}

#[test]
fn a_closed_stderr_does_not_panic_and_the_reports_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("weightdiff"))
        .args(["compare", "-v", "-o"])
        .arg(&out)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(out.join("comparison_report.txt").exists());
}

#[test]
fn a_closed_stdout_under_json_keeps_the_runs_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    let spawn = |args: &[&str]| {
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("weightdiff"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    };
    let o = out.to_str().unwrap();
    let run = spawn(&[
        "compare",
        "--json",
        "-o",
        o,
        pair.base.to_str().unwrap(),
        pair.finetuned.to_str().unwrap(),
    ]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let run = spawn(&["inspect", "--json", pair.base.to_str().unwrap()]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn long_lists_are_summarised_in_the_text_reports() {
    let dir = tempfile::tempdir().unwrap();
    let v = values(1, 16);
    let mut base = vec![f32_tensor("shared.weight", &[4, 4], &v)];
    let ft = vec![f32_tensor("shared.weight", &[4, 4], &v)];
    for i in 0..200 {
        base.push(f32_tensor(
            &format!("model.layers.{i}.self_attn.q_proj.weight"),
            &[4, 4],
            &v,
        ));
    }
    let a = write_file(&dir.path().join("a.safetensors"), &base);
    let b = write_file(&dir.path().join("b.safetensors"), &ft);
    let out = dir.path().join("out");
    let _ = compare_cli(&out, &a, &b).output().unwrap();
    let text = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    let longest = text.lines().map(|l| l.chars().count()).max().unwrap();
    assert!(longest < 300, "a {longest}-character line in:\n{text}");
    assert!(text.contains("200"), "the count is given: {text}");
    assert!(text.contains("q_proj"), "grouped by module type: {text}");
    let wd = read_json(&out.join("weight_differences.json"));
    assert_eq!(
        wd["only_in_base"].as_array().unwrap().len(),
        200,
        "full list in JSON"
    );
}

#[test]
fn a_json_file_given_as_the_model_says_to_give_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let run = compare_cli(
        dir.path().join("out"),
        pair.base.join("config.json"),
        &pair.finetuned,
    )
    .output()
    .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("is JSON, not a checkpoint"), "{err}");
    assert!(err.contains("give its directory"), "{err}");
    assert!(!err.contains("header length"), "{err}");
}

#[test]
fn an_output_path_that_is_a_file_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let file = dir.path().join("taken");
    std::fs::write(&file, "x").unwrap();
    let run = compare_cli(&file, &pair.base, &pair.finetuned)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("is a file, not a directory"), "{err}");
}

#[test]
fn a_missing_relative_path_says_no_such_file_first() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let run = weightdiff()
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", dir.path().join("cache"))
        .args(["compare", "--quiet", "-o", "out", "models/my-finetune"])
        .arg(&pair.finetuned)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    let line = err.lines().find(|l| l.contains("error")).unwrap_or("");
    assert!(
        line.contains("models/my-finetune: no such file or directory"),
        "{err}"
    );
    // `./models/x` and `a/b/c` are paths, never hub ids.
    for arg in ["./models/my-finetune", "a/b/c"] {
        let run = weightdiff()
            .current_dir(dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", dir.path().join("cache"))
            .args(["inspect", arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("no such file or directory"), "{err}");
        assert!(!err.contains("hub"), "{err}");
    }
}

#[test]
fn a_model_compared_with_itself_gets_a_note_and_the_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    let run = weightdiff()
        .args(["compare", "--no-lora", "-o"])
        .arg(&out)
        .arg(&pair.base)
        .arg(pair.base.join("."))
        .output()
        .unwrap();
    assert!(run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("the same model"), "{err}");
    let text = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    assert!(text.contains("the same model"), "{text}");
}

#[test]
fn every_subcommand_prints_its_version() {
    for sub in [
        "compare",
        "extract-lora",
        "merge",
        "inspect",
        "report",
        "demo",
    ] {
        let run = weightdiff().args([sub, "--version"]).output().unwrap();
        assert!(run.status.success(), "{sub}");
        let out = String::from_utf8_lossy(&run.stdout);
        assert!(out.contains(env!("CARGO_PKG_VERSION")), "{sub}: {out}");
    }
}

#[test]
fn verdict_sentences_read_as_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    compare_cli(&out, &pair.base, &pair.base).assert().success();
    let text = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    assert!(!text.contains("looks like unchanged"), "{text}");
    assert!(text.contains("The fine-tune is unchanged"), "{text}");
}

#[test]
fn an_adapter_that_keeps_less_than_half_of_the_change_gets_a_caveat() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    // The demo's LoRA has rank 4 with similar singular values: rank 1 keeps far less than half.
    compare_cli(&out, &pair.base, &pair.finetuned)
        .args(["--lora-rank", "1"])
        .assert()
        .success();
    let text = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    assert!(
        text.contains("This fine-tune is not low-rank: the rank-1 adapter keeps"),
        "{text}"
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("the rank-1 adapter keeps"));
    // At the LoRA's own rank the adapter keeps nearly all of it: no caveat.
    compare_cli(&out, &pair.base, &pair.finetuned)
        .args(["--lora-rank", "4"])
        .assert()
        .success();
    let text = std::fs::read_to_string(out.join("comparison_report.txt")).unwrap();
    assert!(!text.contains("is not low-rank"), "{text}");
}

#[test]
fn report_html_shows_the_time_of_a_short_run() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let out = dir.path().join("out");
    compare_cli(&out, &pair.base, &pair.finetuned)
        .arg("--no-lora")
        .assert()
        .success();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!html.contains(" in 0.00 s "), "a run takes some time");
}

#[test]
fn report_leaves_out_lora_documents_of_another_run() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    compare_cli(&first, &pair.base, &pair.finetuned)
        .assert()
        .success();
    compare_cli(&second, &pair.base, &pair.base)
        .arg("--no-lora")
        .assert()
        .success();
    // A directory mixed by hand (or by an older weightdiff).
    std::fs::copy(
        first.join("lora_analysis.json"),
        second.join("lora_analysis.json"),
    )
    .unwrap();
    weightdiff()
        .args(["report", "--quiet"])
        .arg(&second)
        .assert()
        .success();
    let html = std::fs::read_to_string(second.join("report.html")).unwrap();
    assert!(
        html.contains("data-kind=\"\""),
        "the first run's verdict is not shown"
    );
}

#[test]
fn extract_lora_writes_no_adapter_for_unrelated_models() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tiny_base(dir.path(), 1), tiny_base(dir.path(), 2));
    let out = dir.path().join("adapter");
    let run = weightdiff()
        .args(["extract-lora", "--json", "-o"])
        .arg(&out)
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(EXIT_NOT_A_DERIVATIVE));
    let summary: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["verdict"]["kind"], "unrelated");
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn trajectory_reports_carry_the_relatedness_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tiny_base(dir.path(), 1), tiny_base(dir.path(), 2));
    let out = dir.path().join("traj");
    let run = weightdiff()
        .args(["compare", "--quiet", "-o"])
        .arg(&out)
        .arg(&a)
        .arg(&b)
        .arg(&a)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(EXIT_NOT_A_DERIVATIVE));
    let html = std::fs::read_to_string(out.join("trajectory.html")).unwrap();
    assert!(html.contains("unrelated"), "{html}");
}
