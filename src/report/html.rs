//! `report.html`: one self-contained page (SPEC §4). Everything is inline — styles, the
//! SVG figures drawn here, and a few lines of script for sorting and filtering the
//! table — so the page opens from a cluster's scratch directory with no network. The
//! figures are static SVG: the page reads fine with scripts disabled.

use super::lora::LoraDocs;
use super::summary::{
    LIST_FIRST, low_rank_caveat, metadata_kept_share, summarise_names, verdict_sentence,
};
use super::{fmt_bytes, fmt_seconds, sci};
use crate::comparison::{Comparison, TensorMetrics};
use crate::lowrank::TensorSpectrum;
use crate::pairing::{layer_index, module_type};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

pub const REPORT_HTML: &str = "report.html";

/// Spectra drawn: the most modified analysed tensor of each module type, up to this many.
const SPECTRA: usize = 8;

/// Renders `report.html`; `lora` holds the LoRA stage's documents when it ran.
pub fn render(c: &Comparison, lora: Option<&LoraDocs>, top: usize) -> String {
    let mut s = String::with_capacity(64 * 1024 + c.results.len() * 400);
    let title = format!(
        "weightdiff: {} vs {}",
        short(&c.base.source),
        short(&c.finetuned.source)
    );
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&title)
    );
    let _ = writeln!(s, "<h1>weightdiff report</h1>");
    summary(&mut s, c, lora);
    let _ = writeln!(
        s,
        "<h2 id=\"heatmap-title\">Relative diff by layer and module</h2>"
    );
    heatmap(&mut s, c);
    if let Some(docs) = lora {
        spectra(&mut s, c, docs);
    }
    table(&mut s, c, lora, top);
    let _ = write!(s, "<script>{SCRIPT}</script>\n</body>\n</html>\n");
    s
}

fn summary(s: &mut String, c: &Comparison, lora: Option<&LoraDocs>) {
    let modified = c.modified().len();
    let identical = c.results.iter().filter(|(_, m)| m.identical).count();
    let all: u64 = c.results.iter().map(|(_, m)| m.num_elements).sum();
    let changed: u64 = c
        .results
        .iter()
        .filter(|(_, m)| m.is_modified())
        .map(|(_, m)| m.num_elements)
        .sum();
    let _ = writeln!(
        s,
        "<p class=\"models\"><b>Base</b> <code>{}</code><br><b>Fine-tuned</b> <code>{}</code></p>",
        esc(&c.base.describe()),
        esc(&c.finetuned.describe())
    );
    if !c.complete {
        let _ = writeln!(
            s,
            "<p class=\"warn\">This run did not complete: the figures cover the tensors compared before it stopped.</p>"
        );
    }
    let p = &c.performance;
    let related = crate::relatedness::assess(c);
    let cards = [
        ("compared tensors", c.results.len().to_string()),
        ("modified", modified.to_string()),
        ("byte-identical", identical.to_string()),
        (
            "parameters in modified tensors",
            if all > 0 {
                format!("{:.1} %", 100.0 * changed as f64 / all as f64)
            } else {
                "n/a".into()
            },
        ),
        (
            "whole-model ‖Δ‖/‖W‖",
            related.relative_diff.map_or("n/a".into(), |r| sci(r, 2)),
        ),
        (
            "cosine similarity (parameter-weighted)",
            related
                .cosine_similarity
                .map_or("n/a".into(), |r| format!("{r:.4}")),
        ),
        ("errors", c.errors.len().to_string()),
        (
            "read",
            format!(
                "{} in {} ({:.2} GB/s)",
                fmt_bytes(p.bytes_read),
                fmt_seconds(p.total_time),
                p.throughput_gbps
            ),
        ),
    ];
    let _ = writeln!(s, "<div class=\"cards\" id=\"summary\">");
    for (k, v) in cards {
        let _ = writeln!(
            s,
            "<div class=\"card\"><div class=\"v\">{}</div><div class=\"k\">{k}</div></div>",
            esc(&v)
        );
    }
    let _ = writeln!(s, "</div>");
    if let Some(v) = &related.verdict {
        let _ = writeln!(
            s,
            "<div class=\"verdict\" id=\"verdict\" data-kind=\"{}\"><b>Verdict:</b> {} \
             The low-rank analysis and the adapter were skipped.</div>",
            v.kind,
            esc(&verdict_sentence(v))
        );
    } else if let Some(docs) = lora {
        let v = &docs.analysis.verdict;
        let _ = writeln!(
            s,
            "<div class=\"verdict\" id=\"verdict\" data-kind=\"{}\"><b>LoRA verdict:</b> {}",
            v.kind,
            esc(&verdict_sentence(v))
        );
        if let Some(m) = &docs.metadata {
            let n = m.modules.0.len();
            if n > 0 {
                let _ = write!(
                    s,
                    " Extracted {n} modules as a PEFT adapter (<code>lora_adapter/</code>, default rank {}), mean relative reconstruction error {}.",
                    m.default_rank,
                    sci(m.mean_residual_stored.unwrap_or(0.0), 2)
                );
                if let Some(caveat) =
                    metadata_kept_share(c, m).and_then(|kept| low_rank_caveat(kept, m.default_rank))
                {
                    let _ = write!(s, " <b>{}</b>", esc(&caveat));
                }
            }
        }
        let _ = writeln!(s, "</div>");
    } else if let Some(q) = super::quantization::dominates(c) {
        let _ = writeln!(
            s,
            "<div class=\"verdict\" id=\"verdict\" data-kind=\"\">{}</div>",
            esc(&super::quantization::skipped_sentence(&q))
        );
    } else {
        let _ = writeln!(
            s,
            "<div class=\"verdict\" id=\"verdict\" data-kind=\"\">No LoRA analysis in this run \
             (<code>--no-lora</code>, or the run stopped before it).</div>"
        );
    }
    let quant = super::quantization::by_storage(c);
    if !quant.is_empty() {
        let _ = writeln!(
            s,
            "<h2>Quantization error</h2>\n<p class=\"note\">The two models store these tensors differently; Δ relative to the base.</p>\n<table id=\"quantization\"><thead><tr><th>storage (fine-tuned)</th><th>base</th><th>tensors</th><th>relative error</th><th>median</th><th>SNR (dB)</th><th>max |Δ|</th><th title=\"max |Δ| / quantization step: ≤ 0.5 for a round-to-nearest quant of the base\">max error (steps)</th></tr></thead><tbody>"
        );
        let steps = super::quantization::steps_text;
        for g in &quant {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&g.storage),
                esc(&g.base_storage.join(", ")),
                g.tensors,
                g.relative_error.map_or("n/a".into(), |x| sci(x, 3)),
                g.median_relative_error.map_or("n/a".into(), |x| sci(x, 2)),
                g.snr_db.map_or("inf".into(), |x| format!("{x:.1}")),
                sci(g.max_abs_diff, 2),
                steps(g.max_error_steps)
            );
            for m in &g.modules {
                let _ = writeln!(
                    s,
                    "<tr class=\"module\"><td>&nbsp;&nbsp;{}</td><td></td><td>{}</td><td>{}</td><td></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&m.module),
                    m.tensors,
                    m.relative_error.map_or("n/a".into(), |x| sci(x, 3)),
                    m.snr_db.map_or("inf".into(), |x| format!("{x:.1}")),
                    sci(m.max_abs_diff, 2),
                    steps(m.max_error_steps)
                );
            }
        }
        let _ = writeln!(s, "</tbody></table>");
    }
    let mut problems: Vec<String> = Vec::new();
    problems.extend(c.errors.iter().map(|(n, e)| format!("error: {n}: {e}")));
    if !c.only_in_base.is_empty() {
        problems.push(format!(
            "only in base: {}",
            summarise_names(&c.only_in_base)
        ));
    }
    if !c.only_in_finetuned.is_empty() {
        problems.push(format!(
            "only in fine-tuned: {}",
            summarise_names(&c.only_in_finetuned)
        ));
    }
    if c.mismatches.len() > LIST_FIRST {
        let names: Vec<String> = c.mismatches.iter().map(|m| m.name.clone()).collect();
        problems.push(format!(
            "shape or dtype mismatches: {} (all in weight_differences.json)",
            summarise_names(&names)
        ));
    }
    problems.extend(
        c.mismatches
            .iter()
            .take(LIST_FIRST)
            .map(|m| format!("{} mismatch: {} ({})", m.kind, m.name, m.compared)),
    );
    if related.overlap.same_model {
        problems
            .push("both arguments name the same model: every tensor is identical to itself".into());
    }
    problems.extend(
        c.base
            .warnings
            .iter()
            .chain(&c.finetuned.warnings)
            .map(|w| format!("warning: {w}")),
    );
    if !problems.is_empty() {
        let _ = writeln!(s, "<ul class=\"problems\">");
        for p in problems {
            let _ = writeln!(s, "<li>{}</li>", esc(&p));
        }
        let _ = writeln!(s, "</ul>");
    }
}

/// Relative diff → colour: log scale from `lo` to `hi` over a viridis-like ramp, run from
/// light (smallest change) to dark (largest), so that on a white page the larger change is
/// the stronger colour.
pub(crate) struct Scale {
    lo: f64,
    hi: f64,
}

impl Scale {
    /// Spans the positive values, at most six decades below the largest.
    pub(crate) fn new(values: impl Iterator<Item = f64>) -> Option<Scale> {
        let pos: Vec<f64> = values.filter(|v| *v > 0.0 && v.is_finite()).collect();
        let hi = pos.iter().copied().fold(f64::NAN, f64::max);
        if hi.is_nan() {
            return None;
        }
        let lo = pos.iter().copied().fold(hi, f64::min).max(hi * 1e-6);
        Some(Scale { lo, hi })
    }

    fn t(&self, v: f64) -> f64 {
        if self.hi <= self.lo {
            return 1.0;
        }
        ((v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()))
            .clamp(0.0, 1.0)
    }

    /// A cell's colour: `v` on `scale`, or the grey of "unchanged" for 0 (or no scale).
    pub(crate) fn fill(scale: Option<&Scale>, v: f64) -> String {
        match scale {
            Some(sc) if v > 0.0 => sc.colour(v),
            _ => UNCHANGED.to_string(),
        }
    }

    pub(crate) fn colour(&self, v: f64) -> String {
        const RAMP: [(f64, f64, f64); 5] = [
            (68.0, 1.0, 84.0),
            (59.0, 82.0, 139.0),
            (33.0, 145.0, 140.0),
            (94.0, 201.0, 98.0),
            (253.0, 231.0, 37.0),
        ];
        // The ramp's dark end for the largest value.
        let x = (1.0 - self.t(v)) * (RAMP.len() - 1) as f64;
        let i = (x.floor() as usize).min(RAMP.len() - 2);
        let f = x - i as f64;
        let (a, b) = (RAMP[i], RAMP[i + 1]);
        let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
        format!(
            "#{:02x}{:02x}{:02x}",
            mix(a.0, b.0),
            mix(a.1, b.1),
            mix(a.2, b.2)
        )
    }
}

const UNCHANGED: &str = "#e8e8e8";

/// Heatmap columns, in the order of a transformer block (Llama/Qwen/Mistral/GPT-2/
/// Falcon/DeepSeek MLA/MoE names); other module types follow alphabetically.
const MODULE_ORDER: &[&str] = &[
    "input_layernorm",
    "ln_1",
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "c_attn",
    "query_key_value",
    "q_norm",
    "k_norm",
    "q_a_proj",
    "q_a_layernorm",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
    "c_proj",
    "dense",
    "post_attention_layernorm",
    "ln_2",
    "pre_feedforward_layernorm",
    "gate",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "c_fc",
    "dense_h_to_4h",
    "w1",
    "w3",
    "down_proj",
    "dense_4h_to_h",
    "w2",
    "post_feedforward_layernorm",
];

/// Layer index × module type, cell = largest relative diff of the tensors there.
fn heatmap(s: &mut String, c: &Comparison) {
    let mut modules: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(usize, usize), (f64, Vec<&str>)> = BTreeMap::new();
    for (name, m) in &c.results {
        let Some(layer) = layer_index(name) else {
            continue;
        };
        let module = module_type(name);
        let col = match modules.iter().position(|x| *x == module) {
            Some(i) => i,
            None => {
                modules.push(module);
                modules.len() - 1
            }
        };
        let e = cells.entry((layer, col)).or_insert((0.0, Vec::new()));
        e.0 = e.0.max(rel(m));
        e.1.push(name);
    }
    // Columns in the order of a transformer block, other module types after them.
    let rank = |m: &str| {
        MODULE_ORDER
            .iter()
            .position(|x| *x == m)
            .unwrap_or(MODULE_ORDER.len())
    };
    let mut order: Vec<usize> = (0..modules.len()).collect();
    order.sort_by(|&a, &b| (rank(&modules[a]), &modules[a]).cmp(&(rank(&modules[b]), &modules[b])));
    let mut new_col = vec![0; modules.len()];
    for (new, &old) in order.iter().enumerate() {
        new_col[old] = new;
    }
    let cells: BTreeMap<(usize, usize), (f64, Vec<&str>)> = cells
        .into_iter()
        .map(|((l, c), v)| ((l, new_col[c]), v))
        .collect();
    let modules: Vec<String> = order.iter().map(|&i| modules[i].clone()).collect();
    if cells.is_empty() {
        let _ = writeln!(
            s,
            "<p>No tensor names carry a layer index, so there is no layer map.</p>"
        );
        return;
    }
    let layers: Vec<usize> = {
        let mut v: Vec<usize> = cells.keys().map(|(l, _)| *l).collect();
        v.dedup();
        v
    };
    let scale = Scale::new(cells.values().map(|(v, _)| *v));
    let cw = 72.0;
    let ch = (640.0 / layers.len() as f64).clamp(8.0, 22.0);
    let (left, topm) = (56.0, 120.0);
    let width = left + cw * modules.len() as f64 + 20.0;
    let height = topm + ch * layers.len() as f64 + 70.0;
    let _ = writeln!(
        s,
        "<figure><svg id=\"heatmap\" width=\"{width:.0}\" height=\"{height:.0}\" \
         data-layers=\"{}\" data-modules=\"{}\" role=\"img\" aria-labelledby=\"heatmap-title\">",
        layers.len(),
        modules.len()
    );
    for (i, m) in modules.iter().enumerate() {
        let x = left + cw * (i as f64 + 0.5);
        let _ = writeln!(
            s,
            "<text class=\"lab\" transform=\"translate({x:.1},{:.1}) rotate(-45)\">{}</text>",
            topm - 6.0,
            esc(m)
        );
    }
    for (r, l) in layers.iter().enumerate() {
        let y = topm + ch * r as f64;
        let _ = writeln!(
            s,
            "<text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{l}</text>",
            left - 6.0,
            y + ch * 0.5 + 4.0
        );
    }
    let row_of: BTreeMap<usize, usize> = layers.iter().enumerate().map(|(i, l)| (*l, i)).collect();
    for ((layer, col), (v, names)) in &cells {
        let x = left + cw * *col as f64;
        let y = topm + ch * row_of[layer] as f64;
        let fill = Scale::fill(scale.as_ref(), *v);
        let _ = writeln!(
            s,
            "<rect class=\"cell\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\" \
             data-layer=\"{layer}\" data-module=\"{}\" data-rel=\"{v:e}\"><title>{}: relative diff {}</title></rect>",
            cw - 1.0,
            ch - 1.0,
            esc(&modules[*col]),
            esc(&names.join(", ")),
            sci(*v, 3)
        );
    }
    // Legend: the ramp with its end values, and the colour of "unchanged".
    let ly = topm + ch * layers.len() as f64 + 24.0;
    let _ = writeln!(
        s,
        "<defs><linearGradient id=\"ramp\"><stop offset=\"0\" stop-color=\"#fde725\"/><stop offset=\"0.25\" stop-color=\"#5ec962\"/>\
         <stop offset=\"0.5\" stop-color=\"#21918c\"/><stop offset=\"0.75\" stop-color=\"#3b528b\"/><stop offset=\"1\" stop-color=\"#440154\"/></linearGradient></defs>"
    );
    if let Some(sc) = &scale {
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{ly:.1}\" width=\"200\" height=\"12\" fill=\"url(#ramp)\"/>\
             <text class=\"lab\" x=\"{left}\" y=\"{:.1}\">{}</text>\
             <text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{} (log scale)</text>",
            ly + 28.0,
            sci(sc.lo, 1),
            left + 200.0,
            ly + 28.0,
            sci(sc.hi, 1)
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{:.1}\" y=\"{ly:.1}\" width=\"12\" height=\"12\" fill=\"{UNCHANGED}\"/>\
         <text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\">unchanged</text>",
        left + 230.0,
        left + 248.0,
        ly + 10.0
    );
    let _ = writeln!(
        s,
        "</svg><figcaption>Largest relative diff ‖Δ‖/‖W‖ of the tensors in each layer (rows) and module type (columns). \
         Hover a cell for its tensors. Tensors outside the layers (embeddings, final norm, head) are in the table.</figcaption></figure>"
    );
}

/// Singular values of the most modified analysed tensors, log scale, with the rounding
/// noise floor and the detected rank.
fn spectra(s: &mut String, c: &Comparison, docs: &LoraDocs) {
    let tensors = docs.analysis.tensors.map();
    // The most modified analysed tensor of each module type, most modified first: one
    // panel per kind of change (a LoRA'd q_proj and a fully tuned down_proj look unlike).
    let mut seen: Vec<String> = Vec::new();
    let mut chosen: Vec<(&str, &TensorSpectrum)> = Vec::new();
    for (n, _) in c.top_modified(usize::MAX) {
        let Some(t) = tensors.get(n).copied() else {
            continue;
        };
        let has_values = t.singular_values.iter().any(|&x| x > 0.0);
        let module = module_type(n);
        if has_values && !seen.contains(&module) {
            seen.push(module);
            chosen.push((n, t));
            if chosen.len() == SPECTRA {
                break;
            }
        }
    }
    if chosen.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "<h2>Singular-value spectra of the most modified tensors (one per module type)</h2>\n<div class=\"spectra\" id=\"spectra\">"
    );
    for (name, t) in chosen {
        spectrum_plot(s, name, t);
    }
    let _ = writeln!(
        s,
        "</div><p class=\"note\">σ<sub>i</sub> of each delta (log scale). Dashed: the predicted top singular value of the \
         storage rounding noise; a merged LoRA of rank r shows r values far above it and a cliff after the r-th.</p>"
    );
}

fn spectrum_plot(s: &mut String, name: &str, t: &TensorSpectrum) {
    let sv: &[f64] = &t.singular_values;
    let floor = Some(t.noise_floor).filter(|f| *f > 0.0);
    let rank = t.detected_rank.map(|r| r as u64);
    let positive = sv.iter().copied().filter(|x| *x > 0.0);
    let hi = positive
        .clone()
        .fold(f64::MIN, f64::max)
        .max(floor.unwrap_or(0.0));
    let lo = positive
        .fold(hi, f64::min)
        .min(floor.unwrap_or(hi))
        .max(hi * 1e-12);
    let (ylo, yhi) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let (w, h, l, r, tp, b) = (320.0, 200.0, 52.0, 10.0, 24.0, 28.0);
    let px = |i: usize| l + (w - l - r) * (i as f64) / ((sv.len().max(2) - 1) as f64);
    let py = |v: f64| {
        let y = (v.max(10f64.powf(ylo)).log10() - ylo) / (yhi - ylo);
        tp + (h - tp - b) * (1.0 - y)
    };
    let _ = writeln!(
        s,
        "<svg class=\"spectrum\" width=\"{w}\" height=\"{h}\" data-tensor=\"{}\">\
         <text class=\"st\" x=\"4\" y=\"14\">{}{}</text>",
        esc(name),
        esc(&short_name(name)),
        rank.map_or(String::new(), |r| format!(" — rank {r}"))
    );
    for d in (ylo as i32)..=(yhi as i32) {
        let y = py(10f64.powi(d));
        let _ = writeln!(
            s,
            "<line class=\"grid\" x1=\"{l}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/><text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">1e{d}</text>",
            w - r,
            l - 4.0,
            y + 4.0
        );
    }
    if let Some(f) = floor {
        let y = py(f);
        let _ = writeln!(
            s,
            "<line class=\"floor\" x1=\"{l}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"><title>rounding-noise floor {}</title></line>",
            w - r,
            sci(f, 2)
        );
    }
    if let Some(k) = rank.filter(|k| *k as usize <= sv.len() && *k > 0) {
        let x = px(k as usize - 1);
        let _ = writeln!(
            s,
            "<line class=\"rank\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{tp}\" y2=\"{:.1}\"/>",
            h - b
        );
    }
    let pts: Vec<String> = sv
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.0)
        .map(|(i, v)| format!("{:.1},{:.1}", px(i), py(*v)))
        .collect();
    let _ = writeln!(
        s,
        "<polyline class=\"sv\" points=\"{}\"/><text class=\"lab\" x=\"{l}\" y=\"{:.1}\">1</text>\
         <text class=\"lab\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">i = {}</text></svg>",
        pts.join(" "),
        h - 10.0,
        w - r,
        h - 10.0,
        sv.len()
    );
}

/// Rows of the table written as HTML; the rest are drawn by the script from the JSON
/// copy of all rows (a 47k-tensor MoE model's table as HTML takes a browser tens of
/// seconds to lay out; a page of it, well under one).
const PAGE_ROWS: usize = 2000;

/// A table number as JSON: finite values as numbers, others as their text (JSON has no
/// infinity), absent as null.
fn json_num(v: Option<f64>) -> Value {
    match v {
        Some(x) if x.is_finite() => Value::from(x),
        Some(x) => Value::from(x.to_string()),
        None => Value::Null,
    }
}

/// Every compared tensor, most modified first: the first [`PAGE_ROWS`] as HTML (readable
/// without scripts), all of them as JSON for the script, which sorts by any column,
/// filters by name and shows more rows on demand.
fn table(s: &mut String, c: &Comparison, lora: Option<&LoraDocs>, top: usize) {
    let ranks = lora.map(|d| d.analysis.tensors.map());
    let _ = writeln!(
        s,
        "<h2>All tensors</h2>\n<p class=\"note\">The {top} most modified are marked ★. Click a column to sort; \
         <input id=\"filter\" type=\"search\" placeholder=\"filter by name\" aria-label=\"filter by name\"></p>"
    );
    let cols = [
        ("rank", "#", true),
        ("name", "tensor", false),
        ("shape", "shape", false),
        ("dtype", "dtype", false),
        ("relative_diff", "relative diff", true),
        ("l2_diff", "‖Δ‖", true),
        ("cosine_similarity", "cosine", true),
        ("changed_ratio", "changed", true),
        ("max_abs_diff", "max |Δ|", true),
        ("detected_rank", "LoRA rank", true),
    ];
    let _ = write!(s, "<div class=\"scroll\"><table id=\"tensors\"><thead><tr>");
    for (key, label, num) in cols {
        let _ = write!(
            s,
            "<th data-key=\"{key}\" data-type=\"{}\">{label}</th>",
            if num { "num" } else { "text" }
        );
    }
    let _ = writeln!(s, "</tr></thead><tbody>");
    let order = c.top_modified(usize::MAX);
    let unmodified = c.results.iter().filter(|(_, m)| !m.is_modified());
    let rows = order
        .iter()
        .map(|(n, m)| (*n, *m))
        .chain(unmodified.map(|(n, m)| (n.as_str(), m)));
    let mut data: Vec<Value> = Vec::with_capacity(c.results.len());
    for (i, (name, m)) in rows.enumerate() {
        let detected = ranks
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|t| t.detected_rank);
        let star = i < top && m.is_modified();
        let shape = format!("{:?}", m.shape);
        let numel = m.shape.iter().product::<usize>();
        data.push(serde_json::json!([
            i + 1,
            name,
            shape,
            numel,
            m.dtype,
            json_num(m.relative_diff),
            json_num(Some(m.l2_diff)),
            json_num(m.cosine_similarity),
            json_num(Some(m.changed_ratio)),
            json_num(Some(m.max_abs_diff)),
            detected,
            u8::from(m.is_modified()) | (u8::from(star) << 1),
        ]));
        if i >= PAGE_ROWS {
            continue;
        }
        let _ = writeln!(
            s,
            "<tr class=\"row{}\"><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}{}</td><td data-v=\"{numel}\">{}</td>\
             <td data-v=\"{}\">{}</td>{}{}{}{}{}<td data-v=\"{}\">{}</td></tr>",
            if m.is_modified() { " mod" } else { "" },
            i + 1,
            i + 1,
            esc(name),
            if star { "★ " } else { "" },
            esc(name),
            esc(&shape),
            esc(&m.dtype),
            esc(&m.dtype),
            num_cell(m.relative_diff),
            num_cell(Some(m.l2_diff)),
            num_cell(m.cosine_similarity),
            num_cell(Some(m.changed_ratio)),
            num_cell(Some(m.max_abs_diff)),
            detected.map_or(String::new(), |r| r.to_string()),
            detected.map_or("–".to_string(), |r| r.to_string()),
        );
    }
    let _ = writeln!(s, "</tbody></table></div>");
    let _ = writeln!(
        s,
        "<p class=\"note\" id=\"more-bar\">Showing <span id=\"shown\">{}</span> of <span id=\"total\">{}</span> tensors. \
         <button id=\"more\" type=\"button\"{}>show {PAGE_ROWS} more</button></p>",
        data.len().min(PAGE_ROWS),
        data.len(),
        if data.len() > PAGE_ROWS {
            ""
        } else {
            " hidden"
        }
    );
    // `<` escaped so that no tensor name can close the script element.
    let json = serde_json::to_string(&data)
        .expect("rows serialize")
        .replace('<', "\\u003c");
    let _ = writeln!(
        s,
        "<script id=\"rows-data\" type=\"application/json\" data-page=\"{PAGE_ROWS}\">{json}</script>"
    );
}

fn num_cell(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("<td data-v=\"{x:e}\">{}</td>", sci(x, 3)),
        Some(x) => format!("<td data-v=\"\">{x}</td>"),
        None => "<td data-v=\"\">n/a</td>".to_string(),
    }
}

fn rel(m: &TensorMetrics) -> f64 {
    m.relative_diff.unwrap_or(f64::INFINITY)
}

/// The last two path components of a model argument, for the title.
pub(crate) fn short(source: &str) -> String {
    let parts: Vec<&str> = source.trim_end_matches('/').rsplit('/').take(2).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// A tensor name without the common `model.` prefix and `.weight` suffix, for titles.
fn short_name(name: &str) -> String {
    let n = name.strip_prefix("model.").unwrap_or(name);
    n.strip_suffix(".weight").unwrap_or(n).to_string()
}

/// Escapes text for HTML element content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(ch),
        }
    }
    o
}

pub(crate) const STYLE: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#222}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}
.card .v{font-size:1.3em;font-weight:600}.card .k{color:#666;font-size:.85em}
.verdict{background:#f3f7ff;border-left:4px solid #3b528b;padding:10px 14px;margin:12px 0}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:8px 12px}
.problems{color:#8a1f11}
.lab{font-size:11px;fill:#444}.st{font-size:12px;font-weight:600;fill:#222}
.spectra{display:flex;flex-wrap:wrap;gap:12px}.spectrum{border:1px solid #eee}
.grid{stroke:#eee}.floor{stroke:#c0392b;stroke-dasharray:4 3}.rank{stroke:#888;stroke-dasharray:2 2}
.sv{fill:none;stroke:#3b528b;stroke-width:1.6}
figure{margin:0;overflow-x:auto}figcaption,.note{color:#555;font-size:.9em}
rect.cell:hover{stroke:#000;stroke-width:1.5}
table{border-collapse:collapse;font-size:.85em;width:100%}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th:nth-child(2),td:nth-child(2),th:nth-child(3),td:nth-child(3),th:nth-child(4),td:nth-child(4){text-align:left}
td:nth-child(2){font-family:ui-monospace,Menlo,Consolas,monospace}
.scroll{overflow-x:auto}
th{cursor:pointer;background:#fafafa;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
tr:not(.mod) td{color:#999}
"#;

/// Sorting (click a header; `#sort=KEY-asc|desc` in the address sorts on load), the
/// name filter and "show more", over the JSON copy of the rows (`rows-data`): row
/// arrays of [rank, name, shape, elements, dtype, relative diff, ‖Δ‖, cosine, changed,
/// max |Δ|, detected rank, flags (1 modified, 2 starred)]. Cells are built with
/// `textContent`, never from markup, so a tensor name cannot inject any.
const SCRIPT: &str = r#"
(function () {
  var table = document.getElementById('tensors');
  var body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var src = document.getElementById('rows-data');
  var data = JSON.parse(src.textContent);
  var page = parseInt(src.dataset.page, 10);
  var shown = Math.min(page, data.length);
  var view = data.slice();
  // Column -> index in a row array; `shape` sorts by element count.
  var col = {rank: 0, name: 1, shape: 3, dtype: 4, relative_diff: 5, l2_diff: 6,
             cosine_similarity: 7, changed_ratio: 8, max_abs_diff: 9, detected_rank: 10};
  function sci(x) {
    var p = x.toExponential(3).split('e'), e = parseInt(p[1], 10);
    return p[0] + 'e' + (e < 0 ? '-' : '+') + (Math.abs(e) < 10 ? '0' : '') + Math.abs(e);
  }
  function cell(tr, v, text) {
    var td = document.createElement('td');
    td.dataset.v = v;
    td.textContent = text;
    tr.appendChild(td);
  }
  function num(tr, x) {
    if (typeof x === 'number') { cell(tr, String(x), sci(x)); }
    else { cell(tr, '', x === null ? 'n/a' : x); }
  }
  function render() {
    var rows = [];
    for (var i = 0; i < Math.min(shown, view.length); i++) {
      var r = view[i], tr = document.createElement('tr');
      tr.className = (r[11] & 1) ? 'row mod' : 'row';
      cell(tr, String(r[0]), String(r[0]));
      cell(tr, r[1], ((r[11] & 2) ? '\u2605 ' : '') + r[1]);
      cell(tr, String(r[3]), r[2]);
      cell(tr, r[4], r[4]);
      for (var j = 5; j <= 9; j++) { num(tr, r[j]); }
      cell(tr, r[10] === null ? '' : String(r[10]), r[10] === null ? '\u2013' : String(r[10]));
      rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
    document.getElementById('shown').textContent = String(Math.min(shown, view.length));
    document.getElementById('total').textContent = String(view.length);
    document.getElementById('more').hidden = shown >= view.length;
  }
  function sortBy(i, dir) {
    var k = col[heads[i].dataset.key], numeric = heads[i].dataset.type === 'num';
    view.sort(function (a, b) {
      var x = a[k], y = b[k];
      var xa = numeric ? typeof x !== 'number' : x === null, ya = numeric ? typeof y !== 'number' : y === null;
      if (xa || ya) { return (xa - ya) || (a[0] - b[0]); }
      var c = numeric ? x - y : String(x).localeCompare(String(y), undefined, {numeric: true});
      return dir * c || (a[0] - b[0]);
    });
    heads.forEach(function (h) { h.removeAttribute('aria-sort'); });
    heads[i].setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
    render();
  }
  heads.forEach(function (h, i) {
    h.addEventListener('click', function () {
      var dir = h.getAttribute('aria-sort') === 'descending' ? 1 : -1;
      sortBy(i, dir);
      try { history.replaceState(null, '', '#sort=' + h.dataset.key + (dir > 0 ? '-asc' : '-desc')); } catch (e) {}
    });
  });
  var m = /^#sort=([a-z_0-9]+)-(asc|desc)$/.exec(location.hash);
  if (m) {
    var i = heads.findIndex(function (h) { return h.dataset.key === m[1]; });
    if (i >= 0) { sortBy(i, m[2] === 'asc' ? 1 : -1); }
  }
  document.getElementById('filter').addEventListener('input', function (e) {
    var q = e.target.value.toLowerCase();
    var sorted = heads.findIndex(function (h) { return h.hasAttribute('aria-sort'); });
    view = data.filter(function (r) { return q === '' || r[1].toLowerCase().indexOf(q) >= 0; });
    if (sorted >= 0) { sortBy(sorted, heads[sorted].getAttribute('aria-sort') === 'ascending' ? 1 : -1); }
    else { render(); }
  });
  document.getElementById('more').addEventListener('click', function () {
    shown += page;
    render();
  });
  document.body.dataset.ready = String(data.length);
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_in_names() {
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn colour_scale_is_logarithmic_and_clamped() {
        let sc = Scale::new([1e-4, 1e-2, 0.0].into_iter()).unwrap();
        assert_eq!(sc.t(1e-4), 0.0);
        assert_eq!(sc.t(1e-2), 1.0);
        assert!((sc.t(1e-3) - 0.5).abs() < 1e-12);
        // Larger change, stronger (darker) colour on the white page.
        assert_eq!(sc.colour(1e-4), "#fde725");
        assert_eq!(sc.colour(1.0), "#440154");
        assert!(Scale::new([0.0, f64::INFINITY].into_iter()).is_none());
    }
}
