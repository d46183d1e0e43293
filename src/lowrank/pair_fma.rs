//! The products with Δᵀ of a streamed Δ whose two sides are stored in bf16 (B = QᵀΔ, and
//! the ΔᵀQ of power iterations), in f32 with AVX-512 FMAs straight from both sides' stored
//! values, for CPUs without AMX tiles ([`super::tiles::Left`] does the same there).
//!
//! The f32 path decodes each row block of Δ into an f32 buffer
//! (`kernels::fast::delta_f32`, 9 % of the CPU time of a `compare` of the 32B-shaped pair on
//! an AMD EPYC without AMX, BENCHMARKS.md) and then multiplies the buffer on faer. Here the
//! decoding happens in registers: 16 columns of a row of each side are widened from bf16
//! (exact) and subtracted, Δ = F − A, exactly as `delta_f32` computes it (two bf16 values
//! differ by an f32 exactly unless their exponents are 16 apart), and multiplied at once
//! by 16 columns of Q:
//!
//! ```text
//!   Zᵀ(c, j) += Σ_r Q(r, c) · Δ(r, j)
//! ```
//!
//! with 16 accumulators of 16 columns j each held in registers over a block of rows. That
//! is one FMA per element of Δ per column of Q, as many as faer's product, with half the
//! bytes read (bf16 instead of f32) and no Δ written. The values are those of the f32
//! products on the same Δ, summed in another order. A side holding inf or NaN makes the
//! result non-finite: the product is then redone on the f32 path, which takes such values
//! as no change.

use faer::{Mat, MatRef};

/// Proof that the AVX-512 kernel runs on this CPU ([`Fma::get`]).
#[derive(Clone, Copy, Debug)]
pub struct Fma(());

impl Fma {
    /// The kernel when the CPU has AVX-512 (F, BW, VL and the rest of the kernels' set,
    /// `kernels::fast`).
    pub fn get() -> Option<Fma> {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::fast::avx512() {
            return Some(Fma(()));
        }
        None
    }
}

/// Columns of Δ per accumulator, and columns of Q per group of accumulators.
const W: usize = 16;

/// ΔᵀQ of a bf16 pair, accumulated block of rows by block of rows.
pub struct PairTmul {
    /// Q (m × l) as f32 rows of `lp` values, the columns past l zero.
    q: Vec<f32>,
    l: usize,
    /// l padded to whole groups of [`W`].
    lp: usize,
    n: usize,
    /// (ΔᵀQ)ᵀ, lp × n row-major.
    zt: Vec<f32>,
}

impl PairTmul {
    /// Whether rows of `n` columns are taken: whole accumulators.
    pub fn takes(n: usize) -> bool {
        n > 0 && n.is_multiple_of(W)
    }

    /// For Q (m × l) and a Δ of n columns ([`Self::takes`]).
    pub fn new(_: Fma, q: MatRef<'_, f64>, n: usize) -> PairTmul {
        assert!(Self::takes(n), "n = {n} is not a multiple of {W}");
        let (m, l) = (q.nrows(), q.ncols());
        let lp = l.div_ceil(W) * W;
        let mut qr = vec![0f32; m * lp];
        for c in 0..l {
            for r in 0..m {
                qr[r * lp + c] = q[(r, c)] as f32;
            }
        }
        PairTmul {
            q: qr,
            l,
            lp,
            n,
            zt: vec![0f32; lp * n],
        }
    }

    /// Adds the rows `r0..` of Δ = F − A given as both sides' stored values (row-major,
    /// little-endian bf16 bytes, whole rows).
    pub fn add_rows(&mut self, r0: usize, base: &[u8], ft: &[u8]) {
        let n = self.n;
        assert_eq!(base.len(), ft.len(), "sides of different lengths");
        assert_eq!(base.len() % (2 * n), 0, "whole rows of {n} bf16 values");
        let rows = base.len() / (2 * n);
        let q = &self.q[r0 * self.lp..(r0 + rows) * self.lp];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Fma` (required by `new`) proves the CPU has AVX-512; the lengths
        // of every slice the kernel reads and writes were checked above and in `new`.
        unsafe {
            add_rows_avx512(base, ft, n, q, self.lp, &mut self.zt)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Fma off x86_64: {q:?}");
    }

    /// ΔᵀQ (n × l), or `None` when a value is not finite (a side held inf or NaN).
    pub fn finish(self) -> Option<Mat<f64>> {
        let n = self.n;
        let zt = &self.zt;
        zt[..self.l * n]
            .iter()
            .all(|v| v.is_finite())
            .then(|| Mat::from_fn(n, self.l, |j, c| zt[c * n + j] as f64))
    }
}

/// Widens 16 bf16 values to f32 (their bits moved to the high half: exact).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn widen(x: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
}

/// zt[c][j] += Σ_r q[r][c]·(F[r][j] − A[r][j]) over the rows of `base` (A) and `ft` (F),
/// for the lp columns c of `q` (rows of lp values) and the n columns j.
///
/// # Safety
/// The CPU must have the features enabled here; `base` and `ft` hold whole rows of n
/// bf16 values, `q` lp values per row of them, `zt` lp × n values; n and lp are multiples
/// of [`W`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn add_rows_avx512(base: &[u8], ft: &[u8], n: usize, q: &[f32], lp: usize, zt: &mut [f32]) {
    use std::arch::x86_64::*;
    let rows = base.len() / (2 * n);
    debug_assert!(q.len() == rows * lp && zt.len() == lp * n);
    let (a, f, q, z) = (base.as_ptr(), ft.as_ptr(), q.as_ptr(), zt.as_mut_ptr());
    for g in (0..lp).step_by(W) {
        // Consecutive strips of 16 columns share the rows' cache lines: the second half
        // of each line is read while the block's rows are still in L1.
        for j in (0..n).step_by(W) {
            // SAFETY (all pointer arithmetic below): g + c < lp, j + 16 ≤ n, r < rows.
            let mut acc = [_mm512_setzero_ps(); W];
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = unsafe { _mm512_loadu_ps(z.add((g + c) * n + j)) };
            }
            for r in 0..rows {
                let at = (r * n + j) * 2;
                let (fr, ar) = unsafe {
                    (
                        _mm256_loadu_si256(f.add(at).cast()),
                        _mm256_loadu_si256(a.add(at).cast()),
                    )
                };
                let d = _mm512_sub_ps(widen(fr), widen(ar));
                let qr = unsafe { q.add(r * lp + g) };
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(d, _mm512_set1_ps(unsafe { *qr.add(c) }), *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                unsafe { _mm512_storeu_ps(z.add((g + c) * n + j), *acc) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_tmul_equals_the_f64_product_of_the_decoded_delta() {
        let Some(fma) = Fma::get() else {
            eprintln!("no AVX-512 here: the kernel is not tested on this CPU");
            return;
        };
        let (m, n, l) = (37, 48, 20);
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let a: Vec<half::bf16> = (0..m * n).map(|_| half::bf16::from_f64(next())).collect();
        let f: Vec<half::bf16> = a
            .iter()
            .map(|&x| half::bf16::from_f64(x.to_f64() + 0.01 * next()))
            .collect();
        let q = Mat::<f64>::from_fn(m, l, |_, _| next());
        let bytes =
            |v: &[half::bf16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (ab, fb) = (bytes(&a), bytes(&f));
        let mut p = PairTmul::new(fma, q.as_ref(), n);
        // Two blocks of rows, as a streamed pass gives them.
        let split = 2 * n * 20;
        p.add_rows(0, &ab[..split], &fb[..split]);
        p.add_rows(20, &ab[split..], &fb[split..]);
        let z = p.finish().expect("finite");
        for j in 0..n {
            for c in 0..l {
                let want: f64 = (0..m)
                    .map(|r| {
                        (q[(r, c)] as f32 as f64) * (f[r * n + j].to_f64() - a[r * n + j].to_f64())
                    })
                    .sum();
                assert!(
                    (z[(j, c)] - want).abs() < 1e-5,
                    "({j}, {c}): {} vs {want}",
                    z[(j, c)]
                );
            }
        }
        // A side holding inf: no result, the f32 path redoes it.
        let mut fi = fb.clone();
        fi[2 * 5..2 * 5 + 2].copy_from_slice(&half::bf16::INFINITY.to_le_bytes());
        let mut p = PairTmul::new(fma, q.as_ref(), n);
        p.add_rows(0, &ab, &fi);
        assert!(p.finish().is_none());
    }
}
