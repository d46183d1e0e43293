//! The products of a streamed Δ whose two sides are stored in bf16, straight from both
//! sides' stored values, for CPUs with AVX-512 but without AMX tiles ([`super::tiles`]
//! does the same there): the products with Δᵀ (B = QᵀΔ, and the ΔᵀQ of power
//! iterations) in f32 with FMAs ([`PairTmul`]), and the range sketch Y = ΔX in bf16 with
//! f32 sums where the CPU has AVX-512 BF16 ([`PairRange`]). Both also take Δ in f32 (a
//! held Δ); `lowrank::rsvd` uses the range sketch there, faer's ΔᵀQ being as fast as
//! [`PairTmul`] on an f32 Δ (`examples/sketch_rate`).
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

//! **The range sketch** is only used through its column space, so Δ may be rounded to
//! bf16 there, as on the tiles (the reasons in [`super::tiles`]). `VDPBF16PS` multiplies
//! 32 bf16 pairs into 16 f32 sums, twice the FMA's 16 products per instruction: per pair
//! of columns (j, j + 1), the bf16 pair (Δ(i, j), Δ(i, j + 1)) of a row broadcast against
//! X's rows j and j + 1 interleaved (32 columns of X in two registers) adds to Y(i, ·).
//! [`RANGE_ROWS`] rows share X's registers; their Δ is decoded and rounded 128 columns at
//! a time into a tile in L1. X (Ω's signs, exact in bf16, or a power iteration's basis)
//! is rounded to bf16 once per product. Only for X of width ≤ 32, the screen's.

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

/// Proof that the bf16 dot-product kernel ([`PairRange`]) runs on this CPU.
#[derive(Clone, Copy, Debug)]
pub struct Bf16Dot(());

impl Bf16Dot {
    /// The kernel when the CPU has AVX-512 BF16 (and [`Fma`]'s set), unless
    /// `WEIGHTDIFF_TILES=0` keeps every product in f32 ([`super::tiles::ENV`]).
    pub fn get() -> Option<Bf16Dot> {
        #[cfg(target_arch = "x86_64")]
        if Fma::get().is_some()
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::env::var(super::tiles::ENV).map_or(true, |v| v != "0")
        {
            return Some(Bf16Dot(()));
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
            add_rows_avx512::<true>(
                base.as_ptr(),
                ft.as_ptr(),
                rows,
                n,
                q,
                self.lp,
                &mut self.zt,
            )
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Fma off x86_64: {q:?}");
    }

    /// Adds the rows `r0..` of Δ given in f32 (row-major, whole rows): a held Δ.
    pub fn add_f32_rows(&mut self, r0: usize, delta: &[f32]) {
        let n = self.n;
        assert_eq!(delta.len() % n, 0, "whole rows of {n} values");
        let rows = delta.len() / n;
        let q = &self.q[r0 * self.lp..(r0 + rows) * self.lp];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `add_rows`; `delta` holds rows × n f32 values.
        unsafe {
            add_rows_avx512::<false>(
                std::ptr::null(),
                delta.as_ptr().cast(),
                rows,
                n,
                q,
                self.lp,
                &mut self.zt,
            )
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

/// Rows of Δ per group of accumulators of [`PairRange`]: 12 × 2 registers of 16 f32
/// sums, with X's two and a broadcast, of the 32 AVX-512 registers.
pub const RANGE_ROWS: usize = 12;
/// Columns of Δ rounded at a time by [`PairRange`]: 12 rows × 128 bf16 = 3 KiB, in L1 with
/// the 8 KiB of X's rows they meet and the 6 KiB of stored rows they come from.
const RANGE_COLS: usize = 128;
/// Columns of Y, padded: two registers.
pub const RANGE_WIDTH: usize = 2 * W;

/// Y = ΔX (m × l, l ≤ 32) of a bf16 pair in bf16 with f32 sums, block of rows by block
/// of rows.
pub struct PairRange {
    /// X (n × l) rounded to bf16, rows j and j + 1 interleaved: for each pair of rows,
    /// 32 columns × 2 values; columns past l zero.
    x: Vec<u16>,
    n: usize,
}

impl PairRange {
    /// Whether an X of width `l` for rows of `n` columns is taken.
    pub fn takes(n: usize, l: usize) -> bool {
        n > 0 && n.is_multiple_of(2 * W) && l <= RANGE_WIDTH
    }

    /// For X (n × l) ([`Self::takes`]), given in f32 or f64.
    pub fn new<T: Copy + Into<f64>>(_: Bf16Dot, x: MatRef<'_, T>) -> PairRange {
        let (n, l) = (x.nrows(), x.ncols());
        assert!(Self::takes(n, l), "an X of {n} × {l}");
        let mut xv = vec![0u16; n * RANGE_WIDTH];
        for c in 0..l {
            for j in 0..n {
                let v = half::bf16::from_f64(x[(j, c)].into());
                // Subnormals count as zero in `VDPBF16PS`; so they do here.
                let v = if v.to_bits() & 0x7f80 == 0 {
                    half::bf16::ZERO
                } else {
                    v
                };
                xv[(j / 2) * 2 * RANGE_WIDTH + 2 * c + (j & 1)] = v.to_bits();
            }
        }
        PairRange { x: xv, n }
    }

    /// Y's rows for the rows of Δ = F − A given as both sides' stored values (row-major,
    /// little-endian bf16 bytes, whole rows): rows × [`RANGE_WIDTH`] values, row-major,
    /// the columns past l zero.
    pub fn rows(&self, base: &[u8], ft: &[u8]) -> Vec<f32> {
        let n = self.n;
        assert_eq!(base.len(), ft.len(), "sides of different lengths");
        assert_eq!(base.len() % (2 * n), 0, "whole rows of {n} bf16 values");
        let rows = base.len() / (2 * n);
        let mut y = vec![0f32; rows * RANGE_WIDTH];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Bf16Dot` (required by `new`) proves the CPU's features; the slices'
        // lengths were checked above and in `new`.
        unsafe {
            range_rows_avx512::<true>(base.as_ptr(), ft.as_ptr(), rows, n, &self.x, &mut y)
        };
        y
    }

    /// The same for rows of Δ given in f32 (row-major, whole rows: a held Δ), rounded
    /// to bf16 as the stored pair's are.
    pub fn rows_f32(&self, delta: &[f32]) -> Vec<f32> {
        let n = self.n;
        assert_eq!(delta.len() % n, 0, "whole rows of {n} values");
        let rows = delta.len() / n;
        let mut y = vec![0f32; rows * RANGE_WIDTH];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `rows`; `delta` holds rows × n f32 values.
        unsafe {
            range_rows_avx512::<false>(
                std::ptr::null(),
                delta.as_ptr().cast(),
                rows,
                n,
                &self.x,
                &mut y,
            )
        };
        y
    }
}

/// 16 values of Δ from element `at` on: F − A of two rows of bf16 (`PAIR`; `a`, `f`
/// their bytes), or the f32 values at `f` (`a` unused, never read).
///
/// # Safety
/// The CPU must have the features enabled here; elements at..at + 16 exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn delta16<const PAIR: bool>(
    a: *const u8,
    f: *const u8,
    at: usize,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's.
    unsafe {
        if PAIR {
            let (fr, ar) = (
                _mm256_loadu_si256(f.add(2 * at).cast()),
                _mm256_loadu_si256(a.add(2 * at).cast()),
            );
            _mm512_sub_ps(widen(fr), widen(ar))
        } else {
            _mm512_loadu_ps(f.cast::<f32>().add(at))
        }
    }
}

/// y(i, c) = Σ_j bf16(Δ(i, j))·x(j, c) for `rows` rows of Δ ([`delta16`]: F − A of the
/// bf16 rows at `a` and `f` when `PAIR`, else the f32 rows at `f`), x in [`PairRange`]'s
/// layout; `y` rows × 32.
///
/// # Safety
/// The CPU must have the features enabled here; `f` (and `a` when `PAIR`; else unused,
/// may be null) hold `rows` whole rows of n values, n a multiple of 32, `x` n × 32
/// values and `y` rows × 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
unsafe fn range_rows_avx512<const PAIR: bool>(
    a: *const u8,
    f: *const u8,
    rows: usize,
    n: usize,
    x: &[u16],
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == n * RANGE_WIDTH && y.len() == rows * RANGE_WIDTH);
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    // bf16(Δ) of up to RANGE_ROWS rows × RANGE_COLS columns, as pairs (u32).
    let mut tile = [0u32; RANGE_ROWS * RANGE_COLS / 2];
    for j0 in (0..n).step_by(RANGE_COLS) {
        let cols = RANGE_COLS.min(n - j0);
        let mut i0 = 0;
        while i0 < rows {
            let k = RANGE_ROWS.min(rows - i0);
            // SAFETY (pointer arithmetic below): i0 + r < rows, j0 + j + 32 ≤ n.
            for r in 0..k {
                for j in (0..cols).step_by(2 * W) {
                    let at = (i0 + r) * n + j0 + j;
                    let (d0, d1) =
                        unsafe { (delta16::<PAIR>(a, f, at), delta16::<PAIR>(a, f, at + W)) };
                    // Element e < 16 from d0 (column j + e), the rest from d1: columns in
                    // order, so each 32-bit lane holds the pair (j + 2p, j + 2p + 1).
                    // SAFETY: both are 512 bits of plain data.
                    let pairs: __m512i = unsafe {
                        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(d1, d0))
                    };
                    unsafe {
                        _mm512_storeu_si512(
                            tile.as_mut_ptr().add(r * RANGE_COLS / 2 + j / 2).cast(),
                            pairs,
                        )
                    };
                }
            }
            // SAFETY: rows i0..i0 + k are in the tile, the block and y.
            unsafe {
                let yr = yp.add(i0 * RANGE_WIDTH);
                if k == RANGE_ROWS {
                    dot_rows::<RANGE_ROWS>(&tile, 0, xp, j0, cols, yr);
                } else {
                    for r in 0..k {
                        dot_rows::<1>(&tile, r, xp, j0, cols, yr.add(r * RANGE_WIDTH));
                    }
                }
            }
            i0 += k;
        }
    }
}

/// y(r + i, ·) += Σ_p tile(r + i, p)·x(j0/2 + p, ·) for K rows, 2·K accumulators.
///
/// # Safety
/// As [`range_rows_avx512`]: rows r..r + K of the tile are decoded, `x` holds the pairs of
/// rows j0/2.. and `y` K rows of 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512bf16")]
#[inline]
unsafe fn dot_rows<const K: usize>(
    tile: &[u32; RANGE_ROWS * RANGE_COLS / 2],
    r: usize,
    x: *const u16,
    j0: usize,
    cols: usize,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(r + K <= RANGE_ROWS && cols <= RANGE_COLS);
    let t = tile.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; K];
    // SAFETY (pointer arithmetic): i < K rows of y; pairs p < cols/2 of the tile and x.
    for (i, acc) in acc.iter_mut().enumerate() {
        *acc = unsafe {
            [
                _mm512_loadu_ps(y.add(i * RANGE_WIDTH)),
                _mm512_loadu_ps(y.add(i * RANGE_WIDTH + W)),
            ]
        };
    }
    for p in 0..cols / 2 {
        let xr = unsafe { x.add((j0 / 2 + p) * 2 * RANGE_WIDTH) };
        let (x0, x1): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(xr.cast())),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    xr.add(RANGE_WIDTH).cast(),
                )),
            )
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            let d = _mm512_set1_epi32(unsafe { *t.add((r + i) * RANGE_COLS / 2 + p) } as i32);
            let d = unsafe { std::mem::transmute::<__m512i, __m512bh>(d) };
            acc[0] = _mm512_dpbf16_ps(acc[0], d, x0);
            acc[1] = _mm512_dpbf16_ps(acc[1], d, x1);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        unsafe {
            _mm512_storeu_ps(y.add(i * RANGE_WIDTH), acc[0]);
            _mm512_storeu_ps(y.add(i * RANGE_WIDTH + W), acc[1]);
        }
    }
}

/// Widens 16 bf16 values to f32 (their bits moved to the high half: exact).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn widen(x: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
}

/// zt[c][j] += Σ_r q[r][c]·Δ[r][j] over `rows` rows of Δ ([`delta16`]: F − A of the
/// bf16 rows at `a` and `f` when `PAIR`, else the f32 rows at `f`), for the lp columns c
/// of `q` (rows of lp values) and the n columns j.
///
/// # Safety
/// The CPU must have the features enabled here; `f` (and `a` when `PAIR`; else unused,
/// may be null) hold `rows` whole rows of n values, `q` lp values per row of them, `zt`
/// lp × n values; n and lp are multiples of [`W`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn add_rows_avx512<const PAIR: bool>(
    a: *const u8,
    f: *const u8,
    rows: usize,
    n: usize,
    q: &[f32],
    lp: usize,
    zt: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() == rows * lp && zt.len() == lp * n);
    let (q, z) = (q.as_ptr(), zt.as_mut_ptr());
    // Each strip of 16 columns of the block's rows (32 bytes of each side's rows) is read
    // from wherever the block is once and stays in L1 for every group of Q's columns;
    // the next strip reads the second half of the same cache lines. With the groups
    // outside, a block larger than L2 (128 rows of 25 600 columns: 13 MB) was read once
    // per group from L3 or memory (user time of a p32 `compare` −5 % on a Xeon, BENCHMARKS.md).
    for j in (0..n).step_by(W) {
        for g in (0..lp).step_by(W) {
            // SAFETY (all pointer arithmetic below): g + c < lp, j + 16 ≤ n, r < rows.
            let mut acc = [_mm512_setzero_ps(); W];
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = unsafe { _mm512_loadu_ps(z.add((g + c) * n + j)) };
            }
            for r in 0..rows {
                let d = unsafe { delta16::<PAIR>(a, f, r * n + j) };
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
        let mut g = crate::rng::Gaussian::new(7, "pair_fma", "test");
        let mut next = || g.next();
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
        // The same Δ given in f32 (a held Δ) gives the same bits.
        let delta: Vec<f32> = f
            .iter()
            .zip(&a)
            .map(|(f, a)| f.to_f32() - a.to_f32())
            .collect();
        let mut p = PairTmul::new(fma, q.as_ref(), n);
        p.add_f32_rows(0, &delta[..20 * n]);
        p.add_f32_rows(20, &delta[20 * n..]);
        assert_eq!(p.finish().expect("finite"), z);
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
        // The range sketch in bf16 of 25 rows (two groups of 12 and one), n = 48 → 64
        // columns, against the f64 product of bf16(Δ) and bf16(X).
        if let Some(dot) = Bf16Dot::get() {
            let n2 = 64;
            let a2: Vec<half::bf16> = (0..25 * n2).map(|_| half::bf16::from_f64(next())).collect();
            let f2: Vec<half::bf16> = a2
                .iter()
                .map(|&x| half::bf16::from_f64(x.to_f64() + 0.01 * next()))
                .collect();
            let x = Mat::<f64>::from_fn(n2, l, |_, _| next());
            let r = PairRange::new(dot, x.as_ref());
            let y = r.rows(&bytes(&a2), &bytes(&f2));
            let delta: Vec<f32> = f2
                .iter()
                .zip(&a2)
                .map(|(f, a)| f.to_f32() - a.to_f32())
                .collect();
            assert_eq!(r.rows_f32(&delta), y);
            let bf = |v: f64| half::bf16::from_f64(v).to_f64();
            for i in 0..25 {
                for c in 0..l {
                    let want: f64 = (0..n2)
                        .map(|j| {
                            let d = (f2[i * n2 + j].to_f32() - a2[i * n2 + j].to_f32()) as f64;
                            bf(x[(j, c)]) * bf(d)
                        })
                        .sum();
                    assert!(
                        (y[i * RANGE_WIDTH + c] as f64 - want).abs() < 1e-5,
                        "Y({i}, {c})"
                    );
                }
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
