//! Low-rank analysis and LoRA extraction on builder pairs with known LoRA ranks.

use crate::common::*;
use std::collections::BTreeSet;
use weightdiff::checkpoint::dtype::DType;
use weightdiff::lowrank::rsvd::Precision;
use weightdiff::lowrank::{DeltaPath, LowRankOptions, Method, RankRule};
use weightdiff::pipeline::{LoraOptions, NoProgress, analyze_lora};
use weightdiff::synthetic::{BuiltPair, LoraEdit, ModelShape, NoiseEdit, PairSpec, build_pair};
use weightdiff::{Checkpoint, CompareOptions, compare};

/// A small Llama-style model, big enough for rank 16 to be well below every dimension.
fn shape() -> ModelShape {
    ModelShape {
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        vocab_size: 300,
        tie_word_embeddings: false,
    }
}

fn lora_pair(dir: &std::path::Path, rank: usize, modules: &[&str], dtype: DType) -> BuiltPair {
    lora_pair_sized(dir, rank, modules, dtype, 0.05)
}

/// A pair whose LoRA delta has ‖Δ‖ = `delta_rel`·‖W‖.
fn lora_pair_sized(
    dir: &std::path::Path,
    rank: usize,
    modules: &[&str],
    dtype: DType,
    delta_rel: f64,
) -> BuiltPair {
    let spec = PairSpec {
        shape: shape(),
        dtype,
        lora: Some(LoraEdit {
            rank,
            alpha: 2.0 * rank as f64,
            modules: modules.iter().map(|s| s.to_string()).collect(),
            delta_rel,
            layers: None,
        }),
        ..PairSpec::tiny()
    };
    build_pair(&spec, dir).unwrap()
}

/// A pair with a rank-`rank` LoRA (alpha 2·rank, 5 % of the weights) on `modules` (of
/// `layers`, or every layer) and 1 % noise on the norms matching `noise`.
fn lora_and_noise_spec(
    rank: usize,
    modules: &[&str],
    layers: Option<Vec<usize>>,
    noise: &str,
) -> PairSpec {
    PairSpec {
        shape: shape(),
        lora: Some(LoraEdit {
            rank,
            alpha: 2.0 * rank as f64,
            modules: modules.iter().map(|s| s.to_string()).collect(),
            delta_rel: 0.05,
            layers,
        }),
        noise: Some(NoiseEdit {
            pattern: regex::Regex::new(noise).unwrap(),
            rel: 0.01,
        }),
        ..PairSpec::tiny()
    }
}

fn run(pair: &BuiltPair, lora: &LoraOptions) -> weightdiff::Comparison {
    let b = Checkpoint::open(&pair.base).unwrap();
    let f = Checkpoint::open(&pair.finetuned).unwrap();
    let mut c = compare(&b, &f, &CompareOptions::default(), &NoProgress).unwrap();
    c.lora = Some(analyze_lora(&b, &f, &c, lora).unwrap());
    c
}

fn extract(rank: usize, dtype: Option<DType>) -> LoraOptions {
    LoraOptions {
        extract: true,
        dtype,
        lowrank: LowRankOptions {
            rank_rule: RankRule::Fixed { rank },
            ..Default::default()
        },
        ..Default::default()
    }
}

const ATTN: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj"];
const ALL: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[test]
fn detects_the_planted_rank_on_every_targeted_tensor() {
    for (rank, modules, dtype) in [
        (4, ATTN, DType::BF16),
        (8, ALL, DType::BF16),
        (16, ATTN, DType::F32),
        (8, ALL, DType::F16),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let pair = lora_pair(dir.path(), rank, modules, dtype);
        let c = run(&pair, &LoraOptions::default());
        let l = c.lora.as_ref().unwrap();
        let analysed: BTreeSet<&str> = l.spectra.iter().map(|(n, _)| n.as_str()).collect();
        let edited: BTreeSet<&str> = pair.edits.keys().map(String::as_str).collect();
        assert_eq!(
            analysed, edited,
            "only edited tensors are modified and analysed"
        );
        for (name, s) in &l.spectra {
            assert_eq!(
                s.detected_rank,
                Some(rank),
                "{name} ({dtype}, r={rank}): σ={:?} floor {}",
                &s.singular_values[..rank + 2],
                s.noise_floor
            );
        }
        assert_eq!(l.verdict.kind.as_str(), "merged_lora");
        assert_eq!(l.verdict.rank, Some(rank));
        let mut want: Vec<&str> = modules.to_vec();
        want.sort();
        assert_eq!(l.verdict.target_modules, want);
        assert!(l.verdict.confidence > 0.99);
    }
}

// See: issue 10 ("a merged LoRA in f32 whose delta is large compared with the weights
// is called full_finetune").
#[test]
fn detects_the_rank_of_a_delta_larger_than_the_weights_in_every_float_dtype() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for delta_rel in [0.01, 3.0] {
            let dir = tempfile::tempdir().unwrap();
            let pair = lora_pair_sized(dir.path(), 8, ATTN, dtype, delta_rel);
            let c = run(&pair, &LoraOptions::default());
            let l = c.lora.as_ref().unwrap();
            for (name, s) in &l.spectra {
                assert_eq!(
                    s.detected_rank,
                    Some(8),
                    "{name} ({dtype}, ‖Δ‖/‖W‖ = {delta_rel}): σ={:?} floor {}",
                    &s.singular_values[..10],
                    s.noise_floor
                );
            }
            assert_eq!(
                (l.verdict.kind.as_str(), l.verdict.rank),
                ("merged_lora", Some(8))
            );
        }
    }
}

#[test]
fn a_dense_noise_finetune_is_a_full_finetune() {
    let dir = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        shape: shape(),
        noise: Some(NoiseEdit {
            pattern: regex::Regex::new(r"proj\.weight$").unwrap(),
            rel: 0.05,
        }),
        ..PairSpec::tiny()
    };
    let pair = build_pair(&spec, dir.path()).unwrap();
    let c = run(&pair, &LoraOptions::default());
    let l = c.lora.unwrap();
    assert_eq!(l.verdict.kind.as_str(), "full_finetune");
    assert!(l.spectra.iter().all(|(_, s)| s.detected_rank.is_none()));
}

#[test]
fn extraction_reconstructs_to_the_storage_noise() {
    // f32 pair, f32 factors: the residual is f32 rounding.
    let dir = tempfile::tempdir().unwrap();
    let pair = lora_pair(dir.path(), 8, ATTN, DType::F32);
    let c = run(&pair, &extract(8, Some(DType::F32)));
    let l = c.lora.as_ref().unwrap();
    assert_eq!(l.extracted.len(), 8);
    for e in &l.extracted {
        assert!(
            e.factors.residual_stored < 1e-4,
            "{}: {}",
            e.module,
            e.factors.residual_stored
        );
        assert_eq!(e.factors.rank, 8);
    }
    // bf16 pair: the residual is the rounding noise the detector predicts, held in f32,
    // and streamed with the range sketch on AMX tiles (where this CPU has them) or not.
    let dir = tempfile::tempdir().unwrap();
    let pair = lora_pair(dir.path(), 8, ATTN, DType::BF16);
    for (tiles, budget) in [(true, None), (true, Some(0)), (false, Some(0))] {
        let mut opts = extract(16, None);
        opts.lowrank.tiles = tiles;
        if let Some(b) = budget {
            opts.lowrank.dense_budget_bytes = b;
        }
        let c = run(&pair, &opts);
        check_bf16_extraction(&c, tiles);
    }
}

/// The precision the products of a Δ of a bf16 pair with n columns ran in, `held` or
/// streamed, with `tiles` allowed ([`LowRankOptions::tiles`]): a streamed Δ on tiles when
/// this CPU has them (so CI on such a CPU runs that path), the products with Δᵀ too when
/// the rows are whole tiles; without tiles, the range sketch of a streamed or held Δ by
/// AVX-512 BF16 dot products where the CPU has them; else all in f32.
fn bf16_products(tiles: bool, held: bool, n: usize) -> weightdiff::lowrank::rsvd::Precision {
    use weightdiff::lowrank::{pair_fma, tiles::Tiles};
    // On an AMX host a held Δ stays on faer.
    if !tiles || (held && Tiles::get().is_some()) {
        Precision::F32
    } else if Tiles::get().is_some() {
        if weightdiff::lowrank::tiles::Left::takes(n) {
            Precision::Bf16Pair
        } else {
            Precision::F32Bf16Sketch
        }
    } else if pair_fma::Bf16Dot::get().is_some() && pair_fma::PairRange::takes(n, 32) {
        // Without AMX: the screen's range sketch by bf16 dot products.
        Precision::F32Bf16Sketch
    } else {
        Precision::F32
    }
}

fn check_bf16_extraction(c: &weightdiff::comparison::Comparison, tiles: bool) {
    let l = c.lora.as_ref().unwrap();
    // Four attention projections in each of two layers, all of rank 8.
    assert_eq!(l.extracted.len(), 8);
    for e in &l.extracted {
        let s = &l.spectra.iter().find(|(n, _)| n == &e.tensor).unwrap().1;
        assert_eq!(s.detected_rank, Some(8), "{}", e.module);
        let (m, n) = (s.shape[0] as f64, s.shape[1] as f64);
        // floor = σ·(√m + √n) for element noise σ; the whole noise has norm σ·√(mn).
        let noise_rel = s.noise_floor / (m.sqrt() + n.sqrt()) * (m * n).sqrt() / s.frobenius_norm;
        assert!(
            e.factors.residual_stored <= 1.05 * noise_rel,
            "{}: {} vs predicted {noise_rel}",
            e.module,
            e.factors.residual_stored
        );
        // Extracting 16 components of a rank-8 delta also removes the 8 largest noise
        // directions, so the residual may sit somewhat below the whole noise.
        assert!(
            e.factors.residual_stored >= 0.5 * noise_rel,
            "{}: {} vs predicted {noise_rel}",
            e.module,
            e.factors.residual_stored
        );
        // Eckart–Young: the stored factors cannot beat the exact truncation (whatever
        // the range sketch ran in: the products that measure Δ are f32, lowrank::tiles).
        assert!(
            e.factors.residual_stored >= e.factors.residual * (1.0 - 1e-9),
            "{}: stored {} < exact {}",
            e.module,
            e.factors.residual_stored,
            e.factors.residual
        );
        let method = if s.method == Method::Exact {
            Precision::F64
        } else {
            bf16_products(tiles, s.path == DeltaPath::InMemory, s.shape[1])
        };
        assert_eq!(s.products, method, "{}", e.module);
    }
}

#[test]
fn streamed_and_in_memory_deltas_give_the_same_factors() {
    let dir = tempfile::tempdir().unwrap();
    let pair = lora_pair(dir.path(), 4, &["q_proj"], DType::BF16);
    let a = run(&pair, &extract(4, Some(DType::F32)));
    let mut streamed = extract(4, Some(DType::F32));
    streamed.lowrank.dense_budget_bytes = 0;
    streamed.lowrank.block_bytes = 8 * 128 * 10; // 10 rows per block
    streamed.lowrank.min_block_rows = 1;
    let b = run(&pair, &streamed);
    let (la, lb) = (a.lora.unwrap(), b.lora.unwrap());
    assert!(
        lb.spectra
            .iter()
            .all(|(_, s)| s.path == DeltaPath::Streamed)
    );
    assert!(
        la.spectra
            .iter()
            .all(|(_, s)| s.path == DeltaPath::InMemory)
    );
    // A bf16 pair's products run in f32 (lowrank::rsvd): the two paths sum the blocks of
    // ΔᵀQ in different orders, so they agree to f32 rounding, far below the bf16 floor.
    for (x, y) in la.extracted.iter().zip(&lb.extracted) {
        let scale = x.factors.b().iter().fold(0f64, |a, v| a.max(v.abs()))
            * x.factors.a().iter().fold(0f64, |a, v| a.max(v.abs()));
        assert!(
            (x.factors.residual - y.factors.residual).abs() < 1e-5,
            "{} vs {}",
            x.factors.residual,
            y.factors.residual
        );
        // (B·A)_ij of factors given as (B, A, rank, n).
        let values = |f: &weightdiff::lowrank::extract::Factors| (f.b(), f.a(), f.rank, f.n);
        let prod = |(b, a, rank, n): &(Vec<f64>, Vec<f64>, usize, usize), i: usize, j: usize| {
            (0..*rank)
                .map(|t| b[i * rank + t] * a[t * n + j])
                .sum::<f64>()
        };
        let (xv, yv) = (values(&x.factors), values(&y.factors));
        // Measured on the held Δ, derived from the sketch for the streamed one.
        assert!(
            (x.factors.residual_stored - y.factors.residual_stored).abs()
                < 1e-5 * x.factors.residual_stored,
            "{} vs {}",
            x.factors.residual_stored,
            y.factors.residual_stored
        );
        for (i, j) in [(0, 0), (5, 17), (127, 127)] {
            assert!((prod(&xv, i, j) - prod(&yv, i, j)).abs() < 1e-5 * scale);
        }
    }
}

#[test]
fn stored_residual_of_a_full_finetune_is_derived_as_measured() {
    // Dense noise on every projection (a full fine-tune): the rank-4 factors leave most
    // of Δ, so the stored residual is derived from the sketch
    // (extract::derived_stored_residual, bf16 factors: ‖E‖² counts) instead of measured
    // by one more pass, for a held Δ and a streamed one alike; it must agree with the
    // residual of the stored factors against Δ in f64.
    let dir = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        shape: shape(),
        noise: Some(NoiseEdit {
            pattern: regex::Regex::new(r"proj\.weight$").unwrap(),
            rel: 0.05,
        }),
        ..PairSpec::tiny()
    };
    let pair = build_pair(&spec, dir.path()).unwrap();
    for tiles in [false, true] {
        derived_as_measured(&pair, 4, tiles, 1e-6, false);
    }
}

#[test]
fn stored_residual_of_a_merged_lora_is_derived_as_measured() {
    // A rank-8 LoRA over bf16 weights: what the rank-8 factors leave is the fine-tuned
    // side's rounding, a few tenths of a percent of ‖Δ‖², above DERIVED_MIN_RESIDUAL2;
    // there the f32 products' rounding of Σ sᵢ² costs ~1e-6 of the residual.
    // q_proj (384 × 384) and down_proj (384 × 1536) are large enough for the dropped
    // cross term (extract::DERIVED_MAX_DROPPED) and derived, k_proj (128 × 384) is not
    // and measured.
    let dir = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        shape: ModelShape {
            hidden_size: 384,
            intermediate_size: 1536,
            num_hidden_layers: 1,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            head_dim: 64,
            vocab_size: 300,
            tie_word_embeddings: false,
        },
        lora: Some(LoraEdit {
            rank: 8,
            alpha: 16.0,
            modules: ["q_proj", "k_proj", "down_proj"].map(String::from).to_vec(),
            delta_rel: 0.02,
            layers: None,
        }),
        ..PairSpec::tiny()
    };
    let pair = build_pair(&spec, dir.path()).unwrap();
    for tiles in [false, true] {
        derived_as_measured(&pair, 8, tiles, 5e-5, true);
    }
}

/// ‖Δ − BA‖_F / ‖Δ‖_F of the stored factors, in f64 from both checkpoints.
fn exact_stored_residual(
    pair: &BuiltPair,
    tensor: &str,
    f: &weightdiff::lowrank::extract::Factors,
) -> f64 {
    let values = |dir: &std::path::Path| -> Vec<f64> {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(tensor).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::BF16);
        t.data()
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect()
    };
    let (base, ft) = (values(&pair.base), values(&pair.finetuned));
    let (fb, fa) = (f.b(), f.a());
    let (mut err2, mut frob2) = (0.0, 0.0);
    for i in 0..f.m {
        for j in 0..f.n {
            let d = ft[i * f.n + j] - base[i * f.n + j];
            let p: f64 = (0..f.rank)
                .map(|t| fb[i * f.rank + t] * fa[t * f.n + j])
                .sum();
            err2 += (d - p) * (d - p);
            frob2 += d * d;
        }
    }
    (err2 / frob2).sqrt()
}

/// Extracts rank `rank` with Δ held and streamed: every randomized matrix's stored
/// residual is within `tol` (relative) of the exact one, derived where
/// `extract::derivable` says (without a residual pass) and measured elsewhere;
/// `refined`: the factors come from the screen and one half power iteration (a merged
/// LoRA, `lowrank::rsvd::refine`).
fn derived_as_measured(pair: &BuiltPair, rank: usize, tiles: bool, tol: f64, refined: bool) {
    let mut opts = extract(rank, Some(DType::BF16));
    opts.lowrank.tiles = tiles;
    let held = run(pair, &opts);
    opts.lowrank.dense_budget_bytes = 0;
    let streamed = run(pair, &opts);
    let (lh, ls) = (held.lora.unwrap(), streamed.lora.unwrap());
    let spectrum = |l: &weightdiff::comparison::LoraReport, t: &str| {
        l.spectra.iter().find(|(n, _)| n == t).unwrap().1.clone()
    };
    let mut derived = 0;
    let mut measured = 0;
    for (x, y) in lh.extracted.iter().zip(&ls.extracted) {
        let s = spectrum(&ls, &y.tensor);
        // Matrices too thin for a sketch take the exact SVD (held either way).
        if s.method != Method::Randomized {
            continue;
        }
        assert_eq!(s.path, DeltaPath::Streamed);
        let sh = spectrum(&lh, &x.tensor);
        assert_eq!(sh.path, DeltaPath::InMemory);
        let f = &y.factors;
        let derive = weightdiff::lowrank::extract::derivable(
            1.0,
            1.0 - f.residual.powi(2),
            DType::BF16,
            f.m,
            f.n,
            s.single_pass,
        );
        for (e, what) in [(x, "held"), (y, "streamed")] {
            let f = &e.factors;
            let r = exact_stored_residual(pair, &e.tensor, f);
            assert!(
                (r - f.residual_stored).abs() < tol * r,
                "{} ({what}, derived: {derive}): exact {r}, reported {}",
                e.module,
                f.residual_stored
            );
            assert!(f.residual_stored >= f.residual, "{}", e.module);
        }
        let n = s.shape[1];
        assert_eq!(s.products, bf16_products(tiles, false, n), "{}", x.module);
        assert_eq!(sh.products, bf16_products(tiles, true, n), "{}", x.module);
        // A held Δ is read once. A streamed one's passes come in pairs (Y and B, then two
        // per power iteration), but for a screen whose B came from Y's pass; a refinement
        // adds one (ΔV) and a residual pass one.
        assert_eq!(sh.reads, 1, "{}: {} reads", x.module, sh.reads);
        assert!(!sh.single_pass, "{}", x.module);
        assert_eq!(
            (s.reads + s.single_pass as usize) % 2 == 1,
            refined == derive,
            "{}: {} reads",
            x.module,
            s.reads
        );
        match derive {
            true => derived += 1,
            false => measured += 1,
        }
    }
    assert!(derived > 0);
    // The full fine-tune's matrices are all derived; the LoRA pair has one measured.
    assert_eq!(measured > 0, refined, "{measured} measured");
}

fn extract_cli(pair: &BuiltPair, out: &std::path::Path, extra: &[&str]) {
    weightdiff()
        .args(["extract-lora", "--quiet", "-o"])
        .arg(out)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .args(extra)
        .assert()
        .success();
}

#[test]
fn same_inputs_and_seed_give_a_byte_identical_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let pair = lora_pair(&dir.path().join("pair"), 4, ATTN, DType::BF16);
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    extract_cli(&pair, &a, &["--rank", "4", "--seed", "7"]);
    extract_cli(&pair, &b, &["--rank", "4", "--seed", "7", "--threads", "1"]);
    extract_cli(&pair, &c, &["--rank", "4", "--seed", "8"]);
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    // Another seed gives another sketch; the subspace (and the error) is the same.
    assert_ne!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(c.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn adapter_has_peft_keys_shapes_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let spec = lora_and_noise_spec(
        4,
        &["q_proj", "embed_tokens", "lm_head"],
        Some(vec![1]),
        r"^model\.norm\.weight$",
    );
    let pair = build_pair(&spec, &dir.path().join("pair")).unwrap();
    let out = dir.path().join("adapter");
    extract_cli(&pair, &out, &["--rank", "4"]);
    let ck = Checkpoint::open(&out.join("adapter_model.safetensors")).unwrap();
    let keys: BTreeSet<(&str, Vec<usize>)> = ck
        .tensors()
        .values()
        .map(|t| (t.name.as_str(), t.shape.clone()))
        .collect();
    let want: BTreeSet<(&str, Vec<usize>)> = [
        ("base_model.model.lm_head.lora_A.weight", vec![4, 128]),
        ("base_model.model.lm_head.lora_B.weight", vec![300, 4]),
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            vec![4, 300],
        ),
        (
            "base_model.model.model.embed_tokens.lora_embedding_B",
            vec![128, 4],
        ),
        (
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
            vec![4, 128],
        ),
        (
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
            vec![128, 4],
        ),
        ("base_model.model.model.norm.weight", vec![128]),
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, want);
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 4);
    // Only layer 1's q_proj changed: the leaf `q_proj` would also wrap layer 0's, so
    // target_modules is a pattern PEFT full-matches against module names.
    let pattern = cfg["target_modules"].as_str().expect("a regex string");
    let re = regex::Regex::new(&format!("^{pattern}$")).unwrap();
    let base = Checkpoint::open(&pair.base).unwrap();
    let wrapped: BTreeSet<&str> = base
        .tensors()
        .keys()
        .filter_map(|n| n.rsplit_once('.').map(|(m, _)| m))
        .filter(|m| re.is_match(m))
        .collect();
    assert_eq!(
        wrapped,
        [
            "lm_head",
            "model.embed_tokens",
            "model.layers.1.self_attn.q_proj"
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["model.norm"]));
    let meta = read_json(&out.join("lora_metadata.json"));
    assert_eq!(meta["verification"]["reloaded"], true);
    assert_eq!(meta["verification"]["tensors_checked"], 7);
    assert!(
        meta["modules"]["model.embed_tokens"]["residual_stored"]
            .as_f64()
            .unwrap()
            < 0.2
    );
    let analysis = read_json(&out.join("lora_analysis.json"));
    assert_eq!(
        analysis["verdict"]["kind"], "mixed",
        "a norm changed besides the LoRA"
    );
    assert!(analysis["layers"]["1"]["low_rank"].as_u64().unwrap() == 1);
}

#[test]
fn energy_ratio_and_uniform_rank_rules_pick_the_documented_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        shape: shape(),
        lora: Some(LoraEdit {
            rank: 6,
            alpha: 12.0,
            modules: vec!["q_proj".into()],
            delta_rel: 0.05,
            layers: Some(vec![0]),
        }),
        ..PairSpec::tiny()
    };
    let pair = build_pair(&spec, &dir.path().join("pair")).unwrap();
    let out = dir.path().join("energy");
    extract_cli(&pair, &out, &["--energy", "0.99"]);
    let meta = read_json(&out.join("lora_metadata.json"));
    assert_eq!(
        meta["modules"]["model.layers.0.self_attn.q_proj"]["rank"],
        6
    );
    let out = dir.path().join("uniform");
    extract_cli(&pair, &out, &["--rank", "12", "--uniform-rank"]);
    let ck = Checkpoint::open(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ck.tensors()["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape,
        vec![12, 128]
    );
    // The sv-ratio rule keeps the planted rank; --modules limits what is extracted.
    let pair2 = lora_pair(
        &dir.path().join("pair2"),
        8,
        &["q_proj", "v_proj"],
        DType::BF16,
    );
    let out = dir.path().join("ratio");
    extract_cli(
        &pair2,
        &out,
        &[
            "--sv-ratio",
            "1000",
            "--max-rank",
            "8",
            "--modules",
            "q_proj",
        ],
    );
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj"]));
    assert_eq!(cfg["r"], 8);
    weightdiff()
        .args(["extract-lora", "-o"])
        .arg(dir.path().join("x"))
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .args(["--energy", "0.9", "--uniform-rank"])
        .assert()
        .code(2);
}

#[test]
fn rank_pattern_keys_are_escaped_full_module_paths() {
    let dir = tempfile::tempdir().unwrap();
    // v_proj is 64 x 128: a fixed rank of 100 is capped at 64 there, 100 elsewhere.
    let pair = lora_pair(
        &dir.path().join("pair"),
        4,
        &["q_proj", "v_proj"],
        DType::F32,
    );
    let out = dir.path().join("a");
    extract_cli(&pair, &out, &["--rank", "100"]);
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], 100);
    assert_eq!(
        cfg["rank_pattern"][r"model\.layers\.0\.self_attn\.v_proj"],
        64
    );
    assert_eq!(
        cfg["alpha_pattern"][r"model\.layers\.0\.self_attn\.v_proj"],
        64
    );
}

#[test]
fn numpy_rebuilds_the_finetune_from_base_plus_adapter() {
    if !crate::interop::python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        dtype: DType::F32,
        ..lora_and_noise_spec(
            8,
            &["q_proj", "v_proj", "embed_tokens"],
            None,
            r"layers\.0\.input_layernorm\.weight$",
        )
    };
    let pair = build_pair(&spec, &dir.path().join("pair")).unwrap();
    let out = dir.path().join("cmp");
    weightdiff()
        .args(["compare", "--quiet", "--lora-rank", "8", "-o"])
        .arg(&out)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .assert()
        .success();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/check_adapter.py");
    let status = crate::interop::python()
        .arg(script)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .arg(out.join("lora_adapter"))
        .arg(out.join("lora_metadata.json"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "numpy reconstruction disagrees (see output above)"
    );
}

#[test]
fn the_vllm_profile_writes_linear_modules_at_one_vllm_rank_and_lists_what_it_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let spec = lora_and_noise_spec(
        5,
        &["q_proj", "embed_tokens", "lm_head"],
        None,
        r"^model\.norm\.weight$",
    );
    let pair = build_pair(&spec, &dir.path().join("pair")).unwrap();
    let out = dir.path().join("adapter");
    extract_cli(&pair, &out, &["--rank", "5", "--profile", "vllm"]);
    let ck = Checkpoint::open(&out.join("adapter_model.safetensors")).unwrap();
    let keys: Vec<&str> = ck.tensors().keys().map(String::as_str).collect();
    assert!(!keys.is_empty());
    for (k, t) in ck.tensors() {
        assert!(
            k.contains(".q_proj.lora_"),
            "{k} is not a linear q_proj factor"
        );
        // Rank 5 rounded up to the 8 vLLM accepts (zero-padded).
        assert!(t.shape.contains(&8), "{k}: {:?}", t.shape);
    }
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 8);
    assert_eq!(cfg["rank_pattern"], serde_json::json!({}));
    assert_eq!(cfg["modules_to_save"], serde_json::Value::Null);
    assert_eq!(cfg["lora_bias"], false);
    let meta = read_json(&out.join("lora_metadata.json"));
    assert_eq!(meta["profile"], "vllm");
    let skipped = meta["skipped"].to_string();
    for left_out in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ] {
        assert!(
            skipped.contains(left_out),
            "{left_out} not listed: {skipped}"
        );
    }
    assert!(skipped.contains("--profile vllm"));
}

/// The matrices analysed while the diff compares them (`DuringDiff`, what `compare`
/// and `extract-lora` run) give the same spectra and factors as the stage run after the
/// diff, and every matrix of a LoRA fine-tune is analysed then.
#[test]
fn analyses_during_the_diff_equal_the_stage_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = lora_and_noise_spec(8, ALL, None, "embed_tokens|lm_head|norm");
    let pair = build_pair(&spec, dir.path()).unwrap();
    // Δ held (the diff hands over all of it), streamed (the diff computes the sketch's
    // first product at the stage's blocks), streamed in blocks of rows that do not
    // divide the matrices.
    let held = extract(8, None);
    let mut streamed = extract(8, None);
    streamed.lowrank.dense_budget_bytes = 0;
    let mut ragged = streamed.clone();
    ragged.lowrank.block_bytes = 4 * 64 * 7;
    ragged.lowrank.min_block_rows = 1;
    for lo in [held, streamed, ragged] {
        during_equals_after(&pair, &lo);
    }
}

/// A fine-tuned weight that is +inf in a streamed bf16 pair: the products from both
/// sides' values meet a non-finite result and that tensor's products fall back to f32,
/// which takes the element as no change; the merged LoRA is still found there, the
/// other matrices keep the pair products, and the analyses during the diff still equal
/// the stage's own.
#[test]
fn an_infinite_weight_sends_its_tensor_back_to_f32_products() {
    let dir = tempfile::tempdir().unwrap();
    let spec = lora_and_noise_spec(8, ALL, None, "embed_tokens|lm_head|norm");
    let pair = build_pair(&spec, dir.path()).unwrap();
    let target = "model.layers.0.self_attn.q_proj.weight";
    set_bf16(&pair.finetuned, target, 37, 0x7f80);
    let mut streamed = extract(8, None);
    streamed.lowrank.dense_budget_bytes = 0;
    let c = run(&pair, &streamed);
    let l = c.lora.as_ref().unwrap();
    let (_, s) = l.spectra.iter().find(|(n, _)| n == target).unwrap();
    assert_eq!(s.detected_rank, Some(8));
    let tiles = weightdiff::lowrank::tiles::Tiles::get().is_some();
    let expect = if tiles {
        Precision::F32Bf16Sketch
    } else {
        Precision::F32
    };
    assert_eq!(s.products, expect);
    let (_, other) = l
        .spectra
        .iter()
        .find(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(other.products, bf16_products(true, false, other.shape[1]));
    during_equals_after(&pair, &streamed);
}

/// Overwrites element `index` of `tensor` with the bf16 `bits`, in whichever
/// safetensors file of `dir` holds it.
fn set_bf16(dir: &std::path::Path, tensor: &str, index: usize, bits: u16) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        if let Some(t) = header.get(tensor) {
            assert_eq!(t["dtype"], "BF16");
            let at = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + 2 * index;
            bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("{tensor} not found in {}", dir.display());
}

fn during_equals_after(pair: &BuiltPair, lo: &LoraOptions) {
    use weightdiff::pipeline::{DuringDiff, analyze_lora_after, compare_during};
    let b = Checkpoint::open(&pair.base).unwrap();
    let f = Checkpoint::open(&pair.finetuned).unwrap();
    let lo = lo.clone();
    let after = run(pair, &lo);
    let during = DuringDiff::new(&b, &f, &lo).unwrap();
    let c = compare_during(
        &b,
        &f,
        &CompareOptions::default(),
        &NoProgress,
        Some(&during),
    )
    .unwrap();
    let l = analyze_lora_after(&b, &f, &c, &lo, &NoProgress, Some(&during)).unwrap();
    let a = after.lora.as_ref().unwrap();
    assert_eq!(a.during_diff.0, 0);
    let matrices = l.spectra.len();
    assert!(l.spectra.iter().any(|(n, _)| n.contains("embed_tokens")));
    assert!(l.spectra.iter().any(|(n, _)| n.contains("lm_head")));
    assert_eq!(l.during_diff.0, matrices);
    assert!(l.during_diff.1 > 0.0);
    let strip = |s: &weightdiff::lowrank::TensorSpectrum| {
        let mut v = serde_json::to_value(s).unwrap();
        v.as_object_mut().unwrap().remove("time");
        v
    };
    assert_eq!(a.spectra.len(), matrices);
    for ((na, sa), (nb, sb)) in a.spectra.iter().zip(&l.spectra) {
        assert_eq!(na, nb);
        assert_eq!(strip(sa), strip(sb), "{na}");
    }
    assert_eq!(a.extracted.len(), l.extracted.len());
    for (x, y) in a.extracted.iter().zip(&l.extracted) {
        assert_eq!(x.tensor, y.tensor);
        assert_eq!(
            (x.factors.a(), x.factors.b()),
            (y.factors.a(), y.factors.b()),
            "{}",
            x.tensor
        );
    }
    assert_eq!(a.verdict.kind, l.verdict.kind);
}

/// A full fine-tune's streamed screens take B from the pass that computes Y, during the
/// diff and after it alike, with the same bits however the diff's workers order a
/// matrix's windows (a block out of order sends the sketch back to the stage's own pass
/// in row order): ragged blocks, several runs.
#[test]
fn single_pass_screens_during_the_diff_equal_the_stage_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        shape: shape(),
        noise: Some(NoiseEdit {
            pattern: regex::Regex::new(r"proj\.weight$|embed_tokens|lm_head").unwrap(),
            rel: 0.05,
        }),
        ..PairSpec::tiny()
    };
    let pair = build_pair(&spec, dir.path()).unwrap();
    let mut lo = extract(4, Some(DType::BF16));
    lo.lowrank.dense_budget_bytes = 0;
    lo.lowrank.block_bytes = 4 * 64 * 3;
    lo.lowrank.min_block_rows = 1;
    for _ in 0..3 {
        during_equals_after(&pair, &lo);
    }
    // Where the range sketch takes the rows of Δ in f32 (no tiles, no bf16 dot products).
    let pairs = weightdiff::lowrank::tiles::Tiles::get().is_some()
        || weightdiff::lowrank::pair_fma::Bf16Dot::get().is_some();
    let c = run(&pair, &lo);
    let l = c.lora.as_ref().unwrap();
    let single = l.spectra.iter().filter(|(_, s)| s.single_pass).count();
    assert_eq!(single > 0, !pairs, "{single} single-pass screens");
}
