//! The reference kernel: one element at a time, decoded independently of the fast
//! kernel's block decoders (`half` for 16-bit floats, the format formulas for FP8),
//! every sum in f64 in element order. Slow and obviously right; `--verify` holds the
//! fast kernel to it.

use super::Accum;
use crate::checkpoint::dtype::{DType, f8_e4m3_to_f32, f8_e5m2_to_f32};

/// Decodes element `i` of `bytes` to f64.
fn element(d: DType, bytes: &[u8], i: usize) -> f64 {
    let s = d.size();
    let b = &bytes[i * s..(i + 1) * s];
    match d {
        DType::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")),
        DType::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::F8E4M3 => f8_e4m3_to_f32(b[0]) as f64,
        DType::F8E5M2 => f8_e5m2_to_f32(b[0]) as f64,
        DType::I64 => i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64,
        DType::U64 => u64::from_le_bytes(b.try_into().expect("8 bytes")) as f64,
        DType::I32 => i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
        DType::U32 => u32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        DType::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
        DType::I8 => b[0] as i8 as f64,
        DType::U8 => b[0] as f64,
        DType::BOOL => (b[0] != 0) as u8 as f64,
    }
}

/// Sums of a tensor window pair, element by element in f64.
///
/// For pairs of ≤ 32-bit floats the threshold test uses |d| rounded to f32, the
/// precision at which the stored values live (see `kernels` docs); the max is kept in
/// f64 and rounded only when compared.
pub fn diff(a: &[u8], da: DType, b: &[u8], db: DType, threshold: f64) -> Accum {
    let n = a.len() / da.size();
    assert_eq!(
        n,
        b.len() / db.size(),
        "windows of different element counts"
    );
    let f32_domain = super::is_f32_domain(da, db);
    let mut acc = Accum {
        count: n as u64,
        ..Accum::default()
    };
    for i in 0..n {
        let x = element(da, a, i);
        let y = element(db, b, i);
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
        acc.max_abs_d = acc.max_abs_d.max(ad);
        let ad_test = if f32_domain { ad as f32 as f64 } else { ad };
        if ad_test > threshold {
            acc.changed += 1;
        }
    }
    acc
}
