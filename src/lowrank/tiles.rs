//! Products with Δ on AMX tiles, in bf16 with f32 sums: the range sketch, and for a pair
//! of bf16 sides the products with Δᵀ.
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
//! **Products from both sides' stored values.** When both sides are stored in bf16 (the
//! common case: a bf16 model and its bf16 fine-tune), Δ = F − A is the difference of two
//! exact tile operands. The range sketch is then F·X̃ − A·X̃ ([`Right::mul_pair_rows`]),
//! from the rows the diff or the stage read, with no conversion pass and no Δ written;
//! and QᵀΔ = QᵀF − QᵀA runs on tiles with Δ never
//! rounded ([`Left`]): the rows come straight from the read buffers, Q is split into two
//! bf16 parts (16 significant bits) and the basis re-orthonormalized afterwards
//! ([`super::rsvd::Operator::project`]), so the products measure Δ exactly up to f32
//! sums. Those sums run at the scale of the weights, |W|, not of Δ: their error,
//! ~2⁻²⁴·|W| per term, is 2⁻¹⁵ of the rounding that storing F in bf16 put in Δ
//! (2⁻⁹·|W|/√12), so it never shows above the noise floor the detector compares against.
//! This is B = QᵀΔ of the sketch and ΔᵀQ of power iterations: on the 32B-shaped pair
//! (BENCHMARKS.md) its σ agreed with the f32 products' to 1.1·10⁻⁷ relative. F and A
//! must be finite (a non-finite value, which the f32 products take as no change, sends
//! the product back to f32), and n a multiple of 32. Subnormal values (below
//! 1.2·10⁻³⁸, in weights or in Q) count as zero there, as everywhere on the tiles.
//!
//! Otherwise (a side in f16 or fp8), for streamed Δ: each row block (1 MiB of f32) is
//! converted right after the diff
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

/// `x`, or zero when it is subnormal: `TDPBF16PS` reads subnormal inputs as zero, and
/// [`Left::rounded`] must be what the tiles multiply by.
fn normal(x: half::bf16) -> half::bf16 {
    // Exponent field zero, mantissa not: subnormal (±0 stays as it is).
    if x.to_bits() & 0x7f80 == 0 {
        half::bf16::ZERO
    } else {
        x
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
    /// X and −X, packed (np × lp values each, aligned).
    x: Lines,
    neg: Lines,
    n: usize,
    l: usize,
    /// l padded to whole tiles.
    lp: usize,
}

impl Right {
    pub fn new(_: Tiles, x: MatRef<'_, f64>) -> Right {
        let (n, l) = (x.nrows(), x.ncols());
        let (np, lp) = (pad(n, 32), pad(l, 32));
        let (mut packed, mut neg) = (Lines::default(), Lines::default());
        packed.zeroed(np * lp * 2);
        neg.zeroed(np * lp * 2);
        let (p, q) = (packed.u16s_mut(), neg.u16s_mut());
        for j in 0..l {
            for i in 0..n {
                let at = (i / 2) * 2 * lp + 2 * j + (i & 1);
                p[at] = normal(half::bf16::from_f32(x[(i, j)] as f32)).to_bits();
                // The sign bit of bf16 negates exactly.
                q[at] = p[at] ^ 0x8000;
            }
        }
        Right {
            x: packed,
            neg,
            n,
            l,
            lp,
        }
    }

    /// Whether [`Self::mul_pair_rows`] takes this X's rows of Δ (n columns: whole tiles).
    pub fn takes_pairs(&self) -> bool {
        Left::takes(self.n)
    }

    /// As [`Self::mul_rows`] for Δ = F − A of a pair stored in bf16 on both sides, from
    /// their stored values (`base`, `ft`: k rows of n bf16 values each, little-endian
    /// bytes; [`super::DeltaRows::bf16_pair_rows`]): Y = F·X̃ − A·X̃, X̃ = bf16(X), with Δ
    /// never rounded and no conversion pass. Each 16-row tile of A is read from the rows
    /// where they lie; a last group of fewer than 16 rows is a tile of fewer rows.
    pub fn mul_pair_rows(&self, base: &[u8], ft: &[u8], r0: usize, y: &mut [f32]) {
        let (n, l) = (self.n, self.l);
        assert!(self.takes_pairs() && base.len() == ft.len() && base.len().is_multiple_of(2 * n));
        let k = base.len() / (2 * n);
        assert!(y.len() >= (r0 + k) * l);
        let row = 2 * n;
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let c = &mut s.c;
            c.resize(32 * self.lp, 0.0);
            for p0 in (0..k).step_by(32) {
                let rows = 32.min(k - p0);
                for tj in (0..self.lp / 16).step_by(2) {
                    // SAFETY: `Tiles` (taken by `new`) proves the CPU features and the
                    // permission; the call reads `rows` rows of n values of both sides
                    // from row p0, X's and −X's column tiles tj, tj + 1 (np × lp each),
                    // and writes `rows` rows of 32 f32 of `c` (32 × lp) at column 16·tj.
                    unsafe {
                        amx::pair_rows(
                            ft[p0 * row..].as_ptr(),
                            base[p0 * row..].as_ptr(),
                            row,
                            n / 32,
                            self.x.bytes().as_ptr().add(tj * 64),
                            self.neg.bytes().as_ptr().add(tj * 64),
                            self.lp * 4,
                            c.as_mut_ptr().add(tj * 16).cast(),
                            self.lp * 4,
                            rows,
                        )
                    };
                }
                for i in 0..rows {
                    y[(r0 + p0 + i) * l..][..l].copy_from_slice(&c[i * self.lp..][..l]);
                }
            }
        });
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
                    amx::panel(a, np / 32, self.x.u16s(), self.lp, c);
                }
                for i in p0..p1 {
                    y[(r0 + i) * l..][..l].copy_from_slice(&c[(i - p0) * self.lp..][..l]);
                }
            }
        });
    }
}

/// Q (m × l) as the left operand of QᵀΔ = Qᵀ·F − Qᵀ·A for a pair whose base A and
/// fine-tuned F are both stored in bf16 ([`super::DeltaRows::bf16_pair_rows`]): their
/// values are exact tile operands, so Δ is never rounded. Q is held as two bf16 parts,
/// Q̃ = Q₁ + Q₂ with Q₁ = bf16(Q) and Q₂ = bf16(Q − Q₁) (16 significant bits, |Q − Q̃| ≤
/// 2⁻¹⁷|Q|); the products are those of Q̃ ([`Self::rounded`]), which the caller
/// re-orthonormalizes ([`super::rsvd`]).
///
/// Layout: `TDPBF16PS` contracts pairs of adjacent K values. A row of F or A, read as
/// it is stored, is 16 pairs of adjacent columns, so a B tile is 16 rows of 32 columns
/// straight from the read buffer; the A tile that contracts it over those 16 rows holds
/// Q̃'s value of row p in slot 2p + e (e = 0 or 1) and zero in the other, and yields the
/// even (e = 0) or odd (e = 1) columns. Four such tiles per part and l-group (±, even and
/// odd): twice the tile products of a VNNI copy of the rows, but no copy (measured: the
/// copy cost more than the products it saves). F and −A are summed into the same
/// accumulators chunk by chunk, so their f32 sums cancel as they go, at the scale of a
/// 16-row chunk of Qᵀ·W rather than of all m rows.
pub struct Left {
    /// Q₁ and Q₂, row-major m × lp, zero-padded.
    parts: [Vec<u16>; 2],
    m: usize,
    l: usize,
    lp: usize,
}

/// Columns of Z a kernel call sweeps: its accumulators for the strip (lp × 1024 f32)
/// and the A tiles of a block stay in L2 (measured on the 32B shapes: 0.29–0.36 ns per
/// element of Δ against 0.39–0.53 for whole rows).
const STRIP: usize = 1024;
/// 16-row chunks per accumulator load: two (0.29 ns per element) against one or four
/// (0.38–0.39).
const CHUNKS_PER_CALL: usize = 2;

impl Left {
    pub fn new(_: Tiles, q: MatRef<'_, f64>) -> Left {
        let (m, l) = (q.nrows(), q.ncols());
        let lp = pad(l, 32);
        let mut parts = [vec![0u16; m * lp], vec![0u16; m * lp]];
        for j in 0..l {
            for i in 0..m {
                let v = q[(i, j)];
                let hi = normal(half::bf16::from_f64(v));
                let lo = normal(half::bf16::from_f64(v - hi.to_f64()));
                parts[0][i * lp + j] = hi.to_bits();
                parts[1][i * lp + j] = lo.to_bits();
            }
        }
        Left { parts, m, l, lp }
    }

    /// Q̃ = Q₁ + Q₂, the matrix whose products [`Self::add_rows`] computes (exact in f64).
    pub fn rounded(&self) -> faer::Mat<f64> {
        let v = |p: usize, i: usize, j: usize| {
            half::bf16::from_bits(self.parts[p][i * self.lp + j]).to_f64()
        };
        faer::Mat::from_fn(self.m, self.l, |i, j| v(0, i, j) + v(1, i, j))
    }

    /// The accumulator of Z = Q̃ᵀΔ for Δ with n columns: lp × n f32, zero.
    pub fn accumulator(&self, n: usize) -> Accumulator {
        let mut z = Lines::default();
        z.zeroed(self.lp * n * 4);
        Accumulator(z)
    }

    /// Whether [`Self::add_rows`] takes rows of n columns (whole B tiles: n a multiple of 32).
    pub fn takes(n: usize) -> bool {
        n > 0 && n.is_multiple_of(32)
    }

    /// Adds Q̃[r0..r0 + k]ᵀ·(F − A) for rows `r0..r0 + k` of both sides (`base`, `ft`:
    /// k rows of n bf16 values each, little-endian bytes) to `z` ([`Self::accumulator`]).
    pub fn add_rows(&self, r0: usize, base: &[u8], ft: &[u8], n: usize, z: &mut Accumulator) {
        assert!(Self::takes(n) && base.len() == ft.len() && base.len().is_multiple_of(2 * n));
        let k = base.len() / (2 * n);
        let z = z.0.f32s_mut();
        assert!(r0 + k <= self.m && z.len() == self.lp * n);
        PAIR_SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let PairScratch { a, tail } = &mut *s;
            let whole = k / 16 * 16;
            if whole > 0 {
                let a = self.a_tiles(r0, whole, a);
                // SAFETY: `Tiles` (taken by `new`) proves the CPU features and the
                // permission; `a` holds the A tiles of `whole` rows, both sides `whole`
                // rows of n values, `z` lp × n.
                unsafe {
                    self.sweep(
                        a,
                        whole / 16,
                        &base[..whole * 2 * n],
                        &ft[..whole * 2 * n],
                        n,
                        z,
                    )
                };
            }
            if whole < k {
                // The last rows, zero-padded to a chunk.
                let rows = (k - whole) * 2 * n;
                tail.zeroed(2 * 32 * n);
                let (tb, tf) = tail.bytes_mut().split_at_mut(32 * n);
                tb[..rows].copy_from_slice(&base[whole * 2 * n..]);
                tf[..rows].copy_from_slice(&ft[whole * 2 * n..]);
                let a = self.a_tiles(r0 + whole, k - whole, a);
                // SAFETY: as above, for one chunk of 16 rows (`tail`'s sides).
                unsafe { self.sweep(a, 1, tb, tf, n, z) };
            }
        });
    }

    /// The A tiles of rows `r0..r0 + k` (zero beyond k, padded to whole 16-row chunks),
    /// per group pair and chunk: 16 tiles of 1 KiB, index ((g·2 + part)·2 + sign)·2 +
    /// parity for the pair's two l-groups g.
    fn a_tiles<'s>(&self, r0: usize, k: usize, lines: &'s mut Lines) -> &'s [u16] {
        let chunks = k.div_ceil(16);
        let pairs = self.lp / 32;
        lines.zeroed(pairs * chunks * 16 * 1024);
        let out = lines.u16s_mut();
        for gp in 0..pairs {
            for c in 0..chunks {
                let base = (gp * chunks + c) * 16 * 512;
                for p in 0..16.min(k - c * 16) {
                    let row = r0 + c * 16 + p;
                    for g in 0..2 {
                        for part in 0..2 {
                            let q = &self.parts[part][row * self.lp + (gp * 2 + g) * 16..][..16];
                            for sign in 0..2 {
                                for e in 0..2 {
                                    let t = base + (((g * 2 + part) * 2 + sign) * 2 + e) * 512;
                                    for (i, &v) in q.iter().enumerate() {
                                        // The sign bit of bf16 negates exactly.
                                        out[t + i * 32 + 2 * p + e] = v ^ ((sign as u16) << 15);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Z += the products of `chunks` 16-row chunks of both sides with their A tiles `a`.
    ///
    /// # Safety
    /// As [`amx::pair_strip`]; `a` from [`Self::a_tiles`] for those chunks, `base` and
    /// `ft` chunks·16 rows of n values, `z` lp × n.
    unsafe fn sweep(
        &self,
        a: &[u16],
        chunks: usize,
        base: &[u8],
        ft: &[u8],
        n: usize,
        z: &mut [f32],
    ) {
        assert!(a.len() >= self.lp / 32 * chunks * 16 * 512);
        assert!(base.len() >= chunks * 16 * 2 * n && ft.len() == base.len());
        assert!(Self::takes(n) && z.len() == self.lp * n);
        let zs = n * 4;
        for j0 in (0..n).step_by(STRIP) {
            let cols = STRIP.min(n - j0);
            for c0 in (0..chunks).step_by(CHUNKS_PER_CALL) {
                let nch = CHUNKS_PER_CALL.min(chunks - c0);
                for gp in 0..self.lp / 32 {
                    let rows = c0 * 16 * 2 * n + j0 * 2;
                    // SAFETY: the call reads nch chunks of A tiles from the pair's
                    // chunk c0, nch·16 rows of both sides from row c0·16, columns j0..
                    // j0 + cols, and reads and writes Z rows 32·gp.. (+32) at those
                    // columns: all inside the slices (asserted above).
                    unsafe {
                        amx::pair_strip(
                            a.as_ptr().add((gp * chunks + c0) * 16 * 512),
                            nch,
                            ft.as_ptr().add(rows),
                            base.as_ptr().add(rows),
                            2 * n,
                            z.as_mut_ptr().add(gp * 32 * n + j0).cast(),
                            zs,
                            cols / 32,
                        )
                    };
                }
            }
        }
    }

    /// ΔᵀQ̃ (n × l) from the accumulator `z`, undoing the even/odd order of its columns;
    /// `None` when a value is not finite (a side held inf or NaN, which the f32 products
    /// treat as no change: the caller redoes the product there).
    pub fn finish(&self, z: &Accumulator, n: usize) -> Option<faer::Mat<f64>> {
        let z = z.0.f32s();
        if z.iter().any(|v| !v.is_finite()) {
            return None;
        }
        // Column j of Δ is at column (j / 32)·32 + (j % 2)·16 + (j % 32) / 2 of Z.
        let col = |j: usize| (j / 32) * 32 + (j % 2) * 16 + (j % 32) / 2;
        Some(faer::Mat::from_fn(n, self.l, |j, i| {
            z[i * n + col(j)] as f64
        }))
    }
}

/// Z = Q̃ᵀΔ of [`Left`] as it is summed (lp × n f32, aligned).
pub struct Accumulator(Lines);

/// 64 bytes on a 64-byte boundary: tiles whose rows straddle cache lines load two lines
/// a row (A tiles and accumulators 16 bytes off their lines took 2.4x the time of
/// aligned ones, in a C copy of [`amx::pair_strip`]).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

// SAFETY: 64 bytes with no padding (size = align = 64), any bit pattern valid.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; `Copy` and `'static`.
unsafe impl bytemuck::Pod for Line {}

/// A buffer of whole [`Line`]s, viewed as bytes, u16 or f32.
#[derive(Default)]
struct Lines(Vec<Line>);

impl Lines {
    /// At least `bytes` zero bytes (whole lines).
    fn zeroed(&mut self, bytes: usize) {
        self.0.clear();
        self.0.resize(bytes.div_ceil(64), Line([0; 64]));
    }
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
    fn u16s(&self) -> &[u16] {
        bytemuck::cast_slice(&self.0)
    }
    fn u16s_mut(&mut self) -> &mut [u16] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
    fn f32s(&self) -> &[f32] {
        bytemuck::cast_slice(&self.0)
    }
    fn f32s_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

/// Per-thread buffers of [`Left`], kept from block to block.
#[derive(Default)]
struct PairScratch {
    /// A tiles of a block.
    a: Lines,
    /// The last rows of both sides, zero-padded to a chunk.
    tail: Lines,
}

thread_local! {
    static PAIR_SCRATCH: std::cell::RefCell<PairScratch> = std::cell::RefCell::default();
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

    /// What [`pair_strip`] reads besides its registers: the tile configuration, then
    /// the chunk count and the pointer steps.
    #[repr(C, align(64))]
    struct PairParams {
        cfg: Config,
        /// Chunks per column step.
        chunks: u64,
        /// Bytes the A pointer moves over those chunks.
        a_back: u64,
        /// Bytes between chunks of a side (16 rows).
        chunk_step: u64,
        /// Bytes a side's pointer moves over those chunks.
        side_back: u64,
    }

    /// For `cols32` steps of 32 columns: Z (two l-groups of 16 rows, `zs` bytes apart)
    /// += Σ over `chunks` chunks of 16 rows of the 16 A tiles at `a` (per chunk, in
    /// [`super::Left`]'s order) times the B tiles of F at `ft` and A at `base` (rows
    /// `rs` bytes apart), the accumulators of a column step (4 tiles: 2 groups × even
    /// and odd columns) loaded once and stored once. One `asm!` for the whole strip:
    /// configuration, both loops, release.
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and this process its permission ([`request`]); `a` holds
    /// chunks·16 KiB, both sides chunks·16 rows of `rs` bytes from which the columns
    /// 0..cols32·32 are read, Z 32 rows of `zs` bytes with cols32·32 f32 read and written.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pair_strip(
        a: *const u16,
        chunks: usize,
        ft: *const u8,
        base: *const u8,
        rs: usize,
        z: *mut u8,
        zs: usize,
        cols32: usize,
    ) {
        assert!(chunks > 0 && cols32 > 0);
        let params = PairParams {
            cfg: Config { ..CONFIG },
            chunks: chunks as u64,
            a_back: (chunks * 16 * 1024) as u64,
            chunk_step: (16 * rs) as u64,
            side_back: (chunks * 16 * rs) as u64,
        };
        // SAFETY: the caller's contract; every address below is inside the regions it
        // names (A: chunk c at a + c·16 KiB, tile t at + t·1 KiB, rows 64 bytes apart;
        // sides: chunk c at + c·16·rs, column step s at + s·64; Z: group g at
        // z + g·16·zs, column step s at + s·128, even tile + 0, odd + 64).
        unsafe {
            asm!(
                "ldtilecfg [{p}]",
                "2:",
                // Prefetch both sides' rows PREFETCH bytes ahead: 16·chunks rows of each
                // are as many streams, more than the hardware prefetchers follow.
                "mov {c}, [{p} + 64]",
                "shl {c}, 4",
                "lea {t}, [{f} + {ahead}]",
                "lea {u}, [{b} + {ahead}]",
                "4:",
                "prefetcht0 [{t}]",
                "prefetcht0 [{u}]",
                "add {t}, {rs}",
                "add {u}, {rs}",
                "dec {c}",
                "jnz 4b",
                "mov {c}, {zs}",
                "shl {c}, 4",
                "add {c}, {z}",
                "tileloadd tmm0, [{z} + {zs}*1]",
                "tileloadd tmm1, [{z} + {zs}*1 + 64]",
                "tileloadd tmm2, [{c} + {zs}*1]",
                "tileloadd tmm3, [{c} + {zs}*1 + 64]",
                "mov {c}, [{p} + 64]",
                "3:",
                "tileloadd tmm6, [{f} + {rs}*1]",
                "tileloadd tmm7, [{b} + {rs}*1]",
                // Group 0 into tmm0 (even) and tmm1 (odd): parts 0 and 1 of F, then of −A.
                "tileloadd tmm4, [{a} + {s64}*1 + 0*1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a} + {s64}*1 + 1*1024]",
                "tdpbf16ps tmm1, tmm5, tmm6",
                "tileloadd tmm4, [{a} + {s64}*1 + 4*1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a} + {s64}*1 + 5*1024]",
                "tdpbf16ps tmm1, tmm5, tmm6",
                "tileloadd tmm4, [{a} + {s64}*1 + 2*1024]",
                "tdpbf16ps tmm0, tmm4, tmm7",
                "tileloadd tmm5, [{a} + {s64}*1 + 3*1024]",
                "tdpbf16ps tmm1, tmm5, tmm7",
                "tileloadd tmm4, [{a} + {s64}*1 + 6*1024]",
                "tdpbf16ps tmm0, tmm4, tmm7",
                "tileloadd tmm5, [{a} + {s64}*1 + 7*1024]",
                "tdpbf16ps tmm1, tmm5, tmm7",
                // Group 1 into tmm2 and tmm3.
                "tileloadd tmm4, [{a} + {s64}*1 + 8*1024]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tileloadd tmm5, [{a} + {s64}*1 + 9*1024]",
                "tdpbf16ps tmm3, tmm5, tmm6",
                "tileloadd tmm4, [{a} + {s64}*1 + 12*1024]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tileloadd tmm5, [{a} + {s64}*1 + 13*1024]",
                "tdpbf16ps tmm3, tmm5, tmm6",
                "tileloadd tmm4, [{a} + {s64}*1 + 10*1024]",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "tileloadd tmm5, [{a} + {s64}*1 + 11*1024]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm4, [{a} + {s64}*1 + 14*1024]",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "tileloadd tmm5, [{a} + {s64}*1 + 15*1024]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 16384",
                "add {f}, [{p} + 80]",
                "add {b}, [{p} + 80]",
                "dec {c}",
                "jnz 3b",
                "sub {a}, [{p} + 72]",
                "sub {f}, [{p} + 88]",
                "sub {b}, [{p} + 88]",
                "add {f}, 64",
                "add {b}, 64",
                "mov {c}, {zs}",
                "shl {c}, 4",
                "add {c}, {z}",
                "tilestored [{z} + {zs}*1], tmm0",
                "tilestored [{z} + {zs}*1 + 64], tmm1",
                "tilestored [{c} + {zs}*1], tmm2",
                "tilestored [{c} + {zs}*1 + 64], tmm3",
                "add {z}, 128",
                "dec {nj}",
                "jnz 2b",
                "tilerelease",
                p = in(reg) &params,
                a = inout(reg) a => _,
                f = inout(reg) ft => _,
                b = inout(reg) base => _,
                z = inout(reg) z => _,
                zs = in(reg) zs,
                rs = in(reg) rs,
                s64 = in(reg) 64usize,
                nj = inout(reg) cols32 => _,
                c = out(reg) _,
                t = out(reg) _,
                u = out(reg) _,
                ahead = const PREFETCH,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack),
            );
        }
    }

    /// C (`rows` ≤ 32 rows of 32 f32, `cs` bytes apart) = F·X̃ − A·X̃ for `rows` rows of
    /// both sides (`ft`, `base`: rows `rs` bytes apart, `ks` steps of 32 values) and two
    /// column tiles of X̃ and −X̃ (`x`, `xn`: VNNI rows `xs` bytes apart). The rows are
    /// one or two groups of 16 (the last one shorter): the tiles of A and C are configured
    /// with the group's rows, so no row beyond `rows` is read or written.
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and this process its permission ([`request`]); both sides
    /// hold `rows` rows of `ks`·64 bytes, X̃ and −X̃ `ks`·16 rows of `xs` bytes with 128
    /// bytes from their start read, C `rows` rows of 128 bytes.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pair_rows(
        ft: *const u8,
        base: *const u8,
        rs: usize,
        ks: usize,
        x: *const u8,
        xn: *const u8,
        xs: usize,
        c: *mut u8,
        cs: usize,
        rows: usize,
    ) {
        assert!(ks > 0 && (1..=32).contains(&rows));
        let (r1, r2) = (rows.min(16), rows.saturating_sub(16));
        // Tiles 0–1: C of group 1, 2–3: C of group 2, 4: A of group 1, 5: A of group 2,
        // 6–7: X̃ (or −X̃).
        let mut cfg = Config { ..CONFIG };
        cfg.rows = [
            r1 as u8, r1 as u8, r2 as u8, r2 as u8, r1 as u8, r2 as u8, 16, 16, 0, 0, 0, 0, 0, 0,
            0, 0,
        ];
        for t in [2, 3, 5] {
            if r2 == 0 {
                cfg.rows[t] = 0;
                cfg.colsb[t] = 0;
            }
        }
        let c2 = c.wrapping_add(16 * cs);
        let (f2, b2) = (ft.wrapping_add(16 * rs), base.wrapping_add(16 * rs));
        // SAFETY: the caller's contract; every tile read or written lies in the regions
        // it names (group 2's rows only when r2 > 0, its tiles unused otherwise).
        unsafe {
            if r2 > 0 {
                asm!(
                    "ldtilecfg [{cfg}]",
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "2:",
                    "tileloadd tmm6, [{x} + {xs}*1]",
                    "tileloadd tmm7, [{x} + {xs}*1 + 64]",
                    "tileloadd tmm4, [{f} + {rs}*1]",
                    "tileloadd tmm5, [{f2} + {rs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm6, [{xn} + {xs}*1]",
                    "tileloadd tmm7, [{xn} + {xs}*1 + 64]",
                    "tileloadd tmm4, [{b} + {rs}*1]",
                    "tileloadd tmm5, [{b2} + {rs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "add {f}, 64",
                    "add {f2}, 64",
                    "add {b}, 64",
                    "add {b2}, 64",
                    "add {x}, {xstep}",
                    "add {xn}, {xstep}",
                    "dec {k}",
                    "jnz 2b",
                    "tilestored [{c} + {cs}*1], tmm0",
                    "tilestored [{c} + {cs}*1 + 64], tmm1",
                    "tilestored [{c2} + {cs}*1], tmm2",
                    "tilestored [{c2} + {cs}*1 + 64], tmm3",
                    "tilerelease",
                    cfg = in(reg) &cfg,
                    f = inout(reg) ft => _,
                    f2 = inout(reg) f2 => _,
                    b = inout(reg) base => _,
                    b2 = inout(reg) b2 => _,
                    x = inout(reg) x => _,
                    xn = inout(reg) xn => _,
                    xs = in(reg) xs,
                    xstep = in(reg) 16 * xs,
                    rs = in(reg) rs,
                    k = inout(reg) ks => _,
                    c = in(reg) c,
                    c2 = in(reg) c2,
                    cs = in(reg) cs,
                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                    out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                    options(nostack),
                );
            } else {
                asm!(
                    "ldtilecfg [{cfg}]",
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "2:",
                    "tileloadd tmm6, [{x} + {xs}*1]",
                    "tileloadd tmm7, [{x} + {xs}*1 + 64]",
                    "tileloadd tmm4, [{f} + {rs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm6, [{xn} + {xs}*1]",
                    "tileloadd tmm7, [{xn} + {xs}*1 + 64]",
                    "tileloadd tmm4, [{b} + {rs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "add {f}, 64",
                    "add {b}, 64",
                    "add {x}, {xstep}",
                    "add {xn}, {xstep}",
                    "dec {k}",
                    "jnz 2b",
                    "tilestored [{c} + {cs}*1], tmm0",
                    "tilestored [{c} + {cs}*1 + 64], tmm1",
                    "tilerelease",
                    cfg = in(reg) &cfg,
                    f = inout(reg) ft => _,
                    b = inout(reg) base => _,
                    x = inout(reg) x => _,
                    xn = inout(reg) xn => _,
                    xs = in(reg) xs,
                    xstep = in(reg) 16 * xs,
                    rs = in(reg) rs,
                    k = inout(reg) ks => _,
                    c = in(reg) c,
                    cs = in(reg) cs,
                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                    out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                    options(nostack),
                );
            }
        }
    }

    /// Bytes ahead of the current column step that [`pair_strip`] prefetches.
    const PREFETCH: usize = 256;

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
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pair_rows(
        _: *const u8,
        _: *const u8,
        _: usize,
        _: usize,
        _: *const u8,
        _: *const u8,
        _: usize,
        _: *mut u8,
        _: usize,
        _: usize,
    ) {
        unreachable!("no tiles on this architecture")
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pair_strip(
        _: *const u16,
        _: usize,
        _: *const u8,
        _: *const u8,
        _: usize,
        _: *mut u8,
        _: usize,
        _: usize,
    ) {
        unreachable!("no tiles on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Gaussian;
    use faer::Mat;

    /// Y = ΔX from both sides' bf16 values, against f64 products of F − A with bf16(X):
    /// within what f32 sums of the sides leave, Σ|X̃|(|F| + |A|)·2⁻²⁰ per element, for
    /// blocks of rows that end in groups of fewer than 16 and of 16–32, l not whole tiles.
    #[test]
    fn pair_rows_match_f64() {
        let Some(t) = Tiles::get() else {
            eprintln!("no AMX tiles on this machine: the tile products are not used here");
            return;
        };
        let mut g = Gaussian::new(13, "tiles", "pair rows");
        let bf = |x: f64| half::bf16::from_f64(x);
        for (m, n, l) in [
            (37, 64, 24),
            (70, 96, 32),
            (129, 1024, 40),
            (5, 32, 16),
            (70, 64, 1),
            (40, 32, 65),
        ] {
            let base: Vec<half::bf16> = (0..m * n).map(|_| bf(g.next())).collect();
            let ft: Vec<half::bf16> = base
                .iter()
                .map(|w| bf(w.to_f64() + 0.01 * g.next()))
                .collect();
            let bytes = |v: &[half::bf16]| -> Vec<u8> {
                v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
            };
            let (bb, fb) = (bytes(&base), bytes(&ft));
            let x = Mat::<f64>::from_fn(n, l, |_, _| g.next());
            let right = Right::new(t, x.as_ref());
            let mut y = vec![0f32; m * l];
            let cut = m / 3 + 1;
            right.mul_pair_rows(&bb[..cut * 2 * n], &fb[..cut * 2 * n], 0, &mut y);
            right.mul_pair_rows(&bb[cut * 2 * n..], &fb[cut * 2 * n..], cut, &mut y);
            for i in 0..m {
                for j in 0..l {
                    let (mut want, mut abs) = (0.0, 0.0);
                    for c in 0..n {
                        let (a, f) = (base[i * n + c].to_f64(), ft[i * n + c].to_f64());
                        let xr = bf(x[(c, j)]).to_f64();
                        want += (f - a) * xr;
                        abs += xr.abs() * (f.abs() + a.abs());
                    }
                    let e = (y[i * l + j] as f64 - want).abs();
                    assert!(
                        e <= abs * 2f64.powi(-20),
                        "Y[{i},{j}] ({m}x{n}x{l}): {e} of {abs}"
                    );
                }
            }
        }
    }

    /// QᵀΔ from both sides' bf16 values, against f64 products of Q̃ (its two-part
    /// rounding) with F − A: within what f32 sums of the sides leave, Σ|Q̃|(|F| + |A|)·2⁻²⁰
    /// per element, for ragged rows (blocks not whole chunks), l not whole tiles, and n
    /// across strips; Q̃ within 2⁻¹⁷ of Q; a side holding inf gives `None`.
    #[test]
    fn pair_products_match_f64() {
        let Some(t) = Tiles::get() else {
            eprintln!("no AMX tiles on this machine: the tile products are not used here");
            return;
        };
        let mut g = Gaussian::new(11, "tiles", "pair");
        // (m, n, l, the first block's rows): blocks ending mid-chunk, one of exactly three
        // chunks, one row, l of 1 and 65.
        for (m, n, l, cut) in [
            (37, 64, 24, 19),
            (70, 1056, 32, 35),
            (129, 2080, 40, 65),
            (16, 32, 80, 9),
            (50, 1024, 65, 48),
            (5, 32, 1, 1),
        ] {
            let bf = |x: f64| half::bf16::from_f64(x);
            let base: Vec<half::bf16> = (0..m * n).map(|_| bf(g.next())).collect();
            let ft: Vec<half::bf16> = base
                .iter()
                .map(|w| bf(w.to_f64() + 0.01 * g.next()))
                .collect();
            let bytes = |v: &[half::bf16]| {
                v.iter()
                    .flat_map(|x| x.to_bits().to_le_bytes())
                    .collect::<Vec<u8>>()
            };
            let (bb, fb) = (bytes(&base), bytes(&ft));
            let q = Mat::<f64>::from_fn(m, l, |_, _| g.next() / (m as f64).sqrt());
            let left = Left::new(t, q.as_ref());
            let qr = left.rounded();
            for i in 0..m {
                for j in 0..l {
                    assert!((qr[(i, j)] - q[(i, j)]).abs() <= q[(i, j)].abs() * 2f64.powi(-17));
                }
            }
            let mut z = left.accumulator(n);
            left.add_rows(0, &bb[..cut * 2 * n], &fb[..cut * 2 * n], n, &mut z);
            left.add_rows(cut, &bb[cut * 2 * n..], &fb[cut * 2 * n..], n, &mut z);
            let zt = left.finish(&z, n).expect("finite");
            for j in 0..n {
                for c in 0..l {
                    let (mut want, mut abs) = (0.0, 0.0);
                    for i in 0..m {
                        let (a, f) = (base[i * n + j].to_f64(), ft[i * n + j].to_f64());
                        want += qr[(i, c)] * (f - a);
                        abs += qr[(i, c)].abs() * (f.abs() + a.abs());
                    }
                    let e = (zt[(j, c)] - want).abs();
                    assert!(
                        e <= abs * 2f64.powi(-20),
                        "Z[{j},{c}] ({m}x{n}x{l}): {e} of {abs}"
                    );
                }
            }
            let mut bad = fb.clone();
            bad[2 * (m / 2 * n + 3) + 1] = 0x7f;
            bad[2 * (m / 2 * n + 3)] = 0x80;
            let mut z = left.accumulator(n);
            left.add_rows(0, &bb, &bad, n, &mut z);
            assert!(left.finish(&z, n).is_none(), "inf in a side");
        }
    }

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
