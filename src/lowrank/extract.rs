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
use crate::checkpoint::dtype::DType;
use crate::error::Result;

/// What to extract for one tensor.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Storage dtype of the factors (their rounding is part of the stored residual).
    pub dtype: DType,
    /// Pad (with zero components) or cut every tensor to exactly this rank.
    pub uniform_rank: Option<usize>,
}

/// LoRA factors of one tensor, row-major f64, before rounding to the storage dtype.
#[derive(Debug, Clone)]
pub struct Factors {
    pub rank: usize,
    /// m × rank
    pub b: Vec<f64>,
    /// rank × n
    pub a: Vec<f64>,
    pub m: usize,
    pub n: usize,
    /// Storage dtype of the factors.
    pub dtype: DType,
    /// ‖Δ − BA‖_F / ‖Δ‖_F with exact factors (Eckart–Young, from the computed spectrum).
    pub residual: f64,
    /// The same with the factors rounded to the storage dtype, measured against Δ.
    pub residual_stored: f64,
}

impl Factors {
    /// Pads the factors with zero components up to `rank` (no-op when already there):
    /// B·A, and so every residual, is unchanged.
    pub fn pad_to(&mut self, rank: usize) {
        if rank <= self.rank {
            return;
        }
        let mut b = vec![0f64; self.m * rank];
        for i in 0..self.m {
            b[i * rank..i * rank + self.rank]
                .copy_from_slice(&self.b[i * self.rank..(i + 1) * self.rank]);
        }
        self.b = b;
        self.a.resize(rank * self.n, 0.0);
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
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::F32 => v as f32 as f64,
        _ => v,
    }
}

/// Builds the factors for `target` and measures their stored residual against Δ (from
/// the held Δ, or one more streamed pass).
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
    let bq: Vec<f64> = b.iter().map(|&x| round_to(target.dtype, x)).collect();
    let aq: Vec<f64> = a.iter().map(|&x| round_to(target.dtype, x)).collect();
    let residual_stored = stored_residual(op, &bq, &aq, rank, d.frob2)?;
    Ok(Factors {
        rank,
        b,
        a,
        m,
        n,
        dtype: target.dtype,
        residual,
        residual_stored,
    })
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
        Some(Held::F32(buf)) => held_residual2::<f32>(buf, m, n, b, a, rank),
        Some(Held::F64(buf)) => held_residual2::<f64>(buf, m, n, b, a, rank),
        None if op.src().single_precision() => streamed_residual2::<f32>(op, b, a, rank)?,
        None => streamed_residual2::<f64>(op, b, a, rank)?,
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
                // Sums in T over at most 256 elements, then f64.
                for (dc, pc) in row.chunks(256).zip(col.chunks(256)) {
                    let mut acc = T::of(0.0);
                    for (&d, &p) in dc.iter().zip(pc) {
                        let e = d - p;
                        acc += e * e;
                    }
                    err2 += acc.to();
                }
            }
            i0 = i1;
        }
        err2
    }
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

fn streamed_residual2<T: Real>(
    op: &mut Operator<'_>,
    b: &[f64],
    a: &[f64],
    rank: usize,
) -> Result<f64> {
    let (m, n) = (op.src().nrows(), op.src().ncols());
    let r = Residual::<T>::new(b, a, rank, m, n);
    let mut err2 = 0.0;
    for_each_row_block::<T>(op.src(), op.block_rows(), op.cancel(), |r0, rows, _| {
        err2 += r.add(r0, rows)
    })?;
    op.reads += 1;
    Ok(err2)
}

#[cfg(test)]
mod tests {
    use super::*;

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
