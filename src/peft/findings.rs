//! What the low-rank stage found and the adapter made of it: the spectra and verdict,
//! the extracted modules and the tensors saved whole. The writer
//! ([`super::adapter`]) and every LoRA report render from a [`LoraReport`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How an extracted module is stored in the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// `lora_A.weight` [r, in], `lora_B.weight` [out, r].
    Linear,
    /// `lora_embedding_A` [r, vocab], `lora_embedding_B` [hidden, r].
    Embedding,
    /// A GPT-2-style `Conv1D`, weight stored [in, out]: `lora_A.weight` [r, in],
    /// `lora_B.weight` [out, r], with `fan_in_fan_out`.
    Conv1d,
}

/// One module's extracted LoRA.
#[derive(Debug, Clone)]
pub struct ExtractedModule {
    /// Tensor name (aligned).
    pub tensor: String,
    /// Module path (the tensor name without `.weight`).
    pub module: String,
    pub kind: ModuleKind,
    pub factors: crate::lowrank::extract::Factors,
    /// Δ of the module's bias, written as `lora_B.bias` when the adapter uses `lora_bias`.
    pub bias: Option<Vec<f64>>,
}

/// A tensor saved whole through PEFT's `modules_to_save` (changed 1-D tensors).
#[derive(Debug, Clone)]
pub struct SavedTensor {
    /// Key in the adapter file.
    pub key: String,
    pub dtype: crate::checkpoint::dtype::DType,
    pub shape: Vec<usize>,
    /// Fine-tuned bytes, as stored.
    pub bytes: Vec<u8>,
}

/// Everything the low-rank stage found; the LoRA reports and the adapter are rendered
/// from it.
#[derive(Debug, Clone)]
pub struct LoraReport {
    pub options: crate::lowrank::LowRankOptions,
    /// Storage dtype of the factors as asked (`None`: each base tensor's).
    pub dtype: Option<crate::checkpoint::dtype::DType>,
    /// Every module padded or cut to one rank (`--uniform-rank`).
    pub uniform_rank: Option<usize>,
    /// `base_model_name_or_path` of the adapter config.
    pub base_model: String,
    /// `revision` of the adapter config: the base's commit when it came from the hub.
    pub base_revision: Option<String>,
    /// Analysed 2-D deltas, natural order.
    pub spectra: Vec<(String, crate::lowrank::TensorSpectrum)>,
    pub verdict: crate::lowrank::detect::Verdict,
    /// Extracted modules, natural order (empty when only analysing).
    pub extracted: Vec<ExtractedModule>,
    /// Module paths saved whole, and their tensors.
    pub modules_to_save: Vec<String>,
    pub saved: Vec<SavedTensor>,
    /// Changed tensors left out of the adapter, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Tensors whose analysis failed.
    pub errors: BTreeMap<String, String>,
    /// Matrices not analysed because the stage was stopped; the report is complete
    /// only when this is empty.
    pub not_analysed: Vec<String>,
    /// Wall-clock seconds of the stage after the diff.
    pub total_time: f64,
    /// Matrices analysed during the diff, while their bytes were in the page cache, and
    /// the seconds of those analyses summed over the diff's workers (in the diff's wall
    /// time, not in `total_time`).
    pub during_diff: (usize, f64),
    /// The model facts the adapter follows (task type, module kinds).
    pub facts: crate::peft::ModelFacts,
    /// The runtime the adapter is written for.
    pub profile: crate::peft::Profile,
    /// Bias deltas of the LoRA modules are in the adapter (`lora_bias`).
    pub lora_bias: bool,
    /// `target_modules` of the adapter config.
    pub target_modules: crate::peft::TargetModules,
    /// Notes on the adapter for every report (a missing task type, a profile's limits).
    pub notes: Vec<String>,
}

impl LoraReport {
    /// Every modified matrix was analysed (the stage was not stopped).
    pub fn complete(&self) -> bool {
        self.not_analysed.is_empty()
    }
}
