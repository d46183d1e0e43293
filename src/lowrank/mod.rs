//! Low-rank analysis of deltas: spectra, merged-LoRA detection, and LoRA factors.
//!
//! The module sees Δ only through [`DeltaRows`], which hands out decoded rows; where
//! those rows come from (checkpoint windows) is the pipeline's business.
//!
//! # Two sketches: a screen, and the full analysis only where it can change the answer
//!
//! Every flop of the stage is in the products with Δ (2·m·n·l per product for a sketch of
//! width l), so the width and the number of products set its cost. [`analyze`] first
//! runs a narrow *screening* sketch: width l₁ = [`LowRankOptions::screen_rank`] +
//! [`SCREEN_OVERSAMPLE`] (24 + 8), no power iterations, i.e. two products (Y = ΔΩ and
//! B = QᵀΔ, which for a streamed Δ with a well-conditioned Y come from one pass over it,
//! [`rsvd`]), and applies the rank rule of [`detect`] to its first `screen_rank` values.
//! The screen settles the tensor when a larger sketch could not change the verdict:
//!
//! - **a cliff was found** (rank r < `screen_rank`, σ_r/σ_{r+1} ≥ [`detect::MIN_GAP`]):
//!   a merged LoRA of rank r is exactly rank r plus rounding noise, and the range of
//!   ΔΩ then contains the LoRA's column space up to the noise, with or without power
//!   iterations (HMT 2011, §10.3: the error is governed by σ_{l₁−p+1} ≈ the noise);
//! - **nothing is above the floor**: the delta is rounding noise;
//! - **the delta is provably not of rank ≤ `analysis_rank`**: a rank-R matrix has
//!   R ≥ ‖X‖²_F / σ₁(X)² (the stable rank). The signal energy is ‖Δ‖²_F minus the expected
//!   rounding energy Σ ulp²/12 (Σ step²/12 for quantized sides), and σ₁ ≤ [`SCREEN_TOP_MARGIN`]·s₁ (s₁, the screen's
//!   largest value, is a lower bound on σ₁; without power iterations it can be low by
//!   up to ~40 % on a flat spectrum). When (‖Δ‖²_F − Σ ulp²/12) / (margin·s₁)² exceeds
//!   `analysis_rank`, no cliff can lie within the analysed range, so the full sketch
//!   would only report "not low-rank" more precisely. A full fine-tune (a flat,
//!   Marchenko–Pastur-like spectrum, stable rank ~ min(m, n)/2) ends here.
//!
//! Otherwise (a shallow step, a spectrum still above the floor at the screen's edge
//! that may be a LoRA of rank 24–63, or a rank rule that needs more components than
//! the screen has) the full sketch runs: width `analysis_rank` + `oversample`, with
//! `power_iters` power iterations ([`rsvd`]). A held Δ is not read again for it.
//!
//! The spectrum reported is that of the sketch that settled the tensor
//! (`TensorSpectrum::singular_values` holds `screen_rank` values after a screen), and
//! `sketch_width` / `power_iters` say which.

pub mod detect;
pub mod extract;
pub mod pair_fma;
pub mod rsvd;
pub mod tiles;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// Extra columns of the screening sketch beyond [`LowRankOptions::screen_rank`]: the
/// last values of a sketch without power iterations are the least accurate, and the
/// rank rule only reads the first `screen_rank`.
pub const SCREEN_OVERSAMPLE: usize = 8;
/// σ₁ ≤ this × the screen's largest value, for the stable-rank bound of the module docs.
/// Without power iterations the top Ritz value of a flat m × n spectrum is about
/// (1 + √(l/n))/(1 + √(m/n))·σ₁ ≥ 0.6·σ₁ for the shapes of transformer weights; 2 leaves
/// room for spectra between flat and low-rank.
pub const SCREEN_TOP_MARGIN: f64 = 2.0;

/// Rows of a delta Δ = finetuned − base (m × n), decoded.
pub trait DeltaRows: Sync {
    /// m
    fn nrows(&self) -> usize;
    /// n
    fn ncols(&self) -> usize;
    /// Writes rows `r0..r1` of Δ, row-major, into `out` ((r1 − r0)·n values) and returns
    /// (Σ Δ² over those rows, Σ of the expected squared rounding error ulp²/12 of the
    /// fine-tuned values there; for a quantized side, of each value's quantization step
    /// instead, step²/12, [`crate::checkpoint::encoding`], on both sides when both are
    /// quantized).
    fn read_rows(&self, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)>;
    /// The same in f32 (the sums still in f64). The default rounds [`Self::read_rows`].
    fn read_rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<(f64, f64)> {
        let mut tmp = vec![0f64; out.len()];
        let st = self.read_rows(r0, r1, &mut tmp)?;
        for (o, t) in out.iter_mut().zip(tmp) {
            *o = t as f32;
        }
        Ok(st)
    }
    /// Whether products in f32 are accurate enough for this delta: true when its storage
    /// rounding is far above f32's (16- and 8-bit checkpoints; see [`rsvd`]).
    fn single_precision(&self) -> bool {
        false
    }
    /// Whether the range sketch may round Δ to bf16 (8 significant bits): true when the
    /// fine-tuned side, whose rounding sets the noise floor, is stored with at most
    /// bf16's precision ([`tiles`]). It then runs on AMX tiles where the CPU has them
    /// ([`rsvd::Products`]).
    fn bf16_products(&self) -> bool {
        false
    }
    /// Whether both sides are stored in bf16, so that [`Self::bf16_pair_rows`] gives
    /// their rows: tile products can then take the stored values as they are
    /// ([`tiles::Left`]).
    fn bf16_pair(&self) -> bool {
        false
    }
    /// For a [`Self::bf16_pair`] source: rows `r0..r1` of the base's and the fine-tuned
    /// tensor's stored values (row-major, little-endian bf16 bytes), handed to
    /// `f(base, finetuned)`, and when `sums` the (Σ Δ², Σ rounding variance) of those
    /// rows with the bits [`Self::read_rows_f32`] gives them (else zeros). `None` when
    /// the source has no such rows.
    fn bf16_pair_rows(
        &self,
        r0: usize,
        r1: usize,
        sums: bool,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Option<Result<(f64, f64)>> {
        let _ = (r0, r1, sums, f);
        None
    }
    /// All of Δ in f32 for a held Δ of a [`Self::single_precision`] source, when the
    /// source has a better way to fill it than by row blocks (the pipeline: Δ already
    /// decoded from the windows the diff read, handed over by swapping `out` with it).
    /// `out` comes holding an earlier tensor's buffer, kept for its memory; it must leave
    /// holding exactly m·n values. `None`: read by row blocks with [`Self::read_rows_f32`].
    fn read_all_f32(&self, out: &mut Vec<f32>, cancel: Cancel<'_>) -> Option<Result<(f64, f64)>> {
        let _ = (out, cancel);
        None
    }
    /// For a streamed [`Self::single_precision`] Δ: the first product of
    /// [`rsvd::decompose`], ΔΩ (m × l) for the Ω of width `l` it draws
    /// ([`rsvd::RowProduct::omega`]), and the cross product YᵀΔ when the first sketch
    /// runs without power iterations ([`first_sketch`]), with (Σ Δ², Σ rounding
    /// variance), when the source computed them already (the pipeline: from the windows
    /// the diff read, block by block as the stage's own pass would, so the bits are the
    /// same). `None`: the stage computes them.
    fn sketched(&self, l: usize) -> Option<(rsvd::Sketch, (f64, f64))> {
        let _ = l;
        None
    }
}

/// A stop request the stage checks between row blocks and products (SIGINT/SIGTERM).
#[derive(Clone, Copy)]
pub struct Cancel<'a>(Option<&'a AtomicBool>);

impl<'a> Cancel<'a> {
    pub fn new(flag: Option<&'a AtomicBool>) -> Self {
        Cancel(flag)
    }
    pub fn never() -> Self {
        Cancel(None)
    }
    pub fn is_set(&self) -> bool {
        self.0.is_some_and(|c| c.load(Ordering::Relaxed))
    }
    /// `Err(Error::Cancelled)` once the stop was requested.
    pub fn check(&self) -> Result<()> {
        if self.is_set() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Streams Δ in blocks of at most `block_rows` rows (one reused buffer) and calls
/// `f(first_row, rows, (Σ Δ², Σ rounding variance))` on each block, in row order, with
/// the rows row-major. Every streamed pass over Δ (the sketch products, the residual
/// check) goes through here; it stops with `Error::Cancelled` between blocks.
pub(crate) fn for_each_row_block<T: rsvd::Real>(
    src: &dyn DeltaRows,
    block_rows: usize,
    cancel: Cancel<'_>,
    mut f: impl FnMut(usize, &[T], (f64, f64)),
) -> Result<()> {
    let (m, n) = (src.nrows(), src.ncols());
    let block_rows = block_rows.max(1);
    let mut buf = vec![T::of(0.0); block_rows.min(m) * n];
    let mut r0 = 0;
    while r0 < m {
        cancel.check()?;
        let r1 = (r0 + block_rows).min(m);
        let rows = &mut buf[..(r1 - r0) * n];
        let stats = T::read(src, r0, r1, rows)?;
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
    /// Singular values computed per tensor by the full analysis (the spectrum,
    /// detection): the largest LoRA rank detectable is one less.
    pub analysis_rank: usize,
    /// Extra sketch columns of the full randomized SVD.
    pub oversample: usize,
    /// Power iterations of the full randomized SVD (the screen runs none).
    pub power_iters: usize,
    /// Values of the screening sketch (module docs); 0 runs the full analysis on every
    /// tensor.
    #[serde(default = "default_screen_rank")]
    pub screen_rank: usize,
    /// Half power iterations that refine a merged LoRA's factors after the screen
    /// ([`rsvd::refine`]): 1 reaches 1.0001x the optimal residual against Δ; each one
    /// more costs two products and brings the factors closer to the true LoRA
    /// (`extract-lora` runs 3).
    #[serde(default = "default_refine_iters")]
    pub refine_iters: usize,
    /// Seed of the sketches (combined with each tensor's name).
    pub seed: u64,
    /// Deltas up to this many bytes (as f64) are held in memory; larger ones are streamed.
    pub dense_budget_bytes: usize,
    /// Size of a streamed row block, in bytes of the product precision (at least
    /// [`Self::min_block_rows`] rows). 1 MiB: its read
    /// buffers are reused by the allocator (16 MiB ones were fresh pages each time, ~2x
    /// the cost of a streamed pass on the 32B-shaped pair) and the block stays in cache.
    pub block_bytes: usize,
    /// Fewer rows per streamed block than this only where they would exceed
    /// [`MAX_BLOCK_BYTES`]: a product's accumulators (ΔᵀY, or the sketch's Ω) are read
    /// once per block, so 10-row blocks of a 25 600-column Δ cost 1.4x the products of
    /// 32-row ones (1.83 against 1.34 ns per element for Y and YᵀΔ at width 32).
    #[serde(default = "default_min_block_rows")]
    pub min_block_rows: usize,
    pub rank_rule: RankRule,
    /// Upper bound on any extracted rank.
    pub max_rank: Option<usize>,
    /// Lets the products run on AMX tiles with Δ in bf16 where the CPU has them and the
    /// pair allows it ([`tiles`], [`rsvd::Products`]); false keeps them in f32.
    #[serde(default = "yes")]
    pub tiles: bool,
}

fn yes() -> bool {
    true
}

impl Default for LowRankOptions {
    fn default() -> Self {
        LowRankOptions {
            analysis_rank: 64,
            oversample: 16,
            power_iters: 2,
            screen_rank: DEFAULT_SCREEN_RANK,
            refine_iters: 1,
            seed: 0,
            dense_budget_bytes: 64 << 20,
            block_bytes: 1 << 20,
            min_block_rows: default_min_block_rows(),
            rank_rule: RankRule::Fixed { rank: 16 },
            max_rank: None,
            tiles: true,
        }
    }
}

/// Values of the screening sketch: above the common LoRA ranks 8 and 16 with room for
/// the cliff's next value, and a third of the full analysis' products.
pub const DEFAULT_SCREEN_RANK: usize = 24;

fn default_screen_rank() -> usize {
    DEFAULT_SCREEN_RANK
}

fn default_refine_iters() -> usize {
    1
}

fn default_min_block_rows() -> usize {
    32
}

/// The most bytes of a streamed block that [`LowRankOptions::min_block_rows`] may take.
pub const MAX_BLOCK_BYTES: usize = 8 << 20;

/// Ranks at which residuals are reported: the ranks vLLM accepts, plus the extracted one.
pub const CANDIDATE_RANKS: &[usize] = &[1, 8, 16, 32, 64, 128, 256, 320, 512];

/// How a spectrum was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// A randomized sketch ([`rsvd`]).
    Randomized,
    /// The exact thin SVD of the whole Δ (small matrices).
    Exact,
}

/// Where Δ was while its spectrum was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaPath {
    /// Decoded once and held in memory.
    InMemory,
    /// Read again from the checkpoints for each product.
    Streamed,
}

impl Method {
    /// The name the reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Randomized => "randomized",
            Method::Exact => "exact",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// How the values were computed.
    pub method: Method,
    /// Where Δ was while they were.
    pub path: DeltaPath,
    /// The precision of the products with Δ.
    #[serde(default)]
    pub products: rsvd::Precision,
    /// Columns of the sketch the values come from (the screen's or the full one's).
    #[serde(default)]
    pub sketch_width: usize,
    /// Its power iterations.
    #[serde(default)]
    pub power_iters: usize,
    /// Passes over the tensor's stored bytes.
    #[serde(default)]
    pub reads: usize,
    /// A sketch without power iterations (the screen's, as a rule) took B = QᵀΔ from the
    /// pass that computed Y = ΔΩ ([`rsvd::decompose`]), not from a pass of its own.
    #[serde(default)]
    pub single_pass: bool,
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

/// Whether the screening sketch's values `s` (all l₁ of them; the rule reads the first
/// `k1`) settle the tensor, by the three cases of the module docs.
fn screen_settles(
    s: &[f64],
    k1: usize,
    floor: f64,
    frob2: f64,
    noise2: f64,
    full_k: usize,
) -> bool {
    let head = &s[..k1.min(s.len())];
    if detect::detect(head, floor).detected_rank.is_some() {
        return true;
    }
    let tau = detect::FLOOR_MARGIN * floor;
    let above = head.iter().filter(|&&x| x > tau).count();
    if above == 0 {
        return true;
    }
    if above < head.len() {
        return false;
    }
    let top = SCREEN_TOP_MARGIN * head[0];
    top > 0.0 && (frob2 - noise2) / (top * top) > full_k as f64
}

/// Computes the spectrum of Δ and, when `extract` is given, the LoRA factors: the
/// screening sketch first, the full one when the screen does not settle the tensor
/// (module docs).
/// Components sketched for the analysis and for the largest rank the rule may pick.
fn full_rank(opts: &LowRankOptions, extract: bool) -> usize {
    match (extract, opts.rank_rule) {
        (true, RankRule::Fixed { rank }) => opts.analysis_rank.max(rank),
        (true, _) => opts.analysis_rank.max(opts.max_rank.unwrap_or(0)),
        (false, _) => opts.analysis_rank,
    }
}

/// Whether [`analyze`] starts with the narrow screen.
fn screens(opts: &LowRankOptions, full_k: usize, m: usize, n: usize) -> bool {
    let k1 = opts.screen_rank;
    k1 > 0 && k1 < full_k && k1 + SCREEN_OVERSAMPLE < m.min(n)
}

/// The first sketch [`analyze`] draws for an m × n Δ: its width l (the first product is
/// ΔΩ with Ω of l columns, [`rsvd::RowProduct::omega`]) and whether it runs no power
/// iterations, so that B comes from the same pass's YᵀΔ where Y allows it
/// ([`rsvd::decompose`]); `None` when it computes Δ's exact SVD.
pub fn first_sketch(
    opts: &LowRankOptions,
    extract: bool,
    m: usize,
    n: usize,
) -> Option<(usize, bool)> {
    let full_k = full_rank(opts, extract);
    let (k, oversample, iters) = if screens(opts, full_k, m, n) {
        (opts.screen_rank, SCREEN_OVERSAMPLE, 0)
    } else {
        (full_k, opts.oversample, opts.power_iters)
    };
    rsvd::sketch_width(k, oversample, m, n).map(|l| (l, iters == 0))
}

pub fn analyze(
    src: &dyn DeltaRows,
    name: &str,
    opts: &LowRankOptions,
    extract: Option<extract::Target>,
    cancel: Cancel<'_>,
) -> Result<(TensorSpectrum, Option<extract::Factors>)> {
    let t0 = std::time::Instant::now();
    let (m, n) = (src.nrows(), src.ncols());
    let full_k = full_rank(opts, extract.is_some());
    let mut op = rsvd::Operator::new(src, opts, cancel)?;
    let k1 = opts.screen_rank;
    let screen = if screens(opts, full_k, m, n) {
        let d = rsvd::decompose(&mut op, name, k1, SCREEN_OVERSAMPLE, 0, opts.seed)?;
        let floor = detect::noise_floor(m, n, d.rounding_var_sum);
        let enough = match (&extract, opts.rank_rule) {
            (None, _) => true,
            (Some(_), RankRule::Fixed { rank }) => rank <= k1,
            (Some(_), rule) => extract::choose_rank(&d.s[..k1], d.frob2, rule, opts.max_rank) < k1,
        };
        let settled = enough
            && screen_settles(
                &d.s,
                k1,
                floor,
                d.frob2,
                d.rounding_var_sum,
                opts.analysis_rank,
            );
        let low_rank = detect::detect(&d.s[..k1], floor).detected_rank.is_some();
        settled.then_some((d, k1, k1 + SCREEN_OVERSAMPLE, low_rank))
    } else {
        None
    };
    let (d, want, width, low_rank) = match screen {
        Some(x) => x,
        None => {
            let d = rsvd::decompose(
                &mut op,
                name,
                full_k,
                opts.oversample,
                opts.power_iters,
                opts.seed,
            )?;
            let width = d.s.len();
            (d, full_k, width, false)
        }
    };
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
    // A merged LoRA found by the screen: one power iteration on the screen's leading
    // directions makes its factors optimal (rsvd::refine); the spectrum stays the screen's.
    let factors = match extract {
        None => None,
        Some(t) if low_rank => {
            let k = extract::choose_rank(&d.s[..want], frob2, opts.rank_rule, opts.max_rank);
            let mut r = rsvd::refine(&mut op, name, &d, k + SCREEN_OVERSAMPLE)?;
            for _ in 1..opts.refine_iters.max(1) {
                r = rsvd::iterate(&mut op, name, &r)?;
            }
            Some(extract::factors(&r, t, opts, &mut op)?)
        }
        Some(t) => Some(extract::factors(&d, t, opts, &mut op)?),
    };
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
        method: d.method,
        path: d.path,
        // The exact SVD runs in f64 on the held Δ.
        products: match d.method {
            Method::Exact => rsvd::Precision::F64,
            Method::Randomized => op.precision(),
        },
        sketch_width: if d.method == Method::Exact {
            m.min(n)
        } else {
            width
        },
        power_iters: d.power_iters,
        reads: op.reads,
        single_pass: op.single_pass,
        time: t0.elapsed().as_secs_f64(),
    };
    Ok((spectrum, factors))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use faer::Mat;

    /// An in-memory matrix as a delta source (rounding statistics: none), with products
    /// in f32 when `single`.
    pub struct MatrixRows {
        pub a: Mat<f64>,
        pub single: bool,
    }

    impl DeltaRows for MatrixRows {
        fn nrows(&self) -> usize {
            self.a.nrows()
        }
        fn ncols(&self) -> usize {
            self.a.ncols()
        }
        fn single_precision(&self) -> bool {
            self.single
        }
        fn read_rows(&self, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)> {
            let n = self.a.ncols();
            let mut f2 = 0.0;
            for i in r0..r1 {
                for j in 0..n {
                    let v = self.a[(i, j)];
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
