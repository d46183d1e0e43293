//! FP8 with block scales (`quant_method: fp8`, see the parent module's doc).

use super::super::dtype::{DType, extend_e4m3_scaled};
use super::super::encoding::{Decode, Raw};
use super::super::shard::Window;
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

    fn decode_rows(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<()> {
        // One pass: a tile's columns at a time, code → f32 times its scale (the
        // reference's one f32 product); no division per element.
        out.clear();
        out.reserve(self.values(&rows));
        self.each_tile(raw, &rows, |tile, s| extend_e4m3_scaled(tile, s, out))
    }

    /// `|s| · 2^(e − 3)` with `e` the code's exponent (E4M3 subnormals and zero: −6).
    fn decode_steps(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<bool> {
        out.clear();
        out.reserve(self.values(&rows));
        self.each_tile(raw, &rows, |tile, s| extend_e4m3_steps(tile, s, out))?;
        Ok(true)
    }

    /// Both in one pass over the codes (the diff of an FP8 quant against its original).
    fn decode_rows_and_steps(
        &self,
        raw: Raw<'_>,
        rows: Range<u64>,
        values: &mut Vec<f32>,
        steps: &mut Vec<f32>,
    ) -> Result<bool> {
        values.clear();
        values.reserve(self.values(&rows));
        steps.clear();
        steps.reserve(self.values(&rows));
        self.each_tile(raw, &rows, |tile, s| {
            extend_e4m3_scaled(tile, s, values);
            extend_e4m3_steps(tile, s, steps);
        })?;
        Ok(true)
    }
}

/// The step of each E4M3 code of `tile` under scale `s`, appended to `out`.
fn extend_e4m3_steps(tile: &[u8], s: f32, out: &mut Vec<f32>) {
    let s = s.abs();
    // Exponent field E (bits 6..3, bias 7): e = max(E, 1) − 7, step 2^(e − 3), i.e.
    // 2^(max(E, 1) − 10), the f32 of exponent field max(E, 1) + 117.
    out.extend(
        tile.iter()
            .map(|&b| s * f32::from_bits((((b as u32 >> 3) & 0x0f).max(1) + 117) << 23)),
    );
}

impl Fp8BlockScaled {
    /// Values in `rows`.
    fn values(&self, rows: &Range<u64>) -> usize {
        ((rows.end - rows.start) * self.cols) as usize
    }

    /// Calls `f(codes, scale)` for each tile-row segment of `rows`, in the logical order.
    fn each_tile(
        &self,
        raw: Raw<'_>,
        rows: &Range<u64>,
        mut f: impl FnMut(&[u8], f32),
    ) -> Result<()> {
        let (br, bc) = self.block;
        let cols = self.cols as usize;
        let (codes, scales, s0) = self.codes_and_scales(raw, rows)?;
        let grid_cols = self.cols.div_ceil(bc) as usize;
        for (i, row) in codes.chunks_exact(cols).enumerate() {
            let srow = &scales[((rows.start + i as u64) / br - s0) as usize * grid_cols..];
            for (tile, &s) in row.chunks(bc as usize).zip(srow) {
                f(tile, s);
            }
        }
        Ok(())
    }

    /// The codes of `rows` and the tile scales of the tile rows they fall in (checked
    /// finite), with the first tile row's index.
    fn codes_and_scales(&self, raw: Raw<'_>, rows: &Range<u64>) -> Result<(Window, Vec<f32>, u64)> {
        let br = self.block.0;
        let n = rows.end - rows.start;
        let codes = raw(&self.weight, rows.start * self.cols, n * self.cols)?;
        // The scale rows the window's rows fall in.
        let grid_cols = self.cols.div_ceil(self.block.1);
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
        Ok((codes, scales, s0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, dtype: DType, shape: Vec<usize>, len: u64) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype: Ok(dtype),
            shape,
            shard: 0,
            offset: 0,
            len,
            layout: None,
            encoded: None,
        }
    }

    #[test]
    fn fp8_steps_are_the_tile_scale_times_the_codes_exponent_spacing() {
        // 2×4 codes in 1×2 tiles: scales [[2, 0.5], [1, 4]].
        let codes: Vec<u8> = vec![0x38, 0x00, 0x01, 0x7E, 0xB8, 0x40, 0x08, 0x37];
        let scales: Vec<u8> = [2f32, 0.5, 1.0, 4.0]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let d = Fp8BlockScaled {
            weight: entry("w", DType::F8E4M3, vec![2, 4], 8),
            scale: entry("w_scale_inv", DType::F32, vec![2, 2], 16),
            scale_dtype: ScaleType::Float(DType::F32),
            scale_path: "x".into(),
            block: (1, 2),
            rows: 2,
            cols: 4,
        };
        let raw = |e: &TensorEntry, s: u64, l: u64| -> Result<Window> {
            let bytes = if e.name == "w" { &codes } else { &scales };
            Ok(Window::Shared(
                Arc::new(bytes.clone()),
                s as usize..(s + l) as usize,
            ))
        };
        let mut out = Vec::new();
        assert!(d.decode_steps(&raw, 0..2, &mut out).unwrap());
        // 0x38 = 1.0: 2^-3; 0x00 and 0x01 (zero, subnormal): 2^-9; 0x7E = 448: 2^5;
        // 0xB8 = -1.0: 2^-3; 0x40 = 2.0: 2^-2; 0x08 = 2^-6 (smallest normal): 2^-9;
        // 0x37 = 0.9375: 2^-4.
        let want = [
            2.0 / 8.0,
            2.0 / 512.0,
            0.5 / 512.0,
            0.5 * 32.0,
            1.0 / 8.0,
            1.0 / 4.0,
            4.0 / 512.0,
            4.0 / 16.0,
        ];
        assert_eq!(out, want);
        // Rows from 1: the same steps as the second row of the whole.
        assert!(d.decode_steps(&raw, 1..2, &mut out).unwrap());
        assert_eq!(out, want[4..]);
    }
}
