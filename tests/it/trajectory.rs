//! `compare BASE FT1 FT2 FT3`: one directory per fine-tuned model, each equal to its
//! single comparison, and `trajectory.json` across them.

use crate::common::*;
use weightdiff::synthetic::{LoraEdit, PairSpec, build_pair, demo_spec};

#[test]
fn several_finetunes_get_their_own_reports_and_a_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    // Three checkpoints of a "run": the same LoRA direction growing in size.
    let fts: Vec<_> = [0.01, 0.02, 0.04]
        .iter()
        .enumerate()
        .map(|(i, &rel)| {
            let spec = PairSpec {
                lora: Some(LoraEdit {
                    delta_rel: rel,
                    ..demo_spec().lora.unwrap()
                }),
                noise: None,
                ..demo_spec()
            };
            build_pair(&spec, &dir.path().join(format!("step{i}"))).unwrap()
        })
        .collect();
    let base = &fts[0].base;
    let out = dir.path().join("traj");
    weightdiff()
        .args(["compare", "--quiet", "-o"])
        .arg(&out)
        .arg(base)
        .args(fts.iter().map(|p| &p.finetuned))
        .assert()
        .success();
    // Labels: the directories are all called `finetuned`, so they are made unique.
    let labels = ["finetuned", "2-finetuned", "3-finetuned"];
    for (label, pair) in labels.iter().zip(&fts) {
        let single = dir.path().join(format!("single-{label}"));
        compare_cli(&single, base, &pair.finetuned)
            .assert()
            .success();
        let a = read_json(&out.join(label).join("weight_differences.json"));
        let b = read_json(&single.join("weight_differences.json"));
        assert_eq!(
            metrics_without_times(&a),
            metrics_without_times(&b),
            "{label}"
        );
        assert_eq!(
            std::fs::read(
                out.join(label)
                    .join("lora_adapter/adapter_model.safetensors")
            )
            .unwrap(),
            std::fs::read(single.join("lora_adapter/adapter_model.safetensors")).unwrap()
        );
    }
    let t = read_json(&out.join("trajectory.json"));
    assert_eq!(t["finetuned"].as_array().unwrap().len(), 3);
    let overall: Vec<f64> = t["overall"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["relative_diff"].as_f64().unwrap())
        .collect();
    assert!(
        overall[0] < overall[1] && overall[1] < overall[2],
        "{overall:?}"
    );
    let q = t["tensors"]["model.layers.0.self_attn.q_proj.weight"]["relative_diff"]
        .as_array()
        .unwrap();
    let q: Vec<f64> = q.iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(q[0] < q[1] && q[1] < q[2], "{q:?}");
    assert_eq!(
        t["tensors"]["model.layers.0.mlp.up_proj.weight"]["relative_diff"],
        serde_json::json!([0.0, 0.0, 0.0])
    );
    assert!(
        std::fs::read_to_string(out.join("trajectory.txt"))
            .unwrap()
            .contains("step1")
    );
    // --resume and --shard take one model.
    weightdiff()
        .args(["compare", "--resume", "-o"])
        .arg(&out)
        .arg(base)
        .arg(&fts[0].finetuned)
        .arg(&fts[1].finetuned)
        .assert()
        .code(2);
}
