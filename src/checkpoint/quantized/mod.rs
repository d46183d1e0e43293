//! Checkpoints quantized in place, recognised from `config.json`'s
//! `quantization_config`, and read by value through the encoding seam
//! ([`super::encoding`]).
//!
//! **FP8 with block scales** (`quant_method: fp8` with `weight_block_size: [br, bc]`,
//! the layout of DeepSeek-V3/R1 and the Qwen3 `-FP8` releases): a weight `W` [rows,
//! cols] is stored as F8_E4M3 codes `Q`, and `W.weight_scale_inv` [⌈rows/br⌉, ⌈cols/bc⌉]
//! (F32, BF16, or F8_E8M0 with `scale_fmt: ue8m0`; possibly in another shard) holds one
//! scale per tile, edge tiles ragged:
//!
//! ```text
//! W[i][j] = f32(Q[i][j]) · S[i / br][j / bc]      (one f32 product, as the reference does)
//! ```
//!
//! The weight becomes a logical F32 tensor; its scale tensor is no longer a tensor of
//! the model (it never appears as a row or as "only in"). A missing scale, a scale grid
//! of the wrong shape or dtype, or a non-finite scale is that weight's error, naming the
//! scale.
//!
//! **Any other `quant_method`** is compared as stored, with a warning in every report that
//! the values are not dequantized.

use super::Checkpoint;
use super::dtype::{DType, decode_f32};

mod compressed;
mod fp8;
mod mxfp4;

/// Suffix of the block-scale tensor of a `*.weight` (DeepSeek's name: the inverse of the
/// quantization scale, i.e. the factor that multiplies the codes).
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// Applies the checkpoint's `quantization_config`: FP8 block-scaled weights become their
/// dequantized values; an unknown method is a warning.
pub fn apply(ck: &mut Checkpoint) {
    let Some(qc) = ck
        .config
        .as_ref()
        .and_then(|c| c.get("quantization_config"))
        .cloned()
    else {
        return;
    };
    let method = qc
        .get("quant_method")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let block = qc
        .get("weight_block_size")
        .and_then(|b| b.as_array())
        .and_then(|b| match b.as_slice() {
            [r, c] => Some((r.as_u64()?, c.as_u64()?)),
            _ => None,
        })
        .filter(|&(r, c)| r > 0 && c > 0);
    match (method, block) {
        ("fp8", Some(block)) => fp8::fp8_block_scaled(ck, block),
        ("compressed-tensors", _) => compressed::apply(ck, &qc),
        ("mxfp4", _) => mxfp4::apply(ck),
        _ => caveat(
            ck,
            format!(
                "{}: quantization_config.quant_method `{method}`{}: weightdiff does not dequantize this format yet; its tensors are compared as the stored codes and its scale tensors as tensors of their own, so the numbers are NOT the weights' values",
                ck.source.join("config.json").display(),
                if method == "fp8" {
                    " without weight_block_size"
                } else {
                    ""
                }
            ),
        ),
    }
}

/// 2^k as an f32 (0 below f32's subnormals), for steps built from exponents.
#[inline(always)]
pub(crate) fn pow2(k: i32) -> f32 {
    f64::from_bits(((k.clamp(-1022, 1023) + 1023) as u64) << 52) as f32
}

/// The step of a float code of value `q` with `bits` stored mantissa bits and smallest
/// normal exponent `emin`: 2^(max(⌊log₂|q|⌋, emin) − bits) (the spacing of the codes at
/// `q`; below the normal range, the subnormals' fixed spacing). Exact for every value of
/// the 8-bit and 16-bit float formats (all of them are f32 normals or zero).
#[inline(always)]
pub(crate) fn float_step(q: f32, bits: i32, emin: i32) -> f32 {
    let e = ((q.to_bits() >> 23) & 0xff) as i32 - 127;
    pow2(e.max(emin) - bits)
}

/// The step of an E2M1 value `q` (in code units, before its scale): 0.5 below 2, 1 in
/// [2, 4), 2 from 4 (the spacing of {0, 0.5, 1, 1.5, 2, 3, 4, 6} at and above `|q|`).
#[inline(always)]
pub(crate) fn e2m1_step(q: f32) -> f32 {
    let m = q.abs();
    if m < 2.0 {
        0.5
    } else if m < 4.0 {
        1.0
    } else {
        2.0
    }
}

/// A warning that the numbers may be wrong.
pub(super) fn caveat(ck: &mut Checkpoint, w: String) {
    ck.caveats.push(w.clone());
    ck.warnings.push(w);
}

/// How tile scales are stored: a float, or E8M0 (`scale_fmt: ue8m0`, DeepSeek-V3.1):
/// a bare exponent byte, 2^(e − 127), 0xFF = NaN.
#[derive(Debug, Clone, Copy)]
pub(super) enum ScaleType {
    Float(DType),
    E8M0,
}

impl ScaleType {
    pub(super) fn size(self) -> u64 {
        match self {
            ScaleType::Float(d) => d.size() as u64,
            ScaleType::E8M0 => 1,
        }
    }

    pub(super) fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            ScaleType::Float(d) => decode_f32(d, bytes, out),
            ScaleType::E8M0 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = match b {
                        0xFF => f32::NAN,
                        // 2^-127 is subnormal: its one bit sits below the exponent field.
                        0 => f32::from_bits(0x0040_0000),
                        e => f32::from_bits((e as u32) << 23),
                    };
                }
            }
        }
    }
}

impl std::fmt::Display for ScaleType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScaleType::Float(d) => write!(f, "{d}"),
            ScaleType::E8M0 => f.write_str("F8_E8M0"),
        }
    }
}

#[cfg(test)]
mod step_tests {
    use super::*;

    #[test]
    fn float_steps_are_the_spacing_of_the_codes_at_each_value() {
        // E4M3: 3 mantissa bits, normals from 2^-6.
        assert_eq!(float_step(1.0, 3, -6), 0.125);
        assert_eq!(float_step(1.875, 3, -6), 0.125);
        assert_eq!(float_step(448.0, 3, -6), 32.0);
        assert_eq!(float_step(-3.0, 3, -6), 0.25);
        // Zero and subnormals: the fixed spacing 2^-9.
        assert_eq!(float_step(0.0, 3, -6), 1.0 / 512.0);
        assert_eq!(float_step(3.0 / 512.0, 3, -6), 1.0 / 512.0);
        // E5M2 and f32's own ulp (subnormal spacing 2^-149).
        assert_eq!(float_step(1.0, 2, -14), 0.25);
        assert_eq!(float_step(0.0, 23, -126), f32::from_bits(1));
    }

    #[test]
    fn e2m1_steps_are_half_one_and_two() {
        let want = [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0];
        for (n, w) in (0u8..16).zip(want.iter().cycle()) {
            assert_eq!(e2m1_step(compressed::e2m1(n)), *w, "nibble {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_scales_are_powers_of_two() {
        let mut out = [0f32; 5];
        ScaleType::E8M0.decode(&[127, 128, 1, 0, 0xFF], &mut out);
        assert_eq!(&out[..4], &[1.0, 2.0, 2f32.powi(-126), 2f32.powi(-127)]);
        assert!(out[4].is_nan());
    }
}
