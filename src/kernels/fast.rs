//! The fast kernel: blocks decoded to f32 (or f64), 16-lane accumulation, f64 totals.
//!
//! The same generic body is compiled three times, for the baseline target, with AVX2 and
//! with AVX-512 enabled (`#[target_feature]`), and the widest copy the CPU runs is chosen
//! at run time. This is how the prototype reached 18–33 GB/s on bf16 while staying a
//! portable binary (`../shared/bench/README.md`), without writing intrinsics by hand.
//! The copies give the same bits: the order of every sum is fixed by the code's 16 lanes,
//! which AVX-512 holds in one register (27 % less CPU than AVX2 for `compare --no-lora`
//! of the 32B-shaped pair, BENCHMARKS.md). Squares and products are added with a fused
//! multiply-add (`mul_add`, one rounding instead of two), in every copy: 4 of the 18
//! vector instructions per 16 elements fewer, −13 % user time of that `compare --no-lora`
//! on a 2-vCPU Xeon whose two vector ports bound the loop. The AVX2 copy therefore
//! also needs FMA, which every AVX2 CPU has; the baseline copy, for older CPUs, gets the
//! same bits from the software `fma`, more slowly.

use super::{Accum, threshold_f32};
use crate::checkpoint::dtype::{DType, decode_f32, decode_f64};

/// Values per block. Each of the 16 lanes sums BLOCK/16 = 64 values in f32 before the
/// block total is added in f64, which keeps the f32 rounding error near 1e-7 relative
/// (SPEC §3 allows blocks of up to 4096).
pub const BLOCK: usize = 1024;
const LANES: usize = 16;

/// Sums of a tensor window pair. `a` and `b` hold the same number of elements.
pub fn diff(a: &[u8], da: DType, b: &[u8], db: DType, threshold: f64) -> Accum {
    let n = a.len() / da.size();
    assert_eq!(
        n,
        b.len() / db.size(),
        "windows of different element counts"
    );
    diff_simd(a, da, b, db, threshold)
}

simd_copies! {
    fn diff_simd / diff_avx2 / diff_avx512
        = diff_generic(a: &[u8], da: DType, b: &[u8], db: DType, threshold: f64) -> Accum;
}

/// Σ (d − p)² of two rows of equal length (the residual of stored LoRA factors against a
/// held Δ, `lowrank::extract`): in the rows' precision over chunks of 256 values in 16
/// lanes, each chunk's total added in f64, so that every copy gives the same bits.
pub fn squared_error<T: SquaredError>(d: &[T], p: &[T]) -> f64 {
    assert_eq!(d.len(), p.len(), "rows of different lengths");
    T::simd(d, p)
}

/// f32 or f64: the element types of [`squared_error`].
pub trait SquaredError: Copy {
    #[doc(hidden)]
    fn simd(d: &[Self], p: &[Self]) -> f64;
}

impl SquaredError for f32 {
    fn simd(d: &[f32], p: &[f32]) -> f64 {
        squared_error_f32(d, p)
    }
}

impl SquaredError for f64 {
    fn simd(d: &[f64], p: &[f64]) -> f64 {
        squared_error_f64(d, p)
    }
}

simd_copies! {
    fn squared_error_f32 / squared_error_f32_avx2 / squared_error_f32_avx512
        = squared_error_f32_generic(d: &[f32], p: &[f32]) -> f64;
}

simd_copies! {
    fn squared_error_f64 / squared_error_f64_avx2 / squared_error_f64_avx512
        = squared_error_f64_generic(d: &[f64], p: &[f64]) -> f64;
}

macro_rules! squared_error_body {
    ($name:ident, $t:ty) => {
        #[inline(always)]
        fn $name(d: &[$t], p: &[$t]) -> f64 {
            let mut total = 0.0;
            for (dc, pc) in d.chunks(256).zip(p.chunks(256)) {
                // LANES independent partial sums: one running sum is a chain of adds the
                // compiler may not reorder (one element per add latency); these vectorize.
                let mut acc = [0.0 as $t; LANES];
                let (dh, dt) = dc.split_at(dc.len() - dc.len() % LANES);
                let (ph, pt) = pc.split_at(dh.len());
                for (dl, pl) in dh.chunks_exact(LANES).zip(ph.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        let e = dl[l] - pl[l];
                        acc[l] += e * e;
                    }
                }
                for (&d, &p) in dt.iter().zip(pt) {
                    let e = d - p;
                    acc[0] += e * e;
                }
                total += acc.iter().map(|&x| x as f64).sum::<f64>();
            }
            total
        }
    };
}
squared_error_body!(squared_error_f32_generic, f32);
squared_error_body!(squared_error_f64_generic, f64);

/// Whether the AVX-512 copies of the kernels can run (F, BW, VL, and the AVX2, FMA and
/// F16C every such CPU has).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Whether the AVX2 copies of the kernels can run (AVX2 and FMA: the copies add with a
/// fused multiply-add, module docs).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Sums of a window of a tensor compared with itself (byte-identical pair): only Σa²
/// and the non-finite counts need computing; every d-based sum is zero.
pub fn identical(a: &[u8], da: DType) -> Accum {
    identical_simd(a, da)
}

simd_copies! {
    fn identical_simd / identical_avx2 / identical_avx512
        = identical_generic(a: &[u8], da: DType) -> Accum;
}

/// Δ = b − a decoded to f32 into `out` (non-finite differences as 0), for the low-rank
/// stage, with (Σ Δ², Σ ulp(b)²) where ulp(x) = 2^(max(⌊log₂|x|⌋, e_min) − bits) is the
/// spacing of b's dtype at b (`bits` stored mantissa bits, `e_min` smallest normal
/// exponent). Both dtypes must be f32-domain; values of 16-bit and 8-bit floats are exact
/// in f32 and so is their difference unless their exponents are 24 apart.
pub fn delta_f32(
    a: &[u8],
    da: DType,
    b: &[u8],
    db: DType,
    out: &mut [f32],
    bits: i32,
    emin: i32,
) -> (f64, f64) {
    assert_eq!(out.len(), a.len() / da.size(), "Δ of every element");
    delta_f32_simd(a, da, b, db, Some(out), bits, emin)
}

/// The sums of [`delta_f32`] alone, with the same bits, for a product that takes the
/// two sides' values as they are (`lowrank::tiles::Right::mul_pair_rows`).
pub fn delta_sums(a: &[u8], da: DType, b: &[u8], db: DType, bits: i32, emin: i32) -> (f64, f64) {
    assert_eq!(
        a.len() / da.size(),
        b.len() / db.size(),
        "windows of different element counts"
    );
    delta_f32_simd(a, da, b, db, None, bits, emin)
}

simd_copies! {
    fn delta_f32_simd / delta_f32_avx2 / delta_f32_avx512 = delta_f32_generic(
        a: &[u8], da: DType, b: &[u8], db: DType, out: Option<&mut [f32]>, bits: i32,
        emin: i32,
    ) -> (f64, f64);
}

/// `out`: where Δ goes, or `None` for the sums alone.
#[inline(always)]
fn delta_f32_generic(
    a: &[u8],
    da: DType,
    b: &[u8],
    db: DType,
    mut out: Option<&mut [f32]>,
    bits: i32,
    emin: i32,
) -> (f64, f64) {
    let (sa, sb) = (da.size(), db.size());
    let n = a.len() / sa;
    let (mut ta, mut tb) = ([0f32; BLOCK], [0f32; BLOCK]);
    let (mut f2, mut var) = (0.0f64, 0.0f64);
    for start in (0..n).step_by(BLOCK) {
        let k = BLOCK.min(n - start);
        let (xa, xb) = (&mut ta[..k], &mut tb[..k]);
        decode_f32(da, &a[start * sa..(start + k) * sa], xa);
        decode_f32(db, &b[start * sb..(start + k) * sb], xb);
        let (bf2, bvar) = match out.as_deref_mut() {
            Some(o) => delta_block(xa, xb, &mut o[start..start + k], bits, emin),
            None => delta_block_sums(xa, xb, bits, emin),
        };
        f2 += bf2;
        var += bvar;
    }
    (f2, var)
}

/// (Σ Δ², Σ ulp(b)²) of one block, Δ = xb − xa with non-finite differences as 0, without
/// writing Δ: what [`delta_block`] returns, and all the diff's kernel needs when a product
/// takes both sides' values as they are.
#[inline(always)]
fn delta_block_sums(xa: &[f32], xb: &[f32], bits: i32, emin: i32) -> (f64, f64) {
    // LANES lanes each over exact chunks, so that the sums vectorize; f32 within a
    // block, then f64.
    let (mut sq, mut ulp2) = ([0f32; LANES], [0f32; LANES]);
    let (xs, ys) = (xa.chunks_exact(LANES), xb.chunks_exact(LANES));
    let (xr, yr) = (xs.remainder(), ys.remainder());
    for (x, y) in xs.zip(ys) {
        let x: &[f32; LANES] = x.try_into().expect("exact chunk");
        let y: &[f32; LANES] = y.try_into().expect("exact chunk");
        for i in 0..LANES {
            let d = finite_or_zero(y[i] - x[i]);
            sq[i] = d.mul_add(d, sq[i]);
            ulp2[i] += ulp_sq(y[i], bits, emin);
        }
    }
    for (&x, &y) in xr.iter().zip(yr) {
        let d = finite_or_zero(y - x);
        sq[0] = d.mul_add(d, sq[0]);
        ulp2[0] += ulp_sq(y, bits, emin);
    }
    (
        sq.iter().map(|&v| v as f64).sum::<f64>(),
        ulp2.iter().map(|&v| v as f64).sum::<f64>(),
    )
}

/// A difference as Δ holds it: non-finite differences count as no change.
#[inline(always)]
fn finite_or_zero(d: f32) -> f32 {
    if d.is_finite() { d } else { 0.0 }
}

/// ulp(y)² = 2^(2(e − bits)) of a value y of a dtype with `bits` stored mantissa bits and
/// smallest normal exponent `emin`, built as the f32 whose exponent field is
/// 2e − 2·bits + 127 (flushed to 2^-126 below that).
#[inline(always)]
fn ulp_sq(y: f32, bits: i32, emin: i32) -> f32 {
    let field = (((y.to_bits() >> 23) & 0xff) as i32).max(emin + 127);
    f32::from_bits(((2 * field - 127 - 2 * bits).max(1) as u32) << 23)
}

/// One block of [`delta_f32`]: `o` = xb − xa (non-finite as 0) and its (Σ Δ², Σ ulp(b)²),
/// the f32 lanes of the block summed in f64. Shared with [`diff_delta`], so that Δ taken
/// during the diff has the bits of Δ read by the low-rank stage.
#[inline(always)]
fn delta_block(xa: &[f32], xb: &[f32], o: &mut [f32], bits: i32, emin: i32) -> (f64, f64) {
    // `delta_block_sums`' loop, writing each d as it goes: the same lanes and sums, so
    // the same bits, in one pass over the block instead of two.
    let (mut sq, mut ulp2) = ([0f32; LANES], [0f32; LANES]);
    let (xs, ys) = (xa.chunks_exact(LANES), xb.chunks_exact(LANES));
    let (xr, yr) = (xs.remainder(), ys.remainder());
    let mut os = o.chunks_exact_mut(LANES);
    for ((x, y), o) in xs.zip(ys).zip(&mut os) {
        let x: &[f32; LANES] = x.try_into().expect("exact chunk");
        let y: &[f32; LANES] = y.try_into().expect("exact chunk");
        let o: &mut [f32; LANES] = o.try_into().expect("exact chunk");
        for i in 0..LANES {
            let d = finite_or_zero(y[i] - x[i]);
            o[i] = d;
            sq[i] = d.mul_add(d, sq[i]);
            ulp2[i] += ulp_sq(y[i], bits, emin);
        }
    }
    for ((&x, &y), o) in xr.iter().zip(yr).zip(os.into_remainder()) {
        let d = finite_or_zero(y - x);
        *o = d;
        sq[0] = d.mul_add(d, sq[0]);
        ulp2[0] += ulp_sq(y, bits, emin);
    }
    (
        sq.iter().map(|&v| v as f64).sum::<f64>(),
        ulp2.iter().map(|&v| v as f64).sum::<f64>(),
    )
}

/// [`diff`] and [`delta_f32`] of an f32-domain window pair in one pass over its bytes:
/// the same [`Accum`] as `diff` (the same blocks, sums and order), Δ in `out`, and the
/// (Σ Δ², Σ ulp(b)²) of every `chunk` elements (a multiple of [`BLOCK`], or the whole
/// window), each equal to `delta_f32` of that chunk alone.
#[allow(clippy::too_many_arguments)]
pub fn diff_delta(
    a: &[u8],
    da: DType,
    b: &[u8],
    db: DType,
    threshold: f64,
    out: &mut [f32],
    (bits, emin): (i32, i32),
    chunk: usize,
) -> (Accum, Vec<(f64, f64)>) {
    assert_eq!(out.len(), a.len() / da.size(), "Δ of every element");
    diff_and_sums(a, da, b, db, threshold, Some(out), (bits, emin), chunk)
}

/// [`diff_delta`] without Δ: the same [`Accum`] and sums, with the same bits, for a
/// product that takes the two sides' values as they are.
pub fn diff_sums(
    a: &[u8],
    da: DType,
    b: &[u8],
    db: DType,
    threshold: f64,
    rounding: (i32, i32),
    chunk: usize,
) -> (Accum, Vec<(f64, f64)>) {
    diff_and_sums(a, da, b, db, threshold, None, rounding, chunk)
}

#[allow(clippy::too_many_arguments)]
fn diff_and_sums(
    a: &[u8],
    da: DType,
    b: &[u8],
    db: DType,
    threshold: f64,
    out: Option<&mut [f32]>,
    (bits, emin): (i32, i32),
    chunk: usize,
) -> (Accum, Vec<(f64, f64)>) {
    let n = a.len() / da.size();
    assert!(
        n == b.len() / db.size() && super::is_f32_domain(da, db),
        "windows of different element counts, or not f32-domain"
    );
    assert!(
        chunk.is_multiple_of(BLOCK) || chunk >= n,
        "chunks of whole blocks"
    );
    diff_delta_simd(a, da, b, db, threshold, out, bits, emin, chunk)
}

simd_copies! {
    fn diff_delta_simd / diff_delta_avx2 / diff_delta_avx512 = diff_delta_generic(
        a: &[u8], da: DType, b: &[u8], db: DType, threshold: f64, out: Option<&mut [f32]>,
        bits: i32, emin: i32, chunk: usize,
    ) -> (Accum, Vec<(f64, f64)>);
}

/// `diff_f32`'s loop with [`delta_block`] on each block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn diff_delta_generic(
    a: &[u8],
    da: DType,
    b: &[u8],
    db: DType,
    threshold: f64,
    mut out: Option<&mut [f32]>,
    bits: i32,
    emin: i32,
    chunk: usize,
) -> (Accum, Vec<(f64, f64)>) {
    let thr = threshold_f32(threshold);
    let (sa, sb) = (da.size(), db.size());
    let n = a.len() / sa;
    let mut xa = [0f32; BLOCK];
    let mut xb = [0f32; BLOCK];
    let mut acc = Accum {
        count: n as u64,
        ..Accum::default()
    };
    let chunk = chunk.max(1);
    let mut sums = Vec::with_capacity(n.div_ceil(chunk));
    let mut cur = (0.0f64, 0.0f64);
    let mut start = 0;
    while start < n {
        let k = BLOCK.min(n - start);
        decode_f32(da, &a[start * sa..(start + k) * sa], &mut xa[..k]);
        decode_f32(db, &b[start * sb..(start + k) * sb], &mut xb[..k]);
        let s = block_sums_f32(&xa[..k], &xb[..k], thr);
        if s.is_finite() {
            s.add_to(&mut acc, k);
        } else {
            careful_f32(&xa[..k], &xb[..k], threshold, &mut acc);
        }
        let (f2, var) = match out.as_deref_mut() {
            Some(o) => delta_block(&xa[..k], &xb[..k], &mut o[start..start + k], bits, emin),
            None => delta_block_sums(&xa[..k], &xb[..k], bits, emin),
        };
        cur.0 += f2;
        cur.1 += var;
        start += k;
        if start % chunk == 0 || start == n {
            sums.push(std::mem::take(&mut cur));
        }
    }
    (acc, sums)
}

#[inline(always)]
fn diff_generic(a: &[u8], da: DType, b: &[u8], db: DType, threshold: f64) -> Accum {
    if super::is_f32_domain(da, db) {
        diff_f32(a, da, b, db, threshold)
    } else {
        diff_f64(a, da, b, db, threshold)
    }
}

// diff_f32 and diff_f64 walk their blocks with the same loop written out twice. A shared
// closure-taking block walker measured 20 % slower in the kernel on the qwen3-0.6b pair
// (0.18 s -> 0.22 s summed kernel time, 5 alternating runs): the accumulators stopped
// living in registers. Keep the loops inline.
#[inline(always)]
fn diff_f32(a: &[u8], da: DType, b: &[u8], db: DType, threshold: f64) -> Accum {
    let thr = threshold_f32(threshold);
    let (sa, sb) = (da.size(), db.size());
    let n = a.len() / sa;
    let mut xa = [0f32; BLOCK];
    let mut xb = [0f32; BLOCK];
    let mut acc = Accum {
        count: n as u64,
        ..Accum::default()
    };
    let mut start = 0;
    while start < n {
        let k = BLOCK.min(n - start);
        decode_f32(da, &a[start * sa..(start + k) * sa], &mut xa[..k]);
        decode_f32(db, &b[start * sb..(start + k) * sb], &mut xb[..k]);
        let s = block_sums_f32(&xa[..k], &xb[..k], thr);
        if s.is_finite() {
            s.add_to(&mut acc, k);
        } else {
            careful_f32(&xa[..k], &xb[..k], threshold, &mut acc);
        }
        start += k;
    }
    acc
}

/// Per-block sums; f32 lanes reduced in f64.
struct BlockSums {
    abs: f64,
    max: f32,
    d2: f64,
    a2: f64,
    b2: f64,
    ab: f64,
    changed: u64,
}

impl BlockSums {
    fn is_finite(&self) -> bool {
        self.abs.is_finite()
            && self.d2.is_finite()
            && self.a2.is_finite()
            && self.b2.is_finite()
            && self.ab.is_finite()
    }
    fn add_to(&self, acc: &mut Accum, k: usize) {
        acc.finite += k as u64;
        acc.sum_abs_d += self.abs;
        acc.sum_d2 += self.d2;
        acc.sum_a2 += self.a2;
        acc.sum_b2 += self.b2;
        acc.sum_ab += self.ab;
        acc.changed += self.changed;
        if self.max as f64 > acc.max_abs_d {
            acc.max_abs_d = self.max as f64;
        }
    }
}

#[inline(always)]
fn lanes_to_f64(l: &[f32; LANES]) -> f64 {
    l.iter().map(|&x| x as f64).sum()
}

#[inline(always)]
fn block_sums_f32(xa: &[f32], xb: &[f32], thr: f32) -> BlockSums {
    let mut s_abs = [0f32; LANES];
    let mut s_max = [0f32; LANES];
    let mut s_d2 = [0f32; LANES];
    let mut s_a2 = [0f32; LANES];
    let mut s_b2 = [0f32; LANES];
    let mut s_ab = [0f32; LANES];
    let mut s_ch = [0u32; LANES];
    let ca = xa.chunks_exact(LANES);
    let cb = xb.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (pa, pb) in ca.zip(cb) {
        for j in 0..LANES {
            let (x, y) = (pa[j], pb[j]);
            let d = y - x;
            let ad = d.abs();
            s_abs[j] += ad;
            // `if` rather than f32::max: no NaN special case, so it maps to a vector max.
            s_max[j] = if ad > s_max[j] { ad } else { s_max[j] };
            s_d2[j] = d.mul_add(d, s_d2[j]);
            s_a2[j] = x.mul_add(x, s_a2[j]);
            s_b2[j] = y.mul_add(y, s_b2[j]);
            s_ab[j] = x.mul_add(y, s_ab[j]);
            s_ch[j] += (ad > thr) as u32;
        }
    }
    for (j, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        let d = y - x;
        let ad = d.abs();
        s_abs[j] += ad;
        s_max[j] = if ad > s_max[j] { ad } else { s_max[j] };
        s_d2[j] = d.mul_add(d, s_d2[j]);
        s_a2[j] = x.mul_add(x, s_a2[j]);
        s_b2[j] = y.mul_add(y, s_b2[j]);
        s_ab[j] = x.mul_add(y, s_ab[j]);
        s_ch[j] += (ad > thr) as u32;
    }
    // A NaN |d| never wins the comparison above; a NaN anywhere shows up in the sums,
    // which sends the block to the careful path.
    let max = s_max.iter().fold(0f32, |m, &x| if x > m { x } else { m });
    BlockSums {
        abs: lanes_to_f64(&s_abs),
        max,
        d2: lanes_to_f64(&s_d2),
        a2: lanes_to_f64(&s_a2),
        b2: lanes_to_f64(&s_b2),
        ab: lanes_to_f64(&s_ab),
        changed: s_ch.iter().map(|&c| c as u64).sum(),
    }
}

/// Element-by-element f64 sums for a block with non-finite values or f32 overflow.
/// |d| for the max and the threshold test is the f32 difference, as in the fast loop.
fn careful_f32(xa: &[f32], xb: &[f32], threshold: f64, acc: &mut Accum) {
    for (&x, &y) in xa.iter().zip(xb) {
        if !(x.is_finite() && y.is_finite()) {
            acc.count_nonfinite(x as f64, y as f64);
            continue;
        }
        let (a, b) = (x as f64, y as f64);
        let d = b - a;
        acc.finite += 1;
        acc.sum_abs_d += d.abs();
        acc.sum_d2 += d * d;
        acc.sum_a2 += a * a;
        acc.sum_b2 += b * b;
        acc.sum_ab += a * b;
        let ad32 = (y - x).abs() as f64;
        if ad32 > acc.max_abs_d {
            acc.max_abs_d = ad32;
        }
        if ad32 > threshold {
            acc.changed += 1;
        }
    }
}

/// F64, integer, bool and mixed pairs: the same structure in f64.
#[inline(always)]
fn diff_f64(a: &[u8], da: DType, b: &[u8], db: DType, threshold: f64) -> Accum {
    const B64: usize = 512;
    let (sa, sb) = (da.size(), db.size());
    let n = a.len() / sa;
    let mut xa = [0f64; B64];
    let mut xb = [0f64; B64];
    let mut acc = Accum {
        count: n as u64,
        ..Accum::default()
    };
    let mut start = 0;
    while start < n {
        let k = B64.min(n - start);
        decode_f64(da, &a[start * sa..(start + k) * sa], &mut xa[..k]);
        decode_f64(db, &b[start * sb..(start + k) * sb], &mut xb[..k]);
        for (&x, &y) in xa[..k].iter().zip(&xb[..k]) {
            if !(x.is_finite() && y.is_finite()) {
                acc.count_nonfinite(x, y);
                continue;
            }
            let d = y - x;
            let ad = d.abs();
            acc.finite += 1;
            acc.sum_abs_d += ad;
            acc.sum_d2 += d * d;
            acc.sum_a2 += x * x;
            acc.sum_b2 += y * y;
            acc.sum_ab += x * y;
            if ad > acc.max_abs_d {
                acc.max_abs_d = ad;
            }
            acc.changed += (ad > threshold) as u64;
        }
        start += k;
    }
    acc
}

#[inline(always)]
fn identical_generic(a: &[u8], da: DType) -> Accum {
    let sa = da.size();
    let n = a.len() / sa;
    let mut acc = Accum {
        count: n as u64,
        ..Accum::default()
    };
    if !da.is_f32_domain() {
        let mut x = [0f64; 512];
        let mut start = 0;
        while start < n {
            let k = 512.min(n - start);
            decode_f64(da, &a[start * sa..(start + k) * sa], &mut x[..k]);
            for &v in &x[..k] {
                if v.is_finite() {
                    acc.finite += 1;
                    acc.sum_a2 += v * v;
                } else {
                    acc.count_nonfinite(v, v);
                }
            }
            start += k;
        }
    } else {
        let mut x = [0f32; BLOCK];
        let mut start = 0;
        while start < n {
            let k = BLOCK.min(n - start);
            decode_f32(da, &a[start * sa..(start + k) * sa], &mut x[..k]);
            let mut lanes = [0f32; LANES];
            let chunks = x[..k].chunks_exact(LANES);
            let rem = chunks.remainder();
            for c in chunks {
                for j in 0..LANES {
                    lanes[j] = c[j].mul_add(c[j], lanes[j]);
                }
            }
            for (j, &v) in rem.iter().enumerate() {
                lanes[j] = v.mul_add(v, lanes[j]);
            }
            let s = lanes_to_f64(&lanes);
            if s.is_finite() {
                acc.finite += k as u64;
                acc.sum_a2 += s;
            } else {
                for &v in &x[..k] {
                    if v.is_finite() {
                        acc.finite += 1;
                        acc.sum_a2 += v as f64 * v as f64;
                    } else {
                        acc.count_nonfinite(v as f64, v as f64);
                    }
                }
            }
            start += k;
        }
    }
    acc.sum_b2 = acc.sum_a2;
    acc.sum_ab = acc.sum_a2;
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::dtype::encode;

    /// Every compiled copy of the kernels gives the bits of the generic one (the run-time
    /// choice picks AVX-512 on such a CPU, so this is what runs the others there), on
    /// windows with a ragged last block, non-finite values, and each float dtype.
    #[test]
    fn simd_copies_give_the_generic_bits() {
        let mut g = crate::rng::Gaussian::new(11, "k", "test");
        let n = 3 * BLOCK + 91;
        let a: Vec<f64> = (0..n).map(|_| g.next()).collect();
        let mut b: Vec<f64> = a.iter().map(|x| x + 0.01 * g.next()).collect();
        b[7] = f64::NAN;
        b[BLOCK + 3] = f64::NEG_INFINITY;
        b[2 * BLOCK] = 1e30;
        for dt in [DType::BF16, DType::F16, DType::F32, DType::F64] {
            let (ea, eb) = (encode(dt, &a).unwrap(), encode(dt, &b).unwrap());
            let want = format!("{:?}", diff_generic(&ea, dt, &eb, dt, 1e-6));
            let same = format!("{:?}", identical_generic(&ea, dt));
            #[cfg(target_arch = "x86_64")]
            {
                let mut copies = 0;
                // SAFETY: each copy runs only where the CPU has its features.
                if avx2() {
                    assert_eq!(
                        format!("{:?}", unsafe { diff_avx2(&ea, dt, &eb, dt, 1e-6) }),
                        want
                    );
                    assert_eq!(format!("{:?}", unsafe { identical_avx2(&ea, dt) }), same);
                    copies += 1;
                }
                if avx512() {
                    assert_eq!(
                        format!("{:?}", unsafe { diff_avx512(&ea, dt, &eb, dt, 1e-6) }),
                        want
                    );
                    assert_eq!(format!("{:?}", unsafe { identical_avx512(&ea, dt) }), same);
                    copies += 1;
                }
                eprintln!("{dt:?}: {copies} SIMD copies checked");
            }
            if !matches!(dt, DType::BF16 | DType::F16) {
                continue;
            }
            let rounding = dt.rounding().unwrap();
            let mut want_d = vec![0f32; n];
            let want_s =
                delta_f32_generic(&ea, dt, &eb, dt, Some(&mut want_d), rounding.0, rounding.1);
            let mut want_fd = vec![0f32; n];
            let want_f = format!(
                "{:?}",
                diff_delta_generic(
                    &ea,
                    dt,
                    &eb,
                    dt,
                    1e-6,
                    Some(&mut want_fd),
                    rounding.0,
                    rounding.1,
                    2 * BLOCK
                )
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            #[cfg(target_arch = "x86_64")]
            {
                type Delta = unsafe fn(
                    &[u8],
                    DType,
                    &[u8],
                    DType,
                    Option<&mut [f32]>,
                    i32,
                    i32,
                ) -> (f64, f64);
                type Fused = unsafe fn(
                    &[u8],
                    DType,
                    &[u8],
                    DType,
                    f64,
                    Option<&mut [f32]>,
                    i32,
                    i32,
                    usize,
                ) -> (Accum, Vec<(f64, f64)>);
                let mut copies: Vec<(Delta, Fused)> = Vec::new();
                if avx2() {
                    copies.push((delta_f32_avx2, diff_delta_avx2));
                }
                if avx512() {
                    copies.push((delta_f32_avx512, diff_delta_avx512));
                }
                for (delta, fused) in copies {
                    let mut d = vec![0f32; n];
                    // SAFETY: only copies whose features the CPU has were pushed.
                    let st =
                        unsafe { delta(&ea, dt, &eb, dt, Some(&mut d), rounding.0, rounding.1) };
                    assert_eq!(
                        (st.0.to_bits(), st.1.to_bits()),
                        (want_s.0.to_bits(), want_s.1.to_bits())
                    );
                    assert_eq!(bits(&d), bits(&want_d));
                    let mut fd = vec![0f32; n];
                    // SAFETY: as above.
                    let got = unsafe {
                        fused(
                            &ea,
                            dt,
                            &eb,
                            dt,
                            1e-6,
                            Some(&mut fd),
                            rounding.0,
                            rounding.1,
                            2 * BLOCK,
                        )
                    };
                    assert_eq!(format!("{got:?}"), want_f);
                    assert_eq!(bits(&fd), bits(&want_fd));
                }
            }
        }
    }

    /// The fused pass gives the bits of `diff` and of `delta_f32` chunk by chunk, on a
    /// window with a ragged last block, non-finite values and both 16-bit dtypes; so do
    /// the same passes without Δ (`diff_sums`, `delta_sums`).
    #[test]
    fn diff_delta_equals_diff_and_delta_chunk_by_chunk() {
        let mut g = crate::rng::Gaussian::new(7, "k", "test");
        let n = 5 * BLOCK + 37;
        let a: Vec<f64> = (0..n).map(|_| g.next()).collect();
        let mut b: Vec<f64> = a.iter().map(|x| x + 0.01 * g.next()).collect();
        b[3] = f64::NAN;
        b[2 * BLOCK + 5] = f64::INFINITY;
        for dt in [DType::BF16, DType::F16] {
            let (ea, eb) = (encode(dt, &a).unwrap(), encode(dt, &b).unwrap());
            let rounding = dt.rounding().unwrap();
            for chunk in [2 * BLOCK, n] {
                let mut out = vec![0f32; n];
                let (acc, sums) = diff_delta(&ea, dt, &eb, dt, 1e-6, &mut out, rounding, chunk);
                assert_eq!(
                    format!("{acc:?}"),
                    format!("{:?}", diff(&ea, dt, &eb, dt, 1e-6))
                );
                let alone = diff_sums(&ea, dt, &eb, dt, 1e-6, rounding, chunk);
                assert_eq!(format!("{alone:?}"), format!("{:?}", (acc, &sums)));
                assert_eq!(sums.len(), n.div_ceil(chunk));
                let size = dt.size();
                for (c, got) in sums.iter().enumerate() {
                    let (c0, c1) = (c * chunk, ((c + 1) * chunk).min(n));
                    let mut want = vec![0f32; c1 - c0];
                    let st = delta_f32(
                        &ea[c0 * size..c1 * size],
                        dt,
                        &eb[c0 * size..c1 * size],
                        dt,
                        &mut want,
                        rounding.0,
                        rounding.1,
                    );
                    assert_eq!(got.0.to_bits(), st.0.to_bits());
                    assert_eq!(got.1.to_bits(), st.1.to_bits());
                    let alone = delta_sums(
                        &ea[c0 * size..c1 * size],
                        dt,
                        &eb[c0 * size..c1 * size],
                        dt,
                        rounding.0,
                        rounding.1,
                    );
                    assert_eq!(
                        (alone.0.to_bits(), alone.1.to_bits()),
                        (st.0.to_bits(), st.1.to_bits())
                    );
                    let same = out[c0..c1]
                        .iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "chunk {c}");
                }
                assert_eq!(out[3], 0.0);
            }
        }
    }
}
