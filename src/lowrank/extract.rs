//! LoRA factors from a decomposition: rank choice, the PEFT split, and the residual of
//! the factors as they will be stored.
//!
//! With Δ ≈ U_k S_k V_kᵀ the factors are B = U_k √S_k (m × k) and A = √S_k V_kᵀ (k × n),
//! so that B·A reproduces the truncation with a scale of exactly 1 (the adapter config
//! sets `lora_alpha = r` for every module, see `peft::adapter`). Splitting √S to both
//! sides keeps the two factors at similar magnitudes, which matters once they are
//! rounded to bf16.

use super::rsvd::{Decomposition, Held, Operator, Real};
use super::{LowRankOptions, RankRule, for_each_row_block};
use crate::checkpoint::dtype::{DType, encode};
use crate::error::Result;

/// What to extract for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// Storage dtype of the factors (their rounding is part of the stored residual).
    pub dtype: DType,
    /// Pad (with zero components) or cut every tensor to exactly this rank.
    pub uniform_rank: Option<usize>,
}

/// LoRA factors of one tensor: B (m × rank) and A (rank × n), row-major, held as the
/// bytes of their storage dtype (2 bytes a value for bf16: the factors of every matrix
/// stay in memory until the adapter is written, ~141 M values for a full fine-tune of
/// Qwen3-32B at rank 16, 1.1 GB in f64).
#[derive(Debug, Clone)]
pub struct Factors {
    pub rank: usize,
    pub m: usize,
    pub n: usize,
    /// Storage dtype of the factors.
    pub dtype: DType,
    /// ‖Δ − BA‖_F / ‖Δ‖_F with exact factors (Eckart–Young, from the computed spectrum).
    pub residual: f64,
    /// The same with the factors rounded to the storage dtype: derived from the sketch
    /// (to ~1e-5 relative, `derived_stored_residual`), or measured by one more pass over
    /// Δ where the derivation would cancel ([`DERIVED_MIN_RESIDUAL2`]).
    pub residual_stored: f64,
    /// B then A in [`Self::encoding`]: every value is one of `dtype` (rounded to nearest
    /// even), so the adapter's bytes, a part's f64 and the journal's bytes all hold the
    /// same values.
    values: Vec<u8>,
}

impl Factors {
    /// Factors of `dtype` from values already rounded to it ([`round_slice`]): `b`
    /// (m × rank) and `a` (rank × n), row-major; both residuals 0 until set.
    pub fn new(rank: usize, m: usize, n: usize, dtype: DType, b: &[f64], a: &[f64]) -> Factors {
        assert!(b.len() == m * rank && a.len() == rank * n, "factor shapes");
        let enc = Self::encoding_of(dtype);
        let mut values = encode(enc, b).expect("a writable float dtype");
        values.extend(encode(enc, a).expect("a writable float dtype"));
        Factors {
            rank,
            m,
            n,
            dtype,
            residual: 0.0,
            residual_stored: 0.0,
            values,
        }
    }

    /// [`Self::new`] from B then A as the bytes of `encoding` (a journal's); `None` when
    /// the byte count or the encoding does not fit.
    pub fn from_bytes(
        rank: usize,
        m: usize,
        n: usize,
        dtype: DType,
        encoding: DType,
        bytes: &[u8],
    ) -> Option<Factors> {
        // Checked: the shape comes from a file.
        let count = m
            .checked_add(n)?
            .checked_mul(rank)?
            .checked_mul(encoding.size())?;
        if encoding != Self::encoding_of(dtype) || bytes.len() != count {
            return None;
        }
        Some(Factors {
            rank,
            m,
            n,
            dtype,
            residual: 0.0,
            residual_stored: 0.0,
            values: bytes.to_vec(),
        })
    }

    /// The dtype the values are held in: `dtype` when it can be written
    /// ([`DType::is_writable_float`]), else f64.
    pub fn encoding(&self) -> DType {
        Self::encoding_of(self.dtype)
    }

    fn encoding_of(dtype: DType) -> DType {
        if dtype.is_writable_float() {
            dtype
        } else {
            DType::F64
        }
    }

    /// B then A, as the bytes of [`Self::encoding`].
    pub fn bytes(&self) -> &[u8] {
        &self.values
    }

    /// B's bytes (m × rank values of [`Self::encoding`]).
    pub fn b_bytes(&self) -> &[u8] {
        &self.values[..self.m * self.rank * self.encoding().size()]
    }

    /// A's bytes (rank × n values of [`Self::encoding`]).
    pub fn a_bytes(&self) -> &[u8] {
        &self.values[self.m * self.rank * self.encoding().size()..]
    }

    /// B (m × rank), row-major.
    pub fn b(&self) -> Vec<f64> {
        self.decoded(self.b_bytes())
    }

    /// A (rank × n), row-major.
    pub fn a(&self) -> Vec<f64> {
        self.decoded(self.a_bytes())
    }

    fn decoded(&self, bytes: &[u8]) -> Vec<f64> {
        let enc = self.encoding();
        let mut out = vec![0f64; bytes.len() / enc.size()];
        crate::checkpoint::dtype::decode_f64(enc, bytes, &mut out);
        out
    }

    /// Pads the factors with zero components up to `rank` (no-op when already there):
    /// B·A, and so every residual, is unchanged.
    pub fn pad_to(&mut self, rank: usize) {
        if rank <= self.rank {
            return;
        }
        // Zero is all zero bytes in every float encoding.
        let size = self.encoding().size();
        let (old, new) = (self.rank * size, rank * size);
        let mut values = vec![0u8; (self.m * rank + rank * self.n) * size];
        for (o, b) in values
            .chunks_exact_mut(new)
            .zip(self.b_bytes().chunks_exact(old.max(1)))
            .take(self.m)
        {
            o[..old].copy_from_slice(b);
        }
        let a = self.a_bytes();
        values[self.m * new..self.m * new + a.len()].copy_from_slice(a);
        self.values = values;
        self.rank = rank;
    }
}

/// Picks the rank for singular values `s` (non-increasing) of a delta with ‖Δ‖²_F = frob2.
pub fn choose_rank(s: &[f64], frob2: f64, rule: RankRule, max_rank: Option<usize>) -> usize {
    let k = match rule {
        RankRule::Fixed { rank } => rank,
        RankRule::Energy { fraction } => {
            let mut acc = 0.0;
            s.iter()
                .position(|x| {
                    acc += x * x;
                    acc >= fraction * frob2
                })
                .map_or(s.len(), |i| i + 1)
        }
        RankRule::SvRatio { ratio } => {
            let top = s.first().copied().unwrap_or(0.0);
            s.iter().filter(|&&x| x > 0.0 && x >= top / ratio).count()
        }
    };
    let k = k.min(s.len());
    max_rank.map_or(k, |m| k.min(m))
}

/// Rounds a value to `dtype` and back (the value the adapter file will hold).
pub fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::BF16 => crate::checkpoint::dtype::round_bf16(v),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::F32 => v as f32 as f64,
        _ => v,
    }
}

/// [`round_to`] of every value, in place; bf16 by its branch-free slice loop
/// ([`crate::checkpoint::dtype::round_bf16_slice`], the same bits).
pub fn round_slice(dtype: DType, values: &mut [f64]) {
    match dtype {
        DType::BF16 => crate::checkpoint::dtype::round_bf16_slice(values),
        dtype => values.iter_mut().for_each(|x| *x = round_to(dtype, *x)),
    }
}

/// Builds the factors for `target` and their stored residual against Δ (derived from the
/// sketch, `derived_stored_residual`, or measured where that would cancel).
pub fn factors(
    d: &Decomposition,
    target: Target,
    opts: &LowRankOptions,
    op: &mut Operator<'_>,
) -> Result<Factors> {
    let (m, n) = (d.u.nrows(), d.v.nrows());
    let chosen = choose_rank(&d.s, d.frob2, opts.rank_rule, opts.max_rank);
    let (k, rank) = match target.uniform_rank {
        Some(r) => (chosen.min(r), r),
        None => (chosen, chosen),
    };
    let mut b = vec![0f64; m * rank];
    let mut a = vec![0f64; rank * n];
    for t in 0..k {
        let root = d.s[t].sqrt();
        for i in 0..m {
            b[i * rank + t] = d.u[(i, t)] * root;
        }
        for j in 0..n {
            a[t * n + j] = root * d.v[(j, t)];
        }
    }
    let residual = super::residual(&d.s, k, d.frob2);
    let round = |v: &[f64]| -> Vec<f64> {
        let mut r = v.to_vec();
        round_slice(target.dtype, &mut r);
        r
    };
    let (bq, aq) = (round(&b), round(&a));
    let kept: f64 = d.s.iter().take(k).map(|x| x * x).sum();
    let derived = derivable(d.frob2, kept, target.dtype, m, n, op.single_pass)
        .then(|| derived_stored_residual(d, kept, &b, &a, &bq, &aq, rank, m, n))
        .flatten();
    let residual_stored = match derived {
        Some(r) => r,
        None => stored_residual(op, &bq, &aq, rank, d.frob2)?,
    };
    let mut f = Factors::new(rank, m, n, target.dtype, &bq, &aq);
    f.residual = residual;
    f.residual_stored = residual_stored;
    Ok(f)
}

/// The residual of the stored factors is derived (`derived_stored_residual`) only when
/// ‖R‖² = ‖Δ‖² − Σ_{i≤k} sᵢ² is at least this fraction of ‖Δ‖²: the sᵢ come from f32
/// products whose rounding leaves an absolute error of ~3e-8·‖Δ‖² in Σ sᵢ² (measured on
/// the test pairs), so below this the cancellation would cost more than ~1e-5 of the
/// residual; and only when the cross term it drops is small enough
/// ([`DERIVED_MAX_DROPPED`]). Otherwise the residual is measured by one more pass (16
/// products per element of Δ for rank 16, as many as a sketch).
///
/// A full fine-tune (‖R‖² ≈ ‖Δ‖² at rank 16) and a merged LoRA over bf16 weights of a
/// model's size (‖R‖² the rounding noise, 0.4–0.7 % of ‖Δ‖² on the benchmark pairs) are
/// derived: within 6e-6 of the measured residuals on all 196 matrices of the 0.6b pair
/// and 1.1e-6 on the seven of a 32B-shaped one (BENCHMARKS.md). A LoRA large against its
/// weights (its rounding noise a smaller part of Δ) and small matrices are measured.
pub const DERIVED_MIN_RESIDUAL2: f64 = 2e-3;

/// The largest estimated size, relative to ‖R‖², of the cross term that
/// `derived_stored_residual` drops, ⟨BᵀR, δA⟩ or ⟨RÂᵀ, δB⟩: it pairs the factors'
/// rounding errors (each ~c relative to its entry, c = 2^-mantissa/√12 of the storage
/// dtype) with R, zero-mean over the m·n terms, so it is ~c·(‖P‖/‖R‖)/√(m·n) with
/// ‖P‖² = ‖Δ‖² − ‖R‖². That estimate is conservative by about 10x: on rank-8 LoRAs of
/// 64 × 128 matrices with ‖P‖/‖R‖ ≈ 13 it predicts 3e-4 where 2e-5 was measured, on the
/// 0.6b pair's 1024-row matrices 3e-5 where ≤ 6e-6 was.
pub const DERIVED_MAX_DROPPED: f64 = 1e-4;

/// Whether the stored residual of factors in `dtype` of an m × n Δ with ‖Δ‖² = `frob2`
/// and ‖P‖² = `kept` is derived rather than measured ([`DERIVED_MIN_RESIDUAL2`],
/// [`DERIVED_MAX_DROPPED`]).
/// `single_pass`: B came from Y's pass (`rsvd::single_pass_b`), whose error is up to
/// cond(Y) ≤ 1/[`super::rsvd::SINGLE_PASS_MIN_RATIO`] times the second pass's, and Σ sᵢ²'s
/// with it: the derivation then needs that much more residual not to cancel (a full
/// fine-tune, ‖R‖² ≈ ‖Δ‖², still has it).
pub fn derivable(
    frob2: f64,
    kept: f64,
    dtype: DType,
    m: usize,
    n: usize,
    single_pass: bool,
) -> bool {
    let r2 = frob2 - kept;
    let margin = match single_pass {
        true => 1.0 / super::rsvd::SINGLE_PASS_MIN_RATIO,
        false => 1.0,
    };
    if !(frob2 > 0.0 && r2 >= margin * DERIVED_MIN_RESIDUAL2 * frob2) {
        return false;
    }
    let mantissa = match dtype {
        DType::BF16 => 7,
        DType::F16 => 10,
        DType::F32 => 23,
        _ => 52,
    };
    let c = 2f64.powi(-mantissa) / 12f64.sqrt();
    let dropped = c * (kept.max(0.0) / r2).sqrt() / ((m * n) as f64).sqrt();
    dropped <= DERIVED_MAX_DROPPED
}

/// ‖Δ − B̂Â‖_F / ‖Δ‖_F for the stored (rounded) factors B̂ = B + δB, Â = A + δA,
/// derived from what the sketch already computed instead of one more pass over Δ (a
/// half of the streamed passes of a full fine-tune, and for a held Δ 16 of the 104
/// products per element of a merged LoRA's analysis at rank 16).
///
/// With P = BA = U_k S_k V_kᵀ, R = Δ − P and E = B̂Â − P = δB·Â + B·δA:
///
///   ‖Δ − B̂Â‖² = ‖R‖² − 2⟨R, E⟩ + ‖E‖²,
///
/// - ‖R‖² = ‖Δ‖²_F − Σ_{i≤k} sᵢ² exactly (the projection of the sketch is orthogonal,
///   [`super::rsvd`]);
/// - ‖E‖² = tr(δBᵀδB·ÂÂᵀ) + tr(BᵀB·δAδAᵀ) + 2·tr(BᵀδB·ÂδAᵀ) from k × k Gram matrices
///   (no cancellation: δB and δA are formed directly);
/// - ⟨R, E⟩ = ⟨RÂᵀ, δB⟩ + ⟨BᵀR, δA⟩. One of the two is zero by construction: after a
///   range sketch U = QŨ with QᵀΔ = ŨSVᵀ, so U_kᵀR = 0 and BᵀR = 0; after a half power
///   iteration ([`super::rsvd::refine`]) Δ·V_k = U_k S_k, so RAᵀ = 0 and only the
///   second-order ⟨R, δB·δA⟩ is left of the first. The other is dropped: it pairs the
///   rounding errors of the factors (zero-mean, ≤ ulp/2 per entry, uncorrelated with R)
///   with a part of Δ the sketch left out, so its size is ~‖R·Â ᵀ‖_F·ulp_B/√12 (or
///   ‖BᵀR‖_F·ulp_A/√12), against ‖R‖² — the estimate of [`DERIVED_MAX_DROPPED`], at
///   most 2‖R‖_F·√s₁·max(‖δB‖_F, ‖δA‖_F) (Cauchy–Schwarz, ‖A‖₂ = ‖B‖₂ = √s₁).
///
/// `kept` is Σ_{i≤k} sᵢ². `None` (measure instead) when a stored factor or the correction
/// is not finite.
#[allow(clippy::too_many_arguments)]
fn derived_stored_residual(
    d: &Decomposition,
    kept: f64,
    b: &[f64],
    a: &[f64],
    bq: &[f64],
    aq: &[f64],
    rank: usize,
    m: usize,
    n: usize,
) -> Option<f64> {
    if d.frob2 <= 0.0 {
        return Some(0.0);
    }
    if !bq.iter().chain(aq).all(|x| x.is_finite()) {
        return None;
    }
    let r2 = (d.frob2 - kept).max(0.0);
    // B, δB: m × rank row-major; A, δA: rank × n row-major.
    let bm = faer::MatRef::from_row_major_slice(b, m, rank);
    let db = faer::Mat::<f64>::from_fn(m, rank, |i, t| bq[i * rank + t] - b[i * rank + t]);
    let da = faer::Mat::<f64>::from_fn(rank, n, |t, j| aq[t * n + j] - a[t * n + j]);
    let aqm = faer::MatRef::from_row_major_slice(aq, rank, n);
    let tr = |x: faer::Mat<f64>, y: faer::Mat<f64>| -> f64 {
        // tr(X·Y) for k × k X, Y
        (0..x.nrows())
            .map(|i| (0..x.ncols()).map(|j| x[(i, j)] * y[(j, i)]).sum::<f64>())
            .sum()
    };
    let e2 = tr(db.transpose() * &db, aqm * aqm.transpose())
        + tr(bm.transpose() * bm, &da * da.transpose())
        + 2.0 * tr(bm.transpose() * &db, aqm * da.transpose());
    // NaN or inf (a factor beyond the dtype's range) is measured instead.
    e2.is_finite()
        .then(|| ((r2 + e2.max(0.0)) / d.frob2).sqrt())
}

/// ‖Δ − B·A‖_F / ‖Δ‖_F, from Δ in memory when the operator holds it, else streaming
/// Δ by row blocks. B·A is formed in the product precision a block at a time; the
/// differences and their squares are summed in f64.
pub fn stored_residual(
    op: &mut Operator<'_>,
    b: &[f64],
    a: &[f64],
    rank: usize,
    frob2: f64,
) -> Result<f64> {
    let (m, n) = (op.src().nrows(), op.src().ncols());
    if frob2 <= 0.0 || m * n == 0 {
        return Ok(0.0);
    }
    let err2 = match op.held() {
        Some(Held::F32(buf)) => match super::pair_fma::Fma::get() {
            Some(fma) => FmaResidual::new(fma, b, a, rank, m, n).add(0, buf),
            None => held_residual2::<f32>(buf, m, n, b, a, rank),
        },
        Some(Held::F64(buf)) => held_residual2::<f64>(buf, m, n, b, a, rank),
        None if op.src().single_precision() => match super::pair_fma::Fma::get() {
            Some(fma) => {
                let r = FmaResidual::new(fma, b, a, rank, m, n);
                streamed_residual2::<f32>(op, |r0, rows| r.add(r0, rows))?
            }
            None => {
                let r = Residual::<f32>::new(b, a, rank, m, n);
                streamed_residual2::<f32>(op, |r0, rows| r.add(r0, rows))?
            }
        },
        None => {
            let r = Residual::<f64>::new(b, a, rank, m, n);
            streamed_residual2::<f64>(op, |r0, rows| r.add(r0, rows))?
        }
    };
    Ok((err2 / frob2).sqrt())
}

/// Rows per block of the residual check: the B·A block (rows × n) stays in cache.
const RESIDUAL_BLOCK_ELEMENTS: usize = 1 << 16;

/// Σ (Δ − B·A)² over rows r0.. of `rows` (row-major, k × n).
struct Residual<T: Real> {
    at: faer::Mat<T>,
    bt: faer::Mat<T>,
    n: usize,
}

impl<T: Real> Residual<T> {
    fn new(b: &[f64], a: &[f64], rank: usize, m: usize, n: usize) -> Self {
        // Aᵀ (n × rank) and Bᵀ (rank × m), so that (B·A)ᵀ = Aᵀ·Bᵀ is column-major n × k,
        // i.e. row-major k × n like the rows of Δ: both are walked contiguously.
        Residual {
            at: faer::Mat::from_fn(n, rank, |j, t| T::of(a[t * n + j])),
            bt: faer::Mat::from_fn(rank, m, |t, i| T::of(b[i * rank + t])),
            n,
        }
    }

    fn add(&self, r0: usize, rows: &[T]) -> f64 {
        let n = self.n;
        let k = rows.len() / n;
        let step = (RESIDUAL_BLOCK_ELEMENTS / n).max(1);
        let mut approx_t = faer::Mat::<T>::zeros(n, step.min(k));
        let mut err2 = 0.0;
        let mut i0 = 0;
        while i0 < k {
            let i1 = (i0 + step).min(k);
            faer::linalg::matmul::matmul(
                approx_t.as_mut().subcols_mut(0, i1 - i0),
                faer::Accum::Replace,
                self.at.as_ref(),
                self.bt.as_ref().subcols(r0 + i0, i1 - i0),
                T::of(1.0),
                faer::Par::Seq,
            );
            for (i, row) in rows[i0 * n..i1 * n].chunks_exact(n).enumerate() {
                let col = approx_t
                    .col(i)
                    .try_as_col_major()
                    .expect("a fresh matrix has unit row stride")
                    .as_slice();
                // The kernel's AVX-512 copy: this loop compiled for the baseline target
                // (SSE2) was 8 % of a `compare` of the all-linear 0.6b pair.
                err2 += T::squared_error(row, col);
            }
            i0 = i1;
        }
        err2
    }
}

/// Rows of Δ per group of [`FmaResidual`]: 8 registers of B·A and 8 of sums.
const FMA_ROWS: usize = 8;
/// Columns per register.
const FMA_W: usize = 16;

/// Σ (Δ − B·A)² of f32 rows with AVX-512 FMAs, B·A formed in registers: for 8 rows and
/// 16 columns at a time, the `rank` FMAs of B·A (A's rows broadcast against B's values),
/// then the squared error, without writing B·A. faer's product of inner dimension
/// `rank` wrote it to memory and a second loop read it back (together about three times
/// this kernel's time on the all-linear 0.6b pair). Sums in f32 per row and register
/// lane, then f64.
struct FmaResidual {
    /// A (rank × n), row-major.
    a: Vec<f32>,
    /// B (m × rank), row-major.
    b: Vec<f32>,
    rank: usize,
    n: usize,
}

impl FmaResidual {
    fn new(_: super::pair_fma::Fma, b: &[f64], a: &[f64], rank: usize, m: usize, n: usize) -> Self {
        debug_assert!(b.len() == m * rank && a.len() == rank * n);
        FmaResidual {
            a: a.iter().map(|&x| x as f32).collect(),
            b: b.iter().map(|&x| x as f32).collect(),
            rank,
            n,
        }
    }

    /// Σ (Δ − B·A)² over the rows r0.. given in `rows` (row-major, n columns).
    fn add(&self, r0: usize, rows: &[f32]) -> f64 {
        let (n, k) = (self.n, self.rank);
        assert_eq!(rows.len() % n.max(1), 0, "whole rows");
        let count = rows.len() / n.max(1);
        let b = &self.b[r0 * k..(r0 + count) * k];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Fma` (required by `new`) proves the CPU's features; the slices
        // hold count rows of n and of k values, and A k rows of n.
        unsafe {
            fma_residual_avx512(rows, b, &self.a, n, k)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Fma off x86_64: {b:?}")
    }
}

/// The kernel of [`FmaResidual::add`].
///
/// # Safety
/// The CPU must have the features enabled here; `rows` holds whole rows of n values, `b`
/// k values per row of them and `a` k rows of n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn fma_residual_avx512(rows: &[f32], b: &[f32], a: &[f32], n: usize, k: usize) -> f64 {
    let count = rows.len() / n;
    debug_assert!(b.len() == count * k && a.len() == k * n);
    let (d, bp, ap) = (rows.as_ptr(), b.as_ptr(), a.as_ptr());
    let whole = n - n % FMA_W;
    let mut total = 0f64;
    let mut i0 = 0;
    while i0 < count {
        // SAFETY: rows i0.. of the group are within `rows` and `b`.
        total += unsafe {
            if count - i0 >= FMA_ROWS {
                fma_residual_rows::<FMA_ROWS>(d, bp, ap, n, k, whole, i0)
            } else {
                fma_residual_rows::<1>(d, bp, ap, n, k, whole, i0)
            }
        };
        i0 += if count - i0 >= FMA_ROWS { FMA_ROWS } else { 1 };
    }
    total
}

/// Σ (Δ − B·A)² over the R rows i0.. (their B·A in R registers per 16 columns).
///
/// # Safety
/// As [`fma_residual_avx512`], with rows i0..i0 + R present; `whole` is n rounded down
/// to a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn fma_residual_rows<const R: usize>(
    d: *const f32,
    b: *const f32,
    a: *const f32,
    n: usize,
    k: usize,
    whole: usize,
    i0: usize,
) -> f64 {
    use std::arch::x86_64::*;
    // SAFETY (pointer arithmetic below): rows i0 + r < i0 + R, columns j + 16 ≤ whole ≤ n
    // and j < n, t < k.
    let mut sq = [_mm512_setzero_ps(); R];
    for j in (0..whole).step_by(FMA_W) {
        let mut p = [_mm512_setzero_ps(); R];
        for t in 0..k {
            let at = unsafe { _mm512_loadu_ps(a.add(t * n + j)) };
            for (r, p) in p.iter_mut().enumerate() {
                let bv = _mm512_set1_ps(unsafe { *b.add((i0 + r) * k + t) });
                *p = _mm512_fmadd_ps(bv, at, *p);
            }
        }
        for (r, (sq, p)) in sq.iter_mut().zip(&p).enumerate() {
            let e = _mm512_sub_ps(unsafe { _mm512_loadu_ps(d.add((i0 + r) * n + j)) }, *p);
            *sq = _mm512_fmadd_ps(e, e, *sq);
        }
    }
    let mut s = 0f64;
    for (r, sq) in sq.iter().enumerate() {
        let mut lanes = [0f32; FMA_W];
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *sq) };
        s += lanes.iter().map(|&x| x as f64).sum::<f64>();
        // Columns past the last whole register.
        for j in whole..n {
            let ba: f32 = (0..k)
                .map(|t| unsafe { *b.add((i0 + r) * k + t) * *a.add(t * n + j) })
                .sum();
            let e = unsafe { *d.add((i0 + r) * n + j) } - ba;
            s += (e * e) as f64;
        }
    }
    s
}

fn held_residual2<T: Real>(
    buf: &[T],
    m: usize,
    n: usize,
    b: &[f64],
    a: &[f64],
    rank: usize,
) -> f64 {
    Residual::<T>::new(b, a, rank, m, n).add(0, buf)
}

/// Σ `add(r0, rows)` over one streamed pass of Δ's row blocks (the residual of the
/// stored factors, [`Residual`] or [`FmaResidual`]).
fn streamed_residual2<T: Real>(
    op: &mut Operator<'_>,
    add: impl Fn(usize, &[T]) -> f64,
) -> Result<f64> {
    let mut err2 = 0.0;
    for_each_row_block::<T>(op.src(), op.block_rows(), op.cancel(), |r0, rows, _| {
        err2 += add(r0, rows)
    })?;
    op.reads += 1;
    Ok(err2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_avx512_residual_equals_the_generic_one() {
        let Some(fma) = super::super::pair_fma::Fma::get() else {
            eprintln!("no AVX-512 here: the residual kernel is not tested on this CPU");
            return;
        };
        let mut g = crate::rng::Gaussian::new(7, "extract", "test");
        let mut next = || g.next();
        // Whole and partial groups of rows and registers of columns.
        for (m, n, rank) in [(19, 40, 5), (16, 32, 16), (9, 7, 3), (1, 16, 1)] {
            let b: Vec<f64> = (0..m * rank).map(|_| next()).collect();
            let a: Vec<f64> = (0..rank * n).map(|_| next()).collect();
            let d: Vec<f32> = (0..m * n).map(|_| next() as f32).collect();
            let want = Residual::<f32>::new(&b, &a, rank, m, n).add(0, &d);
            let got = FmaResidual::new(fma, &b, &a, rank, m, n).add(0, &d);
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "{m}×{n} rank {rank}: {got} vs {want}"
            );
            // From a later row on, as a streamed block.
            let r0 = m / 2;
            let want = Residual::<f32>::new(&b, &a, rank, m, n).add(r0, &d[r0 * n..]);
            let got = FmaResidual::new(fma, &b, &a, rank, m, n).add(r0, &d[r0 * n..]);
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "rows {r0}..: {got} vs {want}"
            );
        }
    }

    /// Factors hold their values in the dtype's bytes: the values come back as given,
    /// padding adds zero components, and the journal's bytes must fit the shape.
    #[test]
    fn factors_keep_their_values_in_the_dtype_and_pad_with_zeros() {
        let (b, a) = (
            [1.5, -2.25, 0.125, 3.0],
            [0.5, -0.1875, 1.0, 2.0, -4.0, 0.0],
        );
        let mut f = Factors::new(2, 2, 3, DType::BF16, &b, &a);
        assert_eq!((f.b(), f.a()), (b.to_vec(), a.to_vec()));
        assert_eq!((f.encoding(), f.bytes().len()), (DType::BF16, 20));
        let again = Factors::from_bytes(2, 2, 3, DType::BF16, DType::BF16, f.bytes()).unwrap();
        assert_eq!((again.b(), again.a()), (f.b(), f.a()));
        assert!(Factors::from_bytes(2, 2, 3, DType::BF16, DType::BF16, &f.bytes()[2..]).is_none());
        assert!(Factors::from_bytes(2, 2, 3, DType::BF16, DType::F32, f.bytes()).is_none());
        f.pad_to(3);
        assert_eq!(f.rank, 3);
        assert_eq!(f.b(), [1.5, -2.25, 0.0, 0.125, 3.0, 0.0]);
        assert_eq!(f.a(), [0.5, -0.1875, 1.0, 2.0, -4.0, 0.0, 0.0, 0.0, 0.0]);
        // A dtype that cannot be written is held in f64.
        let g = Factors::new(1, 1, 1, DType::F8E4M3, &[0.1], &[3.0]);
        assert_eq!(
            (g.encoding(), g.b(), g.a()),
            (DType::F64, vec![0.1], vec![3.0])
        );
    }

    #[test]
    fn rank_rules_pick_the_documented_rank() {
        let s = [4.0, 2.0, 1.0, 0.5];
        let f2: f64 = s.iter().map(|x| x * x).sum(); // 21.25
        assert_eq!(choose_rank(&s, f2, RankRule::Fixed { rank: 2 }, None), 2);
        assert_eq!(choose_rank(&s, f2, RankRule::Fixed { rank: 9 }, None), 4);
        assert_eq!(
            choose_rank(&s, f2, RankRule::Energy { fraction: 0.9 }, None),
            2
        ); // 20/21.25
        assert_eq!(
            choose_rank(&s, f2, RankRule::Energy { fraction: 0.95 }, None),
            3
        );
        assert_eq!(
            choose_rank(&s, f2, RankRule::SvRatio { ratio: 4.0 }, None),
            3
        );
        assert_eq!(
            choose_rank(&s, f2, RankRule::SvRatio { ratio: 4.0 }, Some(1)),
            1
        );
    }
}
