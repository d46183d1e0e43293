//! Fuzz target: "open this directory of files and compare".
//!
//! The input is split into up to three files of a model directory: a shard, an index
//! and a second shard (separated by the byte string `|||`). The directory is opened as
//! the base model and compared with a fixed valid model; any panic, abort or
//! out-of-bounds read is a finding. Errors are the expected outcome for most inputs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weightdiff::pipeline::NoProgress;
use weightdiff::{Checkpoint, CompareOptions};

const VALID: &[u8] = b"\x36\x00\x00\x00\x00\x00\x00\x00{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}\x00\x00\x80\x3f\x00\x00\x00\x40";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() < 2 {
        match rest.windows(3).position(|w| w == b"|||") {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 3..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let parts = split(data);
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    let names = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "model-00002-of-00002.safetensors"];
    for (part, name) in parts.iter().zip(names) {
        std::fs::write(model.join(name), part).expect("write part");
    }
    let ft = dir.path().join("ft.safetensors");
    std::fs::write(&ft, VALID).expect("write valid file");
    let Ok(base) = Checkpoint::open(&model) else { return };
    let ft = Checkpoint::open(&ft).expect("the fixed model is valid");
    let opts = CompareOptions { threads: Some(1), verify: true, ..Default::default() };
    if let Ok(c) = weightdiff::compare(&base, &ft, &opts, &NoProgress) {
        let _ = weightdiff::report::write_comparison_reports(&c, &dir.path().join("out"), 5);
    }
});
