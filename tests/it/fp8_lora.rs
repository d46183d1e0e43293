//! A merged LoRA under FP8 quantization: the low-rank stage takes its noise floor from
//! FP8's quantization step (not from f32 rounding, which made such a pair a "full
//! fine-tune"), and the adapter extracted from the FP8 pair is bf16 and reproduces the
//! fine-tune when real PEFT loads it onto the dequantized base. Fixtures by
//! `tests/python/fp8_lora.py` (transformers' Qwen3 model class, torch's float8_e4m3fn).

use crate::common::*;
use crate::interop::{python, python_has};
use std::path::Path;

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/fp8_lora.py")
}

fn run_python(args: &[&std::ffi::OsStr]) -> String {
    let out = python().arg(script()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "fp8_lora.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_lora_merged_under_fp8_is_detected_and_extracted_as_a_bf16_adapter_peft_loads() {
    if !python_has("torch, safetensors, transformers, peft") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_python(&["make".as_ref(), d.as_os_str()]);
    let (base, ft) = (d.join("base_fp8"), d.join("ft_fp8"));

    weightdiff()
        .args(["compare", "--quiet", "-o"])
        .arg(d.join("cmp"))
        .arg(&base)
        .arg(&ft)
        .assert()
        .success();
    let lora = read_json(&d.join("cmp/lora_analysis.json"));
    assert_eq!(
        lora["verdict"]["kind"], "merged_lora",
        "{}",
        lora["verdict"]
    );
    assert_eq!(lora["verdict"]["rank"], 4);
    assert_eq!(
        lora["verdict"]["target_modules"],
        serde_json::json!(["q_proj", "up_proj", "v_proj"])
    );

    let adapter = d.join("adapter");
    weightdiff()
        .args(["extract-lora", "--rank", "4", "--quiet", "-o"])
        .arg(&adapter)
        .arg(&base)
        .arg(&ft)
        .assert()
        .success();
    let report: serde_json::Value = serde_json::from_str(
        run_python(&["check".as_ref(), d.as_os_str(), adapter.as_os_str()])
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        report["adapter_dtypes"],
        serde_json::json!(["torch.bfloat16"])
    );
    // Against the true B·A: what FP8's rounding of both sides leaves (~3 %).
    for (name, e) in report["module_errors"].as_object().unwrap() {
        assert!(e.as_f64().unwrap() < 0.06, "{name}: {e}");
    }
    let (with, without) = (
        report["logits_error_with_adapter"].as_f64().unwrap(),
        report["logits_error_without"].as_f64().unwrap(),
    );
    assert!(
        with < 0.25 * without,
        "logits: {with} with the adapter, {without} without"
    );
    assert!(Path::new(&adapter.join("adapter_config.json")).is_file());
}
