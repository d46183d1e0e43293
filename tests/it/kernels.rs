//! The fast kernel agrees with the scalar f64 reference on every dtype, awkward lengths
//! (block and lane tails) and non-finite values.

use proptest::prelude::*;
use weightdiff::checkpoint::dtype::DType;
use weightdiff::checkpoint::dtype::encode;
use weightdiff::kernels::{check_agreement, fast, is_f32_domain, reference};

const LENGTHS: &[usize] = &[
    0, 1, 2, 15, 16, 17, 511, 1023, 1024, 1025, 4095, 4096, 4097, 10007,
];

const FLOATS: &[DType] = &[DType::F32, DType::F16, DType::BF16, DType::F64];

fn bytes_of(d: DType, v: &[f64]) -> Vec<u8> {
    match d {
        DType::F8E4M3 | DType::F8E5M2 => {
            // Any byte pattern is a value; derive bytes from the values' bits.
            v.iter().map(|x| (x.to_bits() >> 40) as u8).collect()
        }
        DType::I32 => v
            .iter()
            .flat_map(|x| ((x * 1000.0) as i32).to_le_bytes())
            .collect(),
        DType::I8 => v.iter().map(|x| ((x * 100.0) as i8) as u8).collect(),
        DType::U8 | DType::BOOL => v.iter().map(|x| (x.abs() * 3.0) as u8).collect(),
        DType::I64 => v
            .iter()
            .flat_map(|x| ((x * 1e6) as i64).to_le_bytes())
            .collect(),
        DType::I16 => v
            .iter()
            .flat_map(|x| ((x * 1e3) as i16).to_le_bytes())
            .collect(),
        _ => encode(d, v).expect("a float dtype"),
    }
}

fn series(seed: u64, n: usize) -> Vec<f64> {
    crate::common::values(seed, n)
        .into_iter()
        .map(f64::from)
        .collect()
}

fn assert_agree(a: &[u8], da: DType, b: &[u8], db: DType, what: &str) {
    let f = fast::diff(a, da, b, db, 1e-3);
    let r = reference::diff(a, da, b, db, 1e-3);
    if let Err((m, x, y)) = check_agreement(&f, &r, is_f32_domain(da, db)) {
        panic!("{what}: {m}: fast {x} vs reference {y}\nfast {f:?}\nref {r:?}");
    }
}

#[test]
fn fast_matches_reference_for_every_float_dtype_pair_and_length() {
    for &da in FLOATS.iter().chain(&[DType::F8E4M3, DType::F8E5M2]) {
        for &db in FLOATS {
            for &n in LENGTHS {
                let x = series(n as u64, n);
                let y: Vec<f64> = x
                    .iter()
                    .zip(series(n as u64 + 99, n))
                    .map(|(a, e)| a + 0.01 * e)
                    .collect();
                let (a, b) = (bytes_of(da, &x), bytes_of(db, &y));
                assert_agree(&a, da, &b, db, &format!("{da}/{db} n={n}"));
            }
        }
    }
}

#[test]
fn fast_matches_reference_for_integer_and_bool_tensors() {
    for d in [
        DType::I8,
        DType::U8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::BOOL,
    ] {
        for &n in LENGTHS {
            let (a, b) = (bytes_of(d, &series(1, n)), bytes_of(d, &series(2, n)));
            assert_agree(&a, d, &b, d, &format!("{d} n={n}"));
        }
    }
}

#[test]
fn integer_tensors_are_compared_exactly() {
    let a: Vec<u8> = [1i32, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let b: Vec<u8> = [1i32, 5, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let f = fast::diff(&a, DType::I32, &b, DType::I32, 0.0);
    assert_eq!(f.max_abs_d, 3.0);
    assert_eq!(f.changed, 1);
    assert_eq!(f.sum_abs_d, 3.0);
}

#[test]
fn nan_and_inf_are_counted_and_excluded_from_sums() {
    for &d in &[DType::F32, DType::BF16, DType::F16, DType::F64] {
        for &n in &[4usize, 17, 1025, 4097] {
            let mut x = series(5, n);
            let mut y: Vec<f64> = x.iter().map(|v| v + 0.5).collect();
            x[0] = f64::NAN;
            y[n / 2] = f64::INFINITY;
            x[n - 1] = f64::NEG_INFINITY;
            y[n - 1] = f64::NAN;
            let (a, b) = (bytes_of(d, &x), bytes_of(d, &y));
            assert_agree(&a, d, &b, d, &format!("{d} n={n}"));
            let f = fast::diff(&a, d, &b, d, 1e-3);
            assert_eq!(f.nan, 2, "{d} n={n}");
            assert_eq!(f.inf, 2, "{d} n={n}");
            let excluded = if n / 2 == n - 1 || n / 2 == 0 { 2 } else { 3 };
            assert_eq!(f.finite, (n - excluded) as u64);
            assert!(f.sum_abs_d.is_finite() && f.sum_d2.is_finite());
            // d = 0.5 exactly representable in every format here for |x| < 1.
            assert!((f.max_abs_d - 0.5).abs() < 1e-2, "{d}: {}", f.max_abs_d);
        }
    }
}

#[test]
fn values_that_overflow_f32_squares_are_summed_in_f64() {
    let x = vec![3e38f64, -3e38, 1.0];
    let y = vec![-3e38f64, 3e38, 1.0];
    let (a, b) = (
        encode(DType::F32, &x).unwrap(),
        encode(DType::F32, &y).unwrap(),
    );
    assert_agree(&a, DType::F32, &b, DType::F32, "overflow");
    let f = fast::diff(&a, DType::F32, &b, DType::F32, 0.0);
    assert!(f.sum_d2.is_finite() && f.sum_d2 > 1e77);
    assert_eq!(
        f.max_abs_d,
        f64::from(f32::INFINITY),
        "|d| overflows f32 at working precision"
    );
}

#[test]
fn identical_fast_path_equals_the_full_kernel_on_equal_bytes() {
    for &d in &[DType::BF16, DType::F32, DType::F16, DType::I32] {
        let mut x = series(9, 3001);
        x[7] = f64::NAN;
        let a = bytes_of(d, &x);
        let full = fast::diff(&a, d, &a, d, 1e-6);
        let id = fast::identical(&a, d);
        assert_eq!(id.count, full.count);
        assert_eq!(id.finite, full.finite);
        assert_eq!(id.nan, full.nan);
        assert_eq!(id.changed, 0);
        assert_eq!(id.max_abs_d, 0.0);
        assert!((id.sum_a2 - full.sum_a2).abs() <= 1e-9 * full.sum_a2);
        assert_eq!(id.sum_b2, id.sum_a2);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fast_matches_reference_on_arbitrary_f32(
        x in proptest::collection::vec(-1e6f32..1e6, 0..3000),
        noise in proptest::collection::vec(-1.0f32..1.0, 3000),
        threshold in 0.0f64..0.5,
    ) {
        let y: Vec<f32> = x.iter().zip(&noise).map(|(a, e)| a + e).collect();
        let a: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f = fast::diff(&a, DType::F32, &b, DType::F32, threshold);
        let r = reference::diff(&a, DType::F32, &b, DType::F32, threshold);
        prop_assert!(check_agreement(&f, &r, true).is_ok(), "{:?} vs {:?}", f, r);
    }

    #[test]
    fn fast_matches_reference_on_arbitrary_bf16_bit_patterns(
        bits in proptest::collection::vec(any::<u16>(), 0..2500),
        flips in proptest::collection::vec(any::<u16>(), 2500),
    ) {
        let a: Vec<u8> = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = bits.iter().zip(&flips).flat_map(|(v, f)| (v ^ (f & 0x00FF)).to_le_bytes()).collect();
        let f = fast::diff(&a, DType::BF16, &b, DType::BF16, 1e-6);
        let r = reference::diff(&a, DType::BF16, &b, DType::BF16, 1e-6);
        prop_assert!(check_agreement(&f, &r, true).is_ok(), "{:?} vs {:?}", f, r);
    }
}
