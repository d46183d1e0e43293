//! `difference.txt`: the layer-by-layer analysis, in the layout of the Python script
//! it replaces (header, one block per tensor, PERFORMANCE SUMMARY, TOP N MOST MODIFIED).

use super::{fmt_bytes, fmt_opt, sci};
use crate::comparison::Comparison;
use std::fmt::Write;

const RULE: &str = "========================================================================";

/// Renders `difference.txt`; `top` is the length of the most-modified list.
pub fn render(c: &Comparison, top: usize) -> String {
    let mut s = String::new();
    let w = &mut s;
    let modified = c.modified().len();
    let identical = c.results.iter().filter(|(_, m)| m.identical).count();
    let _ = writeln!(w, "WEIGHT DIFFERENCE ANALYSIS");
    let _ = writeln!(w, "{RULE}");
    let _ = writeln!(w, "Base model:       {}", c.base.describe());
    let _ = writeln!(w, "Fine-tuned model: {}", c.finetuned.describe());
    let _ = writeln!(w, "Threshold:        {}", sci(c.threshold, 1));
    let _ = writeln!(
        w,
        "Tensors compared: {} ({modified} modified, {identical} byte-identical, {} failed)",
        c.results.len(),
        c.errors.len()
    );
    if let Some(p) = &c.prefix {
        let _ = writeln!(
            w,
            "Name alignment:   prefix `{}` stripped from the {} names",
            p.prefix,
            if p.side == crate::pairing::Side::Base {
                "base"
            } else {
                "fine-tuned"
            }
        );
    }
    if c.verify {
        let _ = writeln!(
            w,
            "Verification:     fast kernel checked against the scalar f64 reference"
        );
    }
    let _ = writeln!(w, "{RULE}\n");

    for (name, m) in &c.results {
        let _ = writeln!(w, "Layer: {name}");
        match &m.finetuned_shape {
            Some(fs) => {
                let _ = writeln!(
                    w,
                    "  Shape: {:?} (fine-tuned {:?}; leading {} rows compared)",
                    m.shape,
                    fs,
                    m.compared_rows.unwrap_or(0)
                );
            }
            None => {
                let _ = writeln!(w, "  Shape: {:?}", m.shape);
            }
        }
        match &m.finetuned_dtype {
            Some(fd) => {
                let _ = writeln!(w, "  Dtype: {} (fine-tuned {fd})", m.dtype);
            }
            None => {
                let _ = writeln!(w, "  Dtype: {}", m.dtype);
            }
        }
        let _ = writeln!(w, "  Total time: {:.6}s", m.total_time);
        let _ = writeln!(w, "  Compute time: {:.6}s", m.compute_time);
        if let Some(rt) = m.reference_time {
            let _ = writeln!(w, "  Reference kernel time: {rt:.6}s");
            let _ = writeln!(
                w,
                "  Speedup (reference / fast): {}",
                m.speedup.map_or("n/a".to_string(), |x| format!("{x:.1}x"))
            );
        }
        let _ = writeln!(w, "  Identical: {}", if m.identical { "yes" } else { "no" });
        let _ = writeln!(w, "  Mean abs diff: {}", sci(m.mean_abs_diff, 6));
        let _ = writeln!(w, "  Max abs diff: {}", sci(m.max_abs_diff, 6));
        if let Some(x) = m.max_error_steps {
            let _ = writeln!(w, "  Max error (quantization steps): {x:.4}");
        }
        let _ = writeln!(w, "  RMS diff: {}", sci(m.rms_diff, 6));
        let _ = writeln!(w, "  L2 diff: {}", sci(m.l2_diff, 6));
        let _ = writeln!(w, "  Base L2: {}", sci(m.base_l2, 6));
        let _ = writeln!(w, "  Fine-tuned L2: {}", sci(m.finetuned_l2, 6));
        let _ = writeln!(w, "  Relative diff: {}", fmt_opt(m.relative_diff));
        let _ = writeln!(w, "  Cosine similarity: {}", fmt_opt(m.cosine_similarity));
        let _ = writeln!(w, "  Changed ratio: {:.6}", m.changed_ratio);
        if m.nan_count + m.inf_count > 0 {
            let _ = writeln!(
                w,
                "  Non-finite values: {} NaN, {} Inf (excluded from sums)",
                m.nan_count, m.inf_count
            );
        }
        if let Some(note) = &m.note {
            let _ = writeln!(w, "  Note: {note}");
        }
        let _ = writeln!(w);
    }

    if !c.errors.is_empty() {
        let _ = writeln!(w, "{RULE}\nERRORS\n{RULE}");
        for (name, e) in &c.errors {
            let _ = writeln!(w, "{name}: {e}");
        }
        let _ = writeln!(w);
    }

    let p = &c.performance;
    let _ = writeln!(w, "{RULE}\nPERFORMANCE SUMMARY\n{RULE}");
    let _ = writeln!(w, "Total time: {:.3}s", p.total_time);
    let _ = writeln!(w, "Average tensor time: {:.6}s", p.avg_layer_time);
    let _ = writeln!(
        w,
        "Slowest tensor: {} ({:.6}s)",
        p.slowest_tensor.as_deref().unwrap_or("n/a"),
        p.max_layer_time
    );
    let _ = writeln!(w, "Tensors processed: {}", c.results.len());
    let _ = writeln!(w, "Modified tensors: {modified}");
    let related = crate::relatedness::assess(c);
    let _ = writeln!(
        w,
        "Whole model: relative diff ‖Δ‖/‖W‖ {}, parameter-weighted cosine similarity {}",
        fmt_opt(related.relative_diff),
        fmt_opt(related.cosine_similarity)
    );
    let _ = writeln!(
        w,
        "Bytes read: {} ({})",
        p.bytes_read,
        fmt_bytes(p.bytes_read)
    );
    let _ = writeln!(
        w,
        "Throughput: {:.2} GB/s with {} threads",
        p.throughput_gbps, p.threads
    );
    let _ = writeln!(
        w,
        "Fast kernel time (sum over tensors): {:.3}s",
        p.compute_time
    );
    if let (Some(rt), sp) = (p.reference_time, p.speedup) {
        let _ = writeln!(w, "Reference kernel time (sum over tensors): {rt:.3}s");
        let _ = writeln!(
            w,
            "Overall speedup (reference / fast): {}",
            sp.map_or("n/a".to_string(), |x| format!("{x:.1}x"))
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "{RULE}\nTOP {top} MOST MODIFIED TENSORS (by relative diff)\n{RULE}"
    );
    for (i, (name, m)) in c.top_modified(top).into_iter().enumerate() {
        let _ = writeln!(
            w,
            "{:3}. {name}: rel={} mean_abs={} max_abs={} changed={:.4}",
            i + 1,
            fmt_opt(m.relative_diff),
            sci(m.mean_abs_diff, 3),
            sci(m.max_abs_diff, 3),
            m.changed_ratio
        );
    }
    s
}
