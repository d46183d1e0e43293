//! The physical limit of the low-rank stage's sketch on this machine: the rate of the
//! products it is made of (a row block of Δ times a thin Gaussian matrix, and the
//! transposed product), in f32 and f64, single-threaded as each tensor's products run.
//!
//! `cargo run --release --example sketch_rate [ROWS COLS WIDTH]` (default 2048 1024 32).
//! On AVX-512 it also times `lowrank::pair_fma`'s kernels on an f32 Δ in row chunks.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use std::time::Instant;

fn rate<T: faer::traits::ComplexField + Copy>(
    m: usize,
    n: usize,
    l: usize,
    one: T,
    fill: impl Fn(usize) -> T,
) {
    let delta: Vec<T> = (0..m * n).map(&fill).collect();
    let d = MatRef::from_row_major_slice(&delta, m, n);
    let omega = Mat::<T>::from_fn(n, l, |i, j| fill(i * 7 + j));
    let q = Mat::<T>::from_fn(m, l, |i, j| fill(i * 3 + j));
    let mut y = Mat::<T>::zeros(m, l);
    let mut z = Mat::<T>::zeros(n, l);
    let mut yt = Mat::<T>::zeros(l, m);
    let omega_t = omega.transpose().to_owned();
    let q_t = q.transpose().to_owned();
    let mut b = Mat::<T>::zeros(l, n);
    let reps = 20;
    for (what, f) in [("Δ·Ω", 0), ("Δᵀ·Q", 1), ("Ωᵀ·Δᵀ", 2), ("Qᵀ·Δ", 3)] {
        let t = Instant::now();
        for _ in 0..reps {
            if f == 0 {
                matmul(y.as_mut(), Accum::Replace, d, omega.as_ref(), one, Par::Seq);
            } else if f == 1 {
                matmul(
                    z.as_mut(),
                    Accum::Replace,
                    d.transpose(),
                    q.as_ref(),
                    one,
                    Par::Seq,
                );
            } else if f == 3 {
                matmul(b.as_mut(), Accum::Replace, q_t.as_ref(), d, one, Par::Seq);
            } else {
                matmul(
                    yt.as_mut(),
                    Accum::Replace,
                    omega_t.as_ref(),
                    d.transpose(),
                    one,
                    Par::Seq,
                );
            }
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let flops = 2.0 * (m * n * l) as f64;
        println!(
            "{:>4} {what:6} {m}x{n} · {l}: {:.2} ms, {:.1} GFLOP/s, {:.2} ns per element of Δ",
            std::any::type_name::<T>(),
            s * 1e3,
            flops / s / 1e9,
            s / (m * n) as f64 * 1e9
        );
    }
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("a number"))
        .collect();
    let (m, n, l) = match a[..] {
        [m, n, l] => (m, n, l),
        _ => (2048, 1024, 32),
    };
    rate::<f32>(m, n, l, 1.0, |i| ((i % 17) as f32 - 8.0) * 1e-3);
    rate::<f64>(m, n, l, 1.0, |i| ((i % 17) as f64 - 8.0) * 1e-3);
    for chunk in [64 << 10, 256 << 10, 1 << 20, usize::MAX / 8] {
        // The last: all rows in one call, as for a held Δ's range sketch.
        kernels(m, n, l, chunk);
    }
}

/// The AVX-512 kernels of `lowrank::pair_fma` on a held f32 Δ, as `lowrank::rsvd` calls
/// them (row chunks of `chunk_bytes`).
fn kernels(m: usize, n: usize, l: usize, chunk_bytes: usize) {
    use weightdiff::lowrank::pair_fma::{Bf16Dot, Fma, PairRange, PairTmul};
    let Some(fma) = Fma::get() else {
        println!("no AVX-512 here: the pair_fma kernels do not run");
        return;
    };
    let delta: Vec<f32> = (0..m * n).map(|i| ((i % 17) as f32 - 8.0) * 1e-3).collect();
    let q = Mat::<f64>::from_fn(m, l, |i, j| ((i * 3 + j) % 13) as f64 - 6.0);
    let x = Mat::<f64>::from_fn(n, l, |i, j| ((i * 7 + j) % 13) as f64 - 6.0);
    let step = (chunk_bytes / (4 * n)).clamp(1, m.max(1));
    let reps = 20;
    let report = |what: &str, s: f64| {
        println!(
            " f32 {what:8} {m}x{n} · {l}: {:.2} ms, {:.2} ns per element of Δ (chunks of {step} rows)",
            s * 1e3,
            s / (m * n) as f64 * 1e9
        )
    };
    if PairTmul::takes(n) {
        let t = Instant::now();
        for _ in 0..reps {
            let mut p = PairTmul::new(fma, q.as_ref(), n);
            for r0 in (0..m).step_by(step) {
                let r1 = (r0 + step).min(m);
                p.add_f32_rows(r0, &delta[r0 * n..r1 * n]);
            }
            std::hint::black_box(p.finish());
        }
        report("ΔᵀQ fma", t.elapsed().as_secs_f64() / reps as f64);
    }
    if let Some(dot) = Bf16Dot::get().filter(|_| PairRange::takes(n, l)) {
        let t = Instant::now();
        for _ in 0..reps {
            let p = PairRange::new(dot, x.as_ref());
            for r0 in (0..m).step_by(step) {
                let r1 = (r0 + step).min(m);
                std::hint::black_box(p.rows_f32(&delta[r0 * n..r1 * n]));
            }
        }
        report("ΔX dot", t.elapsed().as_secs_f64() / reps as f64);
    }
}
