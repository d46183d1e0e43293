//! compressed-tensors checkpoints made by compressed-tensors itself (every format ×
//! strategy × symmetry of `tests/python/ct_fixtures.py`) against its own decompression:
//! every value equal to the last bit, the scales never tensors of the model.

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
