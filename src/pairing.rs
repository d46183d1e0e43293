//! Pairing tensors by name (SPEC §2), and the name helpers reports group by.
//!
//! Common names with equal shapes are compared. Names present on one side only, shape
//! mismatches and dtype mismatches are reported; only vocabulary tables (token
//! embeddings, LM heads) are compared on the leading rows both shapes share. When one
//! side wraps (nearly) every name in a prefix (`model.`, `base_model.model.`, …) the
//! prefix that pairs the most tensors is inferred from the names, stripped from that
//! side, and reported.

use crate::checkpoint::TensorEntry;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

/// Which checkpoint a prefix was stripped from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Base,
    Finetuned,
}

/// A prefix stripped from one side to align names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixAlignment {
    pub side: Side,
    pub prefix: String,
    /// Pairs gained by stripping it.
    pub pairs_gained: usize,
}

/// Two tensors to compare.
#[derive(Debug, Clone)]
pub struct TensorPair {
    /// The aligned name (with the inferred prefix removed), used in every report.
    pub name: String,
    pub base: TensorEntry,
    pub finetuned: TensorEntry,
    /// For a shape mismatch whose shapes differ only in the first dimension: the number
    /// of leading rows both have, which are the ones compared.
    pub leading_rows: Option<usize>,
}

impl TensorPair {
    /// Elements compared: all of them, or the leading rows both sides have.
    pub fn compared_elements(&self) -> u64 {
        match self.leading_rows {
            Some(rows) => {
                rows as u64
                    * self.base.shape[1..]
                        .iter()
                        .map(|&d| d as u64)
                        .product::<u64>()
            }
            None => self.base.numel(),
        }
    }
}

/// What differs between the two sides of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// The shapes (a resized vocabulary is compared on its leading rows).
    Shape,
    /// The dtype or the storage (compared as values after decoding).
    Dtype,
}

impl std::fmt::Display for MismatchKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MismatchKind::Shape => "shape",
            MismatchKind::Dtype => "dtype",
        })
    }
}

/// A pair whose shapes or dtypes differ.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mismatch {
    pub name: String,
    pub kind: MismatchKind,
    pub base_shape: Vec<usize>,
    pub finetuned_shape: Vec<usize>,
    pub base_dtype: String,
    pub finetuned_dtype: String,
    /// What was compared, in words.
    pub compared: String,
}

/// The result of pairing two checkpoints' tensors.
#[derive(Debug, Clone, Default)]
pub struct Pairing {
    pub prefix: Option<PrefixAlignment>,
    /// Pairs to compare, in natural name order.
    pub pairs: Vec<TensorPair>,
    pub only_in_base: Vec<String>,
    pub only_in_finetuned: Vec<String>,
    pub mismatches: Vec<Mismatch>,
}

impl Pairing {
    /// A name of `side` as it is paired: without the inferred prefix, if that side has it.
    fn aligned(&self, side: Side, name: &str) -> String {
        match &self.prefix {
            Some(p) if p.side == side => name.strip_prefix(&p.prefix).unwrap_or(name).to_string(),
            _ => name.to_string(),
        }
    }

    /// Takes off the only-in lists the names the other side has but cannot read
    /// (`Checkpoint::broken`, a tensor error each): they are not missing.
    pub fn unlist_broken<'a>(
        &mut self,
        base_broken: impl IntoIterator<Item = &'a String>,
        finetuned_broken: impl IntoIterator<Item = &'a String>,
    ) {
        let base: Vec<String> = base_broken
            .into_iter()
            .map(|n| self.aligned(Side::Base, n))
            .collect();
        let finetuned: Vec<String> = finetuned_broken
            .into_iter()
            .map(|n| self.aligned(Side::Finetuned, n))
            .collect();
        self.only_in_base.retain(|n| !finetuned.contains(n));
        self.only_in_finetuned.retain(|n| !base.contains(n));
    }
}

/// Pairs `base` with `finetuned`.
pub fn pair(
    base: &BTreeMap<String, TensorEntry>,
    finetuned: &BTreeMap<String, TensorEntry>,
) -> Pairing {
    let mut out = Pairing {
        prefix: infer_prefix(base.keys(), finetuned.keys()),
        ..Pairing::default()
    };
    let b: BTreeMap<String, &TensorEntry> = base
        .iter()
        .map(|(k, v)| (out.aligned(Side::Base, k), v))
        .collect();
    let f: BTreeMap<String, &TensorEntry> = finetuned
        .iter()
        .map(|(k, v)| (out.aligned(Side::Finetuned, k), v))
        .collect();

    for (name, be) in &b {
        let Some(fe) = f.get(name) else {
            out.only_in_base.push(name.clone());
            continue;
        };
        let mut leading_rows = None;
        if be.shape != fe.shape {
            let same_tail = be.shape.len() == 2
                && fe.shape.len() == 2
                && be.shape[1] == fe.shape[1]
                && VOCABULARY_ROLES.contains(&module_type(name).as_str());
            let compared = if same_tail {
                let rows = be.shape[0].min(fe.shape[0]);
                leading_rows = Some(rows);
                format!("leading {rows} rows")
            } else {
                "nothing (only a vocabulary table, an embedding or LM head, is compared on its leading rows)"
                    .to_string()
            };
            out.mismatches
                .push(mismatch(name, MismatchKind::Shape, be, fe, compared));
            if !same_tail {
                continue;
            }
        }
        // The storage, not only the decoded dtype: a Q8_0 GGUF tensor is read as F32.
        if be.dtype != fe.dtype || be.dtype_name() != fe.dtype_name() {
            let compared = "values after decoding".to_string();
            out.mismatches
                .push(mismatch(name, MismatchKind::Dtype, be, fe, compared));
        }
        out.pairs.push(TensorPair {
            name: name.clone(),
            base: (*be).clone(),
            finetuned: (*fe).clone(),
            leading_rows,
        });
    }
    out.only_in_finetuned = f.keys().filter(|k| !b.contains_key(*k)).cloned().collect();
    out.pairs.sort_by(|x, y| natural_cmp(&x.name, &y.name));
    out.only_in_base.sort_by(|x, y| natural_cmp(x, y));
    out.only_in_finetuned.sort_by(|x, y| natural_cmp(x, y));
    out.mismatches.sort_by(|x, y| natural_cmp(&x.name, &y.name));
    out
}

fn mismatch(
    name: &str,
    kind: MismatchKind,
    be: &TensorEntry,
    fe: &TensorEntry,
    compared: String,
) -> Mismatch {
    Mismatch {
        name: name.to_string(),
        kind,
        base_shape: be.shape.clone(),
        finetuned_shape: fe.shape.clone(),
        base_dtype: be.dtype_name(),
        finetuned_dtype: fe.dtype_name(),
        compared,
    }
}

/// Module types whose first dimension is the vocabulary: token embeddings and LM heads.
/// Only these are compared on their leading rows when the first dimension differs (a
/// resized vocabulary keeps the old tokens' rows first); any other shape difference —
/// a norm of another width, a pruned MLP — is a plain mismatch.
pub const VOCABULARY_ROLES: &[&str] = &[
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
    "tok_embeddings",
    "shared",
    "lm_head",
    "embed_out",
    "output",
];

/// A prefix is stripped only when it wraps nearly all of one side's names: at least this
/// share of them, or all but [`PREFIX_OUTSIDERS`]. A prefix on a few names (`cls.` on the
/// 8 head tensors of a 207-tensor BERT) names a submodule, not a wrapper.
pub const PREFIX_MIN_SHARE: f64 = 0.9;
/// Names a wrapping prefix may leave out whatever the share (`lm_head.weight` beside
/// `model.*`, a `score.weight` added by a classification head).
pub const PREFIX_OUTSIDERS: usize = 2;

/// How many candidate prefixes per side are tried (the most frequent ones).
const MAX_PREFIX_CANDIDATES: usize = 32;
/// Prefixes are made of at most this many dotted components (`base_model.model.model.`).
const MAX_PREFIX_COMPONENTS: usize = 3;

/// Finds the prefix which, stripped from every name of one side that has it, pairs the
/// most tensors; `None` when no prefix pairs more than the names as they are.
pub fn infer_prefix<'a>(
    base: impl Iterator<Item = &'a String> + Clone,
    finetuned: impl Iterator<Item = &'a String> + Clone,
) -> Option<PrefixAlignment> {
    let bset: std::collections::HashSet<&str> = base.clone().map(String::as_str).collect();
    let fset: std::collections::HashSet<&str> = finetuned.clone().map(String::as_str).collect();
    let direct = bset.intersection(&fset).count();
    let mut best: Option<PrefixAlignment> = None;
    for (side, from, to) in [(Side::Base, &bset, &fset), (Side::Finetuned, &fset, &bset)] {
        for prefix in candidate_prefixes(from) {
            let wrapped = from
                .iter()
                .filter(|n| n.starts_with(prefix.as_str()))
                .count();
            if (wrapped as f64) < PREFIX_MIN_SHARE * from.len() as f64
                && wrapped + PREFIX_OUTSIDERS < from.len()
            {
                continue;
            }
            let paired = from
                .iter()
                .filter(|n| {
                    let s = n.strip_prefix(prefix.as_str()).unwrap_or(n);
                    to.contains(s)
                })
                .count();
            if paired > direct {
                let gained = paired - direct;
                let better = match &best {
                    None => true,
                    Some(b) => {
                        gained > b.pairs_gained
                            || (gained == b.pairs_gained && prefix.len() < b.prefix.len())
                    }
                };
                if better {
                    best = Some(PrefixAlignment {
                        side,
                        prefix,
                        pairs_gained: gained,
                    });
                }
            }
        }
    }
    best
}

fn candidate_prefixes(names: &std::collections::HashSet<&str>) -> Vec<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for n in names {
        let mut end = 0;
        for _ in 0..MAX_PREFIX_COMPONENTS {
            match n[end..].find('.') {
                Some(i) => {
                    end += i + 1;
                    *counts.entry(&n[..end]).or_default() += 1;
                }
                None => break,
            }
        }
    }
    let mut v: Vec<(&str, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.into_iter()
        .take(MAX_PREFIX_CANDIDATES)
        .map(|(p, _)| p.to_string())
        .collect()
}

/// Orders names with embedded numbers numerically (`layers.2` before `layers.10`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let nx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (&x[..nx], &y[..ny]);
                let tx = strip_zeros(dx);
                let ty = strip_zeros(dy);
                let o = tx.len().cmp(&ty.len()).then(tx.cmp(ty)).then(nx.cmp(&ny));
                if o != Ordering::Equal {
                    return o;
                }
                x = &x[nx..];
                y = &y[ny..];
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

fn strip_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z..]
}

/// Parameter names that end a tensor name (`….q_proj.weight`).
const PARAM_LEAVES: &[&str] = &[
    "weight",
    "bias",
    "scale",
    "weight_scale",
    "weight_scale_inv",
];

/// The module type of a tensor: the last non-numeric component before the parameter
/// name (`model.layers.3.self_attn.q_proj.weight` → `q_proj`, `lm_head.weight` →
/// `lm_head`).
pub fn module_type(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut end = parts.len();
    if end > 1 && PARAM_LEAVES.contains(&parts[end - 1]) {
        end -= 1;
    }
    parts[..end]
        .iter()
        .rev()
        .find(|p| !p.is_empty() && !p.bytes().all(|c| c.is_ascii_digit()))
        .unwrap_or(&name)
        .to_string()
}

/// The transformer block index of a tensor: the first all-digit component of its name
/// (`model.layers.3.mlp.up_proj.weight` → 3); `None` for embeddings, final norm, head.
pub fn layer_index(name: &str) -> Option<usize> {
    name.split('.')
        .find(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_the_other_side_cannot_read_is_not_only_in_this_side() {
        // The fine-tuned side wraps its names in `model.`; its broken `model.b` is `b`.
        let mut p = Pairing {
            prefix: Some(PrefixAlignment {
                side: Side::Finetuned,
                prefix: "model.".into(),
                pairs_gained: 3,
            }),
            only_in_base: vec!["a".into(), "b".into()],
            only_in_finetuned: vec!["c".into(), "d".into()],
            ..Pairing::default()
        };
        p.unlist_broken(&["d".to_string()], &["model.b".to_string()]);
        assert_eq!(p.only_in_base, ["a"]);
        assert_eq!(p.only_in_finetuned, ["c"]);
    }

    #[test]
    fn natural_order_sorts_layer_numbers_numerically() {
        let mut v = vec![
            "layers.10.a",
            "layers.2.a",
            "layers.1.b",
            "embed",
            "layers.02.a",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "embed",
                "layers.1.b",
                "layers.2.a",
                "layers.02.a",
                "layers.10.a"
            ]
        );
    }

    #[test]
    fn module_type_and_layer_index_come_from_the_name() {
        assert_eq!(
            module_type("model.layers.3.self_attn.q_proj.weight"),
            "q_proj"
        );
        assert_eq!(module_type("lm_head.weight"), "lm_head");
        assert_eq!(module_type("model.norm.weight"), "norm");
        assert_eq!(module_type("h.0.attn.c_attn.bias"), "c_attn");
        assert_eq!(layer_index("model.layers.13.mlp.up_proj.weight"), Some(13));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
    }

    #[test]
    fn infers_a_wrapping_prefix_on_either_side() {
        let base: Vec<String> = [
            "model.layers.0.q.weight",
            "model.norm.weight",
            "lm_head.weight",
        ]
        .map(String::from)
        .to_vec();
        let ft: Vec<String> = base
            .iter()
            .map(|n| format!("base_model.model.{n}"))
            .collect();
        let p = infer_prefix(base.iter(), ft.iter()).expect("a prefix");
        assert_eq!(p.side, Side::Finetuned);
        assert_eq!(p.prefix, "base_model.model.");
        assert_eq!(p.pairs_gained, 3);
        let p = infer_prefix(ft.iter(), base.iter()).expect("a prefix");
        assert_eq!(p.side, Side::Base);
        assert!(infer_prefix(base.iter(), base.iter()).is_none());
    }
}
