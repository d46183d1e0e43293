//! Quantized checkpoints compared by value: FP8 with 128×128 block scales (the
//! DeepSeek-V3 / Qwen3-FP8 layout) against torch's own dequantization, its error against
//! the bf16 original, a missing scale, and an unknown `quant_method` that must warn.
//! Fixtures by `tests/python/fp8_fixtures.py` (torch's float8_e4m3fn).

use crate::common::*;
use crate::interop::{python, python_has};
use std::path::Path;

fn fixtures(dir: &Path) -> bool {
    if !python_has("torch, safetensors") {
        return false;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/fp8_fixtures.py");
    let out = python().arg(script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "fp8_fixtures.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn compare(base: &Path, ft: &Path, out: &Path) -> (serde_json::Value, String) {
    let o = weightdiff()
        .args(["compare", "--no-lora", "-o"])
        .arg(out)
        .arg(base)
        .arg(ft)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (
        read_json(&out.join("weight_differences.json")),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn fp8_block_scaled_weights_equal_torchs_dequantization_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let p = |n: &str| dir.path().join(n);
    let (wd, _) = compare(&p("reference"), &p("fp8"), &p("exact"));
    let all = wd["all_differences"].as_object().unwrap();
    assert_eq!(all.len(), 6, "the scales are not tensors of the model");
    for (name, m) in all {
        assert_eq!(m["l2_diff"], 0.0, "{name}");
        assert_eq!(m["max_abs_diff"], 0.0, "{name}");
    }
    assert!(wd["only_in_finetuned"].as_array().unwrap().is_empty());
    let storage: Vec<&str> = wd["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["finetuned_dtype"].as_str())
        .collect();
    assert!(
        storage.contains(&"F8_E4M3, F32 scales 128×128"),
        "{storage:?}"
    );
    // Power-of-two scales stored as F8_E8M0 (scale_fmt ue8m0).
    let (wd, _) = compare(&p("reference_e8m0"), &p("fp8_e8m0"), &p("exact-e8m0"));
    for (name, m) in wd["all_differences"].as_object().unwrap() {
        assert_eq!(m["max_abs_diff"], 0.0, "{name}");
    }
    assert_eq!(wd["all_differences"].as_object().unwrap().len(), 6);
    let storage = wd["mismatches"].to_string();
    assert!(
        storage.contains("F8_E4M3, F8_E8M0 scales 128×128"),
        "{storage}"
    );
}

#[test]
fn fp8_against_its_bf16_original_shows_the_quantization_error_not_the_codes() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let p = |n: &str| dir.path().join(n);
    let (wd, _) = compare(&p("base"), &p("fp8"), &p("quant"));
    for (name, m) in wd["all_differences"].as_object().unwrap() {
        let rel = m["relative_diff"].as_f64().unwrap();
        // E4M3 keeps 3 mantissa bits: a few percent, never the codes' scale (~1e3).
        assert!(rel < 0.05, "{name}: {rel}");
    }
    let q = &wd["quantization"][0];
    assert_eq!(q["storage"], "F8_E4M3, F32 scales 128×128");
    assert_eq!(q["base_storage"], serde_json::json!(["BF16"]));
    let snr = q["snr_db"].as_f64().unwrap();
    assert!((25.0..40.0).contains(&snr), "E4M3 SNR {snr} dB");
    let page = std::fs::read_to_string(p("quant/report.html")).unwrap();
    assert!(page.contains("id=\"quantization\""));
    // With the low-rank stage on: no verdict of a fine-tune and no adapter made of
    // quantization error; the reports say why.
    let o = weightdiff()
        .args(["compare", "-o"])
        .arg(p("with-lora"))
        .arg(p("base"))
        .arg(p("fp8"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("quantization error"));
    assert!(!p("with-lora/lora_adapter").exists());
    let report = std::fs::read_to_string(p("with-lora/comparison_report.txt")).unwrap();
    assert!(
        report.contains("No LoRA analysis: the two models store every modified matrix differently")
    );
    // An unknown method is compared as stored, and says so on stderr and in the reports.
    let (wd, stderr) = compare(&p("base"), &p("unknown"), &p("unknown-out"));
    assert!(stderr.contains("does not dequantize"), "{stderr}");
    assert!(
        wd["warnings"]["finetuned"]
            .to_string()
            .contains("NOT the weights' values")
    );
    let report = std::fs::read_to_string(p("unknown-out/comparison_report.txt")).unwrap();
    assert!(report.contains("does not dequantize"), "{report}");
    let page = std::fs::read_to_string(p("unknown-out/report.html")).unwrap();
    assert!(page.contains("does not dequantize"));
}

#[test]
fn a_missing_or_misshapen_scale_is_that_weights_error_naming_the_scale() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let p = |n: &str| dir.path().join(n);
    // Drop one scale from the index (it stays in its shard, unlisted: ignored).
    let index_path = p("fp8/model.safetensors.index.json");
    let mut index = read_json(&index_path);
    let scale = "model.layers.0.self_attn.q_proj.weight_scale_inv";
    index["weight_map"].as_object_mut().unwrap().remove(scale);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let o = weightdiff()
        .args(["compare", "--no-lora", "-o"])
        .arg(p("broken"))
        .arg(p("base"))
        .arg(p("fp8"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a tensor error, the rest compared"
    );
    let wd = read_json(&p("broken/weight_differences.json"));
    let e = wd["errors"]["model.layers.0.self_attn.q_proj.weight"]
        .as_str()
        .unwrap();
    assert!(e.contains(scale) && e.contains("missing"), "{e}");
    assert_eq!(wd["all_differences"].as_object().unwrap().len(), 5);
}

/// Issue 13, item 3: torch's FP8 (round to nearest of x / s in E4M3) of the bf16 base is
/// within half a step of it at every element (the f32 division and product round at
/// 2⁻²⁴, far below the tolerance); the base plus noise of 1e-3 is not.
#[test]
fn fp8_error_in_steps_tells_a_faithful_quant_from_other_weights() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let p = |n: &str| dir.path().join(n);
    for fp8 in ["fp8", "fp8_e8m0"] {
        let (wd, _) = compare(&p("base"), &p(fp8), &p(&format!("steps-{fp8}")));
        let mut quantized = 0;
        for (name, m) in wd["all_differences"].as_object().unwrap() {
            match m["max_error_steps"].as_f64() {
                Some(s) => {
                    quantized += 1;
                    assert!(s <= 0.5 + 1e-4, "{fp8} {name}: {s} steps");
                    assert!(s > 0.2, "{fp8} {name}: {s} steps");
                }
                // bf16 on both sides: not quantized, no steps.
                None => assert_eq!(m["shape"].as_array().unwrap().len(), 1, "{name}"),
            }
        }
        assert_eq!(quantized, 4, "{fp8}");
        let q = &wd["quantization"][0];
        assert!(q["max_error_steps"].as_f64().unwrap() <= 0.5 + 1e-4);
        assert_eq!(q["modules"].as_array().unwrap().len(), 4, "{q}");
        let (wd, _) = compare(&p("noisy"), &p(fp8), &p(&format!("noisy-{fp8}")));
        for (name, m) in wd["all_differences"].as_object().unwrap() {
            if let Some(s) = m["max_error_steps"].as_f64() {
                assert!(s > 2.0, "{fp8} {name} against another model: {s} steps");
            }
        }
    }
}
