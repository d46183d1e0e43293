//! PEFT LoRA adapters: what PEFT can load, and how a checkpoint's tensors map onto it.
//!
//! An adapter only reproduces the fine-tune if PEFT builds the same modules from its
//! config that the file has tensors for. The rules here follow what PEFT (0.21) and
//! transformers (5.x) do with a checkpoint, read off their sources:
//!
//! - **Task type** ([`TaskType`]) from `config.json`'s `architectures`: it picks the
//!   `PeftModelFor…` class, and the classification ones add their head (`classifier`,
//!   `score`, `qa_outputs`) to `modules_to_save` by themselves, so the adapter must carry
//!   that head whole.
//! - **Module kind** ([`ModuleKind`]) from the tensor's role: embedding tables (token,
//!   position, token-type, T5's `shared` and relative attention bias, GPT-2's `wte`/`wpe`)
//!   are `nn.Embedding`s, adapted as `lora_embedding_A/B`; the GPT-2 family stores its
//!   projections as `Conv1D` ([in, out]), adapted with `fan_in_fan_out`; everything else
//!   2-D is an `nn.Linear`.
//! - **Tied weights**: a tensor stored once but used under several names (embeddings and
//!   LM head, T5's `shared`) is adapted once, through the input embedding; merging writes
//!   the delta into the one storage every name shares.
//! - **MoE**: transformers 5 loads the per-expert tensors of a checkpoint into fused 3-D
//!   parameters (`experts.gate_up_proj` [E, 2·I, H], `experts.down_proj` [E, H, I]) and
//!   its routers are not `nn.Linear`s: experts are adapted through PEFT's
//!   `target_parameters`, routers saved whole.
//! - **`target_modules`** names exactly the modules the file has factors for: leaf names
//!   when they match nothing else, otherwise a regular expression over full names.

pub mod adapter;
mod findings;

pub use findings::{ExtractedModule, LoraReport, ModuleKind, SavedTensor};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// PEFT's `task_type`: which `PeftModelFor…` class `PeftModel.from_pretrained` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskType {
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    #[serde(rename = "TOKEN_CLS")]
    TokenCls,
    #[serde(rename = "QUESTION_ANS")]
    QuestionAns,
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

impl TaskType {
    /// Every task type, in PEFT's spelling.
    pub const ALL: [TaskType; 6] = [
        TaskType::CausalLm,
        TaskType::Seq2SeqLm,
        TaskType::SeqCls,
        TaskType::TokenCls,
        TaskType::QuestionAns,
        TaskType::FeatureExtraction,
    ];

    /// PEFT's name (`CAUSAL_LM`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::QuestionAns => "QUESTION_ANS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    /// Parses PEFT's name, case-insensitively.
    pub fn parse(s: &str) -> Option<TaskType> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }

    /// Top-level modules the PEFT task model adds to `modules_to_save` itself
    /// (`PeftModelForSequenceClassification` and friends).
    pub fn head_modules(self) -> &'static [&'static str] {
        match self {
            TaskType::SeqCls | TaskType::TokenCls => &["classifier", "score"],
            TaskType::QuestionAns => &["qa_outputs"],
            _ => &[],
        }
    }
}

/// `--task-type`: a task type, or none (PEFT's base `PeftModel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOverride {
    None,
    Task(TaskType),
}

impl std::str::FromStr for TaskOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(TaskOverride::None);
        }
        TaskType::parse(s).map(TaskOverride::Task).ok_or_else(|| {
            let names: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
            format!(
                "unknown task type `{s}` (one of {}, none)",
                names.join(", ")
            )
        })
    }
}

/// The runtime the adapter is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Everything PEFT loads: embeddings, `modules_to_save`, `lora_bias`, per-module ranks.
    #[default]
    Peft,
    /// What vLLM loads: linear modules only, one rank from [`VLLM_RANKS`], one alpha, no bias.
    Vllm,
}

impl Profile {
    /// The name on the command line and in the JSON (`peft`, `vllm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Peft => "peft",
            Profile::Vllm => "vllm",
        }
    }
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "peft" => Ok(Profile::Peft),
            "vllm" => Ok(Profile::Vllm),
            _ => Err(format!("unknown profile `{s}` (peft or vllm)")),
        }
    }
}

/// The LoRA ranks vLLM accepts (its `--max-lora-rank` choices).
pub const VLLM_RANKS: &[usize] = &[8, 16, 32, 64, 128, 256, 320, 512];

/// The smallest rank vLLM accepts that is at least `r`.
pub fn vllm_rank(r: usize) -> Option<usize> {
    VLLM_RANKS.iter().copied().find(|&v| v >= r)
}

/// Model types whose projections are `transformers.pytorch_utils.Conv1D` (weights stored
/// [in, out]), from transformers' modeling files.
pub const CONV1D_MODEL_TYPES: &[&str] = &[
    "gpt2",
    "openai-gpt",
    "imagegpt",
    "decision_transformer",
    "clvp",
];

/// Model types whose checkpoints store experts one by one (`experts.N.gate_proj`, …) and
/// that transformers 5 loads into fused 3-D expert parameters (its conversion mapping).
pub const FUSED_EXPERT_MODEL_TYPES: &[&str] = &[
    "mixtral",
    "minimax",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_vl_moe",
    "olmoe",
    "flex_olmo",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "dots1",
    "phimoe",
];

/// Leaf names of embedding tables (`nn.Embedding`) that do not say "embed".
const EMBEDDING_LEAVES: &[&str] = &["wte", "wpe", "shared", "relative_attention_bias"];

/// What a checkpoint's config says that the adapter depends on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    /// `model_type`.
    pub model_type: Option<String>,
    /// `architectures[0]`.
    pub architecture: Option<String>,
    /// The adapter's `task_type`.
    pub task_type: Option<TaskType>,
    /// How the task type was chosen, when that needs saying (no config, an unknown class).
    pub task_note: Option<String>,
}

impl ModelFacts {
    /// Reads the facts from the fine-tuned model's `config.json` (`--task-type` wins).
    pub fn from_config(config: Option<&Value>, task: Option<TaskOverride>) -> ModelFacts {
        let get = |k: &str| config.and_then(|c| c.get(k));
        let model_type = get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string);
        let architecture = get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_string);
        let enc_dec = get("is_encoder_decoder").and_then(Value::as_bool) == Some(true);
        let (task_type, task_note) = match task {
            Some(TaskOverride::Task(t)) => (Some(t), None),
            Some(TaskOverride::None) => (None, Some("task type left out (--task-type none)".into())),
            None => match (&architecture, config) {
                (_, None) => (
                    None,
                    Some("no config.json: adapter_config.json has no task_type (PEFT's base PeftModel); give --task-type to set one".into()),
                ),
                (None, Some(_)) => (
                    None,
                    Some("config.json names no architectures: adapter_config.json has no task_type (PEFT's base PeftModel); give --task-type to set one".into()),
                ),
                (Some(a), Some(_)) => match task_of(a, enc_dec) {
                    Some(t) => (Some(t), None),
                    None => (
                        None,
                        Some(format!("PEFT has no task type for {a}: adapter_config.json has none (PEFT's base PeftModel); give --task-type to set one")),
                    ),
                },
            },
        };
        ModelFacts {
            model_type,
            architecture,
            task_type,
            task_note,
        }
    }

    /// Whether the model's projections are `Conv1D`.
    pub fn conv1d(&self) -> bool {
        self.model_type
            .as_deref()
            .is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t))
    }

    /// Whether transformers loads this model's experts into fused 3-D parameters.
    pub fn fused_experts(&self) -> bool {
        self.model_type
            .as_deref()
            .is_some_and(|t| FUSED_EXPERT_MODEL_TYPES.contains(&t))
    }

    /// How PEFT wraps the module of the 2-D weight `name`.
    pub fn kind_of(&self, name: &str) -> ModuleKind {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let leaf = module.rsplit('.').next().unwrap_or(module);
        if is_embedding_leaf(leaf) {
            ModuleKind::Embedding
        } else if self.conv1d() && leaf != "lm_head" && leaf != "score" {
            ModuleKind::Conv1d
        } else {
            ModuleKind::Linear
        }
    }

    /// The task head (`classifier`, `score`, `qa_outputs`) that `name` belongs to.
    pub fn head_of(&self, name: &str) -> Option<&'static str> {
        let first = name.split('.').next()?;
        self.task_type?
            .head_modules()
            .iter()
            .copied()
            .find(|h| *h == first && name.len() > first.len())
    }
}

/// The task type of a transformers class name.
fn task_of(arch: &str, encoder_decoder: bool) -> Option<TaskType> {
    let ends = |s: &str| arch.ends_with(s);
    if ends("ForSequenceClassification") {
        Some(TaskType::SeqCls)
    } else if ends("ForTokenClassification") {
        Some(TaskType::TokenCls)
    } else if ends("ForQuestionAnswering") {
        Some(TaskType::QuestionAns)
    } else if ends("ForConditionalGeneration") || ends("LMHeadModel") || ends("ForCausalLM") {
        // T5, BART, … are encoder-decoders; vision-language `…ForConditionalGeneration`
        // models generate causally (PEFT adapts them as CAUSAL_LM).
        Some(if encoder_decoder {
            TaskType::Seq2SeqLm
        } else {
            TaskType::CausalLm
        })
    } else if ends("Model") && !arch.contains("For") {
        Some(TaskType::FeatureExtraction)
    } else {
        None
    }
}

/// Whether a module leaf name is an embedding table.
pub fn is_embedding_leaf(leaf: &str) -> bool {
    if EMBEDDING_LEAVES.contains(&leaf) {
        return true;
    }
    // `embed_tokens`, `word_embeddings`, `position_embeddings`, `embed_positions`, … but
    // not GPT-NeoX's LM head `embed_out` nor a projection such as `embed_proj`.
    leaf.contains("embed") && leaf != "embed_out" && !leaf.ends_with("proj")
}

/// The per-expert tensor `…experts.N.{gate,up,down}_proj.weight` of a fused-expert model:
/// (experts module path, expert index, projection).
pub fn expert_of(name: &str) -> Option<(&str, usize, &str)> {
    let module = name.strip_suffix(".weight")?;
    let (rest, proj) = module.rsplit_once('.')?;
    if !matches!(
        proj,
        "gate_proj" | "up_proj" | "down_proj" | "w1" | "w2" | "w3"
    ) {
        return None;
    }
    let (experts, idx) = rest.rsplit_once('.')?;
    if !experts.ends_with("experts") {
        return None;
    }
    Some((experts, idx.parse().ok()?, proj))
}

/// Whether `module` is the router of an MoE block (`….gate` or `….router` beside an
/// `….experts` module), given a test for the existence of a name prefix.
pub fn is_router(module: &str, has_prefix: impl Fn(&str) -> bool) -> bool {
    let Some((parent, leaf)) = module.rsplit_once('.') else {
        return false;
    };
    matches!(leaf, "gate" | "router") && has_prefix(&format!("{parent}.experts."))
}

/// PEFT's `target_modules`: leaf names, or a regular expression PEFT full-matches
/// against module names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Leaves(Vec<String>),
    Regex(String),
}

/// The smallest `target_modules` that matches exactly `targets` among `all` module
/// paths of the model: the leaf names when no other module shares one, else one pattern
/// per distinct path with layer numbers generalised (`\d+`) when those match nothing
/// else, else the escaped paths themselves.
pub fn target_modules(targets: &[String], all: &[String]) -> TargetModules {
    let leaf = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
    let mut leaves: Vec<String> = targets.iter().map(|t| leaf(t)).collect();
    leaves.sort();
    leaves.dedup();
    let over = |matches: &dyn Fn(&str) -> bool| {
        all.iter()
            .any(|m| matches(m) && !targets.iter().any(|t| t == m))
    };
    if !over(&|m: &str| leaves.contains(&leaf(m))) {
        return TargetModules::Leaves(leaves);
    }
    let mut generalised: Vec<String> = targets.iter().map(|t| generalise(t)).collect();
    generalised.sort();
    generalised.dedup();
    let pattern = format!("(?:{})", generalised.join("|"));
    let re = regex::Regex::new(&format!("^{pattern}$")).expect("escaped names form a regex");
    if !over(&|m: &str| re.is_match(m)) {
        return TargetModules::Regex(pattern);
    }
    let mut exact: Vec<String> = targets.iter().map(|t| regex::escape(t)).collect();
    exact.sort();
    exact.dedup();
    TargetModules::Regex(format!("(?:{})", exact.join("|")))
}

/// A module path as a pattern with every all-digit component replaced by `\d+`.
fn generalise(path: &str) -> String {
    path.split('.')
        .map(|p| {
            if !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) {
                r"\d+".to_string()
            } else {
                regex::escape(p)
            }
        })
        .collect::<Vec<_>>()
        .join(r"\.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(config: Value) -> ModelFacts {
        ModelFacts::from_config(Some(&config), None)
    }

    #[test]
    fn task_type_follows_the_architecture() {
        let t = |arch: &str, ed: bool| {
            facts(json!({"architectures": [arch], "is_encoder_decoder": ed})).task_type
        };
        assert_eq!(t("LlamaForCausalLM", false), Some(TaskType::CausalLm));
        assert_eq!(t("GPT2LMHeadModel", false), Some(TaskType::CausalLm));
        assert_eq!(
            t("T5ForConditionalGeneration", true),
            Some(TaskType::Seq2SeqLm)
        );
        assert_eq!(
            t("LlavaForConditionalGeneration", false),
            Some(TaskType::CausalLm)
        );
        assert_eq!(
            t("BertForSequenceClassification", false),
            Some(TaskType::SeqCls)
        );
        assert_eq!(
            t("BertForTokenClassification", false),
            Some(TaskType::TokenCls)
        );
        assert_eq!(
            t("BertForQuestionAnswering", false),
            Some(TaskType::QuestionAns)
        );
        assert_eq!(t("BertModel", false), Some(TaskType::FeatureExtraction));
        assert_eq!(
            t("T5EncoderModel", false),
            Some(TaskType::FeatureExtraction)
        );
        assert_eq!(t("BertForMaskedLM", false), None);
    }

    #[test]
    fn a_missing_config_or_architecture_is_a_note() {
        let none = ModelFacts::from_config(None, None);
        assert_eq!(none.task_type, None);
        assert!(none.task_note.unwrap().contains("no config.json"));
        let f = facts(json!({"model_type": "llama"}));
        assert_eq!(f.task_type, None);
        assert!(f.task_note.unwrap().contains("no architectures"));
        let forced = ModelFacts::from_config(None, Some(TaskOverride::Task(TaskType::SeqCls)));
        assert_eq!(forced.task_type, Some(TaskType::SeqCls));
        assert_eq!("none".parse::<TaskOverride>(), Ok(TaskOverride::None));
        assert!("bogus".parse::<TaskOverride>().is_err());
    }

    #[test]
    fn module_kinds_follow_the_role() {
        let bert = facts(json!({"model_type": "bert", "architectures": ["BertModel"]}));
        for e in [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
        ] {
            assert_eq!(bert.kind_of(e), ModuleKind::Embedding, "{e}");
        }
        assert_eq!(
            bert.kind_of("encoder.layer.0.attention.self.query.weight"),
            ModuleKind::Linear
        );
        let t5 = facts(json!({"model_type": "t5"}));
        assert_eq!(t5.kind_of("shared.weight"), ModuleKind::Embedding);
        assert_eq!(
            t5.kind_of("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            ModuleKind::Embedding
        );
        let gpt2 = facts(json!({"model_type": "gpt2"}));
        assert_eq!(
            gpt2.kind_of("transformer.h.0.attn.c_attn.weight"),
            ModuleKind::Conv1d
        );
        assert_eq!(
            gpt2.kind_of("transformer.wte.weight"),
            ModuleKind::Embedding
        );
        assert_eq!(
            gpt2.kind_of("transformer.wpe.weight"),
            ModuleKind::Embedding
        );
        assert_eq!(gpt2.kind_of("score.weight"), ModuleKind::Linear);
        let neox = facts(json!({"model_type": "gpt_neox"}));
        assert_eq!(neox.kind_of("embed_out.weight"), ModuleKind::Linear);
        assert_eq!(
            neox.kind_of("gpt_neox.embed_in.weight"),
            ModuleKind::Embedding
        );
    }

    #[test]
    fn heads_are_those_of_the_task_model() {
        let cls = facts(json!({"architectures": ["BertForSequenceClassification"]}));
        assert_eq!(cls.head_of("classifier.weight"), Some("classifier"));
        assert_eq!(cls.head_of("bert.pooler.dense.weight"), None);
        let lm = facts(json!({"architectures": ["LlamaForCausalLM"]}));
        assert_eq!(lm.head_of("score.weight"), None);
    }

    #[test]
    fn experts_and_routers_are_recognised() {
        assert_eq!(
            expert_of("model.layers.3.mlp.experts.12.gate_proj.weight"),
            Some(("model.layers.3.mlp.experts", 12, "gate_proj"))
        );
        assert_eq!(expert_of("model.layers.3.mlp.gate_proj.weight"), None);
        let names = ["model.layers.0.mlp.experts.0.up_proj.weight"];
        let has = |p: &str| names.iter().any(|n| n.starts_with(p));
        assert!(is_router("model.layers.0.mlp.gate", has));
        assert!(!is_router("model.layers.0.self_attn.gate", has));
    }

    #[test]
    fn target_modules_wrap_exactly_the_extracted_modules() {
        let all: Vec<String> = [
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.output.dense",
            "encoder.layer.1.attention.self.query",
            "encoder.layer.1.attention.output.dense",
            "pooler.dense",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Leaves that match nothing else stay leaves.
        let q = vec![all[0].clone(), all[2].clone()];
        assert_eq!(
            target_modules(&q, &all),
            TargetModules::Leaves(vec!["query".into()])
        );
        // `dense` would also wrap the unchanged pooler: a generalised pattern instead.
        let d = vec![all[1].clone(), all[3].clone()];
        let TargetModules::Regex(p) = target_modules(&d, &all) else {
            panic!("expected a regex");
        };
        let re = regex::Regex::new(&format!("^{p}$")).unwrap();
        let hits: Vec<&String> = all.iter().filter(|m| re.is_match(m)).collect();
        assert_eq!(hits, vec![&all[1], &all[3]]);
        // Only layer 0's dense: the layer number cannot be generalised.
        let one = vec![all[1].clone()];
        let TargetModules::Regex(p) = target_modules(&one, &all) else {
            panic!("expected a regex");
        };
        let re = regex::Regex::new(&format!("^{p}$")).unwrap();
        assert_eq!(all.iter().filter(|m| re.is_match(m)).count(), 1);
    }

    #[test]
    fn vllm_ranks_round_up() {
        assert_eq!(vllm_rank(1), Some(8));
        assert_eq!(vllm_rank(16), Some(16));
        assert_eq!(vllm_rank(300), Some(320));
        assert_eq!(vllm_rank(513), None);
    }
}
