//! Randomized truncated SVD (Halko, Martinsson & Tropp, "Finding structure with
//! randomness", SIAM Review 2011, algorithms 4.4 and 5.1) on faer, over a delta that is
//! either held in memory or streamed by row blocks.
//!
//! With l = k + oversample columns and q power iterations:
//! 1. Ω ∈ ℝ^{n×l} standard normal, seeded by (seed, tensor name): deterministic output.
//! 2. Y = ΔΩ; then q times: Q = qr(Y), Z = qr(ΔᵀQ), Y = ΔZ (re-orthonormalizing at each
//!    step keeps small singular directions from drowning in rounding).
//! 3. Q = qr(Y); B = QᵀΔ ∈ ℝ^{l×n}; B = Ũ S Vᵀ (exact thin SVD); U = QŨ.
//!
//! Δ ≈ U S Vᵀ, and for the rank-k truncation ‖Δ − U_k S_k V_kᵀ‖²_F = ‖Δ‖²_F − Σ_{i≤k} sᵢ²
//! exactly (the projection is orthogonal), so residuals reported from ‖Δ‖_F and the
//! computed sᵢ are the true residuals of the factors we write.
//!
//! Memory beyond Δ itself: Ω, Y, Z, Q, B and the factors, O((m + n)·l). When Δ is too large
//! to hold (see [`crate::lowrank::LowRankOptions::dense_budget_bytes`]), it is never
//! materialized: each product streams row blocks of Δ decoded from the mapped bytes, at
//! the cost of one read of the tensor per product (2q + 2 reads).
//!
//! When l reaches min(m, n) the randomized method buys nothing and the exact thin SVD of
//! Δ is computed instead.

use super::{DeltaRows, LowRankOptions, for_each_row_block};
use crate::error::Result;
use crate::rng::Gaussian;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// A truncated decomposition Δ ≈ U diag(s) Vᵀ, singular values non-increasing.
pub struct Decomposition {
    /// m × l
    pub u: Mat<f64>,
    /// l values, non-increasing.
    pub s: Vec<f64>,
    /// n × l
    pub v: Mat<f64>,
    /// ‖Δ‖²_F, accumulated in f64 while reading Δ.
    pub frob2: f64,
    /// Σ over elements of the expected squared rounding error of the fine-tuned value.
    pub rounding_var_sum: f64,
    /// `"randomized"` or `"exact"`.
    pub method: &'static str,
    /// `"in_memory"` or `"streamed"`.
    pub path: &'static str,
    /// Δ itself when it was held in memory, for the residual check to reuse.
    pub delta: Option<InMemoryDelta>,
}

/// Δ held in memory as the row-major buffer it was decoded into; faer reads it through a
/// strided view, so it is never copied into another layout.
pub struct InMemoryDelta {
    buf: Vec<f64>,
    m: usize,
    n: usize,
}

impl InMemoryDelta {
    /// Δ as an m × n matrix view.
    pub fn view(&self) -> MatRef<'_, f64> {
        MatRef::from_row_major_slice(&self.buf, self.m, self.n)
    }
    /// Rows `r0..r1`, row-major.
    pub fn rows(&self, r0: usize, r1: usize) -> &[f64] {
        &self.buf[r0 * self.n..r1 * self.n]
    }
}

/// Δ as the products need it.
enum Operator<'a> {
    InMemory(InMemoryDelta),
    Streamed {
        src: &'a dyn DeltaRows,
        block_rows: usize,
    },
}

/// Statistics gathered while reading Δ.
#[derive(Default, Clone, Copy)]
struct ReadStats {
    frob2: f64,
    rounding_var_sum: f64,
}

impl Operator<'_> {
    /// Δ · x (m × l).
    fn mul(&self, x: MatRef<'_, f64>, stats: &mut ReadStats) -> Result<Mat<f64>> {
        match self {
            Operator::InMemory(d) => Ok(d.view() * x),
            Operator::Streamed { src, block_rows } => {
                let (m, n) = (src.nrows(), src.ncols());
                let mut y = Mat::<f64>::zeros(m, x.ncols());
                for_each_row_block(*src, *block_rows, |r0, rows, (f2, var)| {
                    let blk = MatRef::from_row_major_slice(rows, rows.len() / n, n);
                    stats.frob2 += f2;
                    stats.rounding_var_sum += var;
                    let rows = blk.nrows();
                    matmul(
                        y.as_mut().subrows_mut(r0, rows),
                        Accum::Replace,
                        blk,
                        x,
                        1.0,
                        Par::Seq,
                    );
                })?;
                Ok(y)
            }
        }
    }

    /// Δᵀ · q (n × l).
    fn tmul(&self, q: MatRef<'_, f64>) -> Result<Mat<f64>> {
        match self {
            Operator::InMemory(d) => Ok(d.view().transpose() * q),
            Operator::Streamed { src, block_rows } => {
                let n = src.ncols();
                let mut z = Mat::<f64>::zeros(n, q.ncols());
                for_each_row_block(*src, *block_rows, |r0, rows, _| {
                    let blk = MatRef::from_row_major_slice(rows, rows.len() / n, n);
                    let rows = blk.nrows();
                    matmul(
                        z.as_mut(),
                        Accum::Add,
                        blk.transpose(),
                        q.subrows(r0, rows),
                        1.0,
                        Par::Seq,
                    );
                })?;
                Ok(z)
            }
        }
    }
}

/// Reads all of Δ into memory with its statistics.
fn load(src: &dyn DeltaRows) -> Result<(InMemoryDelta, ReadStats)> {
    let (m, n) = (src.nrows(), src.ncols());
    let mut buf = vec![0f64; m * n];
    let (frob2, rounding_var_sum) = if m * n == 0 {
        (0.0, 0.0)
    } else {
        src.read_rows(0, m, &mut buf)?
    };
    Ok((
        InMemoryDelta { buf, m, n },
        ReadStats {
            frob2,
            rounding_var_sum,
        },
    ))
}

fn orthonormal(y: &Mat<f64>) -> Mat<f64> {
    y.qr().compute_thin_Q()
}

/// Decomposes Δ keeping `k` components (plus oversampling), as described in the module
/// docs. `k` is clamped to min(m, n).
pub fn decompose(
    src: &dyn DeltaRows,
    name: &str,
    k: usize,
    opts: &LowRankOptions,
) -> Result<Decomposition> {
    let (m, n) = (src.nrows(), src.ncols());
    let min_dim = m.min(n);
    let l = (k + opts.oversample).min(min_dim);
    let fits = m.saturating_mul(n).saturating_mul(8) <= opts.dense_budget_bytes;
    if l >= min_dim || min_dim == 0 {
        // Exact: the sketch would be as large as the matrix. Δ is small in one dimension
        // here (min(m, n) ≤ k + oversample), so holding it costs O((m + n)·l) anyway.
        let (d, st) = load(src)?;
        return exact(name, d, st);
    }
    let (op, mut stats, path) = if fits {
        let (d, st) = load(src)?;
        (Operator::InMemory(d), st, "in_memory")
    } else {
        let block_rows = (opts.block_bytes / (8 * n)).max(1);
        (
            Operator::Streamed { src, block_rows },
            ReadStats::default(),
            "streamed",
        )
    };
    let mut g = Gaussian::new(opts.seed, name, "rsvd-omega");
    let omega = Mat::<f64>::from_fn(n, l, |_, _| g.next());
    let mut first = ReadStats::default();
    let mut y = op.mul(omega.as_ref(), &mut first)?;
    if path == "streamed" {
        stats = first;
    }
    for _ in 0..opts.power_iters {
        let q = orthonormal(&y);
        let z = orthonormal(&op.tmul(q.as_ref())?);
        y = op.mul(z.as_ref(), &mut ReadStats::default())?;
    }
    let q = orthonormal(&y);
    // B = QᵀΔ = (ΔᵀQ)ᵀ
    let bt = op.tmul(q.as_ref())?;
    let svd = bt.transpose().thin_svd().map_err(|e| svd_failed(name, e))?;
    let u = &q * svd.U();
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    Ok(Decomposition {
        u,
        s,
        v: svd.V().to_owned(),
        frob2: stats.frob2,
        rounding_var_sum: stats.rounding_var_sum,
        method: "randomized",
        path,
        delta: match op {
            Operator::InMemory(d) => Some(d),
            Operator::Streamed { .. } => None,
        },
    })
}

fn svd_failed(name: &str, e: faer::linalg::svd::SvdError) -> crate::error::Error {
    crate::error::Error::Numerical {
        tensor: name.to_string(),
        reason: format!("the SVD did not converge ({e:?})"),
    }
}

fn exact(name: &str, d: InMemoryDelta, st: ReadStats) -> Result<Decomposition> {
    let (m, n) = (d.m, d.n);
    let (u, s, v) = if m.min(n) == 0 {
        (Mat::zeros(m, 0), Vec::new(), Mat::zeros(n, 0))
    } else {
        let svd = d.view().thin_svd().map_err(|e| svd_failed(name, e))?;
        (
            svd.U().to_owned(),
            svd.S().column_vector().iter().copied().collect(),
            svd.V().to_owned(),
        )
    };
    Ok(Decomposition {
        u,
        s,
        v,
        frob2: st.frob2,
        rounding_var_sum: st.rounding_var_sum,
        method: "exact",
        path: "in_memory",
        delta: Some(d),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::tests::MatrixRows;

    /// A = U diag(σ) Vᵀ with σᵢ = 0.7^i: the randomized values match the exact ones.
    #[test]
    fn randomized_matches_exact_on_a_decaying_spectrum() {
        let (m, n) = (300, 200);
        let mut g = Gaussian::new(3, "a", "test");
        let x = Mat::<f64>::from_fn(m, n, |_, _| g.next());
        let y = Mat::<f64>::from_fn(n, n, |_, _| g.next());
        let qu = x.qr().compute_thin_Q();
        let qv = y.qr().compute_thin_Q();
        let sig: Vec<f64> = (0..n).map(|i| 0.7f64.powi(i as i32)).collect();
        let a = Mat::<f64>::from_fn(m, n, |i, j| {
            (0..n).map(|t| qu[(i, t)] * sig[t] * qv[(j, t)]).sum()
        });
        let src = MatrixRows(a);
        let opts = LowRankOptions::default();
        let r = decompose(&src, "a", 16, &opts).unwrap();
        assert_eq!(r.method, "randomized");
        for (i, (got, want)) in r.s.iter().zip(&sig).take(16).enumerate() {
            assert!((got - want).abs() <= 1e-3 * want, "σ{i}: {got} vs {want}");
        }
        let streamed = LowRankOptions {
            dense_budget_bytes: 0,
            block_bytes: 8 * n * 7,
            ..opts.clone()
        };
        let rs = decompose(&src, "a", 16, &streamed).unwrap();
        assert_eq!(rs.path, "streamed");
        for (x, y) in rs.s.iter().zip(&r.s).take(16) {
            assert!((x - y).abs() <= 1e-9 * r.s[0]);
        }
        assert!((rs.frob2 - r.frob2).abs() <= 1e-9 * r.frob2);
    }

    #[test]
    fn exact_path_is_taken_for_thin_matrices() {
        let mut g = Gaussian::new(1, "b", "test");
        let a = Mat::<f64>::from_fn(50, 10, |_, _| g.next());
        let r = decompose(&MatrixRows(a.clone()), "b", 16, &LowRankOptions::default()).unwrap();
        assert_eq!(r.method, "exact");
        let e = a.singular_values().unwrap();
        for (x, y) in r.s.iter().zip(&e) {
            assert!((x - y).abs() < 1e-12);
        }
    }
}
