//! `trajectory.json`, `trajectory.txt` and `trajectory.html`: how the difference from one
//! base grows across several fine-tuned checkpoints (the checkpoints of a training run,
//! in the order given).

use super::html::{REPORT_HTML, STYLE, Scale, esc, short};
use super::json::Named;
use super::sci;
use crate::comparison::{Comparison, SCHEMA_VERSION, TensorMetrics};
use crate::lowrank::detect::Verdict;
use crate::pairing::layer_index;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// `trajectory.json`: per checkpoint the overall figures, and per tensor the series of
/// relative diff, L2 diff and changed ratio (null where a checkpoint lacks it). Written
/// and read back (`weightdiff report`) by this one type.
#[derive(Debug, Serialize, Deserialize)]
pub struct Trajectory {
    pub schema_version: u32,
    pub base: Option<String>,
    /// The fine-tuned models, in the order given.
    pub finetuned: Vec<String>,
    pub overall: Vec<Overall>,
    /// Tensor → its series, in natural name order.
    pub tensors: Named<Series>,
}

/// Whole-model figures of one comparison: ‖Δ‖ over all compared tensors, relative to
/// ‖base‖, and the modified count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overall {
    pub finetuned: String,
    pub modified: usize,
    pub compared: usize,
    pub l2_diff: Option<f64>,
    pub relative_diff: Option<f64>,
    pub errors: usize,
    pub verdict: Option<Verdict>,
}

/// One tensor's figures across the checkpoints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Series {
    pub relative_diff: Vec<Option<f64>>,
    pub l2_diff: Vec<Option<f64>>,
    pub changed_ratio: Vec<Option<f64>>,
}

impl Overall {
    fn of(c: &Comparison) -> Overall {
        let d2: f64 = c.results.iter().map(|(_, m)| m.l2_diff * m.l2_diff).sum();
        let b2: f64 = c.results.iter().map(|(_, m)| m.base_l2 * m.base_l2).sum();
        Overall {
            finetuned: c.finetuned.source.clone(),
            modified: c.modified().len(),
            compared: c.results.len(),
            l2_diff: Some(d2.sqrt()),
            relative_diff: (b2 > 0.0).then(|| (d2 / b2).sqrt()),
            errors: c.errors.len(),
            verdict: c.lora.as_ref().map(|l| l.verdict.clone()),
        }
    }
}

impl Trajectory {
    /// The document of comparisons of one base with several fine-tuned models.
    pub fn of(cs: &[Comparison]) -> Trajectory {
        let by_name: Vec<HashMap<&str, &TensorMetrics>> = cs
            .iter()
            .map(|c| c.results.iter().map(|(n, m)| (n.as_str(), m)).collect())
            .collect();
        let mut names: Vec<&str> = by_name.iter().flat_map(|m| m.keys().copied()).collect();
        names.sort_by(|a, b| crate::pairing::natural_cmp(a, b));
        names.dedup();
        let tensors = names
            .into_iter()
            .map(|name| {
                let series = |f: &dyn Fn(&TensorMetrics) -> Option<f64>| -> Vec<Option<f64>> {
                    by_name
                        .iter()
                        .map(|m| m.get(name).and_then(|m| f(m)))
                        .collect()
                };
                let s = Series {
                    relative_diff: series(&|m| m.relative_diff),
                    l2_diff: series(&|m| Some(m.l2_diff)),
                    changed_ratio: series(&|m| Some(m.changed_ratio)),
                };
                (name.to_string(), s)
            })
            .collect();
        Trajectory {
            schema_version: SCHEMA_VERSION,
            base: cs.first().map(|c| c.base.source.clone()),
            finetuned: cs.iter().map(|c| c.finetuned.source.clone()).collect(),
            overall: cs.iter().map(Overall::of).collect(),
            tensors: Named(tensors),
        }
    }
}

/// Renders `trajectory.txt`: the overall series as a table.
pub fn render_text(cs: &[Comparison]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Trajectory from {}",
        cs.first().map_or("", |c| c.base.source.as_str())
    );
    let _ = writeln!(
        s,
        "{:<4} {:>9} {:>14} {:>14}  checkpoint",
        "#", "modified", "l2_diff", "relative"
    );
    for (i, c) in cs.iter().enumerate() {
        let o = Overall::of(c);
        let _ = writeln!(
            s,
            "{:<4} {:>9} {:>14} {:>14}  {}",
            i + 1,
            o.modified,
            sci(o.l2_diff.unwrap_or(0.0), 4),
            o.relative_diff.map_or("n/a".to_string(), |x| sci(x, 4)),
            c.finetuned.source
        );
    }
    s
}

/// File name of the page for several fine-tunes of one base.
pub const TRAJECTORY_HTML: &str = "trajectory.html";

/// Whole-model and per-layer relative diff of one comparison: √(Σ‖Δ‖²) / √(Σ‖W‖²)
/// over the tensors of the group. Tensors outside the layers form the group `None`.
fn group_relative_diffs(c: &Comparison) -> (Option<f64>, BTreeMap<Option<usize>, f64>) {
    let mut groups: BTreeMap<Option<usize>, (f64, f64)> = BTreeMap::new();
    let (mut d2, mut b2) = (0.0, 0.0);
    for (name, m) in &c.results {
        let e = groups.entry(layer_index(name)).or_default();
        e.0 += m.l2_diff * m.l2_diff;
        e.1 += m.base_l2 * m.base_l2;
        d2 += m.l2_diff * m.l2_diff;
        b2 += m.base_l2 * m.base_l2;
    }
    let rel = |d: f64, b: f64| (b > 0.0).then(|| (d / b).sqrt());
    (
        rel(d2, b2),
        groups
            .into_iter()
            .filter_map(|(k, (d, b))| rel(d, b).map(|r| (k, r)))
            .collect(),
    )
}

/// Renders `trajectory.html` for several fine-tuned checkpoints of one base, in the order
/// given: a table linking each checkpoint's own `report.html` (in `dirs[i]`), the
/// whole-model relative diff as a line, and relative diff by layer × checkpoint.
/// `verdicts[i]` is the `verdict` of checkpoint i's `lora_analysis.json`, when it has one.
pub fn render_html(cs: &[Comparison], dirs: &[String], verdicts: &[Option<Verdict>]) -> String {
    let mut s = String::with_capacity(32 * 1024);
    let base = cs.first().map_or(String::new(), |c| c.base.describe());
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>weightdiff trajectory: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>weightdiff trajectory</h1>\n<p class=\"models\"><b>Base</b> <code>{}</code></p>\n",
        esc(&short(&base)),
        esc(&base)
    );
    let figures: Vec<_> = cs.iter().map(group_relative_diffs).collect();

    // Table of checkpoints.
    let _ = writeln!(
        s,
        "<h2>Checkpoints</h2>\n<div class=\"scroll\"><table id=\"checkpoints\"><thead><tr><th>#</th>\
         <th>checkpoint</th><th>modified</th><th>relative diff</th><th>‖Δ‖</th><th>LoRA verdict</th></tr></thead><tbody>"
    );
    for (i, (c, (rel, _))) in cs.iter().zip(&figures).enumerate() {
        let l2: f64 = c
            .results
            .iter()
            .map(|(_, m)| m.l2_diff * m.l2_diff)
            .sum::<f64>()
            .sqrt();
        let verdict = verdicts
            .get(i)
            .and_then(Option::as_ref)
            .map_or("–".to_string(), |v| match v.rank {
                Some(r) => format!("{} (rank {r})", v.kind),
                None => v.kind.to_string(),
            });
        let dir = dirs.get(i).map_or("", String::as_str);
        let _ = writeln!(
            s,
            "<tr class=\"row mod\"><td>{}</td><td><a href=\"{}/{REPORT_HTML}\">{}</a></td><td>{} / {}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            i + 1,
            esc(dir),
            esc(&c.finetuned.describe()),
            c.modified().len(),
            c.results.len(),
            rel.map_or("n/a".to_string(), |r| sci(r, 3)),
            sci(l2, 3),
            esc(&verdict)
        );
    }
    let _ = writeln!(s, "</tbody></table></div>");

    // Whole-model relative diff, one point per checkpoint.
    let values: Vec<f64> = figures.iter().map(|(r, _)| r.unwrap_or(0.0)).collect();
    let top = values.iter().copied().fold(0.0, f64::max);
    if top > 0.0 {
        let (w, h, l, r, t, b) = (640.0, 220.0, 70.0, 20.0, 16.0, 30.0);
        let n = values.len().max(2) - 1;
        let px = |i: usize| l + (w - l - r) * i as f64 / n as f64;
        let py = |v: f64| t + (h - t - b) * (1.0 - v / top);
        let _ = writeln!(
            s,
            "<h2>Whole-model relative diff</h2>\n<svg id=\"trajectory-line\" width=\"{w}\" height=\"{h}\">\
             <line class=\"grid\" x1=\"{l}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>\
             <text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">0</text>",
            w - r,
            py(top),
            py(top),
            l - 6.0,
            py(top) + 4.0,
            sci(top, 2),
            l - 6.0,
            py(0.0) + 4.0
        );
        let pts: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", px(i), py(*v)))
            .collect();
        let _ = writeln!(s, "<polyline class=\"sv\" points=\"{}\"/>", pts.join(" "));
        for (i, v) in values.iter().enumerate() {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#3b528b\"><title>{}: {}</title></circle>\
                 <text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                px(i),
                py(*v),
                esc(dirs.get(i).map_or("", String::as_str)),
                sci(*v, 3),
                px(i),
                h - 10.0,
                i + 1
            );
        }
        let _ = writeln!(s, "</svg>");
    }

    // Relative diff by layer (rows) × checkpoint (columns).
    let mut rows: Vec<Option<usize>> = figures
        .iter()
        .flat_map(|(_, g)| g.keys().copied())
        .collect();
    rows.sort();
    rows.dedup();
    let scale = Scale::new(figures.iter().flat_map(|(_, g)| g.values().copied()));
    let (cw, ch, left, topm) = (56.0, 16.0, 64.0, 24.0);
    let width = left + cw * cs.len() as f64 + 20.0;
    let height = topm + ch * rows.len() as f64 + 10.0;
    let _ = writeln!(
        s,
        "<h2>Relative diff by layer and checkpoint</h2>\n<figure><svg id=\"trajectory-heatmap\" width=\"{width:.0}\" height=\"{height:.0}\">"
    );
    for i in 0..cs.len() {
        let _ = writeln!(
            s,
            "<text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            left + cw * (i as f64 + 0.5),
            topm - 8.0,
            i + 1
        );
    }
    for (ri, row) in rows.iter().enumerate() {
        let y = topm + ch * ri as f64;
        let label = row.map_or("other".to_string(), |l| l.to_string());
        let _ = writeln!(
            s,
            "<text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            left - 6.0,
            y + ch * 0.5 + 4.0
        );
        for (ci, (_, groups)) in figures.iter().enumerate() {
            let Some(v) = groups.get(row) else { continue };
            let fill = Scale::fill(scale.as_ref(), *v);
            let _ = writeln!(
                s,
                "<rect class=\"tcell\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\">\
                 <title>layer {label}, checkpoint {}: relative diff {}</title></rect>",
                left + cw * ci as f64,
                cw - 1.0,
                ch - 1.0,
                ci + 1,
                sci(*v, 3)
            );
        }
    }
    let _ = writeln!(
        s,
        "</svg><figcaption>√(Σ‖Δ‖²)/√(Σ‖W‖²) over the tensors of each layer (\"other\": embeddings, final norm, head), \
         per checkpoint (columns, in the order given); colours on one log scale across checkpoints.</figcaption></figure>"
    );
    let _ = writeln!(s, "</body>\n</html>");
    s
}
