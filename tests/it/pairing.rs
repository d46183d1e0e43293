//! Pairing cases of SPEC §2 through the library API.

use crate::common::*;
use weightdiff::CompareOptions;

fn run(base: &[T], ft: &[T]) -> weightdiff::Comparison {
    compare_files(
        base,
        ft,
        &CompareOptions {
            verify: true,
            ..Default::default()
        },
    )
}

#[test]
fn tensors_on_one_side_only_are_listed() {
    let v = values(1, 8);
    let c = run(
        &[
            f32_tensor("shared", &[8], &v),
            f32_tensor("removed", &[8], &v),
        ],
        &[
            f32_tensor("shared", &[8], &v),
            f32_tensor("score.weight", &[2, 4], &v),
        ],
    );
    assert_eq!(c.only_in_base, ["removed"]);
    assert_eq!(c.only_in_finetuned, ["score.weight"]);
    assert_eq!(c.results.len(), 1);
    assert!(c.results[0].1.identical);
}

#[test]
fn resized_vocabulary_compares_the_leading_rows() {
    let base_v = values(2, 10 * 4);
    let mut ft_v = base_v.clone();
    ft_v[5] += 1.0; // row 1 changes
    ft_v.extend(values(3, 2 * 4)); // two new rows
    let c = run(
        &[f32_tensor("model.embed_tokens.weight", &[10, 4], &base_v)],
        &[f32_tensor("model.embed_tokens.weight", &[12, 4], &ft_v)],
    );
    assert_eq!(c.mismatches.len(), 1);
    assert_eq!(
        c.mismatches[0].kind,
        weightdiff::pairing::MismatchKind::Shape
    );
    assert_eq!(c.mismatches[0].finetuned_shape, [12, 4]);
    let m = &c.results[0].1;
    assert_eq!(m.compared_rows, Some(10));
    assert_eq!(m.num_elements, 40);
    assert!((m.max_abs_diff - 1.0).abs() < 1e-6);
    assert!(!m.identical);
    assert!(c.errors.is_empty(), "{:?}", c.errors);
}

#[test]
fn shapes_that_differ_beyond_the_first_dimension_are_reported_not_compared() {
    let v = values(4, 12);
    let c = run(
        &[f32_tensor("w", &[3, 4], &v)],
        &[f32_tensor("w", &[4, 3], &v)],
    );
    assert_eq!(c.mismatches.len(), 1);
    assert!(c.mismatches[0].compared.starts_with("nothing"));
    assert!(c.results.is_empty());
}

#[test]
fn dtype_mismatch_is_compared_after_decoding() {
    // Values exactly representable in bf16: no difference after decoding.
    let v: Vec<f32> = values(5, 64)
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    let c = run(
        &[bf16_tensor("w", &[8, 8], &v)],
        &[f32_tensor("w", &[8, 8], &v)],
    );
    assert_eq!(c.mismatches.len(), 1);
    assert_eq!(
        c.mismatches[0].kind,
        weightdiff::pairing::MismatchKind::Dtype
    );
    assert_eq!(
        (
            c.mismatches[0].base_dtype.as_str(),
            c.mismatches[0].finetuned_dtype.as_str()
        ),
        ("BF16", "F32")
    );
    let m = &c.results[0].1;
    assert_eq!(m.dtype, "BF16");
    assert_eq!(m.finetuned_dtype.as_deref(), Some("F32"));
    assert!(!m.identical, "different bytes");
    assert_eq!(m.max_abs_diff, 0.0);
    assert!(!m.is_modified());
}

#[test]
fn a_wrapping_prefix_on_one_side_is_inferred_and_reported() {
    let v = values(6, 16);
    let names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    let base: Vec<T> = names.iter().map(|n| f32_tensor(n, &[16], &v)).collect();
    let ft: Vec<T> = names
        .iter()
        .map(|n| f32_tensor(&format!("base_model.model.{n}"), &[16], &v))
        .collect();
    let c = run(&base, &ft);
    let p = c.prefix.as_ref().expect("prefix inferred");
    assert_eq!(p.prefix, "base_model.model.");
    assert_eq!(p.side, weightdiff::pairing::Side::Finetuned);
    assert_eq!(c.results.len(), 3);
    assert!(c.only_in_base.is_empty() && c.only_in_finetuned.is_empty());
    assert_eq!(
        c.results[0].0, "lm_head.weight",
        "reported under the unwrapped names"
    );
}
