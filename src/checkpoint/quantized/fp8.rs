//! FP8 with block scales (`quant_method: fp8`, see the parent module's doc).

use super::super::dtype::{DType, extend_e4m3_scaled};
use super::super::encoding::{Decode, Raw};
use super::super::{Checkpoint, TensorEntry};
use super::{SCALE_SUFFIX, ScaleType};
use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::Arc;

pub(super) fn fp8_block_scaled(ck: &mut Checkpoint, (br, bc): (u64, u64)) {
    let weights: Vec<String> = ck
        .tensors
        .values()
        .filter(|e| matches!(e.dtype, Ok(DType::F8E4M3)) && e.encoded.is_none())
        .map(|e| e.name.clone())
        .collect();
    let mut decoded = 0usize;
    for name in weights {
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let w = ck.tensors.remove(&name).expect("listed above");
        let path = ck.shards[w.shard].path().to_path_buf();
        let bad = |why: String| {
            format!(
                "{}: F8_E4M3 weight with block scales: {why}",
                path.display()
            )
        };
        let Some(scale) = ck.tensors.remove(&scale_name) else {
            ck.broken.insert(
                name,
                bad(format!("its scale tensor `{scale_name}` is missing")),
            );
            continue;
        };
        let (rows, cols) = match w.shape.as_slice() {
            [r, c] => (*r as u64, *c as u64),
            _ => {
                ck.broken
                    .insert(name, bad(format!("shape {:?} is not 2-D", w.shape)));
                continue;
            }
        };
        let grid = [rows.div_ceil(br) as usize, cols.div_ceil(bc) as usize];
        if scale.shape != grid {
            ck.broken.insert(
                name,
                bad(format!(
                    "its scale tensor `{scale_name}` has shape {:?}, not the {grid:?} of {br}×{bc} tiles",
                    scale.shape
                )),
            );
            continue;
        }
        let scale_dtype = match (&scale.dtype, scale.dtype_name().as_str()) {
            (Ok(d @ (DType::F32 | DType::BF16)), _) => ScaleType::Float(*d),
            (_, "F8_E8M0") => ScaleType::E8M0,
            _ => {
                ck.broken.insert(
                    name,
                    bad(format!(
                        "its scale tensor `{scale_name}` is {}; F32, BF16 and F8_E8M0 scales are decoded",
                        scale.dtype_name()
                    )),
                );
                continue;
            }
        };
        let scale_path = ck.shards[scale.shard].path().to_path_buf();
        let d = Fp8BlockScaled {
            weight: w.clone(),
            scale,
            scale_path,
            scale_dtype,
            block: (br, bc),
            rows,
            cols,
        };
        ck.tensors.insert(
            name,
            TensorEntry {
                dtype: Ok(DType::F32),
                len: rows * cols * 4,
                layout: None,
                encoded: Some(Arc::new(d)),
                ..w
            },
        );
        decoded += 1;
    }
    if decoded > 0 {
        ck.warnings.push(format!(
            "{}: FP8 checkpoint (quant_method fp8, {br}×{bc} block scales): {decoded} weights are compared by value, dequantized with their `*{SCALE_SUFFIX}` scales",
            ck.source.display()
        ));
    }
}

/// An F8_E4M3 weight and its tile scales.
#[derive(Debug)]
struct Fp8BlockScaled {
    weight: TensorEntry,
    scale: TensorEntry,
    scale_dtype: ScaleType,
    /// The scale's file, for its errors.
    scale_path: std::path::PathBuf,
    block: (u64, u64),
    rows: u64,
    cols: u64,
}

impl Decode for Fp8BlockScaled {
    fn storage(&self) -> String {
        format!(
            "F8_E4M3, {} scales {}×{}",
            self.scale_dtype, self.block.0, self.block.1
        )
    }

    fn rows(&self) -> (u64, u64) {
        (self.rows, self.cols)
    }

    fn row_granule(&self) -> u64 {
        1
    }

    /// E4M3's 3 mantissa bits, relative to the decoded value: ulp(W) ≈
    /// 2^(⌊log₂|W|⌋ − 3). Exact for power-of-two tile scales (E8M0); otherwise within a
    /// factor 2 of the true s·2^(⌊log₂|W/s|⌋ − 3), as ⌊log₂|W|⌋ and ⌊log₂|W/s|⌋ + log₂ s
    /// differ by less than 1. Codes below E4M3's normal range (|W/s| < 2^−6) are rare
    /// after amax scaling and are modelled as normal.
    fn rounding(&self) -> Option<(i32, i32)> {
        Some((3, -126))
    }

    fn decode_rows(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<()> {
        let (br, bc) = self.block;
        let cols = self.cols as usize;
        let n = (rows.end - rows.start) as usize;
        let codes = raw(&self.weight, rows.start * self.cols, n as u64 * self.cols)?;
        // The scale rows the window's rows fall in.
        let grid_cols = self.cols.div_ceil(bc);
        let (s0, s1) = (rows.start / br, rows.end.div_ceil(br));
        let es = self.scale_dtype.size();
        let scale_bytes = raw(&self.scale, s0 * grid_cols * es, (s1 - s0) * grid_cols * es)?;
        let mut scales = vec![0f32; ((s1 - s0) * grid_cols) as usize];
        self.scale_dtype.decode(&scale_bytes, &mut scales);
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::Tensor {
                path: self.scale_path.clone(),
                tensor: self.scale.name.clone(),
                reason: format!(
                    "the scale of tile ({}, {}) is {}",
                    s0 + i as u64 / grid_cols,
                    i as u64 % grid_cols,
                    scales[i]
                ),
            });
        }
        // One pass: a tile's columns at a time, code → f32 times its scale (the
        // reference's one f32 product); no division per element.
        out.clear();
        out.reserve(n * cols);
        for (i, row) in codes.chunks_exact(cols).enumerate() {
            let srow = &scales[((rows.start + i as u64) / br - s0) as usize * grid_cols as usize..];
            for (tile, &s) in row.chunks(bc as usize).zip(srow) {
                extend_e4m3_scaled(tile, s, out);
            }
        }
        Ok(())
    }
}
