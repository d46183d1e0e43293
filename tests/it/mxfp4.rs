//! gpt-oss MXFP4 (`quant_method: mxfp4`) against transformers 5.24's own dequantization:
//! a tiny gpt-oss checkpoint (`tests/python/mxfp4_fixtures.py`: transformers'
//! `GptOssConfig`, random codes and exponents plus the edge codes) compared with what
//! transformers' loader makes of it in bf16. Every expert tensor pairs with the bf16
//! name and shape and equals the reference to the last bit (the sign of zeros and
//! infinities included), read whole and in windows that cut experts and groups; one
//! changed nibble shows as exactly that difference; a missing scale tensor, blocks of the
//! wrong shape and an exponent byte 255 are each that tensor's error, naming the file
//! and the tensor, and the rest is compared.

use crate::common::*;
use crate::interop::{python, python_has};
use std::path::Path;

const EXPERTS: [&str; 4] = [
    "model.layers.0.mlp.experts.down_proj",
    "model.layers.0.mlp.experts.gate_up_proj",
    "model.layers.1.mlp.experts.down_proj",
    "model.layers.1.mlp.experts.gate_up_proj",
];
/// Tensors of the reference (the bf16 gpt-oss names): per layer 2 norms, 4 attention
/// weights and 4 biases, the sinks, the router's weight and bias, 2 expert weights and
/// their 2 biases; then the embedding, the final norm and the head.
const TENSORS: usize = 2 * 17 + 3;

fn fixtures(dir: &Path) -> bool {
    if !python_has("torch, safetensors, transformers") {
        return false;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/mxfp4_fixtures.py"
    );
    let out = python().arg(script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "mxfp4_fixtures.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// `compare --no-lora REFERENCE FT`: its exit code, weight_differences.json and stderr.
fn compare(dir: &Path, ft: &str) -> (Option<i32>, serde_json::Value, String) {
    let out = dir.join(format!("out-{ft}"));
    let o = weightdiff()
        .args(["compare", "--no-lora", "-o"])
        .arg(&out)
        .arg(dir.join("reference"))
        .arg(dir.join(ft))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let json = out.join("weight_differences.json");
    assert!(json.exists(), "{ft}: no outputs ({:?}): {stderr}", o.status);
    (o.status.code(), read_json(&json), stderr)
}

#[test]
fn gpt_oss_mxfp4_experts_equal_transformers_dequantization_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let (code, wd, stderr) = compare(dir.path(), "mxfp4");
    assert_eq!(code, Some(0), "{stderr}");
    let all = wd["all_differences"].as_object().unwrap();
    assert_eq!(
        all.len(),
        TENSORS,
        "every tensor pairs; blocks and scales are not tensors"
    );
    for side in ["only_in_base", "only_in_finetuned"] {
        assert!(
            wd[side].as_array().unwrap().is_empty(),
            "{side}: {}",
            wd[side]
        );
    }
    assert!(
        wd["errors"].as_object().is_none_or(|e| e.is_empty()),
        "{}",
        wd["errors"]
    );
    for (name, m) in all {
        assert_eq!(m["max_abs_diff"], 0.0, "{name}");
        assert_eq!(m["l2_diff"], 0.0, "{name}");
        assert_eq!(m["nan_count"], 0, "{name}");
    }
    for name in EXPERTS {
        assert!(all.contains_key(name), "{name} is compared");
    }
    // The edge codes: 16 elements of 6·2^127 and the like are ±inf on both sides.
    assert_eq!(all[EXPERTS[1]]["inf_count"], 32);
    assert_eq!(all[EXPERTS[1]]["shape"], serde_json::json!([4, 64, 192]));
    assert_eq!(all[EXPERTS[0]]["shape"], serde_json::json!([4, 96, 64]));
    // Tested, so a note of how the experts were read, not a caveat on their numbers.
    let notes = wd["warnings"]["finetuned"].to_string();
    assert!(
        notes.contains("4 expert weights are compared by value, dequantized from their"),
        "{notes}"
    );
    let report =
        std::fs::read_to_string(dir.path().join("out-mxfp4/comparison_report.txt")).unwrap();
    for text in [&notes, &report, &stderr] {
        assert!(!text.contains("provisional"), "{text}");
    }
    let storage = wd["mismatches"].to_string();
    assert_eq!(
        storage
            .matches("MXFP4: E2M1, F8_E8M0 scales group 32")
            .count(),
        4,
        "{storage}"
    );

    // The same through the library, bit for bit (metrics cannot see the sign of a zero
    // or an infinity), in windows of 7 logical rows: they cut groups of 32 and experts.
    let mx = weightdiff::Checkpoint::open(&dir.path().join("mxfp4")).unwrap();
    let reference = weightdiff::Checkpoint::open(&dir.path().join("reference")).unwrap();
    let (mut negative_zeros, mut infinities) = (0, 0);
    for name in EXPERTS {
        let (e, r) = (&mx.tensors()[name], &reference.tensors()[name]);
        assert_eq!(e.shape, r.shape, "{name}");
        let want: Vec<u32> = reference
            .read(r, 0, r.nbytes())
            .unwrap()
            .chunks_exact(2)
            .map(|b| (u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
            .collect();
        let row = *e.shape.last().unwrap() as u64 * 4;
        for whole in [true, false] {
            let step = if whole { e.nbytes() } else { 7 * row };
            let mut got = Vec::new();
            let mut at = 0;
            while at < e.nbytes() {
                let len = step.min(e.nbytes() - at);
                let w = mx.read(e, at, len).unwrap();
                got.extend(
                    w.chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
                at += len;
            }
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "{name} element {i} (windows of {step} bytes): {} vs transformers' {}",
                    f32::from_bits(*g),
                    f32::from_bits(*w)
                );
            }
        }
        negative_zeros += want.iter().filter(|&&w| w == 0x8000_0000).count();
        infinities += want
            .iter()
            .filter(|&&w| f32::from_bits(w).is_infinite())
            .count();
    }
    assert!(
        negative_zeros > 0 && infinities == 16,
        "{negative_zeros} -0, {infinities} inf"
    );
}

#[test]
fn one_changed_code_is_exactly_that_difference() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let expect = read_json(&dir.path().join("perturbed.json"));
    let changed = expect["tensor"].as_str().unwrap();
    assert_eq!(expect["changed"], 1);
    let (code, wd, stderr) = compare(dir.path(), "perturbed");
    assert_eq!(code, Some(0), "{stderr}");
    let all = wd["all_differences"].as_object().unwrap();
    assert_eq!(all.len(), TENSORS);
    for (name, m) in all {
        if name == changed {
            assert_eq!(m["max_abs_diff"], expect["max_abs_diff"], "{name}");
            let n = m["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>();
            assert_eq!(
                m["changed_ratio"].as_f64().unwrap(),
                1.0 / n as f64,
                "{name}"
            );
        } else {
            assert_eq!(m["max_abs_diff"], 0.0, "{name}");
        }
    }
    assert_eq!(wd["modified_layers"], serde_json::json!([changed]));
}

#[test]
fn bad_mxfp4_expert_weights_are_their_errors_and_the_rest_is_compared() {
    let dir = tempfile::tempdir().unwrap();
    if !fixtures(dir.path()) {
        return;
    }
    let bad = read_json(&dir.path().join("broken.json"));
    let bad = bad.as_object().unwrap();
    let (code, wd, stderr) = compare(dir.path(), "broken");
    assert_eq!(code, Some(1), "tensor errors, the rest compared: {stderr}");
    let errors = wd["errors"].as_object().unwrap();
    assert_eq!(errors.len(), bad.len(), "{errors:?}");
    for (name, want) in bad {
        let e = errors[name]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: {errors:?}"));
        let file = dir
            .path()
            .join("broken")
            .join(want["file"].as_str().unwrap());
        for part in [
            file.to_str().unwrap(),
            want["tensor"].as_str().unwrap(),
            want["says"].as_str().unwrap(),
        ] {
            assert!(e.contains(part), "{name}: `{part}` not in: {e}");
        }
        assert!(stderr.contains(e), "{name}: not on stderr: {stderr}");
    }
    let all = wd["all_differences"].as_object().unwrap();
    assert_eq!(all.len(), TENSORS - bad.len(), "the rest is compared");
    for (name, m) in all {
        assert!(!bad.contains_key(name), "{name}");
        assert_eq!(m["max_abs_diff"], 0.0, "{name}");
    }
    // A weight that is its error is not also "only in" the reference, and its blocks
    // and scales are not tensors of their own.
    for side in ["only_in_base", "only_in_finetuned"] {
        assert!(
            wd[side].as_array().unwrap().is_empty(),
            "{side}: {}",
            wd[side]
        );
    }
}
