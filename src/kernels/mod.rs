//! Difference kernels: from the raw bytes of a base and a fine-tuned tensor (or of a
//! window of them) to the sums every metric of SPEC §3 is derived from.
//!
//! Two independent implementations compute the same [`Accum`]:
//! - [`fast`]: decodes blocks of [`fast::BLOCK`] values into f32 (or f64 for F64 and
//!   integer types), accumulates each block in f32 over 16 independent lanes (which the
//!   compiler turns into SIMD; AVX-512 or AVX2 is chosen at run time), and adds block totals in
//!   f64. A block holding a non-finite value or overflowing f32 is redone element by
//!   element in f64, so NaN/Inf are counted and excluded without a branch in the hot loop.
//! - [`reference`](mod@reference): one element at a time, decoded independently, summed in f64.
//!
//! `--verify` runs both and [`check_agreement`] compares them.
//!
//! Non-finite values: an element pair where either value is NaN or ±Inf is counted
//! (`nan_count`/`inf_count` count values in both tensors) and left out of every sum,
//! of the max and of the changed count; means divide by the number of finite pairs.

/// Compiles the kernel `$generic` twice more, with AVX2 and FMA (`$avx2`) and with AVX-512
/// (`$avx512`) enabled, and defines `$simd`, which calls the widest copy the CPU runs
/// (the scheme of [`fast`]'s module docs).
macro_rules! simd_copies {
    ($(#[$m:meta])* fn $simd:ident / $avx2:ident / $avx512:ident
        = $generic:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $simd($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::kernels::fast::avx512() {
                    // SAFETY: the CPU has the AVX-512 copy's features, checked just above.
                    return unsafe { $avx512($($arg),*) };
                }
                if $crate::kernels::fast::avx2() {
                    // SAFETY: the CPU has the AVX2 copy's features, checked just above.
                    return unsafe { $avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx512($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
    };
}

pub mod fast;
pub mod reference;

/// The largest error in quantization steps of a window: max |b − a| / step over the
/// elements where the ratio is finite, with `steps` the little-endian f32 step of each
/// element of the encoded side ([`crate::checkpoint::encoding`]). A step of 0 (a zero
/// scale: its block decodes to 0 whatever the codes) gives ∞ and a non-finite value NaN:
/// both are left out (their error is in `max_abs_diff`). In f32 for f32-domain dtypes
/// (|b − a| and the division each round at 2⁻²⁴ relative: the ratio is good to ~1e-7,
/// far below any bound it is read against), f64 otherwise. One pass over blocks of
/// [`fast::BLOCK`] values, vectorized (AVX-512 or AVX2 chosen at run time).
pub fn max_error_steps(wa: &[u8], da: DType, wb: &[u8], db: DType, steps: &[u8]) -> f64 {
    if !is_f32_domain(da, db) {
        return max_error_steps_f64(wa, da, wb, db, steps);
    }
    max_error_steps_simd(wa, da, wb, db, steps)
}

simd_copies! {
    fn max_error_steps_simd / max_error_steps_avx2 / max_error_steps_avx512
        = max_error_steps_f32(wa: &[u8], da: DType, wb: &[u8], db: DType, steps: &[u8]) -> f64;
}

#[inline(always)]
fn max_error_steps_f32(wa: &[u8], da: DType, wb: &[u8], db: DType, steps: &[u8]) -> f64 {
    use crate::checkpoint::dtype::decode_f32;
    const N: usize = fast::BLOCK;
    const LANES: usize = 16;
    let (sa, sb) = (da.size(), db.size());
    let n = steps.len() / 4;
    let (mut a, mut b, mut s) = ([0f32; N], [0f32; N], [0f32; N]);
    let mut max = [0f32; LANES];
    // Decoded windows are f32 buffers: read them in place rather than copy them.
    let b_f32: Option<&[f32]> = (db == DType::F32)
        .then(|| bytemuck::try_cast_slice(wb).ok())
        .flatten();
    let s_f32: Option<&[f32]> = bytemuck::try_cast_slice(steps).ok();
    for i in (0..n).step_by(N) {
        let k = N.min(n - i);
        decode_f32(da, &wa[i * sa..(i + k) * sa], &mut a[..k]);
        let b: &[f32] = match b_f32 {
            Some(v) => &v[i..i + k],
            None => {
                decode_f32(db, &wb[i * sb..(i + k) * sb], &mut b[..k]);
                &b[..k]
            }
        };
        let s: &[f32] = match s_f32 {
            Some(v) => &v[i..i + k],
            None => {
                decode_f32(DType::F32, &steps[i * 4..(i + k) * 4], &mut s[..k]);
                &s[..k]
            }
        };
        lanes_max(&a[..k], b, s, &mut max);
    }
    max.iter().fold(0f32, |m, &x| m.max(x)) as f64
}

/// max(|b − a| / s) into 16 lanes, leaving out ∞ and NaN; a select per lane (NaN
/// compares false), so the loop vectorizes.
#[inline(always)]
fn lanes_max(a: &[f32], b: &[f32], s: &[f32], max: &mut [f32; 16]) {
    let n = a.len().min(b.len()).min(s.len());
    let (a, b, s) = (&a[..n], &b[..n], &s[..n]);
    let (ca, cb, cs) = (a.chunks_exact(16), b.chunks_exact(16), s.chunks_exact(16));
    let (ra, rb, rs) = (ca.remainder(), cb.remainder(), cs.remainder());
    for ((pa, pb), ps) in ca.zip(cb).zip(cs) {
        let pa: &[f32; 16] = pa.try_into().expect("16 values");
        let pb: &[f32; 16] = pb.try_into().expect("16 values");
        let ps: &[f32; 16] = ps.try_into().expect("16 values");
        for j in 0..16 {
            let r = (pb[j] - pa[j]).abs() / ps[j];
            // ∞ and NaN (which compares false) to 0, then a plain max: two selects.
            let r = if r < f32::INFINITY { r } else { 0.0 };
            max[j] = if r > max[j] { r } else { max[j] };
        }
    }
    for (j, ((&x, &y), &z)) in ra.iter().zip(rb).zip(rs).enumerate() {
        let r = (y - x).abs() / z;
        max[j] = if r > max[j] && r < f32::INFINITY {
            r
        } else {
            max[j]
        };
    }
}

fn max_error_steps_f64(wa: &[u8], da: DType, wb: &[u8], db: DType, steps: &[u8]) -> f64 {
    use crate::checkpoint::dtype::{decode_f32, decode_f64};
    const CHUNK: usize = 1024;
    let (sa, sb) = (da.size(), db.size());
    let n = steps.len() / 4;
    let (mut a, mut b, mut s) = ([0f64; CHUNK], [0f64; CHUNK], [0f32; CHUNK]);
    let mut max = 0f64;
    for i in (0..n).step_by(CHUNK) {
        let k = CHUNK.min(n - i);
        decode_f64(da, &wa[i * sa..(i + k) * sa], &mut a[..k]);
        decode_f64(db, &wb[i * sb..(i + k) * sb], &mut b[..k]);
        decode_f32(DType::F32, &steps[i * 4..(i + k) * 4], &mut s[..k]);
        for j in 0..k {
            let r = (b[j] - a[j]).abs() / s[j] as f64;
            if r.is_finite() && r > max {
                max = r;
            }
        }
    }
    max
}

#[cfg(test)]
mod step_tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn max_error_steps_leaves_out_zero_steps_and_non_finite_values_at_every_length() {
        for n in [0usize, 1, 15, 17, 4095, 4097, 9000] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let mut b: Vec<f32> = a.iter().map(|x| x + 0.001).collect();
            let mut s = vec![0.004f32; n];
            if n > 10 {
                b[n - 1] = a[n - 1] + 0.003; // 0.75 steps, in the tail
                s[3] = 0.0; // a zero step: left out
                b[5] = f32::NAN; // left out
            }
            let want = if n > 10 {
                0.75
            } else if n > 0 {
                0.25
            } else {
                0.0
            };
            for (da, wa) in [
                (DType::F32, bytes(&a)),
                (
                    DType::F64,
                    a.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
                ),
            ] {
                let got = max_error_steps(&wa, da, &bytes(&b), DType::F32, &bytes(&s));
                assert!((got - want).abs() < 1e-3, "n {n} {da}: {got}");
            }
        }
    }
}

use crate::checkpoint::dtype::DType;

/// Running sums over element pairs (a = base, b = fine-tuned, d = b − a).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accum {
    /// Element pairs seen.
    pub count: u64,
    /// Pairs where both values are finite (the ones summed).
    pub finite: u64,
    /// Σ|d|
    pub sum_abs_d: f64,
    /// max |d|; computed at the kernel's working precision (f32 for ≤ 32-bit floats).
    pub max_abs_d: f64,
    /// Σd²
    pub sum_d2: f64,
    /// Σa²
    pub sum_a2: f64,
    /// Σb²
    pub sum_b2: f64,
    /// Σab
    pub sum_ab: f64,
    /// #{|d| > threshold}
    pub changed: u64,
    /// NaN values in a plus NaN values in b.
    pub nan: u64,
    /// ±Inf values in a plus ±Inf values in b.
    pub inf: u64,
}

impl Accum {
    /// Adds the sums of another part of the same tensor.
    pub fn merge(&mut self, o: &Accum) {
        self.count += o.count;
        self.finite += o.finite;
        self.sum_abs_d += o.sum_abs_d;
        if o.max_abs_d > self.max_abs_d {
            self.max_abs_d = o.max_abs_d;
        }
        self.sum_d2 += o.sum_d2;
        self.sum_a2 += o.sum_a2;
        self.sum_b2 += o.sum_b2;
        self.sum_ab += o.sum_ab;
        self.changed += o.changed;
        self.nan += o.nan;
        self.inf += o.inf;
    }

    /// Counts a non-finite pair (called by both kernels' careful paths).
    fn count_nonfinite(&mut self, a: f64, b: f64) {
        for v in [a, b] {
            if v.is_nan() {
                self.nan += 1;
            } else if v.is_infinite() {
                self.inf += 1;
            }
        }
    }
}

/// Whether the pair is handled in the f32 domain (both floats of at most 32 bits).
pub fn is_f32_domain(da: DType, db: DType) -> bool {
    da.is_f32_domain() && db.is_f32_domain()
}

/// The largest f32 not above `t`: for an f32 value x, `x > floor32(t)` ⇔ `x > t`,
/// so the f32 kernel counts exactly the elements the f64 definition counts.
pub fn threshold_f32(t: f64) -> f32 {
    let mut f = t as f32;
    if f as f64 > t {
        f = f.next_down();
    }
    f
}

/// Relative tolerance on sums between the two kernels (SPEC §3 `--verify`).
pub const VERIFY_RTOL: f64 = 1e-6;

/// Compares the fast kernel's sums with the reference kernel's: sums within
/// [`VERIFY_RTOL`] relative, counts exact, max exact once the reference max is rounded
/// to the fast kernel's working precision. Returns the first metric that disagrees.
pub fn check_agreement(
    fast: &Accum,
    reference: &Accum,
    f32_domain: bool,
) -> Result<(), (&'static str, f64, f64)> {
    let counts = [
        ("count", fast.count, reference.count),
        ("finite pairs", fast.finite, reference.finite),
        ("changed count", fast.changed, reference.changed),
        ("nan_count", fast.nan, reference.nan),
        ("inf_count", fast.inf, reference.inf),
    ];
    for (name, f, r) in counts {
        if f != r {
            return Err((name, f as f64, r as f64));
        }
    }
    let ref_max = if f32_domain {
        reference.max_abs_d as f32 as f64
    } else {
        reference.max_abs_d
    };
    if fast.max_abs_d != ref_max {
        return Err(("max_abs_diff", fast.max_abs_d, ref_max));
    }
    let sums = [
        ("sum |d|", fast.sum_abs_d, reference.sum_abs_d),
        ("sum d^2", fast.sum_d2, reference.sum_d2),
        ("sum a^2", fast.sum_a2, reference.sum_a2),
        ("sum b^2", fast.sum_b2, reference.sum_b2),
        ("sum ab", fast.sum_ab, reference.sum_ab),
    ];
    for (name, f, r) in sums {
        let scale = f.abs().max(r.abs());
        if (f - r).abs() > VERIFY_RTOL * scale {
            return Err((name, f, r));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_f32_is_exact_for_f32_values() {
        for t in [1e-6, 0.1, 1.0 / 3.0, 1e-30, 0.0, 5.0] {
            let f = threshold_f32(t);
            assert!(f as f64 <= t);
            let next = f.next_up();
            assert!(next as f64 > t || next as f64 == t && f as f64 == t);
        }
    }
}
