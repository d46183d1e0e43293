//! GGUF ↔ Hugging Face tensor names, and the converter's transforms to undo before
//! comparing a GGUF tensor with its Hugging Face original.
//!
//! llama.cpp's `convert_hf_to_gguf.py` renames every tensor (through gguf-py's
//! `TensorNameMap`, chosen by `general.architecture`) and changes some on the way. The
//! map here is per architecture; the transforms are data ([`Transform`]) with their
//! inverse ([`Transform::undo`]), so that the pipeline can apply them to f32 windows.
//!
//! # Names (block `N`; `.weight` / `.bias` carried over)
//!
//! | GGUF | Hugging Face | architectures |
//! |---|---|---|
//! | `token_embd` | `model.embed_tokens` | all |
//! | `output_norm` | `model.norm` | all |
//! | `output` | `lm_head` | all but gemma, gemma2 (tied; the converter drops `lm_head`) |
//! | `blk.N.attn_norm` | `model.layers.N.input_layernorm` | all |
//! | `blk.N.attn_{q,k,v}` | `model.layers.N.self_attn.{q,k,v}_proj` | all but phi3 |
//! | `blk.N.attn_qkv` | `model.layers.N.self_attn.qkv_proj` | phi3 (fused in HF too) |
//! | `blk.N.attn_output` | `model.layers.N.self_attn.o_proj` | all |
//! | `blk.N.attn_{q,k}_norm` | `model.layers.N.self_attn.{q,k}_norm` | qwen3, qwen3moe, gemma3 |
//! | `blk.N.ffn_norm` | `model.layers.N.post_attention_layernorm` | llama, qwen*, gemma, phi3 |
//! | `blk.N.ffn_norm` | `model.layers.N.pre_feedforward_layernorm` | gemma2, gemma3 |
//! | `blk.N.post_attention_norm` | `model.layers.N.post_attention_layernorm` | gemma2, gemma3 |
//! | `blk.N.post_ffw_norm` | `model.layers.N.post_feedforward_layernorm` | gemma2, gemma3 |
//! | `blk.N.ffn_{gate,up,down}` | `model.layers.N.mlp.{gate,up,down}_proj` | dense archs |
//! | `blk.N.ffn_up` | `model.layers.N.mlp.gate_up_proj` | phi3 (fused in HF too) |
//! | `blk.N.ffn_gate_inp` | `model.layers.N.mlp.gate` (`block_sparse_moe.gate` for llama/Mixtral) | MoE |
//! | `blk.N.ffn_{gate,up,down}_exps` | `model.layers.N.mlp.experts.E.{gate,up,down}_proj` (Mixtral: `block_sparse_moe.experts.E.{w1,w3,w2}`) | qwen2moe, qwen3moe, llama (Mixtral) |
//! | `blk.N.ffn_{gate,up,down}_shexp`, `ffn_gate_inp_shexp` | `model.layers.N.mlp.shared_expert.{…}_proj`, `mlp.shared_expert_gate` | qwen2moe |
//!
//! `mistral` GGUFs are written with the `llama` architecture (the converter registers
//! `MistralForCausalLM` under `LlamaModel`); the name `mistral` is accepted as an alias.
//! Tensors the converter generates (`rope_freqs`, `rope_factors_long/short`) have no HF
//! original and are listed as GGUF-only. An architecture without a map pairs tensors by
//! their GGUF names, with a warning.
//!
//! # Transforms
//!
//! Read in llama.cpp's converter, whose model classes now live in `conversion/*.py`
//! (imported by `convert_hf_to_gguf.py`): `conversion/llama.py` (`LlamaModel`, at
//! 7bca1fd), `conversion/qwen.py` and `conversion/gemma.py` (at 2bbcf7f),
//! `conversion/phi.py` (at 7bca1fd); the name tables agree with gguf-py 0.19.0's
//! `TensorNameMap` (tested in `tests/it/gguf.rs`).
//!
//! - **Q/K row permutation** (`LlamaModel.permute`, applied in `LlamaModel.modify_tensors`
//!   to `q_proj.{weight,bias}` with `n_head` and `k_proj.{weight,bias}` with `n_kv_head`,
//!   when `undo_permute` is true — the default for `LlamaModel`, which covers
//!   `LlamaForCausalLM`, `MistralForCausalLM` and `MixtralForCausalLM`): the rows of each
//!   head, reshaped `(2, head_dim/2)`, are transposed to `(head_dim/2, 2)`, interleaving the
//!   two rotary halves for ggml's RoPE. GGUF row `h·hd + 2j + i` holds HF row
//!   `h·hd + i·hd/2 + j`. `Qwen2Model`, `Qwen3Model`, `Qwen2MoeModel`/`Qwen3MoeModel`,
//!   `GemmaModel`/`Gemma2Model`/`Gemma3Model` and `Phi3MiniModel` derive from `TextModel`
//!   and never permute. → [`Transform::PermuteRows`].
//! - **Gemma's norms + 1**: `GemmaModel`, `Gemma2Model` and `Gemma3Model` add 1 to every
//!   tensor whose name ends in `norm.weight` (HF's Gemma RMSNorm multiplies by
//!   `1 + weight`; ggml's by `weight`). → [`Transform::AddOne`]. The addition happens in
//!   the checkpoint's dtype before the norm is written as f32 (inference from the order
//!   of `modify_tensors` and the f32 cast that follows), so for a bf16 original the
//!   inverse leaves the rounding of `w + 1` to bf16: a small, expected error.
//! - **Gemma3's embedding rows**: `Gemma3Model` keeps only the first `len(vocab)` rows of
//!   `embed_tokens` (it drops out-of-vocabulary rows). → [`Transform::TruncatedRows`].
//! - **Stacked experts**: `Qwen2MoeModel` (so `Qwen3MoeModel`) and `LlamaModel` (Mixtral)
//!   `torch.stack` the per-expert `[out, in]` weights into one `[E, out, in]` tensor
//!   (GGUF dims `[in, out, E]`); expert `e` is the `e`-th contiguous slice.
//!   → [`Transform::ExpertSlice`]. (Checkpoints whose HF side is already fused 3-D,
//!   `mlp.experts.gate_up_proj`, are split by the converter into gate and up and
//!   transposed; that layout is not mapped here.)
//! - **phi3**: `Phi3MiniModel` keeps `qkv_proj` and `gate_up_proj` fused, exactly as the
//!   HF Phi-3 checkpoint stores them, so no transform.

use super::{GgufFile, GgufTensor};
use std::ops::Range;

/// A change the converter made to a tensor, to be undone before comparing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    /// Rows of each of `heads` heads interleaved for ggml's RoPE: GGUF row `h·hd + 2j + i`
    /// is HF row `h·hd + i·hd/2 + j` (`hd = rows / heads`). Undone per whole head.
    PermuteRows { heads: u64 },
    /// GGUF value = HF value + 1 (Gemma norms). Undone by subtracting 1.
    AddOne,
    /// The GGUF tensor stacks `n_experts` experts along its outermost HF dimension; this
    /// HF tensor is expert `expert`, the `expert`-th contiguous slice.
    ExpertSlice { expert: u64, n_experts: u64 },
    /// The GGUF tensor holds only the first `rows` rows of the HF tensor; the HF rows past
    /// them have no GGUF counterpart.
    TruncatedRows { rows: u64 },
}

/// Why a transform cannot apply to a window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    /// The tensor's rows do not split into the heads the metadata gives.
    #[error("{rows} rows do not split into {heads} heads of an even size")]
    Heads { rows: u64, heads: u64 },
    /// The window is not made of whole heads (see [`Transform::row_granularity`]).
    #[error("window rows {first_row}..+{rows} are not whole {granule}-row heads")]
    Window {
        first_row: u64,
        rows: u64,
        granule: u64,
    },
    /// The expert index or count does not fit the tensor.
    #[error("expert {expert} of {n_experts} does not fit a tensor of shape {shape:?}")]
    Expert {
        expert: u64,
        n_experts: u64,
        shape: Vec<u64>,
    },
}

impl Transform {
    /// Rows (of the HF-order tensor, i.e. units of `shape[1..]` elements) that a window
    /// must be a whole number of for [`Transform::undo`]: one head for
    /// [`Transform::PermuteRows`], 1 otherwise.
    pub fn row_granularity(&self, hf_rows: u64) -> Result<u64, TransformError> {
        match *self {
            Transform::PermuteRows { heads } => {
                if heads == 0
                    || hf_rows == 0
                    || !hf_rows.is_multiple_of(heads)
                    || !(hf_rows / heads).is_multiple_of(2)
                {
                    return Err(TransformError::Heads {
                        rows: hf_rows,
                        heads,
                    });
                }
                Ok(hf_rows / heads)
            }
            _ => Ok(1),
        }
    }

    /// The HF row that GGUF row `gguf_row` of a `rows`-row tensor holds.
    pub fn hf_row(&self, gguf_row: u64, rows: u64) -> Result<u64, TransformError> {
        match *self {
            Transform::PermuteRows { .. } => {
                let hd = self.row_granularity(rows)?;
                let (head, r) = (gguf_row / hd, gguf_row % hd);
                Ok(head * hd + (r % 2) * (hd / 2) + r / 2)
            }
            _ => Ok(gguf_row),
        }
    }

    /// The range of GGUF elements (flat, HF order) that this HF tensor corresponds to:
    /// one expert's slice for [`Transform::ExpertSlice`], everything otherwise.
    pub fn gguf_elements(&self, gguf_shape: &[u64]) -> Result<Range<u64>, TransformError> {
        let numel: u64 = gguf_shape.iter().product();
        match *self {
            Transform::ExpertSlice { expert, n_experts } => {
                if gguf_shape.first() != Some(&n_experts) || expert >= n_experts {
                    return Err(TransformError::Expert {
                        expert,
                        n_experts,
                        shape: gguf_shape.to_vec(),
                    });
                }
                let per = numel / n_experts;
                Ok(expert * per..(expert + 1) * per)
            }
            _ => Ok(0..numel),
        }
    }

    /// Turns a window of GGUF values into HF values in place. The window holds whole rows
    /// `first_row ..` of a tensor with `hf_rows` rows of `row_len` elements (after any
    /// expert slicing); `scratch` is reused between calls. Exact, except that
    /// [`Transform::AddOne`] subtracts in f32.
    pub fn undo(
        &self,
        window: &mut [f32],
        first_row: u64,
        hf_rows: u64,
        row_len: usize,
        scratch: &mut Vec<f32>,
    ) -> Result<(), TransformError> {
        self.run(window, first_row, hf_rows, row_len, scratch, true)
    }

    /// The converter's direction (HF → GGUF), for tests and for checking a map.
    pub fn apply(
        &self,
        window: &mut [f32],
        first_row: u64,
        hf_rows: u64,
        row_len: usize,
        scratch: &mut Vec<f32>,
    ) -> Result<(), TransformError> {
        self.run(window, first_row, hf_rows, row_len, scratch, false)
    }

    /// [`Transform::undo`] (`to_hf`) or [`Transform::apply`].
    fn run(
        &self,
        window: &mut [f32],
        first_row: u64,
        hf_rows: u64,
        row_len: usize,
        scratch: &mut Vec<f32>,
        to_hf: bool,
    ) -> Result<(), TransformError> {
        match *self {
            Transform::AddOne => {
                let one = if to_hf { -1.0 } else { 1.0 };
                for x in window.iter_mut() {
                    *x += one;
                }
                Ok(())
            }
            Transform::PermuteRows { .. } => {
                self.permute(window, first_row, hf_rows, row_len, scratch, to_hf)
            }
            Transform::ExpertSlice { .. } | Transform::TruncatedRows { .. } => Ok(()),
        }
    }

    fn permute(
        &self,
        window: &mut [f32],
        first_row: u64,
        hf_rows: u64,
        row_len: usize,
        scratch: &mut Vec<f32>,
        to_hf: bool,
    ) -> Result<(), TransformError> {
        let hd = self.row_granularity(hf_rows)?;
        if window.is_empty() {
            return Ok(());
        }
        let rows = window.len().checked_div(row_len).unwrap_or(0) as u64;
        if !first_row.is_multiple_of(hd)
            || !rows.is_multiple_of(hd)
            || first_row.checked_add(rows).is_none_or(|end| end > hf_rows)
            || rows as usize * row_len != window.len()
        {
            return Err(TransformError::Window {
                first_row,
                rows,
                granule: hd,
            });
        }
        let (hd, half) = (hd as usize, hd as usize / 2);
        for head in window.chunks_exact_mut(hd * row_len) {
            scratch.clear();
            scratch.extend_from_slice(head);
            for j in 0..half {
                for i in 0..2 {
                    let gguf = 2 * j + i;
                    let hf = i * half + j;
                    let (dst, src) = if to_hf { (hf, gguf) } else { (gguf, hf) };
                    head[dst * row_len..][..row_len]
                        .copy_from_slice(&scratch[src * row_len..][..row_len]);
                }
            }
        }
        Ok(())
    }
}

/// One GGUF tensor paired with one HF tensor name.
#[derive(Debug, Clone, PartialEq)]
pub struct NamePair {
    /// The GGUF tensor's name.
    pub gguf: String,
    /// The HF tensor's name.
    pub hf: String,
    /// The HF shape expected (the GGUF shape reversed, less the expert dimension).
    pub hf_shape: Vec<u64>,
    /// What to undo, in order, to turn GGUF values into HF values.
    pub transforms: Vec<Transform>,
}

/// The name alignment of a GGUF file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NameMap {
    /// `general.architecture`, when present.
    pub architecture: Option<String>,
    /// Whether a map for the architecture was used (otherwise names are GGUF names).
    pub mapped: bool,
    /// The pairs, in GGUF tensor order (a stacked-expert tensor gives one per expert).
    pub pairs: Vec<NamePair>,
    /// GGUF tensors with no HF counterpart (generated by the converter, or unknown).
    pub gguf_only: Vec<String>,
    /// Problems to report (no map for the architecture, missing head counts, …).
    pub warnings: Vec<String>,
}

/// Hyperparameters the transforms need, from the GGUF metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hparams {
    /// `{arch}.attention.head_count`, per block (one value repeated when scalar).
    pub head_count: Option<PerBlock>,
    /// `{arch}.attention.head_count_kv`, per block.
    pub head_count_kv: Option<PerBlock>,
}

/// A hyperparameter that is one number or one per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerBlock {
    All(u64),
    Each(Vec<u64>),
}

impl PerBlock {
    fn get(&self, block: u64) -> Option<u64> {
        match self {
            PerBlock::All(v) => Some(*v),
            PerBlock::Each(v) => v.get(usize::try_from(block).ok()?).copied(),
        }
    }
}

impl Hparams {
    /// Reads the head counts of `file`'s architecture.
    pub fn from_file(file: &GgufFile) -> Hparams {
        let per_block = |suffix: &str| -> Option<PerBlock> {
            let key = format!("{}.{suffix}", file.architecture()?);
            let v = file.get(&key)?;
            if let Some(x) = v.as_int() {
                return u64::try_from(x).ok().map(PerBlock::All);
            }
            let ints = v.as_array()?.as_ints()?;
            ints.into_iter()
                .map(|x| u64::try_from(x).ok())
                .collect::<Option<Vec<_>>>()
                .map(PerBlock::Each)
        };
        Hparams {
            head_count: per_block("attention.head_count"),
            head_count_kv: per_block("attention.head_count_kv"),
        }
    }
}

/// The per-architecture facts the mapper needs.
struct ArchMap {
    /// (GGUF top-level stem, HF name stem).
    top: &'static [(&'static str, &'static str)],
    /// (GGUF block stem, HF stem under `model.layers.N.`).
    block: &'static [(&'static str, &'static str)],
    /// (GGUF block stem of a stacked-expert tensor, HF stem with `{e}` for the expert).
    experts: &'static [(&'static str, &'static str)],
    /// GGUF tensors the converter generates.
    generated: &'static [&'static str],
    permute_qk: bool,
    norm_plus_one: bool,
    truncated_embedding: bool,
}

const TOP: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Gemma and Gemma2 tie the output to the embedding; the converter drops `lm_head`.
const TOP_TIED: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
];

const ATTN: [(&str, &str); 5] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
];

const MLP: [(&str, &str); 3] = [
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

const FFN_NORM: (&str, &str) = ("ffn_norm", "post_attention_layernorm");
const QK_NORM: [(&str, &str); 2] = [
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];

const fn concat<const A: usize, const B: usize, const C: usize>(
    a: [(&'static str, &'static str); A],
    b: [(&'static str, &'static str); B],
) -> [(&'static str, &'static str); C] {
    assert!(A + B == C);
    let mut out = [("", ""); C];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < C {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

const LLAMA_BLOCK: [(&str, &str); 10] = concat(
    concat::<5, 3, 8>(ATTN, MLP),
    [FFN_NORM, ("ffn_gate_inp", "block_sparse_moe.gate")],
);
const QWEN2_BLOCK: [(&str, &str); 9] = concat(concat::<5, 3, 8>(ATTN, MLP), [FFN_NORM]);
const QWEN3_BLOCK: [(&str, &str); 11] = concat(QWEN2_BLOCK, QK_NORM);
const QWEN3MOE_BLOCK: [(&str, &str); 9] = concat(
    concat::<5, 2, 7>(ATTN, QK_NORM),
    [FFN_NORM, ("ffn_gate_inp", "mlp.gate")],
);
const QWEN2MOE_BLOCK: [(&str, &str); 11] = concat(
    ATTN,
    [
        FFN_NORM,
        ("ffn_gate_inp", "mlp.gate"),
        ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
        ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
        ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
        ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
    ],
);
const GEMMA_BLOCK: [(&str, &str); 9] = QWEN2_BLOCK;
const GEMMA2_BLOCK: [(&str, &str); 11] = concat(
    concat::<5, 3, 8>(ATTN, MLP),
    [
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("post_attention_norm", "post_attention_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
    ],
);
const GEMMA3_BLOCK: [(&str, &str); 13] = concat(GEMMA2_BLOCK, QK_NORM);
const PHI3_BLOCK: [(&str, &str); 5] = [
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    FFN_NORM,
    ("ffn_up", "mlp.gate_up_proj"),
];
const PHI3_BLOCK_FULL: [(&str, &str); 6] = concat(PHI3_BLOCK, [("ffn_down", "mlp.down_proj")]);

const QWEN_EXPERTS: &[(&str, &str)] = &[
    ("ffn_gate_exps", "mlp.experts.{e}.gate_proj"),
    ("ffn_up_exps", "mlp.experts.{e}.up_proj"),
    ("ffn_down_exps", "mlp.experts.{e}.down_proj"),
];
/// Mixtral (llama architecture): w1 is the gate, w3 the up and w2 the down projection.
const MIXTRAL_EXPERTS: &[(&str, &str)] = &[
    ("ffn_gate_exps", "block_sparse_moe.experts.{e}.w1"),
    ("ffn_up_exps", "block_sparse_moe.experts.{e}.w3"),
    ("ffn_down_exps", "block_sparse_moe.experts.{e}.w2"),
];

fn arch_map(arch: &str) -> Option<ArchMap> {
    let base = ArchMap {
        top: TOP,
        block: &QWEN2_BLOCK,
        experts: &[],
        generated: &["rope_freqs"],
        permute_qk: false,
        norm_plus_one: false,
        truncated_embedding: false,
    };
    Some(match arch {
        "llama" | "mistral" => ArchMap {
            block: &LLAMA_BLOCK,
            experts: MIXTRAL_EXPERTS,
            permute_qk: true,
            ..base
        },
        "qwen2" => base,
        "qwen3" => ArchMap {
            block: &QWEN3_BLOCK,
            ..base
        },
        "qwen2moe" => ArchMap {
            block: &QWEN2MOE_BLOCK,
            experts: QWEN_EXPERTS,
            ..base
        },
        "qwen3moe" => ArchMap {
            block: &QWEN3MOE_BLOCK,
            experts: QWEN_EXPERTS,
            ..base
        },
        "gemma" => ArchMap {
            top: TOP_TIED,
            block: &GEMMA_BLOCK,
            norm_plus_one: true,
            ..base
        },
        "gemma2" => ArchMap {
            top: TOP_TIED,
            block: &GEMMA2_BLOCK,
            norm_plus_one: true,
            ..base
        },
        "gemma3" => ArchMap {
            block: &GEMMA3_BLOCK,
            norm_plus_one: true,
            truncated_embedding: true,
            ..base
        },
        "phi3" => ArchMap {
            block: &PHI3_BLOCK_FULL,
            generated: &["rope_factors_long", "rope_factors_short"],
            ..base
        },
        _ => return None,
    })
}

/// The architectures with a name map.
pub const MAPPED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3",
    "phi3",
];

/// The name alignment of an opened file.
pub fn map_file(file: &GgufFile) -> NameMap {
    map_tensors(
        file.architecture(),
        &Hparams::from_file(file),
        file.tensors(),
    )
}

/// The name alignment of `tensors` for architecture `arch` (pure: tests call it directly).
pub fn map_tensors(arch: Option<&str>, hp: &Hparams, tensors: &[GgufTensor]) -> NameMap {
    let mut map = NameMap {
        architecture: arch.map(str::to_string),
        ..NameMap::default()
    };
    let Some(am) = arch.and_then(arch_map) else {
        map.warnings.push(match arch {
            Some(a) => format!(
                "no GGUF name map for architecture `{a}` (mapped: {}): tensors are paired by \
                 their GGUF names, and converter transforms are not undone",
                MAPPED_ARCHITECTURES.join(", ")
            ),
            None => "GGUF file has no general.architecture: tensors are paired by their GGUF \
                     names"
                .to_string(),
        });
        map.pairs = tensors
            .iter()
            .map(|t| NamePair {
                gguf: t.name.clone(),
                hf: t.name.clone(),
                hf_shape: t.shape(),
                transforms: Vec::new(),
            })
            .collect();
        return map;
    };
    map.mapped = true;
    let mut missing_heads = false;
    for t in tensors {
        let (stem, suffix) = match t.name.rsplit_once('.') {
            Some((s, suf @ ("weight" | "bias"))) => (s, suf),
            _ => (t.name.as_str(), ""),
        };
        let with_suffix = |hf: String| {
            if suffix.is_empty() {
                hf
            } else {
                format!("{hf}.{suffix}")
            }
        };
        let mut transforms = Vec::new();
        if am.norm_plus_one && suffix == "weight" && stem.ends_with("norm") {
            // The converter tests the HF name for `norm.weight`; every GGUF norm mapped
            // here comes from such a name.
            transforms.push(Transform::AddOne);
        }
        if let Some(&(_, hf)) = am.top.iter().find(|(g, _)| *g == stem) {
            if am.truncated_embedding && stem == "token_embd" {
                transforms.push(Transform::TruncatedRows {
                    rows: t.shape().first().copied().unwrap_or(0),
                });
            }
            map.pairs.push(NamePair {
                gguf: t.name.clone(),
                hf: with_suffix(hf.to_string()),
                hf_shape: t.shape(),
                transforms,
            });
            continue;
        }
        let block = stem
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(n, rest)| Some((n.parse::<u64>().ok()?, n, rest)));
        let Some((bid, bid_str, rest)) = block else {
            map.gguf_only.push(t.name.clone());
            continue;
        };
        let layer = format!("model.layers.{bid_str}.");
        if let Some(&(_, hf)) = am.block.iter().find(|(g, _)| *g == rest) {
            if am.permute_qk && (rest == "attn_q" || rest == "attn_k") {
                let heads = if rest == "attn_q" {
                    hp.head_count.as_ref().and_then(|h| h.get(bid))
                } else {
                    hp.head_count_kv
                        .as_ref()
                        .or(hp.head_count.as_ref())
                        .and_then(|h| h.get(bid))
                };
                match heads {
                    Some(heads) => transforms.push(Transform::PermuteRows { heads }),
                    None => missing_heads = true,
                }
            }
            map.pairs.push(NamePair {
                gguf: t.name.clone(),
                hf: with_suffix(format!("{layer}{hf}")),
                hf_shape: t.shape(),
                transforms,
            });
            continue;
        }
        if let Some(&(_, hf)) = am.experts.iter().find(|(g, _)| *g == rest) {
            let shape = t.shape();
            let n_experts = shape.first().copied().unwrap_or(0);
            for e in 0..n_experts {
                let mut transforms = transforms.clone();
                transforms.push(Transform::ExpertSlice {
                    expert: e,
                    n_experts,
                });
                map.pairs.push(NamePair {
                    gguf: t.name.clone(),
                    hf: with_suffix(format!("{layer}{}", hf.replace("{e}", &e.to_string()))),
                    hf_shape: shape[1..].to_vec(),
                    transforms,
                });
            }
            continue;
        }
        map.gguf_only.push(t.name.clone());
    }
    let unknown: Vec<&String> = map
        .gguf_only
        .iter()
        .filter(|n| {
            let stem = n.strip_suffix(".weight").unwrap_or(n);
            !am.generated.contains(&stem)
        })
        .collect();
    if !unknown.is_empty() {
        map.warnings.push(format!(
            "{} GGUF tensor(s) have no Hugging Face name in the `{}` map (first: `{}`)",
            unknown.len(),
            arch.unwrap_or_default(),
            unknown[0]
        ));
    }
    if missing_heads {
        map.warnings.push(format!(
            "{}.attention.head_count is missing: the Q/K row permutation cannot be undone, so \
             attn_q/attn_k will differ from the original by a row order",
            arch.unwrap_or_default()
        ));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::super::GgmlType;
    use super::*;

    fn t(name: &str, dims: &[u64]) -> GgufTensor {
        GgufTensor {
            name: name.to_string(),
            ggml_type: GgmlType::F32,
            dims: dims.to_vec(),
            offset: 0,
            nbytes: 0,
        }
    }

    fn heads(q: u64, kv: u64) -> Hparams {
        Hparams {
            head_count: Some(PerBlock::All(q)),
            head_count_kv: Some(PerBlock::All(kv)),
        }
    }

    #[test]
    fn the_row_permutation_round_trips_and_matches_the_converters_formula() {
        // Two heads of 4 rows, rows of 3 elements; row r holds the value r.
        let p = Transform::PermuteRows { heads: 2 };
        let hf: Vec<f32> = (0..8).flat_map(|r| [r as f32; 3]).collect();
        let mut w = hf.clone();
        let mut scratch = Vec::new();
        p.apply(&mut w, 0, 8, 3, &mut scratch).unwrap();
        // reshape(2 heads, 2, 2).swapaxes(1, 2): head rows [0 1 2 3] → [0 2 1 3].
        let rows: Vec<f32> = w.chunks(3).map(|r| r[0]).collect();
        assert_eq!(rows, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        for g in 0..8 {
            assert_eq!(p.hf_row(g, 8).unwrap() as f32, rows[g as usize]);
        }
        p.undo(&mut w, 0, 8, 3, &mut scratch).unwrap();
        assert_eq!(w, hf);
    }

    #[test]
    fn windows_must_hold_whole_heads() {
        let p = Transform::PermuteRows { heads: 2 };
        let mut w = vec![0f32; 6];
        assert!(p.undo(&mut w, 0, 8, 3, &mut Vec::new()).is_err());
        assert!(p.undo(&mut [0f32; 12], 4, 8, 3, &mut Vec::new()).is_ok());
        assert!(
            Transform::PermuteRows { heads: 3 }
                .row_granularity(8)
                .is_err()
        );
    }

    #[test]
    fn llama_maps_names_and_permutes_q_with_heads_and_k_with_kv_heads() {
        let ts = [
            t("token_embd.weight", &[16, 100]),
            t("blk.0.attn_q.weight", &[16, 16]),
            t("blk.0.attn_k.weight", &[16, 8]),
            t("blk.0.ffn_norm.weight", &[16]),
            t("rope_freqs.weight", &[4]),
        ];
        let m = map_tensors(Some("llama"), &heads(4, 2), &ts);
        assert!(m.mapped && m.warnings.is_empty(), "{:?}", m.warnings);
        assert_eq!(m.pairs[0].hf, "model.embed_tokens.weight");
        assert_eq!(m.pairs[0].hf_shape, vec![100, 16]);
        assert_eq!(m.pairs[1].hf, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(
            m.pairs[1].transforms,
            vec![Transform::PermuteRows { heads: 4 }]
        );
        assert_eq!(
            m.pairs[2].transforms,
            vec![Transform::PermuteRows { heads: 2 }]
        );
        assert_eq!(
            m.pairs[3].hf,
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(m.gguf_only, vec!["rope_freqs.weight"]);
    }

    #[test]
    fn qwen_models_are_not_permuted_and_gemma_norms_lose_their_one() {
        let q = map_tensors(
            Some("qwen2"),
            &heads(4, 2),
            &[t("blk.3.attn_q.bias", &[16])],
        );
        assert_eq!(q.pairs[0].hf, "model.layers.3.self_attn.q_proj.bias");
        assert!(q.pairs[0].transforms.is_empty());
        let g = map_tensors(
            Some("gemma3"),
            &heads(4, 2),
            &[
                t("blk.1.post_ffw_norm.weight", &[8]),
                t("blk.1.attn_q_norm.weight", &[8]),
                t("blk.1.attn_q.weight", &[8, 8]),
                t("token_embd.weight", &[8, 50]),
            ],
        );
        assert_eq!(
            g.pairs[0].hf,
            "model.layers.1.post_feedforward_layernorm.weight"
        );
        assert_eq!(g.pairs[0].transforms, vec![Transform::AddOne]);
        assert_eq!(g.pairs[1].transforms, vec![Transform::AddOne]);
        assert!(g.pairs[2].transforms.is_empty());
        assert_eq!(
            g.pairs[3].transforms,
            vec![Transform::TruncatedRows { rows: 50 }]
        );
    }

    #[test]
    fn stacked_experts_pair_with_each_hf_expert() {
        let m = map_tensors(
            Some("qwen3moe"),
            &heads(4, 2),
            &[t("blk.0.ffn_down_exps.weight", &[6, 4, 3])],
        );
        assert_eq!(m.pairs.len(), 3);
        assert_eq!(
            m.pairs[2].hf,
            "model.layers.0.mlp.experts.2.down_proj.weight"
        );
        assert_eq!(m.pairs[2].hf_shape, vec![4, 6]);
        let slice = &m.pairs[2].transforms[0];
        assert_eq!(slice.gguf_elements(&[3, 4, 6]).unwrap(), 48..72);
    }

    #[test]
    fn an_unmapped_architecture_pairs_by_gguf_name_with_a_warning() {
        let m = map_tensors(
            Some("mamba"),
            &Hparams::default(),
            &[t("blk.0.ssm_in.weight", &[4])],
        );
        assert!(!m.mapped);
        assert_eq!(m.pairs[0].hf, "blk.0.ssm_in.weight");
        assert!(m.warnings[0].contains("mamba"), "{:?}", m.warnings);
    }

    #[test]
    fn missing_head_counts_are_warned_about() {
        let m = map_tensors(
            Some("llama"),
            &Hparams::default(),
            &[t("blk.0.attn_q.weight", &[4, 4])],
        );
        assert!(m.pairs[0].transforms.is_empty());
        assert!(
            m.warnings.iter().any(|w| w.contains("head_count")),
            "{:?}",
            m.warnings
        );
    }
}
