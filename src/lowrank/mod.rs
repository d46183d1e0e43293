//! Low-rank analysis of deltas: spectra, merged-LoRA detection, and LoRA factors.
//!
//! The module sees Δ only through [`DeltaRows`], which hands out decoded rows; where
//! those rows come from (checkpoint windows) is the pipeline's business.

pub mod detect;
pub mod extract;
pub mod rsvd;

use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Rows of a delta Δ = finetuned − base (m × n), decoded to f64.
pub trait DeltaRows: Sync {
    /// m
    fn nrows(&self) -> usize;
    /// n
    fn ncols(&self) -> usize;
    /// Writes rows `r0..r1` of Δ, row-major, into `out` ((r1 − r0)·n values) and returns
    /// (Σ Δ² over those rows, Σ of the expected squared rounding error ulp²/12 of the
    /// fine-tuned values there).
    fn read_rows(&self, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)>;
}

/// Streams Δ in blocks of at most `block_rows` rows (one reused buffer) and calls
/// `f(first_row, rows, (Σ Δ², Σ rounding variance))` on each block, in row order, with
/// the rows row-major. Every streamed pass over Δ (the sketch products, the residual
/// check) goes through here.
pub(crate) fn for_each_row_block(
    src: &dyn DeltaRows,
    block_rows: usize,
    mut f: impl FnMut(usize, &[f64], (f64, f64)),
) -> Result<()> {
    let (m, n) = (src.nrows(), src.ncols());
    let block_rows = block_rows.max(1);
    let mut buf = vec![0f64; block_rows.min(m) * n];
    let mut r0 = 0;
    while r0 < m {
        let r1 = (r0 + block_rows).min(m);
        let rows = &mut buf[..(r1 - r0) * n];
        let stats = src.read_rows(r0, r1, rows)?;
        f(r0, rows, stats);
        r0 = r1;
    }
    Ok(())
}

/// How many components to extract per tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum RankRule {
    /// Exactly this rank (capped by the matrix size).
    Fixed { rank: usize },
    /// The smallest k with Σ_{i≤k}σᵢ² ≥ fraction·‖Δ‖²_F.
    Energy { fraction: f64 },
    /// Every σᵢ ≥ σ₁ / ratio.
    SvRatio { ratio: f64 },
}

/// Options of the analysis and extraction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LowRankOptions {
    /// Singular values computed per tensor for the analysis (the spectrum, detection).
    pub analysis_rank: usize,
    /// Extra sketch columns of the randomized SVD.
    pub oversample: usize,
    /// Power iterations of the randomized SVD.
    pub power_iters: usize,
    /// Seed of the sketches (combined with each tensor's name).
    pub seed: u64,
    /// Deltas up to this many bytes (as f64) are held in memory; larger ones are streamed.
    pub dense_budget_bytes: usize,
    /// Size of a streamed row block, in bytes of f64.
    pub block_bytes: usize,
    pub rank_rule: RankRule,
    /// Upper bound on any extracted rank.
    pub max_rank: Option<usize>,
}

impl Default for LowRankOptions {
    fn default() -> Self {
        LowRankOptions {
            analysis_rank: 64,
            oversample: 16,
            power_iters: 2,
            seed: 0,
            dense_budget_bytes: 64 << 20,
            block_bytes: 16 << 20,
            rank_rule: RankRule::Fixed { rank: 16 },
            max_rank: None,
        }
    }
}

/// Ranks at which residuals are reported: the ranks vLLM accepts, plus the extracted one.
pub const CANDIDATE_RANKS: &[usize] = &[1, 8, 16, 32, 64, 128, 256, 320, 512];

/// The spectrum of one delta (`lora_analysis.json` → `tensors`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSpectrum {
    pub shape: [usize; 2],
    /// Top singular values (up to `analysis_rank`), non-increasing.
    pub singular_values: Vec<f64>,
    /// Σ_{i≤k}σᵢ² / ‖Δ‖²_F for k = 1..len.
    pub energy: Vec<f64>,
    pub effective_rank_90: Option<usize>,
    pub effective_rank_99: Option<usize>,
    /// ‖Δ‖²_F / σ₁².
    pub stable_rank: Option<f64>,
    pub detected_rank: Option<usize>,
    /// Predicted top singular value of the storage rounding noise.
    pub noise_floor: f64,
    pub gap_ratio: Option<f64>,
    /// ‖Δ‖_F.
    pub frobenius_norm: f64,
    /// Relative residual sqrt(1 − Σ_{i≤k}σᵢ²/‖Δ‖²_F) at each candidate rank k computed.
    pub residuals: BTreeMap<usize, f64>,
    /// `randomized` or `exact`.
    pub method: String,
    /// `in_memory` or `streamed`.
    pub path: String,
    /// Seconds.
    pub time: f64,
}

/// Relative residual of the rank-k truncation, from the exact ‖Δ‖²_F.
pub fn residual(s: &[f64], k: usize, frob2: f64) -> f64 {
    if frob2 <= 0.0 {
        return 0.0;
    }
    let kept: f64 = s.iter().take(k).map(|x| x * x).sum();
    (1.0 - kept / frob2).max(0.0).sqrt()
}

/// Computes the spectrum of Δ and, when `extract` is given, the LoRA factors.
pub fn analyze(
    src: &dyn DeltaRows,
    name: &str,
    opts: &LowRankOptions,
    extract: Option<extract::Target>,
) -> Result<(TensorSpectrum, Option<extract::Factors>)> {
    let t0 = std::time::Instant::now();
    let (m, n) = (src.nrows(), src.ncols());
    // Sketch enough components for the analysis and for the largest rank the rule may pick.
    let want = match (&extract, opts.rank_rule) {
        (Some(_), RankRule::Fixed { rank }) => opts.analysis_rank.max(rank),
        (Some(_), _) => opts.analysis_rank.max(opts.max_rank.unwrap_or(0)),
        (None, _) => opts.analysis_rank,
    };
    let d = rsvd::decompose(src, name, want, opts)?;
    let s = &d.s[..d.s.len().min(want)];
    let frob2 = d.frob2;
    let energy: Vec<f64> = s
        .iter()
        .scan(0.0, |acc, x| {
            *acc += x * x;
            Some(if frob2 > 0.0 { *acc / frob2 } else { 1.0 })
        })
        .collect();
    let eff = |f: f64| energy.iter().position(|&e| e >= f).map(|i| i + 1);
    let floor = detect::noise_floor(m, n, d.rounding_var_sum);
    let det = detect::detect(s, floor);
    let residuals = CANDIDATE_RANKS
        .iter()
        .filter(|&&k| k <= s.len())
        .map(|&k| (k, residual(s, k, frob2)))
        .collect();
    let factors = extract
        .map(|t| extract::factors(&d, t, opts, src))
        .transpose()?;
    let spectrum = TensorSpectrum {
        shape: [m, n],
        singular_values: s.iter().take(opts.analysis_rank).copied().collect(),
        energy: energy.iter().take(opts.analysis_rank).copied().collect(),
        effective_rank_90: eff(0.9),
        effective_rank_99: eff(0.99),
        stable_rank: s.first().filter(|&&x| x > 0.0).map(|x| frob2 / (x * x)),
        detected_rank: det.detected_rank,
        noise_floor: floor,
        gap_ratio: det.gap_ratio,
        frobenius_norm: frob2.sqrt(),
        residuals,
        method: d.method.to_string(),
        path: d.path.to_string(),
        time: t0.elapsed().as_secs_f64(),
    };
    Ok((spectrum, factors))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use faer::Mat;

    /// An in-memory matrix as a delta source (rounding statistics: none).
    pub struct MatrixRows(pub Mat<f64>);

    impl DeltaRows for MatrixRows {
        fn nrows(&self) -> usize {
            self.0.nrows()
        }
        fn ncols(&self) -> usize {
            self.0.ncols()
        }
        fn read_rows(&self, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)> {
            let n = self.0.ncols();
            let mut f2 = 0.0;
            for i in r0..r1 {
                for j in 0..n {
                    let v = self.0[(i, j)];
                    out[(i - r0) * n + j] = v;
                    f2 += v * v;
                }
            }
            Ok((f2, 0.0))
        }
    }

    #[test]
    fn residuals_follow_eckart_young() {
        assert_eq!(residual(&[3.0, 4.0], 2, 25.0), 0.0);
        assert!((residual(&[3.0, 4.0], 1, 25.0) - (16.0f64 / 25.0).sqrt()).abs() < 1e-15);
        assert_eq!(residual(&[], 1, 0.0), 0.0);
    }
}
