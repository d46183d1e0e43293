//! `comparison_report.txt`: what changed, where, how much, and what was written.

use super::lora::LoraDocs;
use super::{fmt_bytes, fmt_opt, sci};
use crate::comparison::Comparison;
use crate::pairing::{layer_index, module_type};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

/// Renders `comparison_report.txt`.
/// `lora` holds the LoRA stage's documents when it ran.
pub fn render(c: &Comparison, lora: Option<&LoraDocs>, written: &[PathBuf], top: usize) -> String {
    let mut s = String::new();
    let w = &mut s;
    let modified = c.modified();
    let identical = c.results.iter().filter(|(_, m)| m.identical).count();
    let _ = writeln!(w, "weightdiff comparison report");
    let _ = writeln!(w, "============================\n");
    let _ = writeln!(w, "Base:       {}", c.base.describe());
    let _ = writeln!(w, "Fine-tuned: {}", c.finetuned.describe());
    if !c.complete {
        let _ = writeln!(
            w,
            "\nTHIS RUN DID NOT COMPLETE: the figures cover the tensors compared before it stopped."
        );
    }
    let _ = writeln!(w, "\nWhat changed");
    let _ = writeln!(w, "------------");
    let _ = writeln!(
        w,
        "{} of {} compared tensors were modified (|d| > {} somewhere); {identical} are byte-identical.",
        modified.len(),
        c.results.len(),
        sci(c.threshold, 1)
    );
    let changed_params: u64 = c
        .results
        .iter()
        .filter(|(_, m)| m.is_modified())
        .map(|(_, m)| m.num_elements)
        .sum();
    let all_params: u64 = c.results.iter().map(|(_, m)| m.num_elements).sum();
    if all_params > 0 {
        let _ = writeln!(
            w,
            "Modified tensors hold {changed_params} of {all_params} compared parameters ({:.1} %).",
            100.0 * changed_params as f64 / all_params as f64
        );
    }

    // Where: by module type and by layer.
    let mut by_module: BTreeMap<String, (usize, usize, f64)> = BTreeMap::new();
    let mut by_layer: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (name, m) in &c.results {
        let e = by_module.entry(module_type(name)).or_default();
        e.0 += 1;
        if m.is_modified() {
            e.1 += 1;
            e.2 = e.2.max(m.relative_diff.unwrap_or(0.0));
        }
        if let Some(l) = layer_index(name) {
            let e = by_layer.entry(l).or_default();
            e.0 += 1;
            e.1 += m.is_modified() as usize;
        }
    }
    let _ = writeln!(
        w,
        "\nBy module type (modified / total, largest relative diff):"
    );
    for (module, (total, modn, maxrel)) in &by_module {
        let _ = writeln!(
            w,
            "  {module:<28} {modn:>4} / {total:<4} {}",
            sci(*maxrel, 3)
        );
    }
    if !by_layer.is_empty() {
        let touched: Vec<String> = by_layer
            .iter()
            .filter(|(_, (_, m))| *m > 0)
            .map(|(l, _)| l.to_string())
            .collect();
        let _ = writeln!(
            w,
            "\nLayers with modified tensors: {} of {}{}",
            touched.len(),
            by_layer.len(),
            if touched.is_empty() {
                String::new()
            } else {
                format!(" ({})", touched.join(", "))
            }
        );
    }

    if let Some(docs) = lora {
        lora_section(w, docs);
    }

    let _ = writeln!(w, "\nMost modified (by relative diff)");
    let _ = writeln!(w, "--------------------------------");
    for (i, (name, m)) in c.top_modified(top).into_iter().enumerate() {
        let _ = writeln!(
            w,
            "{:3}. {name}  rel {}  cos {}",
            i + 1,
            fmt_opt(m.relative_diff),
            fmt_opt(m.cosine_similarity)
        );
    }
    if modified.is_empty() {
        let _ = writeln!(w, "(none)");
    }

    let _ = writeln!(w, "\nStructure");
    let _ = writeln!(w, "---------");
    let _ = writeln!(w, "Only in base: {}", list(&c.only_in_base));
    let _ = writeln!(w, "Only in fine-tuned: {}", list(&c.only_in_finetuned));
    for m in &c.mismatches {
        let _ = writeln!(
            w,
            "{} mismatch: {} base {:?} {} vs fine-tuned {:?} {}; compared {}",
            m.kind,
            m.name,
            m.base_shape,
            m.base_dtype,
            m.finetuned_shape,
            m.finetuned_dtype,
            m.compared
        );
    }
    if let Some(p) = &c.prefix {
        let _ = writeln!(
            w,
            "Names aligned by stripping `{}` from the {} side ({} more pairs).",
            p.prefix,
            if p.side == crate::pairing::Side::Base {
                "base"
            } else {
                "fine-tuned"
            },
            p.pairs_gained
        );
    }

    let _ = writeln!(w, "\nProblems");
    let _ = writeln!(w, "--------");
    if c.errors.is_empty() && c.base.warnings.is_empty() && c.finetuned.warnings.is_empty() {
        let _ = writeln!(w, "none");
    }
    for (name, e) in &c.errors {
        let _ = writeln!(w, "error: {name}: {e}");
    }
    for wn in c.base.warnings.iter().chain(&c.finetuned.warnings) {
        let _ = writeln!(w, "warning: {wn}");
    }

    let p = &c.performance;
    let _ = writeln!(w, "\nPerformance");
    let _ = writeln!(w, "-----------");
    let _ = writeln!(
        w,
        "{} read in {:.3}s ({:.2} GB/s, {} threads).",
        fmt_bytes(p.bytes_read),
        p.total_time,
        p.throughput_gbps,
        p.threads
    );

    let _ = writeln!(w, "\nOutputs");
    let _ = writeln!(w, "-------");
    for f in written {
        let _ = writeln!(w, "{}", f.display());
    }
    s
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        format!("{} ({})", v.len(), v.join(", "))
    }
}

/// The verdict in words, from `lora_analysis.json`'s `verdict`.
pub(crate) fn verdict_sentence(v: &serde_json::Value) -> String {
    let rank = v["rank"]
        .as_u64()
        .map_or("?".to_string(), |r| r.to_string());
    let modules = v["target_modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let what = match v["kind"].as_str().unwrap_or("") {
        "merged_lora" => format!("a merged LoRA of rank {rank} on {modules}"),
        "full_finetune" => "a full fine-tune (the deltas are not low-rank)".to_string(),
        "mixed" => {
            format!("mixed: low-rank deltas (rank {rank}) on {modules}, other changes elsewhere")
        }
        _ => "unchanged".to_string(),
    };
    format!(
        "The fine-tune looks like {what} (confidence {:.2}).",
        v["confidence"].as_f64().unwrap_or(0.0)
    )
}

fn lora_section(w: &mut String, docs: &LoraDocs) {
    let a = &docs.analysis;
    let _ = writeln!(w, "\nLoRA verdict");
    let _ = writeln!(w, "------------");
    let _ = writeln!(w, "{}", verdict_sentence(&a["verdict"]));
    let empty = serde_json::Map::new();
    let tensors = a["tensors"].as_object().unwrap_or(&empty);
    let low = tensors
        .values()
        .filter(|s| s["detected_rank"].is_u64())
        .count();
    let _ = writeln!(
        w,
        "{low} of {} analysed matrices have a clear rank cliff above the storage rounding floor.",
        tensors.len()
    );
    if let Some(m) = &docs.metadata {
        let modules = m["modules"].as_object().map_or(0, |o| o.len());
        if modules > 0 {
            let _ = writeln!(
                w,
                "Extracted {modules} modules as a PEFT adapter (default rank {}), mean relative reconstruction error {}.",
                m["default_rank"],
                sci(m["mean_residual_stored"].as_f64().unwrap_or(0.0), 3)
            );
            let _ = writeln!(
                w,
                "Adapter task type: {} (profile {}).",
                m["task_type"].as_str().unwrap_or("none"),
                m["profile"].as_str().unwrap_or("peft")
            );
        }
        for n in m["notes"].as_array().into_iter().flatten() {
            let _ = writeln!(w, "note: {}", n.as_str().unwrap_or("?"));
        }
    }
    for s in a["skipped"].as_array().into_iter().flatten() {
        let _ = writeln!(
            w,
            "not extracted: {}: {}",
            s["tensor"].as_str().unwrap_or("?"),
            s["reason"].as_str().unwrap_or("?")
        );
    }
    for (n, e) in a["errors"].as_object().into_iter().flatten() {
        let _ = writeln!(w, "analysis error: {n}: {}", e.as_str().unwrap_or("?"));
    }
}
