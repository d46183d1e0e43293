//! A synthetic checkpoint builder: Qwen3/Llama-style base models in Hugging Face
//! layout, and fine-tuned copies made from known edits. Tests, `weightdiff demo` and
//! the benchmarks use it, so every expected result is known by construction.
//!
//! Edits of the fine-tuned copy:
//! - untouched tensors are byte-identical;
//! - a merged LoRA of rank r on chosen module types: W + (alpha/r)·B·A, computed in
//!   f64 and rounded once to the storage dtype;
//! - dense noise on tensors matching a regex: W + N(0, (rel·scale)²) with scale the
//!   mean |W| of the tensor's kind.
//!
//! Values come from a small counter-based generator seeded by (seed, tensor name), so a
//! tensor's values do not depend on shard size or write order. It is written here rather
//! than taken from `rand` because `rand` does not promise the same stream across
//! versions, and fixtures must not change under a dependency update.

use crate::checkpoint::dtype::DType;
use crate::checkpoint::dtype::encode;
use crate::error::{Error, Result};
use crate::fsio::write_atomic;
pub use crate::rng::Gaussian;
use regex::Regex;
use safetensors::View;
use serde_json::json;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Transformer dimensions (the `config.json` fields that set tensor shapes).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
}

impl ModelShape {
    /// A named preset: `tiny` (unit tests, demo) or `qwen3-0.6b` (the real Qwen3-0.6B
    /// shapes, for benchmarks).
    pub fn preset(name: &str) -> Result<ModelShape> {
        match name {
            "tiny" => Ok(ModelShape {
                hidden_size: 64,
                intermediate_size: 192,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                vocab_size: 1000,
                tie_word_embeddings: false,
            }),
            "qwen3-0.6b" => Ok(ModelShape {
                hidden_size: 1024,
                intermediate_size: 3072,
                num_hidden_layers: 28,
                num_attention_heads: 16,
                num_key_value_heads: 8,
                head_dim: 128,
                vocab_size: 151936,
                tie_word_embeddings: true,
            }),
            other => Err(Error::InvalidOption(format!(
                "unknown preset `{other}` (choose tiny or qwen3-0.6b)"
            ))),
        }
    }

    /// Tensors in `state_dict` order: (name, shape, kind).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Kind)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
            Kind::Embedding,
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let lin =
                |n: &str, o: usize, i: usize| (format!("{p}{n}.weight"), vec![o, i], Kind::Linear);
            let norm = |n: &str, d: usize| (format!("{p}{n}.weight"), vec![d], Kind::Norm);
            v.extend([
                lin("self_attn.q_proj", q, h),
                lin("self_attn.k_proj", kv, h),
                lin("self_attn.v_proj", kv, h),
                lin("self_attn.o_proj", h, q),
                norm("self_attn.q_norm", hd),
                norm("self_attn.k_norm", hd),
                lin("mlp.gate_proj", i, h),
                lin("mlp.up_proj", i, h),
                lin("mlp.down_proj", h, i),
                norm("input_layernorm", h),
                norm("post_attention_layernorm", h),
            ]);
        }
        v.push(("model.norm.weight".to_string(), vec![h], Kind::Norm));
        if !self.tie_word_embeddings {
            v.push((
                "lm_head.weight".to_string(),
                vec![self.vocab_size, h],
                Kind::Embedding,
            ));
        }
        v
    }

    /// A Qwen3-style `config.json`.
    pub fn config(&self, dtype: DType) -> serde_json::Value {
        json!({
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000,
            "max_position_embeddings": 40960,
            "torch_dtype": match dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
        })
    }
}

/// What a tensor is, which sets how its base values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedding,
    Linear,
    Norm,
}

/// A merged LoRA edit.
#[derive(Debug, Clone)]
pub struct LoraEdit {
    pub rank: usize,
    /// Scaling is alpha / rank.
    pub alpha: f64,
    /// Module types (`q_proj`, `v_proj`, …) that receive it.
    pub modules: Vec<String>,
    /// Expected ‖ΔW‖ / ‖W‖ of each edited tensor.
    pub delta_rel: f64,
    /// Only layers in this set, when given (tensors outside the layers, such as the
    /// embeddings, are edited when their module is listed).
    pub layers: Option<Vec<usize>>,
}

/// Dense noise on tensors whose name matches.
#[derive(Debug, Clone)]
pub struct NoiseEdit {
    pub pattern: Regex,
    /// Noise standard deviation relative to the tensor kind's typical |w|.
    pub rel: f64,
}

/// Everything that defines a synthetic pair.
#[derive(Debug, Clone)]
pub struct PairSpec {
    pub shape: ModelShape,
    pub dtype: DType,
    pub seed: u64,
    /// Split into shards of at most this many bytes; `None` writes `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    /// Write `model.safetensors.index.json` for sharded models.
    pub write_index: bool,
    pub lora: Option<LoraEdit>,
    pub noise: Option<NoiseEdit>,
}

impl PairSpec {
    /// The `tiny` preset in bf16, one file, no edits.
    pub fn tiny() -> PairSpec {
        PairSpec {
            shape: ModelShape::preset("tiny").expect("tiny is a preset"),
            dtype: DType::BF16,
            seed: 0,
            max_shard_bytes: None,
            write_index: true,
            lora: None,
            noise: None,
        }
    }
}

/// How the builder changed a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    Lora { rank: usize },
    Noise,
}

/// A written pair and its ground truth.
#[derive(Debug, Clone)]
pub struct BuiltPair {
    pub base: PathBuf,
    pub finetuned: PathBuf,
    /// Tensors the builder edited.
    pub edits: BTreeMap<String, Edit>,
}

/// Standard deviation of base linear and embedding weights.
const WEIGHT_STD: f64 = 0.02;

/// Writes `out/base` and `out/finetuned`.
pub fn build_pair(spec: &PairSpec, out: &Path) -> Result<BuiltPair> {
    if !spec.dtype.is_f32_domain() || spec.dtype.size() < 2 {
        return Err(Error::InvalidOption(format!(
            "synthetic models are stored as BF16, F16 or F32, not {}",
            spec.dtype
        )));
    }
    let spec = Arc::new(spec.clone());
    let plan = spec.shape.tensors();
    let mut edits = BTreeMap::new();
    for (name, _, kind) in &plan {
        if let Some(e) = edit_of(&spec, name, *kind) {
            edits.insert(name.clone(), e);
        }
    }
    let base = out.join("base");
    let finetuned = out.join("finetuned");
    for (dir, fine) in [(&base, false), (&finetuned, true)] {
        write_model(&spec, &plan, dir, fine)?;
    }
    Ok(BuiltPair {
        base,
        finetuned,
        edits,
    })
}

fn edit_of(spec: &PairSpec, name: &str, kind: Kind) -> Option<Edit> {
    if let Some(l) = &spec.lora {
        let module = crate::pairing::module_type(name);
        let layer_ok = match (&l.layers, crate::pairing::layer_index(name)) {
            (None, _) => true,
            (Some(ls), Some(i)) => ls.contains(&i),
            // Embeddings and the head belong to no layer: the module list decides.
            (Some(_), None) => true,
        };
        if kind != Kind::Norm && layer_ok && l.modules.contains(&module) {
            return Some(Edit::Lora { rank: l.rank });
        }
    }
    if let Some(n) = &spec.noise
        && n.pattern.is_match(name)
    {
        return Some(Edit::Noise);
    }
    None
}

fn write_model(
    spec: &Arc<PairSpec>,
    plan: &[(String, Vec<usize>, Kind)],
    dir: &Path,
    finetuned: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create directory", e))?;
    let esize = spec.dtype.size() as u64;
    // Greedy split in state_dict order, as huggingface_hub does.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, (_, shape, _)) in plan.iter().enumerate() {
        let nbytes = shape.iter().product::<usize>() as u64 * esize;
        if let Some(max) = spec.max_shard_bytes
            && cur > 0
            && cur + nbytes > max
        {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        cur += nbytes;
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (si, members) in shards.iter().enumerate() {
        let file = if spec.max_shard_bytes.is_none() {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", si + 1)
        };
        let views: Vec<(String, LazyTensor)> = members
            .iter()
            .map(|&i| {
                let (name, shape, kind) = &plan[i];
                weight_map.insert(name.clone(), file.clone());
                total += shape.iter().product::<usize>() as u64 * esize;
                (
                    name.clone(),
                    LazyTensor {
                        spec: spec.clone(),
                        name: name.clone(),
                        shape: shape.clone(),
                        kind: *kind,
                        finetuned,
                    },
                )
            })
            .collect();
        let path = dir.join(&file);
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| Error::io(&path, "cannot write", std::io::Error::other(e.to_string())))?;
    }
    if spec.max_shard_bytes.is_some() && spec.write_index {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(
            &dir.join("model.safetensors.index.json"),
            &crate::fsio::to_json(&index),
        )?;
    }
    write_atomic(
        &dir.join("config.json"),
        &crate::fsio::to_json(&spec.shape.config(spec.dtype)),
    )?;
    Ok(())
}

/// A tensor whose bytes are generated when the writer asks for them, so a shard is
/// written holding one tensor in memory at a time.
struct LazyTensor {
    spec: Arc<PairSpec>,
    name: String,
    shape: Vec<usize>,
    kind: Kind,
    finetuned: bool,
}

impl View for LazyTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.spec.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(tensor_bytes(
            &self.spec,
            &self.name,
            &self.shape,
            self.kind,
            self.finetuned,
        ))
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.spec.dtype.size()
    }
}

/// The stored bytes of one tensor of the base or fine-tuned model.
pub fn tensor_bytes(
    spec: &PairSpec,
    name: &str,
    shape: &[usize],
    kind: Kind,
    finetuned: bool,
) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut values = base_values(spec.seed, name, n, kind);
    if finetuned {
        // Edits apply to the stored base, as a merge does on a loaded checkpoint: the
        // delta then carries one rounding (of the fine-tuned value), not two.
        crate::lowrank::extract::round_slice(spec.dtype, &mut values);
        match edit_of(spec, name, kind) {
            Some(Edit::Lora { .. }) => {
                let l = spec.lora.as_ref().expect("lora edit implies lora spec");
                add_lora(spec.seed, name, shape, l, &mut values);
            }
            Some(Edit::Noise) => {
                let nz = spec.noise.as_ref().expect("noise edit implies noise spec");
                let scale = if kind == Kind::Norm { 1.0 } else { WEIGHT_STD };
                let mut g = Gaussian::new(spec.seed, name, "noise");
                for v in &mut values {
                    *v += g.next() * nz.rel * scale;
                }
            }
            None => {}
        }
    }
    encode(spec.dtype, &values).expect("build_pair accepts float dtypes only")
}

fn base_values(seed: u64, name: &str, n: usize, kind: Kind) -> Vec<f64> {
    let mut g = Gaussian::new(seed, name, "base");
    (0..n)
        .map(|_| match kind {
            Kind::Norm => 1.0 + 0.1 * g.next(),
            _ => WEIGHT_STD * g.next(),
        })
        .collect()
}

/// Adds (alpha/r)·B·A with A [r, in] ~ N(0, 1/in) and B [out, r] scaled so that
/// E‖ΔW‖ = delta_rel · WEIGHT_STD · sqrt(out·in), the convention of
/// `../shared/bench/make_pair.py`.
fn add_lora(seed: u64, name: &str, shape: &[usize], l: &LoraEdit, w: &mut [f64]) {
    let (out, inp, r) = (shape[0], shape[1], l.rank);
    let scaling = l.alpha / r as f64;
    let mut g = Gaussian::new(seed, name, "lora");
    let a: Vec<f64> = (0..r * inp)
        .map(|_| g.next() / (inp as f64).sqrt())
        .collect();
    let b_std = l.delta_rel * WEIGHT_STD * (inp as f64).sqrt() / (scaling * (r as f64).sqrt());
    let b: Vec<f64> = (0..out * r).map(|_| g.next() * b_std).collect();
    for i in 0..out {
        let row = &mut w[i * inp..(i + 1) * inp];
        for k in 0..r {
            let bik = b[i * r + k] * scaling;
            let ak = &a[k * inp..(k + 1) * inp];
            for (x, &y) in row.iter_mut().zip(ak) {
                *x += bik * y;
            }
        }
    }
}

/// The pair `weightdiff demo` builds: the `tiny` preset in bf16, sharded with an index,
/// a rank-4 LoRA merged into q_proj and v_proj of every layer, and dense noise on the
/// norms of layer 1.
pub fn demo_spec() -> PairSpec {
    PairSpec {
        max_shard_bytes: Some(100_000),
        lora: Some(LoraEdit {
            rank: 4,
            alpha: 8.0,
            modules: vec!["q_proj".into(), "v_proj".into()],
            delta_rel: 0.05,
            layers: None,
        }),
        noise: Some(NoiseEdit {
            pattern: Regex::new(r"^model\.layers\.1\..*norm\.weight$").expect("valid regex"),
            rel: 0.01,
        }),
        ..PairSpec::tiny()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_is_deterministic_and_roughly_standard() {
        let mut g = Gaussian::new(1, "x", "base");
        let v: Vec<f64> = (0..20000).map(|_| g.next()).collect();
        let mut h = Gaussian::new(1, "x", "base");
        assert_eq!(v[..10], (0..10).map(|_| h.next()).collect::<Vec<_>>()[..]);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn presets_have_the_documented_shapes() {
        let q = ModelShape::preset("qwen3-0.6b").unwrap();
        let params: usize = q
            .tensors()
            .iter()
            .map(|t| t.1.iter().product::<usize>())
            .sum();
        // Qwen3-0.6B has 596M parameters with tied embeddings.
        assert_eq!(params, 596_049_920);
        assert_eq!(q.tensors().len(), 1 + 28 * 11 + 1);
        assert!(ModelShape::preset("nope").is_err());
    }
}
