//! The range sketch's products with Δ on AMX tiles, in bf16 with f32 sums.
//!
//! Intel's AMX (Sapphire Rapids and later Xeons) multiplies 16 × 32 bf16 tiles into
//! 16 × 16 f32 accumulators, `TDPBF16PS`: C += A·B with every product of two bf16 values
//! exact in f32 and the sums in f32. On the machine of BENCHMARKS.md (Xeon, AVX-512 and
//! AMX) the tile product Y = ΔX of width 32 took 0.19–0.27 ns per element of Δ with Δ's
//! tiles in memory, against ~0.7 ns for faer's f32 matmul, which is compute-bound there.
//!
//! **Only where the sketch finds a range.** Y = ΔΩ (and Y = ΔZ of a power iteration) is
//! only used through its column space: Q = qr(Y) is then applied to Δ exactly
//! (B = QᵀΔ in f32, [`super::rsvd`]), and ‖Δ − QQᵀΔ‖²_F = ‖Δ‖²_F − ‖QᵀΔ‖²_F holds for any
//! orthonormal Q, so the spectrum, the residuals and the factors stay those of the exact
//! Δ. Rounding Δ and X to bf16 (8 significant bits) only perturbs which subspace the
//! sketch finds, by about 2⁻⁹ relative, far below the noise that decides it:
//! the range of a merged LoRA's Δ is set by its σ_r against the storage rounding's
//! σ_{r+1}, itself ~2⁻⁹ of the weights. The products that measure (B = QᵀΔ, the
//! refinement's ΔV whose singular values are reported) stay in f32: rounding Δ there
//! shifted a merged LoRA's reported rank-16 residual by 1 % against the one measured on
//! Δ (a 5 % LoRA on Gaussian bf16 weights: 1 % of Δ's elements are not exact in bf16,
//! where |Δ| > |W|).
//!
//! Used for streamed Δ: each row block is converted while it is in cache, after the
//! diff or the stage's read decoded it. A held Δ is read from memory at each product,
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
//! the products stay in f32 on faer.

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
/// once per product: n padded to 32 (the depth of a tile product), l to 16.
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
        let (np, lp) = (pad(n, 32), pad(l, 16));
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
                let mt = (p1 - p0).div_ceil(16);
                // SAFETY: `Tiles` proves the CPU features; `rows_bf16` sizes `a` to mt·16
                // rows of np values (zero-padded), `c` holds 32 rows of lp, X np × lp.
                unsafe {
                    amx::rows_bf16(&rows[p0 * n..p1 * n], n, np, mt * 16, a);
                    let part =
                        amx::Part::tiled_a(a.as_ptr(), np / 32, self.x.as_ptr(), self.lp * 4);
                    amx::gemm(
                        c.as_mut_ptr(),
                        self.lp * 4,
                        mt,
                        self.lp / 16,
                        np / 32,
                        &[part],
                        false,
                    );
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
        if !(std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("xsave"))
        {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
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

    /// One operand pair of a product C += A·B, by where its tiles are: A tile (i, k) at
    /// `a + i·a_m + k·a_k` with its 16 rows `a_row` bytes apart, B tile (k, j) (VNNI) at
    /// `b + k·b_k + j·b_n` with its 16 pair rows `b_row` bytes apart.
    pub(super) struct Part {
        pub a: *const u8,
        pub a_row: usize,
        pub a_m: usize,
        pub a_k: usize,
        pub b: *const u8,
        pub b_row: usize,
        pub b_k: usize,
        pub b_n: usize,
    }

    impl Part {
        /// A as one of [`rows_bf16`]'s tiled layouts of `ks` K steps, B row-major VNNI
        /// with pair rows `b_row` bytes apart.
        pub(super) fn tiled_a(a: *const u16, ks: usize, b: *const u16, b_row: usize) -> Part {
            Part {
                a: a.cast(),
                a_row: 64,
                a_m: ks * 1024,
                a_k: 1024,
                b: b.cast(),
                b_row,
                b_k: 16 * b_row,
                b_n: 64,
            }
        }
    }

    macro_rules! tile {
        (load $t:literal, $p:expr, $s:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
                p = in(reg) $p, s = in(reg) $s, options(nostack, readonly, preserves_flags))
        };
        (store $t:literal, $p:expr, $s:expr) => {
            asm!(concat!("tilestored [{p} + {s}*1], tmm", $t),
                p = in(reg) $p, s = in(reg) $s, options(nostack, preserves_flags))
        };
        (zero $t:literal) => {
            asm!(concat!("tilezero tmm", $t), options(nostack, nomem, preserves_flags))
        };
        (dot $c:literal, $a:literal, $b:literal) => {
            asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
                options(nostack, nomem, preserves_flags))
        };
    }

    /// C (`mt`·16 × `nt`·16 f32, rows `ldc` bytes apart) = or += Σ over `parts` of
    /// A (`mt`·16 × `ks`·32 bf16) · B (`ks`·32 × `nt`·16 bf16, VNNI), in 2 × 2 blocks of
    /// tiles (1-wide at an odd edge).
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and this process its permission ([`request`]); every tile
    /// of A, B and C is inside its buffer.
    pub(super) unsafe fn gemm(
        c: *mut f32,
        ldc: usize,
        mt: usize,
        nt: usize,
        ks: usize,
        parts: &[Part],
        accumulate: bool,
    ) {
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
            let c = c.cast::<u8>();
            for ti in (0..mt).step_by(2) {
                let two_m = ti + 1 < mt;
                for tj in (0..nt).step_by(2) {
                    let two_n = tj + 1 < nt;
                    let ct = |i: usize, j: usize| c.add((ti + i) * 16 * ldc + (tj + j) * 64);
                    if accumulate {
                        tile!(load 0, ct(0, 0), ldc);
                        if two_n {
                            tile!(load 1, ct(0, 1), ldc);
                        }
                        if two_m {
                            tile!(load 2, ct(1, 0), ldc);
                        }
                        if two_m && two_n {
                            tile!(load 3, ct(1, 1), ldc);
                        }
                    } else {
                        tile!(zero 0);
                        tile!(zero 1);
                        tile!(zero 2);
                        tile!(zero 3);
                    }
                    // K outer: the operand the parts share is loaded from L1 after the
                    // first part.
                    for k in 0..ks {
                        for p in parts {
                            let at = |i: usize| p.a.add((ti + i) * p.a_m + k * p.a_k);
                            let bt = |j: usize| p.b.add(k * p.b_k + (tj + j) * p.b_n);
                            tile!(load 4, at(0), p.a_row);
                            tile!(load 6, bt(0), p.b_row);
                            tile!(dot 0, 4, 6);
                            if two_n {
                                tile!(load 7, bt(1), p.b_row);
                                tile!(dot 1, 4, 7);
                            }
                            if two_m {
                                tile!(load 5, at(1), p.a_row);
                                tile!(dot 2, 5, 6);
                                if two_n {
                                    tile!(dot 3, 5, 7);
                                }
                            }
                        }
                    }
                    tile!(store 0, ct(0, 0), ldc);
                    if two_n {
                        tile!(store 1, ct(0, 1), ldc);
                    }
                    if two_m {
                        tile!(store 2, ct(1, 0), ldc);
                    }
                    if two_m && two_n {
                        tile!(store 3, ct(1, 1), ldc);
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
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
    pub(super) struct Part;
    impl Part {
        pub(super) fn tiled_a(_: *const u16, _: usize, _: *const u16, _: usize) -> Part {
            Part
        }
    }
    pub(super) unsafe fn gemm(
        _: *mut f32,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &[Part],
        _: bool,
    ) {
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
