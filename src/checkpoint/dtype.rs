//! Element types weightdiff decodes, and their conversion to f32/f64.
//!
//! Bytes come straight from (possibly unaligned) mapped memory, so every decoder reads
//! little-endian bytes with `from_le_bytes` on fixed-size chunks instead of casting the
//! slice: no alignment assumption is ever made.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::OnceLock;

/// A supported element type (SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    BOOL,
}

impl DType {
    /// Stored mantissa bits and smallest normal exponent of a float dtype, for the
    /// rounding error of a stored value: ulp(x) = 2^(max(⌊log₂|x|⌋, e_min) − bits).
    /// `None` for integer types.
    pub fn rounding(self) -> Option<(i32, i32)> {
        match self {
            DType::BF16 => Some((7, -126)),
            DType::F16 => Some((10, -14)),
            DType::F32 => Some((23, -126)),
            DType::F64 => Some((52, -1022)),
            DType::F8E4M3 => Some((3, -6)),
            DType::F8E5M2 => Some((2, -14)),
            _ => None,
        }
    }

    /// A float type weightdiff writes (adapters, synthetic models): F64, F32, F16, BF16.
    pub fn is_writable_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::U8 | DType::BOOL => 1,
        }
    }

    /// The name used in safetensors headers.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U64 => "U64",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::BOOL => "BOOL",
        }
    }

    /// Floating-point types of at most 32 bits: their values, and the difference of two
    /// of them, are handled in f32 by the fast kernel.
    pub fn is_f32_domain(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// Integer and bool tensors are compared exactly, value by value.
    pub fn is_integer(self) -> bool {
        !self.is_f32_domain() && self != DType::F64
    }

    /// Maps the safetensors crate's dtype; `Err` carries the name of an unsupported one.
    pub fn from_safetensors(d: safetensors::Dtype) -> Result<Self, String> {
        use safetensors::Dtype as S;
        Ok(match d {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E5M2 => DType::F8E5M2,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U64 => DType::U64,
            S::U32 => DType::U32,
            S::U16 => DType::U16,
            S::U8 => DType::U8,
            S::BOOL => DType::BOOL,
            other => return Err(format!("{other:?}")),
        })
    }

    /// The safetensors crate's dtype, for writing.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F64 => S::F64,
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::F8E4M3 => S::F8_E4M3,
            DType::F8E5M2 => S::F8_E5M2,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
            DType::I16 => S::I16,
            DType::I8 => S::I8,
            DType::U64 => S::U64,
            DType::U32 => S::U32,
            DType::U16 => S::U16,
            DType::U8 => S::U8,
            DType::BOOL => S::BOOL,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// bf16 → f32 is exact: bf16 is the upper half of an f32. A shift is branch-free and
/// vectorizes, unlike a conversion that special-cases NaN.
#[inline(always)]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Decoding table for an 8-bit float format, built once.
fn f8_table(cell: &'static OnceLock<[f32; 256]>, decode: fn(u8) -> f32) -> &'static [f32; 256] {
    cell.get_or_init(|| std::array::from_fn(|i| decode(i as u8)))
}

/// F8_E4M3 ("fn" variant used by safetensors/PyTorch `float8_e4m3fn`): bias 7, no
/// infinities, S.1111.111 is NaN, max finite 448.
pub fn f8_e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((bits >> 3) & 0x0F) as i32;
    let man = (bits & 0x07) as f32;
    if exp == 0x0F && bits & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// `f32(e4m3) × scale` for each code, appended to `out`: the FP8 weights' dequantization
/// loop. Branchless bit arithmetic instead of the table (a gather per element), so it
/// vectorizes; equal to [`f8_e4m3_to_f32`] × scale for all 256 codes (tested).
pub fn extend_e4m3_scaled(codes: &[u8], scale: f32, out: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { extend_e4m3_scaled_avx2(codes, scale, out) };
    }
    extend_e4m3_scaled_generic(codes, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn extend_e4m3_scaled_avx2(codes: &[u8], scale: f32, out: &mut Vec<f32>) {
    extend_e4m3_scaled_generic(codes, scale, out)
}

#[inline(always)]
fn extend_e4m3_scaled_generic(codes: &[u8], scale: f32, out: &mut Vec<f32>) {
    let start = out.len();
    out.resize(start + codes.len(), 0.0);
    for (o, &b) in out[start..].iter_mut().zip(codes) {
        let b = b as u32;
        let sign = (b & 0x80) << 24;
        let e = (b >> 3) & 0x0F;
        let m = b & 0x07;
        // Normal: (1 + m/8)·2^(e−7) is the f32 with exponent e − 7 + 127 and mantissa m.
        let normal = f32::from_bits(sign | ((e + 120) << 23) | (m << 20));
        // Subnormal (e = 0): m/8 · 2^−6 = m · 2^−9, exact in f32.
        let sub = f32::from_bits(sign | (m as f32 * (1.0 / 512.0)).to_bits());
        let v = if e == 0 { sub } else { normal };
        // 0x7F / 0xFF are NaN (E4M3 has no infinities).
        let v = if b & 0x7F == 0x7F { f32::NAN } else { v };
        *o = v * scale;
    }
}

/// F8_E5M2 (`float8_e5m2`): IEEE-like, bias 15, with infinities and NaN.
pub fn f8_e5m2_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((bits >> 2) & 0x1F) as i32;
    let man = (bits & 0x03) as f32;
    if exp == 0x1F {
        return if bits & 0x03 == 0 {
            sign * f32::INFINITY
        } else {
            f32::NAN
        };
    }
    if exp == 0 {
        sign * man / 4.0 * 2f32.powi(-14)
    } else {
        sign * (1.0 + man / 4.0) * 2f32.powi(exp - 15)
    }
}

static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
static E5M2: OnceLock<[f32; 256]> = OnceLock::new();

/// The 256-entry decoding table of an 8-bit float type.
pub fn f8_lut(d: DType) -> &'static [f32; 256] {
    match d {
        DType::F8E4M3 => f8_table(&E4M3, f8_e4m3_to_f32),
        DType::F8E5M2 => f8_table(&E5M2, f8_e5m2_to_f32),
        _ => panic!("f8_lut called with {d}"),
    }
}

/// Decodes `out.len()` elements of an f32-domain dtype from `bytes` into `out`.
///
/// `bytes.len()` must be `out.len() * d.size()`.
#[inline(always)]
pub fn decode_f32(d: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * d.size());
    match d {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::F8E4M3 | DType::F8E5M2 => {
            let lut = f8_lut(d);
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = lut[b as usize];
            }
        }
        _ => panic!("decode_f32 called with non-f32-domain dtype {d}"),
    }
}

/// Decodes `out.len()` elements of any dtype into f64 (exact for every type except
/// 64-bit integers beyond 2^53).
#[inline(always)]
pub fn decode_f64(d: DType, bytes: &[u8], out: &mut [f64]) {
    debug_assert_eq!(bytes.len(), out.len() * d.size());
    macro_rules! ints {
        ($t:ty, $n:literal) => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact($n)) {
                *o = <$t>::from_le_bytes(c.try_into().expect("chunk of exact size")) as f64;
            }
        };
    }
    match d {
        DType::F64 => ints!(f64, 8),
        DType::I64 => ints!(i64, 8),
        DType::U64 => ints!(u64, 8),
        DType::I32 => ints!(i32, 4),
        DType::U32 => ints!(u32, 4),
        DType::I16 => ints!(i16, 2),
        DType::U16 => ints!(u16, 2),
        DType::I8 => ints!(i8, 1),
        DType::U8 => ints!(u8, 1),
        DType::BOOL => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = if b != 0 { 1.0 } else { 0.0 };
            }
        }
        _ => {
            let mut tmp = [0f32; 256];
            let sz = d.size();
            for (o, c) in out.chunks_mut(256).zip(bytes.chunks(256 * sz)) {
                let t = &mut tmp[..o.len()];
                decode_f32(d, c, t);
                for (x, y) in o.iter_mut().zip(t.iter()) {
                    *x = *y as f64;
                }
            }
        }
    }
}

/// `v` rounded to the nearest bf16, ties to even. `half::bf16::from_f64` breaks ties on
/// the high 32 bits of the significand only, so a value above halfway by less than 2⁻³²
/// ulp rounds to even there; and it goes branch by branch, one value at a time (3 % of a
/// `compare` of an all-linear LoRA pair, with the rounding of the factors). In f32's
/// normal range this rounds the f64 bits once, with one integer add; subnormal, overflowing
/// and non-finite values go to `half`.
#[inline]
pub fn bf16_from_f64(v: f64) -> half::bf16 {
    match bf16_normal(v) {
        // Exact in f32: 8 significant bits in its normal range.
        Some(r) => half::bf16::from_bits(((r as f32).to_bits() >> 16) as u16),
        None => half::bf16::from_f64(v),
    }
}

/// `v` rounded to the nearest bf16 and back: `bf16_from_f64(v).to_f64()`, without the
/// trip through the 16-bit value in f32's normal range.
#[inline]
pub fn round_bf16(v: f64) -> f64 {
    bf16_normal(v).unwrap_or_else(|| half::bf16::from_f64(v).to_f64())
}

/// [`round_bf16`] of every value, in place. One branch-free pass that rounds the values
/// in f32's normal range and leaves the others, then `half` for those (none, for the
/// factors of a delta), so that the loop has no call in it.
pub fn round_bf16_slice(values: &mut [f64]) {
    let mut others = false;
    for v in values.iter_mut() {
        let normal = in_bf16_normal_range(*v);
        others |= !normal;
        *v = if normal { bf16_nearest(*v) } else { *v };
    }
    if others {
        // Values rounded above are bf16 values already, which `half` returns unchanged.
        for v in values.iter_mut().filter(|v| !in_bf16_normal_range(**v)) {
            *v = half::bf16::from_f64(*v).to_f64();
        }
    }
}

/// Whether `v` is in f32's normal range with room for rounding up to bf16.
#[inline]
fn in_bf16_normal_range(v: f64) -> bool {
    let a = v.abs();
    // Below bf16's largest finite value (3.39e38) with room for rounding up.
    a >= f32::MIN_POSITIVE as f64 && a < 3.0e38
}

/// The nearest bf16 to `v` (ties to even) as an f64, for `v` in that range; any bits
/// for other values (the slice functions compute it for every value, branch-free).
#[inline]
fn bf16_nearest(v: f64) -> f64 {
    // bf16 keeps 7 of f64's 52 significand bits: drop 45, to nearest even. Wrapping: a
    // NaN with a full payload would carry out of the sign bit.
    const DROP: u32 = 45;
    let bits = v.to_bits();
    let up = ((1u64 << (DROP - 1)) - 1).wrapping_add((bits >> DROP) & 1);
    let r = bits.wrapping_add(up) & !((1u64 << DROP) - 1);
    f64::from_bits(r)
}

/// The nearest bf16 to `v` (ties to even) as an f64, when `v` is in f32's normal range
/// with room for rounding up.
#[inline]
fn bf16_normal(v: f64) -> Option<f64> {
    in_bf16_normal_range(v).then(|| bf16_nearest(v))
}

/// Little-endian bytes of `values` stored as `dtype`, rounded to nearest even; `None`
/// for a dtype weightdiff never writes (integers, booleans, FP8).
pub fn encode(dtype: DType, values: &[f64]) -> Option<Vec<u8>> {
    fn each<const N: usize>(values: &[f64], f: impl Fn(f64) -> [u8; N]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * N];
        for (o, &v) in out.chunks_exact_mut(N).zip(values) {
            o.copy_from_slice(&f(v));
        }
        out
    }
    Some(match dtype {
        DType::BF16 => {
            // As `round_bf16_slice`: a branch-free pass, then `half` for the rest.
            let mut out = each(values, |v| {
                // Exact in f32 (8 significant bits in its normal range); garbage for the
                // values the second pass rewrites.
                (((bf16_nearest(v) as f32).to_bits() >> 16) as u16).to_le_bytes()
            });
            if !values.iter().all(|&v| in_bf16_normal_range(v)) {
                for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                    if !in_bf16_normal_range(v) {
                        o.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes());
                    }
                }
            }
            out
        }
        DType::F16 => each(values, |v| half::f16::from_f64(v).to_le_bytes()),
        DType::F32 => each(values, |v| (v as f32).to_le_bytes()),
        DType::F64 => each(values, |v| v.to_le_bytes()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest bf16 to a finite, normal-range `v` (ties to even), by comparing the two
    /// neighbours (their distances to `v` are exact in f64).
    fn nearest_bf16(v: f64) -> f64 {
        let t = f64::from_bits(v.to_bits() & !((1u64 << 45) - 1));
        let u = f64::from_bits(t.to_bits() + (1u64 << 45));
        let (dt, du) = ((v - t).abs(), (u - v).abs());
        if dt < du || (dt == du && (t.to_bits() >> 45) & 1 == 0) {
            t
        } else {
            u
        }
    }

    #[test]
    fn bf16_rounding_of_f64_is_to_nearest_even() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            1.00390625,
            1.005859375,
            1.0078125,
            3.0e38,
            3.39e38,
            3.4e38,
            1e39,
            -1e39,
            1.2e-38,
            1.1754943508222875e-38,
            1e-40,
            1e-45,
            f64::INFINITY,
            f64::NAN,
            -f64::from_bits(u64::MAX >> 1),
            f64::from_bits(u64::MAX),
            2.999e38,
            -2.999e38,
            f64::MIN_POSITIVE,
            65504.0,
            0.1,
            0.2,
        ];
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Random bits across the exponents that matter, exact halfway cases, and
            // halfway in the high word with low bits set (where `half` rounds to even).
            let v =
                f64::from_bits((x & 0x800f_ffff_ffff_ffff) | ((0x380 + (x >> 52) % 0x100) << 52));
            let halfway = v.to_bits() & !((1u64 << 45) - 1) | (1u64 << 44);
            values.extend([v, f64::from_bits(halfway), f64::from_bits(halfway | 1)]);
        }
        let mut rounded = values.clone();
        round_bf16_slice(&mut rounded);
        let bytes = encode(DType::BF16, &values).unwrap();
        for (i, &v) in values.iter().enumerate() {
            let got = bf16_from_f64(v).to_f64();
            assert_eq!(round_bf16(v).to_bits(), got.to_bits(), "{v:e}");
            assert_eq!(rounded[i].to_bits(), got.to_bits(), "{v:e}");
            assert_eq!(
                bytes[2 * i..2 * i + 2],
                bf16_from_f64(v).to_le_bytes(),
                "{v:e}"
            );
            let normal = v.abs() >= f32::MIN_POSITIVE as f64 && v.abs() < 3.0e38;
            let want = if normal {
                nearest_bf16(v)
            } else {
                half::bf16::from_f64(v).to_f64()
            };
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{v:e}: {got:e} vs {want:e}"
            );
            // A bf16 value; and `half`'s own rounding wherever it sees every bit.
            assert_eq!(
                half::bf16::from_f64(got).to_f64().to_bits(),
                got.to_bits(),
                "{v:e}"
            );
            if v.to_bits() as u32 == 0 {
                assert_eq!(
                    got.to_bits(),
                    half::bf16::from_f64(v).to_f64().to_bits(),
                    "{v:e}"
                );
            }
        }
    }

    fn same(a: f32, b: f32) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    #[test]
    fn e4m3_scaled_decoding_equals_the_table_times_the_scale() {
        let codes: Vec<u8> = (0..=255).collect();
        for scale in [1.0f32, 0.0123, 3.5e-5, 2f32.powi(-127)] {
            let mut out = vec![7.0];
            extend_e4m3_scaled(&codes, scale, &mut out);
            assert_eq!(out[0], 7.0, "appends");
            for (&b, &v) in codes.iter().zip(&out[1..]) {
                let want = f8_e4m3_to_f32(b) * scale;
                assert!(
                    v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                    "{b:#04x} × {scale}: {v} vs {want}"
                );
            }
        }
    }

    #[test]
    fn every_bf16_pattern_matches_half() {
        for bits in 0..=u16::MAX {
            let ours = bf16_bits_to_f32(bits);
            let theirs = half::bf16::from_bits(bits).to_f32();
            assert!(same(ours, theirs), "bf16 {bits:#06x}: {ours} vs {theirs}");
            let mut out = [0f32; 1];
            decode_f32(DType::BF16, &bits.to_le_bytes(), &mut out);
            assert!(same(out[0], theirs));
        }
    }

    #[test]
    fn every_f16_pattern_matches_half() {
        for bits in 0..=u16::MAX {
            let mut out = [0f32; 1];
            decode_f32(DType::F16, &bits.to_le_bytes(), &mut out);
            let theirs = half::f16::from_bits(bits).to_f32();
            assert!(same(out[0], theirs), "f16 {bits:#06x}");
            let mut o64 = [0f64; 1];
            decode_f64(DType::F16, &bits.to_le_bytes(), &mut o64);
            assert!(same(o64[0] as f32, theirs));
        }
    }

    /// Reference values from the OCP FP8 specification (E4M3FN and E5M2 tables).
    #[test]
    fn f8_patterns_match_reference_table() {
        let e4m3 = [
            (0x00u8, 0.0f32),
            (0x01, 2f32.powi(-9)), // smallest subnormal
            (0x07, 0.875 * 2f32.powi(-6)),
            (0x08, 2f32.powi(-6)), // smallest normal
            (0x38, 1.0),
            (0x40, 2.0),
            (0x7E, 448.0), // max finite
            (0xB8, -1.0),
            (0xFE, -448.0),
        ];
        for (b, v) in e4m3 {
            assert_eq!(f8_lut(DType::F8E4M3)[b as usize], v, "e4m3 {b:#04x}");
        }
        assert!(f8_lut(DType::F8E4M3)[0x7F].is_nan());
        assert!(f8_lut(DType::F8E4M3)[0xFF].is_nan());
        let e5m2 = [
            (0x00u8, 0.0f32),
            (0x01, 2f32.powi(-16)),
            (0x04, 2f32.powi(-14)),
            (0x3C, 1.0),
            (0x7B, 57344.0),
            (0xBC, -1.0),
        ];
        for (b, v) in e5m2 {
            assert_eq!(f8_lut(DType::F8E5M2)[b as usize], v, "e5m2 {b:#04x}");
        }
        assert_eq!(f8_lut(DType::F8E5M2)[0x7C], f32::INFINITY);
        assert_eq!(f8_lut(DType::F8E5M2)[0xFC], f32::NEG_INFINITY);
        assert!(f8_lut(DType::F8E5M2)[0x7D].is_nan());
        // Every E5M2 pattern is the upper byte of the f16 with the same bits.
        for b in 0..=255u8 {
            let via_f16 = half::f16::from_bits((b as u16) << 8).to_f32();
            assert!(same(f8_lut(DType::F8E5M2)[b as usize], via_f16), "{b:#04x}");
        }
    }

    #[test]
    fn integers_decode_exactly_from_unaligned_bytes() {
        let mut bytes = vec![0xAAu8];
        bytes.extend_from_slice(&(-5i32).to_le_bytes());
        bytes.extend_from_slice(&(7i32).to_le_bytes());
        let mut out = [0f64; 2];
        decode_f64(DType::I32, &bytes[1..], &mut out);
        assert_eq!(out, [-5.0, 7.0]);
        let mut out = [0f64; 3];
        decode_f64(DType::BOOL, &[0, 1, 2], &mut out);
        assert_eq!(out, [0.0, 1.0, 1.0]);
    }
}
