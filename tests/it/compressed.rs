//! compressed-tensors checkpoints made by compressed-tensors itself (every format ×
//! strategy × symmetry of `tests/python/ct_fixtures.py`) against its own decompression:
//! every value equal to the last bit, the scales never tensors of the model. Damaged
//! ones (`ct_fixtures.py --bad`): each bad weight its own error, naming the file and the
//! part, the rest compared; a module in `ignore` read as stored.

use crate::common::*;
use crate::interop::{python, python_has};

#[test]
fn compressed_tensors_weights_equal_its_own_decompression_bit_for_bit() {
    if !python_has("torch, safetensors, compressed_tensors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/ct_fixtures.py");
    let out = python().arg(script).arg(dir.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cases = 0;
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let case = e.unwrap().file_name().into_string().unwrap();
        if case.ends_with("_ref") || case == "base" {
            continue;
        }
        cases += 1;
        let o = dir.path().join(format!("out-{case}"));
        let r = weightdiff()
            .args(["compare", "--no-lora", "-o"])
            .arg(&o)
            .arg(dir.path().join(format!("{case}_ref")))
            .arg(dir.path().join(&case))
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let wd = read_json(&o.join("weight_differences.json"));
        let all = wd["all_differences"].as_object().unwrap();
        assert_eq!(
            all.len(),
            5,
            "{case}: the scales are not tensors of the model"
        );
        for (name, m) in all {
            assert_eq!(m["max_abs_diff"], 0.0, "{case} {name}");
            assert_eq!(m["l2_diff"], 0.0, "{case} {name}");
        }
        assert!(
            wd["only_in_finetuned"].as_array().unwrap().is_empty(),
            "{case}"
        );
        if case.starts_with("pack-quantized-4-group-asym") {
            assert!(wd["mismatches"].to_string().contains("I4 packed"), "{case}");
        }
    }
    assert!(cases >= 40, "{cases} cases");
}

/// `compare --no-lora OUT/<case>_ref OUT/<case>`: exit code, weight_differences.json, stderr.
fn compare_to_ref(dir: &std::path::Path, case: &str) -> (Option<i32>, serde_json::Value, String) {
    let out = dir.join(format!("out-{case}"));
    let r = weightdiff()
        .args(["compare", "--no-lora", "-o"])
        .arg(&out)
        .arg(dir.join(format!("{case}_ref")))
        .arg(dir.join(case))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    let json = out.join("weight_differences.json");
    assert!(
        json.exists(),
        "{case}: no outputs ({:?}): {stderr}",
        r.status
    );
    (r.status.code(), read_json(&json), stderr)
}

/// Each `(weight, part, words)`: the weight's error names `file`, the part and the words,
/// and is said on stderr; no other tensor has an error.
fn assert_errors(
    wd: &serde_json::Value,
    stderr: &str,
    file: &std::path::Path,
    want: &[(&str, &str, &str)],
) {
    let errors = wd["errors"].as_object().unwrap();
    assert_eq!(errors.len(), want.len(), "{errors:?}");
    for (weight, part, words) in want {
        let e = errors[*weight]
            .as_str()
            .unwrap_or_else(|| panic!("{weight}: {errors:?}"));
        for text in [file.to_str().unwrap(), part, words] {
            assert!(e.contains(text), "{weight}: `{text}` not in: {e}");
        }
        assert!(stderr.contains(e), "{weight}: not on stderr: {stderr}");
    }
}

#[test]
fn a_bad_compressed_tensors_weight_is_its_error_naming_the_file_and_part_and_the_rest_is_compared()
{
    if !python_has("torch, safetensors, compressed_tensors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/ct_fixtures.py");
    let out = python()
        .arg(script)
        .arg(dir.path())
        .arg("--bad")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, m) = ("model.layers.0.self_attn", "model.layers.0.mlp");
    let w = |module: &str, p: &str| format!("{module}.{p}");

    // INT4 packed: truncated codes, a short scale grid, a missing scale, an impossible shape.
    let (code, wd, stderr) = compare_to_ref(dir.path(), "bad-pack");
    assert_eq!(code, Some(1), "tensor errors, the rest compared: {stderr}");
    let file = dir.path().join("bad-pack/model.safetensors");
    assert_errors(
        &wd,
        &stderr,
        &file,
        &[
            (
                &w(a, "q_proj.weight"),
                &w(a, "q_proj.weight_packed"),
                "is I32 [96, 15], not the I32 [96, 16] that packs [96, 128]",
            ),
            (
                &w(a, "k_proj.weight"),
                &w(a, "k_proj.weight_scale"),
                "has shape [37, 3], not the [37, 4] of group 32 scales of [37, 128]",
            ),
            (
                &w(m, "down_proj.weight"),
                &w(m, "down_proj.weight_scale"),
                "is missing",
            ),
            (
                &w(m, "up_proj.weight"),
                &w(m, "up_proj.weight_shape"),
                "[192, 4611686018427387904]",
            ),
        ],
    );
    let all = wd["all_differences"].as_object().unwrap();
    let compared: Vec<&str> = all.keys().map(String::as_str).collect();
    assert_eq!(
        compared,
        [
            "lm_head.weight",
            &w(a, "o_proj.weight"),
            &w(a, "v_proj.weight"),
            "model.norm_weight"
        ],
        "the rest is compared"
    );
    for (name, m) in all {
        assert_eq!(m["max_abs_diff"], 0.0, "{name}");
    }
    // The module in `ignore` is read as stored: its bf16 weight with the stray scale not
    // applied (2.0 would double it), and that scale a tensor of its own.
    assert_eq!(all[&w(a, "v_proj.weight")]["finetuned_dtype"], "BF16");
    assert_eq!(
        all[&w(a, "o_proj.weight")]["finetuned_dtype"],
        "I4 packed, BF16 scales group 32"
    );
    assert_eq!(
        wd["only_in_finetuned"],
        serde_json::json!([w(a, "v_proj.weight_scale")])
    );
    assert!(wd["only_in_base"].as_array().unwrap().is_empty());

    // INT8 codes whose scale is missing are that weight's error, not values.
    let (code, wd, stderr) = compare_to_ref(dir.path(), "bad-int");
    assert_eq!(code, Some(1), "{stderr}");
    let file = dir.path().join("bad-int/model.safetensors");
    assert_errors(
        &wd,
        &stderr,
        &file,
        &[(
            &w(a, "q_proj.weight"),
            &w(a, "q_proj.weight_scale"),
            "is missing",
        )],
    );
    let all = wd["all_differences"].as_object().unwrap();
    assert_eq!(all.len(), 4, "the rest is compared");
    for (name, m) in all {
        assert_eq!(m["max_abs_diff"], 0.0, "{name}");
    }
    assert!(wd["only_in_base"].as_array().unwrap().is_empty());
}
