//! The range sketch's products with Δ on AMX tiles, in bf16 with f32 sums.
//!
//! Intel's AMX (Sapphire Rapids and later Xeons) multiplies 16 × 32 bf16 tiles into
//! 16 × 16 f32 accumulators, `TDPBF16PS`: C += A·B with every product of two bf16 values
//! exact in f32 and the sums in f32. On the machine of BENCHMARKS.md (Xeon, AVX-512 and
//! AMX) the tile product Y = ΔX of width 32 took 0.19–0.27 ns per element of Δ with Δ's
//! tiles in memory, against ~0.7 ns for faer's f32 matmul.
//!
//! **Only where the sketch finds a range.** Y = ΔΩ (and Y = ΔZ of a power iteration) is
//! only used through its column space: Q = qr(Y) is then applied to Δ exactly
//! (B = QᵀΔ in f32, [`super::rsvd`]), and ‖Δ − QQᵀΔ‖²_F = ‖Δ‖²_F − ‖QᵀΔ‖²_F holds for any
//! orthonormal Q, so the spectrum, the residuals and the factors stay those of the exact
//! Δ. Rounding Δ and X to bf16 (8 significant bits) only perturbs which subspace the
//! sketch finds, by about 2⁻⁹ of Δ, below the noise that decides it when |Δ| ≪ |W| (the
//! range of a merged LoRA's Δ is set by its σ_r against the storage rounding's
//! σ_{r+1}, itself ~2⁻⁹ of the weights); hence only for a fine-tuned side stored in bf16
//! or fp8, whose rounding sets that noise floor. The products that measure (B = QᵀΔ, the
//! refinement's ΔV whose singular values are reported) stay in f32: rounding Δ there
//! shifted a merged LoRA's reported rank-16 residual by 1 % against the one measured on
//! Δ (a 5 % LoRA on Gaussian bf16 weights: 1 % of Δ's elements are not exact in bf16,
//! where |Δ| > |W|).
//!
//! Used for streamed Δ: each row block (1 MiB of f32) is converted right after the diff
//! or the stage's read decoded it, 32 rows at a time. A held Δ is read from memory at each product,
//! and converting it there (0.45–0.6 ns per element, bound by memory) cost as much as
//! the tile product saved, so its products stay on faer.
//!
//! Layouts: `TDPBF16PS` takes A as 16 rows of 32 bf16 and B in the "VNNI" layout, row
//! pairs interleaved: B′(p, j) = (B(2p, j), B(2p + 1, j)). Δ's rows are A, converted a
//! 32-row panel at a time into contiguous 1 KiB tiles; X is packed once per product.
//! Every operand is padded with zeros to whole tiles.
//!
//! The kernel needs the CPU's AMX-TILE, AMX-BF16 and AVX512-BF16 (for the conversions)
//! and the kernel's permission to use the tile state (Linux `arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`, asked once): [`Tiles::get`] checks all of it once. Elsewhere
//! the products stay in f32 on faer. The permission is for the whole process and makes
//! Linux's signal frames larger: afterwards the kernel refuses an alternate signal stack
//! (`sigaltstack`) too small for the tile state, which matters to a host process (Python)
//! that installs small ones after weightdiff ran; `WEIGHTDIFF_TILES=0` avoids the request.
//! bf16 conversion and `TDPBF16PS` flush subnormal values (below 1.2·10⁻³⁸) to zero.

use faer::MatRef;

/// Proof that the tile products can run on this machine ([`Tiles::get`]).
#[derive(Clone, Copy, Debug)]
pub struct Tiles(());

/// Environment variable that turns the tile products off (`0`): the products then run
/// in f32 on faer, as on a CPU without AMX.
pub const ENV: &str = "WEIGHTDIFF_TILES";

impl Tiles {
    /// The tiles when the CPU has them and the OS lets this process use them, and
    /// [`ENV`] does not turn them off. Checked once per process.
    pub fn get() -> Option<Tiles> {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *AVAILABLE
            .get_or_init(|| std::env::var(ENV).map_or(true, |v| v != "0") && amx::request());
        on.then_some(Tiles(()))
    }
}

/// Padded size: a multiple of `t`.
fn pad(x: usize, t: usize) -> usize {
    x.div_ceil(t) * t
}

/// X (n × l) as the right operand of Δ·X, rounded to bf16 and packed in the VNNI layout
/// once per product: n padded to 32 (the depth of a tile product), l to 32 (the kernel
/// computes 2 × 2 tiles of 16 × 16 at a time).
pub struct Right {
    x: Vec<u16>,
    n: usize,
    l: usize,
    /// l padded to whole tiles.
    lp: usize,
}

impl Right {
    pub fn new(_: Tiles, x: MatRef<'_, f64>) -> Right {
        let (n, l) = (x.nrows(), x.ncols());
        let (np, lp) = (pad(n, 32), pad(l, 32));
        let mut packed = vec![0u16; np * lp];
        for j in 0..l {
            for i in 0..n {
                packed[(i / 2) * 2 * lp + 2 * j + (i & 1)] =
                    half::bf16::from_f32(x[(i, j)] as f32).to_bits();
            }
        }
        Right {
            x: packed,
            n,
            l,
            lp,
        }
    }

    /// Rows `r0..` of Y = Δ·X for the rows of Δ given in `rows` (row-major, n columns):
    /// row i of the block goes to `y[(r0 + i)·l ..][..l]` (Y row-major, m × l).
    pub fn mul_rows(&self, rows: &[f32], r0: usize, y: &mut [f32]) {
        let (n, l) = (self.n, self.l);
        let k = rows.len() / n.max(1);
        if k == 0 {
            return;
        }
        assert!(rows.len() == k * n && y.len() >= (r0 + k) * l);
        let np = pad(n, 32);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let Scratch { a, c } = &mut *s;
            c.resize(32 * self.lp, 0.0);
            for p0 in (0..k).step_by(32) {
                let p1 = (p0 + 32).min(k);
                // SAFETY: `Tiles` proves the CPU features; `rows_bf16` sizes `a` to 32 rows
                // of np values (zero-padded), `c` holds 32 rows of lp, X np × lp.
                unsafe {
                    amx::rows_bf16(&rows[p0 * n..p1 * n], n, np, 32, a);
                    amx::panel(a, np / 32, &self.x, self.lp, c);
                }
                for i in p0..p1 {
                    y[(r0 + i) * l..][..l].copy_from_slice(&c[(i - p0) * self.lp..][..l]);
                }
            }
        });
    }
}

/// Per-thread conversion buffers, kept from product to product.
#[derive(Default)]
struct Scratch {
    /// Δ's rows as A tiles (bf16).
    a: Vec<u16>,
    /// An f32 output panel.
    c: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes. Tiles
    /// 0–3 are the C accumulators of a 2 × 2 block, 4–5 the A tiles, 6–7 the B tiles.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Whether the CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 (and BW), the OS saves the tile state (XCR0 bits 17 and 18), and Linux grants
    /// this process the tile data (`ARCH_REQ_XCOMP_PERM`, XFEATURE 18).
    pub(super) fn request() -> bool {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("xsave"))
        {
            return false;
        }
        // `unsafe` for the Rust versions before `__cpuid_count` became safe (rust-version).
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512.
        let leaf7 = unsafe { __cpuid_count(7, 0) };
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        // SAFETY: OSXSAVE is implied by the AVX-512 detection above (std checks it).
        let xcr0 = unsafe { _xgetbv(0) };
        if !(amx_bf16 && amx_tile && xcr0 & (0b11 << 17) == 0b11 << 17) {
            return false;
        }
        request_permission()
    }

    #[cfg(target_os = "linux")]
    fn request_permission() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes this process's permission.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_permission() -> bool {
        false
    }

    /// C (32 × `lp` f32, row-major) = A·X for one 32-row panel of Δ: A (32 × `ks`·32
    /// bf16) in [`rows_bf16`]'s tiled layout, X (`ks`·32 × `lp`) in the VNNI layout of
    /// [`super::Right`], `lp` a multiple of 32.
    ///
    /// Each 2 × 2 block of 16 × 16 tiles is one `asm!` statement that configures the
    /// tiles, runs the K loop (two A tiles, two X tiles, four `TDPBF16PS`), stores C and
    /// releases the tiles: no tile register or configuration lives across statements,
    /// and all eight tile registers are declared clobbered.
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and this process its permission ([`request`]); `a` holds
    /// 32·`ks`·32 values, `x` `ks`·32·`lp`, `c` 32·`lp`.
    pub(super) unsafe fn panel(a: &[u16], ks: usize, x: &[u16], lp: usize, c: &mut [f32]) {
        assert!(ks > 0 && lp.is_multiple_of(32));
        assert!(a.len() >= 32 * ks * 32 && x.len() >= ks * 32 * lp && c.len() >= 32 * lp);
        // Bytes: a row of X's pairs and of C (lp values of 4 bytes each).
        let row = lp * 4;
        for tj in (0..lp / 16).step_by(2) {
            // SAFETY: every tile read or written lies in `a`, `x` or `c` (sizes asserted
            // above): A tiles at a + i·ks·1 KiB + k·1 KiB, rows 64 bytes apart; X tiles
            // at x + k·16·row + tj·64 (+ 64), rows `row` apart; C tiles at
            // c + (i·16·row) + tj·64 (+ 64), rows `row` apart.
            unsafe {
                let a0 = a.as_ptr().cast::<u8>();
                let a1 = a0.add(ks * 1024);
                let b0 = x.as_ptr().cast::<u8>().add(tj * 64);
                let c0 = c.as_mut_ptr().cast::<u8>().add(tj * 64);
                let c2 = c0.add(16 * row);
                asm!(
                    "ldtilecfg [{cfg}]",
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "2:",
                    "tileloadd tmm4, [{a0} + {sixty_four}*1]",
                    "tileloadd tmm5, [{a1} + {sixty_four}*1]",
                    "tileloadd tmm6, [{b0} + {row}*1]",
                    "tileloadd tmm7, [{b0} + {row}*1 + 64]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "add {a0}, 1024",
                    "add {a1}, 1024",
                    "add {b0}, {b_step}",
                    "dec {k}",
                    "jnz 2b",
                    "tilestored [{c0} + {row}*1], tmm0",
                    "tilestored [{c0} + {row}*1 + 64], tmm1",
                    "tilestored [{c2} + {row}*1], tmm2",
                    "tilestored [{c2} + {row}*1 + 64], tmm3",
                    "tilerelease",
                    cfg = in(reg) &CONFIG,
                    a0 = inout(reg) a0 => _,
                    a1 = inout(reg) a1 => _,
                    b0 = inout(reg) b0 => _,
                    k = inout(reg) ks => _,
                    sixty_four = in(reg) 64usize,
                    row = in(reg) row,
                    b_step = in(reg) 16 * row,
                    c0 = in(reg) c0,
                    c2 = in(reg) c2,
                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                    out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                    options(nostack),
                );
            }
        }
    }

    /// The mask of the first `r` of 16 lanes.
    fn lanes(r: usize) -> u16 {
        if r >= 16 { u16::MAX } else { (1u16 << r) - 1 }
    }

    /// `rows` (k × n f32, row-major) to bf16 A tiles in `out`: the rows padded with zeros
    /// to `kp` (a multiple of 16) and `np` values (a multiple of 32), cut into tiles of 16
    /// rows × 32 values (1 KiB, 64 bytes a row), stored tile row by tile row and along
    /// each tile row by K step: every tile is contiguous, and the K steps of a tile row
    /// follow each other in memory (one stream for the prefetchers, where a row-major
    /// layout made each tile's 16 rows 16 far-apart loads).
    ///
    /// # Safety
    /// The CPU has AVX512-BF16 and AVX512-BW; `np` ≥ n is a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn rows_bf16(
        rows: &[f32],
        n: usize,
        np: usize,
        kp: usize,
        out: &mut Vec<u16>,
    ) {
        let k = rows.len() / n;
        out.resize(kp * np, 0);
        assert!(np >= n && np.is_multiple_of(32) && kp >= k && kp.is_multiple_of(16));
        let ks = np / 32;
        let empty = [0f32; 0];
        for r in 0..kp {
            let src = if r < k {
                &rows[r * n..(r + 1) * n]
            } else {
                &empty[..]
            };
            let n = src.len();
            let tile_row = &mut out[(r / 16) * ks * 512..][..ks * 512];
            for (step, c) in (0..np).step_by(32).enumerate() {
                let dst = &mut tile_row[step * 512 + (r % 16) * 32..][..32];
                // SAFETY: masked loads read only lanes inside `src` (none of an empty
                // row); the store writes the 32 values of `dst`.
                unsafe {
                    let lo = _mm512_maskz_loadu_ps(
                        lanes(n.saturating_sub(c)),
                        src.as_ptr().add(c.min(n)),
                    );
                    let hi = _mm512_maskz_loadu_ps(
                        lanes(n.saturating_sub(c + 16)),
                        src.as_ptr().add((c + 16).min(n)),
                    );
                    let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(dst.as_mut_ptr().cast(), v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    pub(super) fn request() -> bool {
        false
    }
    pub(super) unsafe fn panel(_: &[u16], _: usize, _: &[u16], _: usize, _: &mut [f32]) {
        unreachable!("no tiles on this architecture")
    }
    pub(super) unsafe fn rows_bf16(_: &[f32], _: usize, _: usize, _: usize, _: &mut Vec<u16>) {
        unreachable!("no tiles on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Gaussian;
    use faer::Mat;

    /// Ragged shapes (not whole tiles, odd rows, one 16-wide edge), in two blocks of rows
    /// as a streamed pass gives them, against f64 products of bf16(Δ) and bf16(X): within
    /// what f32 sums leave (Σ|Δ||X|·2⁻¹⁸ per element), for random signs (Ω, exact in bf16)
    /// and a general X; and against Δ·X itself within bf16's rounding of both.
    #[test]
    fn products_match_f64_on_ragged_shapes() {
        let Some(t) = Tiles::get() else {
            eprintln!("no AMX tiles on this machine: the tile products are not used here");
            return;
        };
        let bf = |x: f64| half::bf16::from_f32(x as f32).to_f64();
        let mut g = Gaussian::new(7, "tiles", "test");
        for (m, n, l) in [(37, 70, 24), (64, 32, 32), (5, 1000, 40), (129, 257, 16)] {
            let d: Vec<f32> = (0..m * n).map(|_| g.next() as f32).collect();
            let dm = Mat::<f64>::from_fn(m, n, |i, j| d[i * n + j] as f64);
            let x = Mat::<f64>::from_fn(n, l, |_, _| g.next());
            let signs =
                Mat::<f64>::from_fn(n, l, |i, j| if (i * 7 + j) % 3 == 0 { -1.0 } else { 1.0 });
            for x in [&x, &signs] {
                let right = Right::new(t, x.as_ref());
                let mut y = vec![0f32; m * l];
                let cut = m / 2;
                right.mul_rows(&d[..cut * n], 0, &mut y);
                right.mul_rows(&d[cut * n..], cut, &mut y);
                for i in 0..m {
                    for j in 0..l {
                        let abs: f64 = (0..n).map(|c| (dm[(i, c)] * x[(c, j)]).abs()).sum();
                        let want: f64 = (0..n).map(|c| bf(dm[(i, c)]) * bf(x[(c, j)])).sum();
                        let e = (y[i * l + j] as f64 - want).abs();
                        assert!(e <= abs * 2f64.powi(-18), "Y[{i},{j}] ({m}x{n}x{l}): {e}");
                        let exact: f64 = (0..n).map(|c| dm[(i, c)] * x[(c, j)]).sum();
                        let e = (y[i * l + j] as f64 - exact).abs();
                        assert!(e <= abs * 2f64.powi(-7), "Y[{i},{j}] against Δ·X: {e}");
                    }
                }
            }
        }
    }
}
