//! Mutated checkpoints (byte flips, truncations at every structural boundary, header
//! edits): no panic, and either a clean error naming the file or results equal to the
//! unmutated run for every tensor the mutation did not touch.

use crate::common::*;
use proptest::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use weightdiff::{Checkpoint, CompareOptions, TensorMetrics, compare, pipeline::NoProgress};

fn tensors(seed: u64) -> Vec<T> {
    let v = values(seed, 16);
    vec![
        f32_tensor("a", &[4, 4], &v),
        bf16_tensor("b", &[8], &v[..8]),
        T {
            name: "c".into(),
            dtype: "F16",
            shape: vec![2, 3],
            data: v[..6]
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        },
    ]
}

/// (header JSON, data) of a valid file.
fn parts(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        pos: usize,
        mask: u8,
    },
    Truncate {
        at: usize,
    },
    /// Truncation exactly at a structural boundary (header end, tensor starts/ends).
    TruncateAtBoundary {
        which: usize,
    },
    SwapDtype {
        tensor: usize,
        dtype: &'static str,
    },
    MultiplyShape {
        tensor: usize,
        factor: usize,
    },
    ShiftOffsets {
        tensor: usize,
        delta: i64,
    },
    Append {
        extra: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(pos, mask)| Mutation::Flip { pos, mask }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (0usize..8).prop_map(|which| Mutation::TruncateAtBoundary { which }),
        (
            0usize..3,
            prop::sample::select(vec![
                "F32", "F16", "BF16", "I8", "U8", "F64", "I64", "BOOL", "F8_E4M3", "C64", "XX"
            ])
        )
            .prop_map(|(tensor, dtype)| Mutation::SwapDtype { tensor, dtype }),
        (0usize..3, prop::sample::select(vec![0usize, 2, 3, 1 << 40]))
            .prop_map(|(tensor, factor)| Mutation::MultiplyShape { tensor, factor }),
        (0usize..3, -9i64..9).prop_map(|(tensor, delta)| Mutation::ShiftOffsets { tensor, delta }),
        (1usize..16).prop_map(|extra| Mutation::Append { extra }),
    ]
}

const NAMES: [&str; 3] = ["a", "b", "c"];

fn apply(bytes: &[u8], m: &Mutation) -> Vec<u8> {
    let (mut header, data) = parts(bytes);
    let rebuild = |h: &Value, d: &[u8]| raw_file(&h.to_string(), d);
    match *m {
        Mutation::Flip { pos, mask } => {
            let mut b = bytes.to_vec();
            let i = pos % b.len();
            b[i] ^= mask;
            b
        }
        Mutation::Truncate { at } => bytes[..at % bytes.len()].to_vec(),
        Mutation::TruncateAtBoundary { which } => {
            let n = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let mut cuts = vec![0, 8, n];
            for t in NAMES {
                let o = &header[t]["data_offsets"];
                cuts.push(n + o[0].as_u64().unwrap() as usize);
                cuts.push(n + o[1].as_u64().unwrap() as usize - 1);
            }
            bytes[..cuts[which % cuts.len()]].to_vec()
        }
        Mutation::SwapDtype { tensor, dtype } => {
            header[NAMES[tensor]]["dtype"] = Value::from(dtype);
            rebuild(&header, &data)
        }
        Mutation::MultiplyShape { tensor, factor } => {
            let s = &mut header[NAMES[tensor]]["shape"][0];
            *s = Value::from(s.as_u64().unwrap().wrapping_mul(factor as u64));
            rebuild(&header, &data)
        }
        Mutation::ShiftOffsets { tensor, delta } => {
            for k in 0..2 {
                let o = &mut header[NAMES[tensor]]["data_offsets"][k];
                *o = Value::from((o.as_i64().unwrap() + delta).max(0));
            }
            rebuild(&header, &data)
        }
        Mutation::Append { extra } => {
            let mut b = bytes.to_vec();
            b.extend(std::iter::repeat_n(0u8, extra));
            b
        }
    }
}

fn without_times(m: &TensorMetrics) -> TensorMetrics {
    TensorMetrics {
        total_time: 0.0,
        compute_time: 0.0,
        reference_time: None,
        speedup: None,
        ..m.clone()
    }
}

/// (dtype, shape, bytes) of every tensor of a checkpoint.
fn contents(ck: &Checkpoint) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    ck.tensors()
        .values()
        .map(|e| {
            (
                e.name.clone(),
                (
                    e.dtype_name(),
                    e.shape.clone(),
                    ck.read(e, 0, e.nbytes())
                        .map(|w| w.to_vec())
                        .unwrap_or_default(),
                ),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_files_fail_cleanly_or_leave_untouched_tensors_unchanged(m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let good = file_bytes(&tensors(1));
        let ft_path = write_file(&dir.path().join("ft.safetensors"), &tensors(2));
        let base_path = dir.path().join("base.safetensors");
        std::fs::write(&base_path, &good).unwrap();
        let opts = CompareOptions { verify: true, ..Default::default() };
        let ft = Checkpoint::open(&ft_path).unwrap();
        let orig = Checkpoint::open(&base_path).unwrap();
        let baseline = compare(&orig, &ft, &opts, &NoProgress).unwrap();
        let orig_contents = contents(&orig);

        let mutated = apply(&good, &m);
        std::fs::write(&base_path, &mutated).unwrap();
        match Checkpoint::open(&base_path) {
            Err(e) => prop_assert!(e.to_string().contains("base.safetensors"), "{e}"),
            Ok(ck) => {
                let c = compare(&ck, &ft, &opts, &NoProgress).unwrap();
                let now = contents(&ck);
                for (name, m) in &c.results {
                    if now.get(name) == orig_contents.get(name) {
                        let before = &baseline.results.iter().find(|(n, _)| n == name).unwrap().1;
                        prop_assert_eq!(without_times(m), without_times(before), "{} changed under {:?}", name, m);
                    }
                }
            }
        }
    }
}
