//! Metrics of hand-computable tensors equal their SPEC §3 definitions.

use crate::common::*;
use weightdiff::{Checkpoint, CompareOptions, compare, pipeline::NoProgress};

fn run(base: &[T], ft: &[T], opts: &CompareOptions) -> weightdiff::Comparison {
    compare_files(base, ft, opts)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1e-300)
}

#[test]
fn metrics_of_a_small_tensor_match_their_definitions() {
    let base = [f32_tensor("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])];
    let ft = [f32_tensor("w", &[2, 2], &[1.0, 2.0, 3.0, 6.0])];
    let c = run(
        &base,
        &ft,
        &CompareOptions {
            verify: true,
            ..Default::default()
        },
    );
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    let m = &c.results[0].1;
    assert_eq!(m.num_elements, 4);
    assert!(close(m.mean_abs_diff, 0.5));
    assert_eq!(m.max_abs_diff, 2.0);
    assert!(close(m.rms_diff, 1.0));
    assert!(close(m.l2_diff, 2.0));
    assert!(close(m.base_l2, 30f64.sqrt()));
    assert!(close(m.finetuned_l2, 50f64.sqrt()));
    assert!(close(m.relative_diff.unwrap(), 2.0 / 30f64.sqrt()));
    assert!(close(m.cosine_similarity.unwrap(), 38.0 / 1500f64.sqrt()));
    assert_eq!(m.changed_ratio, 0.25);
    assert!(!m.identical);
    assert!(m.is_modified());
    assert!(m.reference_time.is_some() && m.speedup.is_some());
}

#[test]
fn threshold_decides_what_counts_as_changed() {
    let base = [f32_tensor("w", &[4], &[0.0, 0.0, 0.0, 0.0])];
    let ft = [f32_tensor("w", &[4], &[0.5, 0.05, 0.005, 0.0])];
    for (t, expect) in [(0.1, 0.25), (0.01, 0.5), (0.001, 0.75), (1.0, 0.0)] {
        let c = run(
            &base,
            &ft,
            &CompareOptions {
                threshold: t,
                ..Default::default()
            },
        );
        assert_eq!(c.results[0].1.changed_ratio, expect, "threshold {t}");
    }
}

#[test]
fn all_zero_base_gives_null_relative_diff_with_a_reason() {
    let base = [
        f32_tensor("z", &[3], &[0.0; 3]),
        f32_tensor("zz", &[2], &[0.0; 2]),
    ];
    let ft = [
        f32_tensor("z", &[3], &[0.0, 1.0, 0.0]),
        f32_tensor("zz", &[2], &[0.0; 2]),
    ];
    let c = run(&base, &ft, &CompareOptions::default());
    let z = &c.results.iter().find(|r| r.0 == "z").unwrap().1;
    assert_eq!(z.relative_diff, None);
    assert!(z.note.as_deref().unwrap().contains("all zeros"));
    let zz = &c.results.iter().find(|r| r.0 == "zz").unwrap().1;
    assert_eq!(zz.relative_diff, Some(0.0));
    assert!(zz.identical);
}

#[test]
fn zero_size_tensors_and_scalars_are_compared() {
    let base = [
        f32_tensor("empty", &[0, 4], &[]),
        f32_tensor("scalar", &[], &[2.0]),
    ];
    let ft = [
        f32_tensor("empty", &[0, 4], &[]),
        f32_tensor("scalar", &[], &[3.0]),
    ];
    let c = run(
        &base,
        &ft,
        &CompareOptions {
            verify: true,
            ..Default::default()
        },
    );
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    let s = &c.results.iter().find(|r| r.0 == "scalar").unwrap().1;
    assert_eq!(s.max_abs_diff, 1.0);
    let e = &c.results.iter().find(|r| r.0 == "empty").unwrap().1;
    assert_eq!(e.num_elements, 0);
    assert!(!e.is_modified());
}

#[test]
fn a_nan_does_not_blank_out_a_tensor() {
    let base = [f32_tensor("w", &[3], &[1.0, f32::NAN, 3.0])];
    let ft = [f32_tensor("w", &[3], &[2.0, 5.0, 3.0])];
    let c = run(
        &base,
        &ft,
        &CompareOptions {
            verify: true,
            ..Default::default()
        },
    );
    let m = &c.results[0].1;
    assert_eq!(m.nan_count, 1);
    assert_eq!(m.max_abs_diff, 1.0);
    assert!(close(m.mean_abs_diff, 0.5), "mean over the 2 finite pairs");
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = weightdiff::synthetic::demo_spec();
    spec.dtype = weightdiff::checkpoint::dtype::DType::F32;
    let pair = weightdiff::synthetic::build_pair(&spec, dir.path()).unwrap();
    let b = Checkpoint::open(&pair.base).unwrap();
    let f = Checkpoint::open(&pair.finetuned).unwrap();
    // Small windows so that big tensors are split across threads.
    let opts = |t| CompareOptions {
        threads: Some(t),
        window_bytes: 4096,
        ..Default::default()
    };
    let one = compare(&b, &f, &opts(1), &NoProgress).unwrap();
    let four = compare(&b, &f, &opts(4), &NoProgress).unwrap();
    assert_eq!(results_without_times(&one), results_without_times(&four));
}
