//! The rate of each GGUF block decoder on this machine, single-threaded, as one worker of
//! a streaming diff decodes its windows: MB/s of f32 produced and of bytes consumed.
//!
//! `cargo run --release --example gguf_dequant_rate [MIB_OF_F32]` (default 16).
//!
//! Blocks are random bytes with finite f16 scales, decoded into one reused buffer.

use std::time::Instant;
use weightdiff::checkpoint::gguf::quant::{ALL_TYPES, block_size, dequantize, type_size};

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MIB_OF_F32 is a number"))
        .unwrap_or(16);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut byte = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    println!("{:<8} {:>12} {:>12}", "type", "MB/s out", "MB/s in");
    for t in ALL_TYPES.into_iter().filter(|t| t.can_dequantize()) {
        let (bs, ts) = (block_size(t), type_size(t));
        let blocks = (mib << 20) / 4 / bs;
        let mut bytes: Vec<u8> = (0..blocks * ts).map(|_| byte()).collect();
        // A finite f16 (0x2000 ≈ 0.0078) wherever a scale may sit keeps products finite;
        // the rate does not depend on the values.
        for b in bytes.chunks_exact_mut(ts) {
            if ts > 4 {
                b[0] = 0;
                b[1] = 0x20;
            }
        }
        let mut out = vec![0f32; blocks * bs];
        dequantize(t, &bytes, &mut out).unwrap(); // warm up
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            dequantize(t, std::hint::black_box(&bytes), &mut out).unwrap();
            std::hint::black_box(&out);
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{:<8} {:>12.0} {:>12.0}",
            t.name(),
            (out.len() * 4) as f64 / secs / 1e6,
            bytes.len() as f64 / secs / 1e6
        );
    }
}
