//! Fuzz target: "open this GGUF file, map its names and decode every tensor".
//!
//! The input is written as `model.gguf` and opened (header validation: counts, strings,
//! arrays, dimensions, offsets, overlap); when it opens, its names are mapped and every
//! tensor is read and dequantized in windows of a few blocks, with each transform undone
//! where the window allows. Any panic, abort, out-of-bounds read or oversized allocation is
//! a finding; errors are the expected outcome.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weightdiff::checkpoint::gguf::{GgufFile, block_size, names};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, data).expect("write input");
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    let map = names::map_file(&file);
    let mut raw = Vec::new();
    let mut scratch = Vec::new();
    for t in file.tensors() {
        let bs = block_size(t.ggml_type) as u64;
        // At most 1 MiB of f32 per window, and a bounded amount of work per tensor.
        let window_blocks = ((1u64 << 18) / bs).max(1);
        let mut out = Vec::new();
        let mut block = 0;
        while block < t.n_blocks().min(1 << 16) {
            let n = window_blocks.min(t.n_blocks() - block);
            out.resize((n * bs) as usize, 0f32);
            if file.read_blocks(t, block, &mut raw, &mut out).is_err() {
                break;
            }
            block += n;
        }
        for pair in map.pairs.iter().filter(|p| p.gguf == t.name) {
            let rows = pair.hf_shape.first().copied().unwrap_or(1);
            let row_len: u64 = pair.hf_shape.iter().skip(1).product();
            for tr in &pair.transforms {
                let _ = tr.gguf_elements(&t.shape());
                let _ = tr.undo(&mut out, 0, rows, row_len as usize, &mut scratch);
            }
        }
    }
});
