//! Fuzz target: "open this PyTorch checkpoint file and compare it with itself".
//!
//! The input is written as `pytorch_model.bin` and opened (zip or legacy format, the
//! restricted pickle machine, storage placement, strided views); when it opens, it is
//! compared with itself, which reads and gathers every tensor. Any panic, abort,
//! out-of-bounds read or leak is a finding; errors are the expected outcome.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weightdiff::pipeline::NoProgress;
use weightdiff::{Checkpoint, CompareOptions};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pytorch_model.bin");
    std::fs::write(&path, data).expect("write input");
    let (Ok(a), Ok(b)) = (Checkpoint::open(&path), Checkpoint::open(&path)) else {
        return;
    };
    let opts = CompareOptions { threads: Some(1), verify: true, ..Default::default() };
    let _ = weightdiff::compare(&a, &b, &opts, &NoProgress);
});
