//! The architecture matrix of issue 10 with the real clients: `tests/python/peft_matrix.py`
//! builds tiny models from transformers' config classes, fine-tunes each twice (a PEFT-made
//! LoRA merged with `merge_and_unload`, a few AdamW steps), runs this binary on them and loads
//! the adapters with PEFT (`PeftModel.from_pretrained`). The script runs once for every family
//! (one Python process: importing torch costs seconds) and writes its results as JSON; each
//! family's test then fails on its own rows, with the whole table in the message. Fixtures
//! stay in `target/tmp/peft-matrix/<family>`, and the table in `target/tmp/peft-matrix/table.txt`,
//! for a look after a failure.
//! Needs torch, transformers and peft (`scripts/test.sh` installs them into its virtual
//! environment); under CI a missing one fails.
//! See: issue 10 (item 8), issue 16 (item 5)

use crate::interop::{python, python_has};
use serde_json::Value;
use std::sync::OnceLock;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/peft_matrix.py");

/// The families below, as the script names them.
const FAMILIES: &[&str] = &[
    "bert",
    "bert-cls",
    "gpt2",
    "llama",
    "qwen3-tied",
    "phi3",
    "t5",
    "qwen3-moe",
    "mistral",
    "qwen2",
    "gemma",
];

/// One run of the script over every family: its JSON results and its printed table.
struct Matrix {
    results: Value,
    table: String,
}

/// The matrix, run by the first test that asks (the others wait for it); `None` when the
/// Python lacks torch, transformers or peft outside CI.
fn matrix() -> Option<&'static Matrix> {
    static MATRIX: OnceLock<Option<Matrix>> = OnceLock::new();
    MATRIX
        .get_or_init(|| run_script("peft-matrix", &[]))
        .as_ref()
}

/// The matrix with PEFT's merged LoRAs at the scale `init_lora_weights=False` gives them
/// (deltas several times the weights; embeddings ~200x): the large-delta case of issue 10.
fn matrix_at_peft_scale() -> Option<&'static Matrix> {
    static MATRIX: OnceLock<Option<Matrix>> = OnceLock::new();
    MATRIX
        .get_or_init(|| run_script("peft-matrix-large", &["--lora-delta", "0"]))
        .as_ref()
}

/// Runs the script into `target/tmp/<name>` with `extra` arguments.
fn run_script(name: &str, extra: &[&str]) -> Option<Matrix> {
    {
        {
            if !python_has("torch, transformers, peft") {
                return None;
            }
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
            let json = dir.join("results.json");
            let _ = std::fs::remove_file(&json);
            let out = python()
                .arg(SCRIPT)
                .args([
                    "--weightdiff",
                    env!("CARGO_BIN_EXE_weightdiff"),
                    "--workdir",
                ])
                .arg(&dir)
                .arg("--json")
                .arg(&json)
                .args(extra)
                .output()
                .expect("start the Python of the tests");
            let table = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let results = std::fs::read(&json)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .unwrap_or_else(|| {
                    panic!("peft_matrix.py wrote no results ({}):\n{table}", out.status)
                });
            let _ = std::fs::write(dir.join("table.txt"), &table);
            Some(Matrix { results, table })
        }
    }
}

/// Fails unless every check of `family` passed (both fine-tunes).
fn run_matrix(family: &str) {
    assert!(FAMILIES.contains(&family), "{family} is not in FAMILIES");
    let Some(m) = matrix() else { return };
    let mut failures = Vec::new();
    for case in ["lora", "real"] {
        let row = &m.results["results"][format!("{family}/{case}")];
        let checks = row["checks"].as_object();
        assert!(checks.is_some(), "no {family}/{case} row:\n{}", m.table);
        for (check, r) in checks.unwrap() {
            if r["ok"] != Value::Bool(true) {
                let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                failures.push(format!(
                    "{case} {check}: {}: {}",
                    text(&r["value"]),
                    text(&r["detail"])
                ));
            }
        }
    }
    let rows: Vec<&str> = m
        .table
        .lines()
        .filter(|l| l.starts_with("family ") || l.starts_with(&format!("{family} ")))
        .collect();
    assert!(
        failures.is_empty(),
        "{family}: weightdiff's adapters fail with PEFT:\n{}\n  {}\n(the whole table: {})",
        rows.join("\n"),
        failures.join("\n  "),
        concat!(env!("CARGO_TARGET_TMPDIR"), "/peft-matrix/table.txt")
    );
}

#[test]
fn the_script_lists_exactly_the_families_tested_here() {
    if matrix().is_none() {
        return;
    }
    let out = python().arg(SCRIPT).arg("--list").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        listed, FAMILIES,
        "add a #[test] for each family of the script"
    );
}

#[test]
fn bert_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("bert");
}

#[test]
fn bert_classifier_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("bert-cls");
}

#[test]
fn gpt2_conv1d_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("gpt2");
}

#[test]
fn llama_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("llama");
}

#[test]
fn qwen3_tied_embedding_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("qwen3-tied");
}

#[test]
fn phi3_fused_projection_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("phi3");
}

#[test]
fn t5_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("t5");
}

#[test]
fn qwen3_moe_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("qwen3-moe");
}

#[test]
fn mistral_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("mistral");
}

#[test]
fn qwen2_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("qwen2");
}

#[test]
fn gemma_adapters_load_in_peft_and_rebuild_the_finetunes() {
    run_matrix("gemma");
}

// See: issue 10 item 7 ("detection exact for a rank-r merged LoRA whether its delta is 1 %
// of the weights or larger than them").
#[test]
fn merged_loras_larger_than_the_weights_are_detected_and_rebuilt_in_every_family() {
    let Some(m) = matrix_at_peft_scale() else {
        return;
    };
    let mut failures = Vec::new();
    for family in FAMILIES {
        let row = &m.results["results"][format!("{family}/lora")];
        let checks = row["checks"].as_object();
        assert!(checks.is_some(), "no {family}/lora row:\n{}", m.table);
        for (check, r) in checks.unwrap() {
            if r["ok"] != Value::Bool(true) {
                failures.push(format!("{family} {check}: {} {}", r["value"], r["detail"]));
            }
        }
    }
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), m.table);
}
