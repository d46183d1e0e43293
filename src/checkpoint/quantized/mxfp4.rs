//! gpt-oss MXFP4 (`quant_method: mxfp4`): fused expert weights stored as
//! `P_blocks` U8 [E, R, G, 16] (32 E2M1 codes per group of 16 bytes, low nibble = even
//! element) and `P_scales` U8 [E, R, G] (one E8M0 exponent per 32 values), for `P` =
//! `….mlp.experts.gate_up_proj` / `down_proj`. Decoded as transformers 5.24's
//! `convert_moe_packed_tensors` does, into the tensor the bf16 gpt-oss checkpoint holds
//! under the name `P` (so an MXFP4 checkpoint pairs with its bf16 original):
//!
//! ```text
//! D[e][r][32·g + 2t]     = e2m1(B[e][r][g][t] & 0xF) · 2^(S[e][r][g] − 127)
//! D[e][r][32·g + 2t + 1] = e2m1(B[e][r][g][t] >> 4)  · 2^(S[e][r][g] − 127)
//! P[e][k][r] = D[e][r][k]          (the transpose: P is [E, G·32, R])
//! ```
//!
//! Every product is exact in bf16 and f32 (a 2-bit significand times a power of two;
//! 2^-127 · 0.5 is a bf16 subnormal, 2^127 · 2 overflows to ±inf in both), so the values
//! equal the reference's in any float dtype: `tests/it/mxfp4.rs` holds them, bit for
//! bit, to what transformers 5.24's loader makes of a gpt-oss checkpoint in bf16. An
//! exponent byte of 255 (2^128, not finite) is that tensor's error, naming the scales;
//! a missing scale tensor or blocks not U8 [E, R, G, 16] is that weight's error.
//!
//! Windows: the logical tensor is read as rows `(e, k)` of `R` values (`[E·K, R]`), so
//! a window of the pipeline is any range of those rows, granule 1. Row `(e, k)` takes one
//! nibble from each of the `R` stored rows of expert `e`, so a window of rows
//! `k0..k1` of expert `e` reads the one contiguous stretch of that expert's blocks
//! from `(r 0, group k0/32)` to `(r R−1, group ⌈k1/32⌉)` — at most one expert's packed
//! bytes (`R·G·16`, 1/8 of its f32 size; 8.3 MB for gpt-oss-120b) — and decodes only
//! the window's values. Memory stays bounded by one expert's storage whatever the
//! window, at the cost of reading that stretch once per window.

use super::super::dtype::DType;
use super::super::encoding::{Decode, Raw};
use super::super::{Checkpoint, TensorEntry};
use super::compressed::e2m1;
use super::{ScaleType, e2m1_step};
use crate::error::{Error, Result};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

pub(super) fn apply(ck: &mut Checkpoint) {
    let names: Vec<String> = ck
        .tensors
        .keys()
        .filter_map(|n| n.strip_suffix("_blocks").map(String::from))
        .collect();
    let mut decoded = 0usize;
    for name in names {
        let blocks_name = format!("{name}_blocks");
        let scales_name = format!("{name}_scales");
        let blocks = ck.tensors.remove(&blocks_name).expect("listed above");
        let path = ck.shards[blocks.shard].path().to_path_buf();
        let bad = |why: String| format!("{}: MXFP4 weight `{blocks_name}`: {why}", path.display());
        let Some(scales) = ck.tensors.remove(&scales_name) else {
            ck.broken.insert(
                name,
                bad(format!("its scale tensor `{scales_name}` is missing")),
            );
            continue;
        };
        let (e, r, g) = match (blocks.shape.as_slice(), &blocks.dtype) {
            (&[e, r, g, 16], Ok(DType::U8)) => (e as u64, r as u64, g as u64),
            _ => {
                ck.broken.insert(
                    name,
                    bad(format!(
                        "is {} {:?}, not U8 [experts, rows, groups, 16]",
                        blocks.dtype_name(),
                        blocks.shape
                    )),
                );
                continue;
            }
        };
        if !matches!(scales.dtype, Ok(DType::U8)) || scales.shape != blocks.shape[..3] {
            ck.broken.insert(
                name,
                bad(format!(
                    "its scales `{scales_name}` are {} {:?}, not U8 {:?}",
                    scales.dtype_name(),
                    scales.shape,
                    &blocks.shape[..3]
                )),
            );
            continue;
        }
        let d = Mxfp4Experts {
            scale_path: ck.shards[scales.shard].path().to_path_buf(),
            blocks: blocks.clone(),
            scales,
            experts: e,
            rows: r,
            groups: g,
        };
        ck.tensors.insert(
            name.clone(),
            TensorEntry {
                name,
                dtype: Ok(DType::F32),
                shape: vec![e as usize, (g * 32) as usize, r as usize],
                len: e * g * 32 * r * 4,
                layout: None,
                encoded: Some(Arc::new(d)),
                ..blocks
            },
        );
        decoded += 1;
    }
    if decoded > 0 {
        ck.warnings.push(format!(
            "{}: MXFP4 checkpoint (quant_method mxfp4): {decoded} expert weights are compared by value, dequantized from their `*_blocks` and `*_scales` as transformers does",
            ck.source.display()
        ));
    }
}

#[derive(Debug)]
struct Mxfp4Experts {
    blocks: TensorEntry,
    scales: TensorEntry,
    scale_path: PathBuf,
    experts: u64,
    /// Stored rows per expert (the logical last dim).
    rows: u64,
    /// Groups of 32 per stored row (the logical middle dim is 32 × this).
    groups: u64,
}

impl Decode for Mxfp4Experts {
    fn storage(&self) -> String {
        "MXFP4: E2M1, F8_E8M0 scales group 32".into()
    }

    fn rows(&self) -> (u64, u64) {
        (self.experts * self.groups * 32, self.rows)
    }

    fn row_granule(&self) -> u64 {
        1
    }

    fn decode_rows(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<()> {
        self.each(raw, rows, out, |q, s| q * s)
    }

    /// `2^(e − 127) · e2m1_step(q)`.
    fn decode_steps(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<bool> {
        self.each(raw, rows, out, |q, s| e2m1_step(q) * s)?;
        Ok(true)
    }
}

impl Mxfp4Experts {
    /// `f(e2m1 value, scale)` of every logical element of `rows`, in order, into `out`.
    fn each(
        &self,
        raw: Raw<'_>,
        rows: Range<u64>,
        out: &mut Vec<f32>,
        f: impl Fn(f32, f32) -> f32,
    ) -> Result<()> {
        let (rr, gg) = (self.rows, self.groups);
        let k_len = gg * 32;
        out.clear();
        out.resize(((rows.end - rows.start) * rr) as usize, 0.0);
        let mut at = rows.start;
        while at < rows.end {
            let e = at / k_len;
            let k0 = at % k_len;
            let k1 = (rows.end - e * k_len).min(k_len);
            let (g0, g1) = (k0 / 32, k1.div_ceil(32));
            // Stored (r, g) cells of expert e from (0, g0) to (R−1, g1−1), inclusive.
            let first = e * rr * gg + g0;
            let cells = (rr - 1) * gg + g1 - g0;
            let b = raw(&self.blocks, first * 16, cells * 16)?;
            let sb = raw(&self.scales, first, cells)?;
            let mut s = vec![0f32; sb.len()];
            ScaleType::E8M0.decode(&sb, &mut s);
            if let Some(i) = s.iter().position(|v| !v.is_finite()) {
                let cell = first + i as u64;
                return Err(Error::Tensor {
                    path: self.scale_path.clone(),
                    tensor: self.scales.name.clone(),
                    reason: format!(
                        "the scale at [{}, {}, {}] is E8M0 255 (not finite)",
                        cell / (rr * gg),
                        cell / gg % rr,
                        cell % gg
                    ),
                });
            }
            let base = ((at - rows.start) * rr) as usize;
            for r in 0..rr {
                for k in k0..k1 {
                    let cell = (r * gg + k / 32 - g0) as usize;
                    let byte = b[cell * 16 + (k % 32 / 2) as usize];
                    let nib = if k % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    out[base + ((k - k0) * rr + r) as usize] = f(e2m1(nib), s[cell]);
                }
            }
            at = e * k_len + k1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::shard::Window;

    #[test]
    fn gpt_oss_steps_are_e2m1_spacing_times_the_e8m0_scale() {
        let entry = |name: &str, shape: Vec<usize>, len: u64| TensorEntry {
            name: name.into(),
            dtype: Ok(DType::U8),
            shape,
            shard: 0,
            offset: 0,
            len,
            layout: None,
            encoded: None,
        };
        // One expert, one stored row, one group: logical [1, 32, 1]; scale 2^(128−127).
        let d = Mxfp4Experts {
            blocks: entry("b", vec![1, 1, 1, 16], 16),
            scales: entry("s", vec![1, 1, 1], 1),
            scale_path: "x".into(),
            experts: 1,
            rows: 1,
            groups: 1,
        };
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x71; // k 0: 0.5, k 1: 6
        blocks[1] = 0xD4; // k 2: 2, k 3: -3
        let raw = |e: &TensorEntry, s: u64, l: u64| -> Result<Window> {
            let b = if e.name == "b" {
                blocks.clone()
            } else {
                vec![128]
            };
            Ok(Window::Shared(Arc::new(b), s as usize..(s + l) as usize))
        };
        let mut out = Vec::new();
        assert!(d.decode_steps(&raw, 0..32, &mut out).unwrap());
        assert_eq!(&out[..5], [1.0, 4.0, 2.0, 2.0, 1.0]);
    }
}
