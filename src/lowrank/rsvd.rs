//! Randomized truncated SVD (Halko, Martinsson & Tropp, "Finding structure with
//! randomness", SIAM Review 2011, algorithms 4.4 and 5.1) on faer, over a delta that is
//! either held in memory or streamed by row blocks.
//!
//! With l = k + oversample columns and q power iterations:
//! 1. Ω ∈ {±1}^{n×l} random signs, seeded by (seed, tensor name): deterministic output.
//! 2. Y = ΔΩ; then q times: Q = qr(Y), Z = qr(ΔᵀQ), Y = ΔZ (re-orthonormalizing at each
//!    step keeps small singular directions from drowning in rounding).
//! 3. Q = qr(Y); B = QᵀΔ ∈ ℝ^{l×n}; B = Ũ S Vᵀ (exact thin SVD); U = QŨ.
//!
//! Without power iterations (the screen, [`super`]) a streamed Δ is read once, not twice:
//! Q = Y·M for an l × l M, so B = MᵀYᵀΔ, and YᵀΔ = Σ_blocks Y_bᵀΔ_b is summed in the same
//! pass as Y, each block of rows of Δ multiplied by its own rows of Y while still in
//! cache (Yu, Gu, Li, Liu & Li, IJCAI 2017). That is the same B in exact arithmetic; its
//! rounding error is cond(Y) times the second pass's, so it runs where cond(Y) ≤ 10
//! ([`single_pass_b`]): a full fine-tune's sketch (cond ≈ 1), not a merged LoRA's.
//!
//! Δ ≈ U S Vᵀ, and for the rank-k truncation ‖Δ − U_k S_k V_kᵀ‖²_F = ‖Δ‖²_F − Σ_{i≤k} sᵢ²
//! exactly (the projection is orthogonal), so residuals reported from ‖Δ‖_F and the
//! computed sᵢ are the true residuals of the factors we write.
//!
//! **Precision.** The products with Δ (all the flops: 2·m·n·l per product) run in the
//! precision [`DeltaRows::single_precision`] allows ([`Products`]): f32 for deltas of
//! 16- and 8-bit checkpoints, whose storage rounding (2⁻⁹ relative for bf16) is some 10⁴
//! times the f32 product error (~√n·2⁻²⁴), and f64 otherwise (an f32 checkpoint's
//! rounding is at the f32 product error, so f32 products would bury the floor the
//! detector compares against). The range sketch of a streamed Δ (Y = ΔΩ and the ΔZ of
//! power iterations, used only through their column space) runs on AMX tiles with Δ in
//! bf16 where the CPU has them and the fine-tuned side is stored in bf16 or fp8
//! ([`DeltaRows::bf16_products`], [`super::tiles`]); the products whose values are
//! reported (B = QᵀΔ, the refinement's ΔV) stay f32, so the identity above is exact
//! whatever the sketch ran in. When both sides are stored in bf16, the range sketch and
//! the products with Δᵀ of a streamed Δ (B = QᵀΔ, and ΔᵀQ of power iterations) run on
//! the tiles from the two sides' exact values, Δ never rounded ([`super::tiles::Left`]); B is then that
//! of Q′, the orthonormal basis of Q's two-part bf16 rounding ([`Operator::project`]),
//! so the identity holds for Q′. Without the tiles, on AVX-512, those products with Δᵀ run in
//! f32 from the two sides' stored values instead of a decoded f32 copy of Δ (the same Δ,
//! the f32 products' precision), a held f32 Δ's on the same FMA kernel
//! (`held_fma_tmul`), and with AVX-512 BF16 the range sketch of width ≤ 32 in
//! bf16 with f32 sums, as on the tiles ([`super::pair_fma`]); that range sketch also
//! runs on a held f32 Δ whose source allows bf16 ([`DeltaRows::bf16_products`]).
//!
//! The small dense steps — the QR of Y (m × l), the SVD of B (l × n) — always run in
//! f64. They cost O((m + n)·l²) against the products' O(m·n·l), but at f64's rate on
//! thin matrices they were still about a sixth of the CPU time of a `compare` of the
//! 0.6b all-linear pair (BENCHMARKS.md). The QRs are CholeskyQR2 and the SVDs of tall
//! sketches the SVD of their l × l R (`cholesky_qr`, `tall_svd`), Householder only where
//! Y is too ill-conditioned for the Gram matrix; with f32 products, a sketch with
//! cond ≤ 10³ takes both from its Gram matrix's eigen-decomposition instead
//! (`gram_svd`: 2.5x fewer flops, accurate to ~10⁻¹⁰ where the products leave ~10⁻⁷).
//!
//! Memory beyond Δ itself: Ω, Y, Z, Q, B and the factors, O((m + n)·l). When Δ is too large
//! to hold (see [`crate::lowrank::LowRankOptions::dense_budget_bytes`]), it is never
//! materialized: each product streams row blocks of Δ decoded from the stored bytes, at
//! the cost of one read of the tensor per product (2q + 2 reads, 1 for a single-pass
//! screen; the residual of the
//! stored factors is derived from the sketch, `extract::derived_stored_residual`, not
//! measured by one more read, unless the derivation would cancel); a held Δ is read
//! once, in the product precision, into a buffer each worker thread reuses from tensor
//! to tensor.
//!
//! When l reaches min(m, n) the randomized method buys nothing and the exact thin SVD of
//! Δ is computed instead.

use super::pair_fma::{Bf16Dot, Fma, PairRange, PairTmul, RANGE_WIDTH};
use super::tiles::{Left, Right, Tiles};
use super::{Cancel, DeltaRows, LowRankOptions, for_each_row_block};
use crate::error::Result;
use crate::rng::Gaussian;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// The element type of the products with Δ: f32 or f64.
pub trait Real: faer::traits::RealField + Copy + Send + Sync + 'static {
    fn of(x: f64) -> Self;
    fn to(self) -> f64;
    /// Reads rows `r0..r1` of Δ in this precision (see [`DeltaRows`]).
    fn read(src: &dyn DeltaRows, r0: usize, r1: usize, out: &mut [Self]) -> Result<(f64, f64)>;
    /// Σ (d − p)² ([`crate::kernels::fast::squared_error`]).
    fn squared_error(d: &[Self], p: &[Self]) -> f64;
}

impl Real for f32 {
    fn of(x: f64) -> f32 {
        x as f32
    }
    fn to(self) -> f64 {
        self as f64
    }
    fn read(src: &dyn DeltaRows, r0: usize, r1: usize, out: &mut [f32]) -> Result<(f64, f64)> {
        src.read_rows_f32(r0, r1, out)
    }
    fn squared_error(d: &[f32], p: &[f32]) -> f64 {
        crate::kernels::fast::squared_error(d, p)
    }
}

impl Real for f64 {
    fn of(x: f64) -> f64 {
        x
    }
    fn to(self) -> f64 {
        self
    }
    fn read(src: &dyn DeltaRows, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)> {
        src.read_rows(r0, r1, out)
    }
    fn squared_error(d: &[f64], p: &[f64]) -> f64 {
        crate::kernels::fast::squared_error(d, p)
    }
}

/// The precision of the products with Δ (module docs).
#[derive(Clone, Copy, Debug)]
pub enum Products {
    /// f64 on faer.
    F64,
    /// f32 on faer.
    F32,
    /// f32 on faer, and the range sketch of a streamed Δ in bf16 with f32 sums on AMX
    /// tiles ([`super::tiles`]).
    Tiles(Tiles),
    /// f32 on faer, and the range sketch of a streamed Δ of two bf16 sides in bf16 with
    /// f32 sums by AVX-512 BF16 dot products ([`super::pair_fma::PairRange`]).
    Bf16Dot(Bf16Dot),
}

/// The precision the products with one Δ ran in, as the reports name it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F64,
    #[default]
    F32,
    /// The range sketch's products in bf16 with f32 sums (on AMX tiles, [`super::tiles`],
    /// or by AVX-512 BF16 dot products, [`super::pair_fma`]), the others in f32.
    F32Bf16Sketch,
    /// The products of a streamed Δ with two bf16 sides on AMX tiles from the sides'
    /// stored values, Δ never rounded, with f32 sums: the range sketch with X in bf16
    /// ([`super::tiles::Right::mul_pair_rows`]), the products with Δᵀ with Q in two bf16
    /// parts ([`super::tiles::Left`]); the refinement's ΔV in f32.
    Bf16Pair,
}

impl Products {
    /// For a source whose products may run in f32 (`single`, [`DeltaRows::single_precision`])
    /// and with Δ in bf16 (`bf16`, [`DeltaRows::bf16_products`], and allowed by
    /// [`LowRankOptions::tiles`]).
    pub fn choose(single: bool, bf16: bool) -> Products {
        match (single, bf16.then(Tiles::get).flatten()) {
            (true, Some(t)) => Products::Tiles(t),
            (true, None) => match bf16.then(Bf16Dot::get).flatten() {
                Some(d) => Products::Bf16Dot(d),
                None => Products::F32,
            },
            (false, _) => Products::F64,
        }
    }

    /// The products of `src` under `opts`.
    pub fn of(src: &dyn DeltaRows, opts: &LowRankOptions) -> Products {
        Self::choose(src.single_precision(), opts.tiles && src.bf16_products())
    }

    /// The tiles, for a streamed Δ's range sketch.
    pub fn range_tiles(self) -> Option<Tiles> {
        match self {
            Products::Tiles(t) => Some(t),
            _ => None,
        }
    }

    /// The bf16 dot products, for a streamed bf16 pair's range sketch.
    pub fn range_dot(self) -> Option<Bf16Dot> {
        match self {
            Products::Bf16Dot(d) => Some(d),
            _ => None,
        }
    }

    /// Bytes per element of Δ as held and read.
    fn element_bytes(self) -> usize {
        match self {
            Products::F64 => 8,
            Products::F32 | Products::Tiles(_) | Products::Bf16Dot(_) => 4,
        }
    }
}

/// A truncated decomposition Δ ≈ U diag(s) Vᵀ, singular values non-increasing.
pub struct Decomposition {
    /// m × l
    pub u: Mat<f64>,
    /// l values, non-increasing.
    pub s: Vec<f64>,
    /// n × l
    pub v: Mat<f64>,
    /// ‖Δ‖²_F, accumulated in f64 while reading Δ.
    pub frob2: f64,
    /// Σ over elements of the expected squared rounding error of the fine-tuned value.
    pub rounding_var_sum: f64,
    pub method: super::Method,
    pub path: super::DeltaPath,
    /// Power iterations run.
    pub power_iters: usize,
    /// Passes over Δ's stored bytes (a held Δ is read once).
    pub reads: usize,
}

/// Δ held in memory as the row-major buffer it was decoded into; faer reads it through a
/// strided view, so it is never copied into another layout.
pub enum Held {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Δ as the products see it: held (in the chosen precision) or streamed by row blocks.
pub struct Operator<'a> {
    src: &'a dyn DeltaRows,
    products: Products,
    held: Option<Held>,
    /// Whether a product ran on tiles.
    tiles_used: bool,
    /// The tiles for the products with Δᵀ from both sides' bf16 values: a streamed Δ
    /// of a [`DeltaRows::bf16_pair`] source whose rows are whole tiles.
    pair: Option<Tiles>,
    /// Whether such a product ran.
    pair_used: bool,
    /// The AVX-512 kernel for the products with Δᵀ from both sides' bf16 values, where
    /// the tiles do not run ([`super::pair_fma`]): a streamed Δ of a
    /// [`DeltaRows::bf16_pair`] source with f32 products.
    fma: Option<Fma>,
    block_rows: usize,
    cancel: Cancel<'a>,
    /// Passes over the stored bytes so far.
    pub reads: usize,
    /// A decomposition took B from its first pass ([`decompose`]).
    pub single_pass: bool,
    /// ‖Δ‖²_F and Σ rounding variance, known after the first pass.
    pub stats: Option<(f64, f64)>,
}

thread_local! {
    /// The f32 buffer of the last Δ held on this thread, kept for the next one.
    static HELD_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for Operator<'_> {
    fn drop(&mut self) {
        if let Some(Held::F32(buf)) = self.held.take() {
            HELD_F32.with(|p| *p.borrow_mut() = buf);
        }
    }
}

/// Rows per read of the products with Δᵀ on tiles from both sides' bf16 values
/// ([`Operator::pair_tmul`]), at least the streamed blocks' rows: 64, 128 and 256 measured
/// alike on p32 (BENCHMARKS.md).
const PAIR_ROWS: usize = 128;
/// Bytes per side of those reads at most, so that their buffers stay in the read pool
/// (`checkpoint::shard`, 32 MiB): wider rows are read fewer at a time.
const PAIR_READ_BYTES: usize = 16 << 20;

/// Elements per read when filling a held Δ: the read buffers (a few MiB) are then reused
/// by the allocator instead of being fresh pages each time.
const HELD_READ_ELEMENTS: usize = 1 << 18;

/// Fills `buf` (all of Δ) by row blocks, summing the statistics.
fn read_held<T>(
    src: &dyn DeltaRows,
    buf: &mut [T],
    cancel: Cancel<'_>,
    read: impl Fn(usize, usize, &mut [T]) -> Result<(f64, f64)>,
) -> Result<(f64, f64)> {
    let (m, n) = (src.nrows(), src.ncols());
    let step = (HELD_READ_ELEMENTS / n.max(1)).max(1);
    let (mut f2, mut var) = (0.0, 0.0);
    let mut r0 = 0;
    while r0 < m {
        cancel.check()?;
        let r1 = (r0 + step).min(m);
        let st = read(r0, r1, &mut buf[r0 * n..r1 * n])?;
        f2 += st.0;
        var += st.1;
        r0 = r1;
    }
    Ok((f2, var))
}

/// Converts an f64 matrix to the product precision.
fn cast<T: Real>(x: MatRef<'_, f64>) -> Mat<T> {
    Mat::from_fn(x.nrows(), x.ncols(), |i, j| T::of(x[(i, j)]))
}

fn widen<T: Real>(x: MatRef<'_, T>) -> Mat<f64> {
    Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)].to())
}

impl<'a> Operator<'a> {
    /// Δ of `src`, held in memory when it fits `opts.dense_budget_bytes` in the product
    /// precision (read once, now), else streamed at each product.
    pub fn new(src: &'a dyn DeltaRows, opts: &LowRankOptions, cancel: Cancel<'a>) -> Result<Self> {
        let (m, n) = (src.nrows(), src.ncols());
        let products = Products::of(src, opts);
        let fits = Self::holds(opts, m, n, products);
        let mut op = Operator {
            src,
            products,
            held: None,
            tiles_used: false,
            pair: None,
            pair_used: false,
            fma: None,
            block_rows: Self::rows_per_block(opts, n, products),
            cancel,
            reads: 0,
            single_pass: false,
            stats: None,
        };
        if fits {
            let (held, stats) = if m * n == 0 {
                (Held::F64(Vec::new()), (0.0, 0.0))
            } else if !matches!(products, Products::F64) {
                // Reused from this thread's last tensor: fresh pages cost ~20x more to
                // touch than warm ones (BENCHMARKS.md).
                // Every element is overwritten by the read: only growth is zeroed.
                let mut buf = HELD_F32.with(|p| std::mem::take(&mut *p.borrow_mut()));
                let st = match src.read_all_f32(&mut buf, cancel) {
                    Some(st) => st?,
                    None => {
                        buf.resize(m * n, 0.0);
                        read_held(src, &mut buf, cancel, |r0, r1, out| {
                            src.read_rows_f32(r0, r1, out)
                        })?
                    }
                };
                debug_assert_eq!(buf.len(), m * n, "read_all_f32 fills all of Δ");
                (Held::F32(buf), st)
            } else {
                let mut buf = vec![0f64; m * n];
                let st = read_held(src, &mut buf, cancel, |r0, r1, out| {
                    src.read_rows(r0, r1, out)
                })?;
                (Held::F64(buf), st)
            };
            op.held = Some(held);
            op.stats = Some(stats);
            op.reads = 1;
        } else if src.bf16_pair() {
            if Left::takes(n) {
                op.pair = products.range_tiles();
            }
            if op.pair.is_none() && !matches!(products, Products::F64) && PairTmul::takes(n) {
                op.fma = Fma::get();
            }
        }
        Ok(op)
    }

    /// Whether an m × n Δ is held in memory, as [`Self::new`] decides.
    pub fn holds(opts: &LowRankOptions, m: usize, n: usize, products: Products) -> bool {
        let size = products.element_bytes();
        m.saturating_mul(n).saturating_mul(size) <= opts.dense_budget_bytes
    }

    /// Rows per block of a streamed Δ with n columns, as [`Self::new`] cuts them.
    pub fn rows_per_block(opts: &LowRankOptions, n: usize, products: Products) -> usize {
        let row = products.element_bytes() * n.max(1);
        let floor = (super::MAX_BLOCK_BYTES / row).min(opts.min_block_rows);
        (opts.block_bytes / row).max(floor).max(1)
    }

    /// Whether the small dense steps may take the Gram matrix's eigen-decomposition
    /// ([`gram_svd`]): the products are f32 (or coarser).
    fn gram(&self) -> bool {
        !matches!(self.products, Products::F64)
    }

    /// The precision the products so far ran in.
    pub fn precision(&self) -> Precision {
        match (self.products, self.tiles_used, self.pair_used) {
            (Products::F64, ..) => Precision::F64,
            (_, _, true) => Precision::Bf16Pair,
            (_, true, false) => Precision::F32Bf16Sketch,
            (_, false, false) => Precision::F32,
        }
    }

    pub fn path(&self) -> super::DeltaPath {
        if self.held.is_some() {
            super::DeltaPath::InMemory
        } else {
            super::DeltaPath::Streamed
        }
    }

    pub fn held(&self) -> Option<&Held> {
        self.held.as_ref()
    }

    pub fn src(&self) -> &'a dyn DeltaRows {
        self.src
    }

    pub fn block_rows(&self) -> usize {
        self.block_rows
    }

    pub fn cancel(&self) -> Cancel<'a> {
        self.cancel
    }

    /// Δ · x (m × l) in f32 or f64: the products whose values are reported.
    pub fn mul(&mut self, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.product(x, false)
    }

    /// Δ · x (m × l) of the range sketch (only its column space is used): on tiles for a
    /// streamed Δ when they run ([`super::tiles`]), else as [`Self::mul`].
    pub fn mul_range(&mut self, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.product(x, true)
    }

    /// Δ · x; `range`: a range sketch, which may run on the tiles or the bf16 dot products.
    fn product(&mut self, x: MatRef<'_, f64>, range: bool) -> Result<Mat<f64>> {
        let (tiles, dot) = match range {
            true => (self.products.range_tiles(), self.products.range_dot()),
            false => (None, None),
        };
        match (self.held.as_ref(), self.products) {
            (Some(Held::F32(b)), _) => {
                match dot.and_then(|d| held_range_dot(d, b, self.src.nrows(), x)) {
                    Some(y) => {
                        self.tiles_used = true;
                        Ok(y)
                    }
                    None => Ok(held_mul::<f32>(b, self.src, x)),
                }
            }
            (Some(Held::F64(b)), _) => Ok(held_mul::<f64>(b, self.src, x)),
            (None, Products::F64) => self.streamed_mul::<f64>(x),
            (None, _) => {
                self.tiles_used |= tiles.is_some();
                let mut p = RowProduct::new(tiles, dot, x, self.src.nrows());
                if (self.pair.is_some() || self.fma.is_some()) && p.takes_pairs() {
                    let step = self.block_rows;
                    let done = self.pair_pass(step, |r0, base, ft| p.add_pair(r0, base, ft))?;
                    if let Some(y) = done.then(|| p.finish()).flatten() {
                        // On tiles, a pair product; by dot products, a bf16 range sketch.
                        self.pair_used |= tiles.is_some();
                        self.tiles_used |= dot.is_some();
                        return Ok(y);
                    }
                    self.pair_failed();
                    // A side held inf or NaN, which the f32 products take as no change.
                    p = RowProduct::new(tiles, None, x, self.src.nrows());
                }
                self.pass::<f32>(|r0, rows| p.add(r0, rows))?;
                Ok(p.finish().expect("rows of Δ were added in f32"))
            }
        }
    }

    /// The first product ΔΩ of [`decompose`] for Ω of width `l`, when the source has
    /// it already ([`DeltaRows::sketched`]; a streamed Δ only). It counts as a pass over
    /// Δ: the source made one to compute it.
    fn sketched(&mut self, l: usize) -> Option<Sketch> {
        if self.held.is_some() || matches!(self.products, Products::F64) {
            return None;
        }
        let (sketch, st) = self.src.sketched(l)?;
        let (m, n) = (self.src.nrows(), self.src.ncols());
        if sketch.y.ncols() != l || sketch.y.nrows() != m {
            return None;
        }
        self.reads += 1;
        self.stats.get_or_insert(st);
        // The source sketched with the same choice of products ([`RowProduct::omega`]);
        // the dot products only where it had both sides' bf16 rows to give them.
        self.tiles_used |= self.products.range_tiles().is_some()
            || (self.products.range_dot().is_some()
                && self.src.bf16_pair()
                && PairRange::takes(self.src.ncols(), l));
        let cross = sketch.cross.filter(|z| z.nrows() == l && z.ncols() == n);
        Some(Sketch { cross, ..sketch })
    }

    /// The first product of [`decompose`]: ΔΩ for its Ω of width `l`, from the source
    /// when it computed it ([`Self::sketched`]), else by a pass of its own; with `cross`
    /// and a streamed Δ whose rows are added in f32, also YᵀΔ in the same pass.
    fn first_sketch(&mut self, name: &str, seed: u64, l: usize, cross: bool) -> Result<Sketch> {
        if let Some(s) = self.sketched(l) {
            return Ok(s);
        }
        let n = self.src.ncols();
        let signs = omega_signs(seed, name, n, l);
        let omega = MatRef::from_column_major_slice(&signs, n, l);
        let streamed_f32 = self.held.is_none() && !matches!(self.products, Products::F64);
        if !(cross && streamed_f32) {
            let y = self.mul_range(omega)?;
            return Ok(Sketch { y, cross: None });
        }
        let tiles = self.products.range_tiles();
        let dot = self.products.range_dot();
        let p = RowProduct::new(tiles, dot, omega, self.src.nrows());
        if (self.pair.is_some() || self.fma.is_some()) && p.takes_pairs() {
            // The rows come as both sides' values, which have no f32 rows for YᵀΔ.
            let y = self.mul_range(omega)?;
            return Ok(Sketch { y, cross: None });
        }
        self.tiles_used |= tiles.is_some();
        let mut p = p.with_cross(n);
        self.pass::<f32>(|r0, rows| p.add(r0, rows))?;
        Ok(p.finish_sketch().expect("rows of Δ were added in f32"))
    }

    /// Δᵀ · q (n × l).
    pub fn tmul(&mut self, q: MatRef<'_, f64>) -> Result<Mat<f64>> {
        match (self.held.as_ref(), self.products) {
            (Some(Held::F32(b)), _) => match held_fma_tmul(b, self.src.ncols(), q) {
                Some(z) => Ok(z),
                None => Ok(held_tmul::<f32>(b, self.src, q)),
            },
            (Some(Held::F64(b)), _) => Ok(held_tmul::<f64>(b, self.src, q)),
            (None, Products::F64) => self.streamed_tmul::<f64>(q),
            (None, _) => match self.fma_tmul(q)? {
                Some(z) => Ok(z),
                None => self.streamed_tmul::<f32>(q),
            },
        }
    }

    /// Δᵀ · q in f32 from both sides' bf16 values with the AVX-512 kernel
    /// ([`super::pair_fma`]), one pass; `None` when it does not run here, on the first
    /// pass (Δ's sums come from the f32 pass's blocks), or when a side holds values that
    /// are not finite (then never again for this Δ).
    fn fma_tmul(&mut self, q: MatRef<'_, f64>) -> Result<Option<Mat<f64>>> {
        let Some(fma) = self.fma else {
            return Ok(None);
        };
        if self.stats.is_none() {
            return Ok(None);
        }
        let mut p = PairTmul::new(fma, q, self.src.ncols());
        let step = self.pair_read_rows();
        let z = if self.pair_pass(step, |r0, base, ft| p.add_rows(r0, base, ft))? {
            p.finish()
        } else {
            None
        };
        if z.is_none() {
            self.fma = None;
        }
        Ok(z)
    }

    /// Δᵀ · q (n × l) of a range sketch (a power iteration: only its column space is
    /// used): on tiles from both sides' bf16 values when they run, with q in two bf16
    /// parts, else as [`Self::tmul`].
    pub fn tmul_range(&mut self, q: MatRef<'_, f64>) -> Result<Mat<f64>> {
        if let Some(t) = self.pair {
            let left = Left::new(t, q);
            if let Some(z) = self.pair_tmul(&left)? {
                self.pair_used = true;
                return Ok(z);
            }
        }
        self.tmul(q)
    }

    /// (Q′, ΔᵀQ′) for an orthonormal q (m × l): Q′ = q and ΔᵀQ′ in the products'
    /// precision ([`Self::tmul`]); or on tiles from both sides' bf16 values
    /// ([`Left`]), Q′ the orthonormal basis of the span of q's two-part rounding Q̃
    /// (Q̃ = Q′Lᵀ, L the Cholesky factor of Q̃ᵀQ̃, which is I to 2⁻¹⁶) and ΔᵀQ′ = ΔᵀQ̃·L⁻ᵀ.
    /// Q′ spans the sketch's range to 2⁻¹⁷, and the products are those of an orthonormal
    /// basis, so ‖Δ − Q′Q′ᵀΔ‖² = ‖Δ‖² − ‖Q′ᵀΔ‖² holds as for q (module docs).
    pub fn project(&mut self, q: Mat<f64>) -> Result<(Mat<f64>, Mat<f64>)> {
        if let Some(t) = self.pair {
            let left = Left::new(t, q.as_ref());
            if let Some(zt) = self.pair_tmul(&left)? {
                let rounded = left.rounded();
                let g = rounded.transpose() * &rounded;
                if let Ok(llt) = g.llt(faer::Side::Lower) {
                    let lower = llt.L();
                    // X L⁻ᵀ for X = Q̃ and ΔᵀQ̃: solve L Xᵀ' = Xᵀ in place.
                    let solve = |mut x: Mat<f64>| {
                        faer::linalg::triangular_solve::solve_lower_triangular_in_place(
                            lower,
                            x.as_mut().transpose_mut(),
                            Par::Seq,
                        );
                        x
                    };
                    self.pair_used = true;
                    return Ok((solve(rounded), solve(zt)));
                }
                // Q̃ᵀQ̃ is I to 2⁻¹⁶: a failed factorization means a sketch that was not
                // finite; the f32 product below decides.
            }
        }
        let bt = self.tmul(q.as_ref())?;
        Ok((q, bt))
    }

    /// ΔᵀQ̃ (n × l) on tiles, one pass over both sides' bf16 rows, for the Q̃ of `left`;
    /// `None` when a side holds values that are not finite (the f32 products take
    /// them as no change) or the source gives no such rows: the products of this Δ then
    /// stay off the pair path ([`Self::pair_failed`]).
    fn pair_tmul(&mut self, left: &Left) -> Result<Option<Mat<f64>>> {
        let n = self.src.ncols();
        // Never the first pass: Δ's sums come from the f32 pass's blocks.
        if self.stats.is_none() {
            return Ok(None);
        }
        let mut z = left.accumulator(n);
        let step = self.pair_read_rows();
        let zt = if self.pair_pass(step, |r0, base, ft| left.add_rows(r0, base, ft, n, &mut z))? {
            left.finish(&z, n)
        } else {
            None
        };
        if zt.is_none() {
            self.pair_failed();
        }
        Ok(zt)
    }

    /// Rows per read of the products with Δᵀ from both sides' bf16 values ([`Left`],
    /// [`PairTmul`]): [`PAIR_ROWS`] where they fit [`PAIR_READ_BYTES`], and at least a
    /// streamed block. The accumulators are read and written once per read, 256/rows
    /// bytes per element of Δ.
    fn pair_read_rows(&self) -> usize {
        PAIR_ROWS
            .min(PAIR_READ_BYTES / (2 * self.src.ncols()).max(1))
            .max(self.block_rows)
    }

    /// A pair product met a value that is not finite (or no rows): every later product
    /// of this Δ runs in f32, one pass each instead of a pair pass first.
    fn pair_failed(&mut self) {
        self.pair = None;
        self.fma = None;
    }

    fn streamed_mul<T: Real>(&mut self, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let (m, n) = (self.src.nrows(), self.src.ncols());
        let xt = cast::<T>(x.transpose());
        let mut yt = Mat::<T>::zeros(x.ncols(), m);
        debug_assert_eq!(xt.ncols(), n);
        self.pass::<T>(|r0, rows| sketch_block(yt.as_mut(), xt.as_ref(), r0, rows))?;
        Ok(widen(yt.transpose()))
    }

    fn streamed_tmul<T: Real>(&mut self, q: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let n = self.src.ncols();
        let q = cast::<T>(q);
        let mut z = Mat::<T>::zeros(n, q.ncols());
        self.pass::<T>(|r0, rows| {
            let blk = MatRef::from_row_major_slice(rows, rows.len() / n, n);
            let k = blk.nrows();
            matmul(
                z.as_mut(),
                Accum::Add,
                blk.transpose(),
                q.as_ref().subrows(r0, k),
                T::of(1.0),
                Par::Seq,
            );
        })?;
        Ok(widen(z.as_ref()))
    }

    /// One streamed pass over both sides' bf16 rows ([`DeltaRows::bf16_pair_rows`]):
    /// `f(first_row, base, finetuned)` on each block of `step` rows, counted as a read;
    /// Δ's sums are taken when this is the first pass (then with [`Self::pass`]'s blocks,
    /// `step` = `block_rows`, so they have its bits). `false` when the source gives no
    /// such rows.
    fn pair_pass(&mut self, step: usize, mut f: impl FnMut(usize, &[u8], &[u8])) -> Result<bool> {
        let m = self.src.nrows();
        let step = step.max(1);
        let sums = self.stats.is_none();
        let (mut f2, mut var) = (0.0, 0.0);
        let mut r0 = 0;
        while r0 < m {
            self.cancel.check()?;
            let r1 = (r0 + step).min(m);
            match self
                .src
                .bf16_pair_rows(r0, r1, sums, &mut |base, ft| f(r0, base, ft))
            {
                Some(st) => {
                    let st = st?;
                    f2 += st.0;
                    var += st.1;
                }
                None => return Ok(false),
            }
            r0 = r1;
        }
        self.reads += 1;
        self.stats.get_or_insert((f2, var));
        Ok(true)
    }

    /// One streamed pass over Δ: `f(first_row, rows)` on each row block, counted as a
    /// read, with Δ's sums kept from the first pass.
    fn pass<T: Real>(&mut self, mut f: impl FnMut(usize, &[T])) -> Result<()> {
        let (mut f2, mut var) = (0.0, 0.0);
        for_each_row_block::<T>(self.src, self.block_rows, self.cancel, |r0, rows, st| {
            f2 += st.0;
            var += st.1;
            f(r0, rows);
        })?;
        self.reads += 1;
        self.stats.get_or_insert((f2, var));
        Ok(())
    }
}

fn held_mul<T: Real>(buf: &[T], src: &dyn DeltaRows, x: MatRef<'_, f64>) -> Mat<f64> {
    let d = MatRef::from_row_major_slice(buf, src.nrows(), src.ncols());
    // (ΔΩ)ᵀ = ΩᵀΔᵀ, as in `streamed_mul`.
    widen((cast::<T>(x.transpose()) * d.transpose()).transpose())
}

fn held_tmul<T: Real>(buf: &[T], src: &dyn DeltaRows, q: MatRef<'_, f64>) -> Mat<f64> {
    let d = MatRef::from_row_major_slice(buf, src.nrows(), src.ncols());
    widen((d.transpose() * cast::<T>(q)).as_ref())
}

/// Rows of a held f32 Δ per call of [`PairTmul::add_f32_rows`]: its accumulators (ΔᵀQ,
/// l × n) are read and written once per call, Q's rows and Δ's stay in L1 and L2 (16, 64
/// and 256 rows: 0.60, 0.54 and 0.85 ns per element for 3072 × 1024 at l = 32,
/// `examples/sketch_rate`).
const HELD_TMUL_ROWS: usize = 64;

/// Δᵀq of a held f32 Δ (n columns) by [`PairTmul`]'s FMAs on AVX-512: 0.54–0.60 ns per
/// element against faer's 0.78–0.93 for the shapes of the 0.6b pair on the Xeon of
/// BENCHMARKS.md. `None` without AVX-512, for n not a multiple of 16, or when a value is
/// not finite (faer's product then decides).
fn held_fma_tmul(buf: &[f32], n: usize, q: MatRef<'_, f64>) -> Option<Mat<f64>> {
    let fma = Fma::get()?;
    if !PairTmul::takes(n) || buf.len() != q.nrows() * n {
        return None;
    }
    let mut p = PairTmul::new(fma, q, n);
    for (i, rows) in buf.chunks(HELD_TMUL_ROWS * n).enumerate() {
        p.add_f32_rows(i * HELD_TMUL_ROWS, rows);
    }
    p.finish()
}

/// The range sketch Δx of a held f32 Δ (m × n) by [`PairRange`]'s bf16 dot products, Δ
/// rounded to bf16 as for a streamed pair (0.19–0.24 ns per element against faer's 0.29
/// at width 32 on the AMD EPYC of BENCHMARKS.md, `examples/sketch_rate`); `None` when
/// the shapes do not suit it or a value is not finite.
fn held_range_dot(dot: Bf16Dot, buf: &[f32], m: usize, x: MatRef<'_, f64>) -> Option<Mat<f64>> {
    let (n, l) = (x.nrows(), x.ncols());
    if !PairRange::takes(n, l) || m * n != buf.len() {
        return None;
    }
    // All rows in one call: whole groups of `RANGE_ROWS` (chunks of 21 rows measured
    // 1.4x slower for n = 3072, `examples/sketch_rate`).
    let y = PairRange::new(dot, x).rows_f32(buf);
    y.iter()
        .all(|v| v.is_finite())
        .then(|| Mat::from_fn(m, l, |i, c| y[i * RANGE_WIDTH + c] as f64))
}

/// An orthonormal basis of the columns of a tall `y` (m × l, m ≥ l): the U of
/// [`gram_svd`] when `gram` allows it and Y is well conditioned, else the Q of `y = QR`.
fn orthonormal(y: &Mat<f64>, gram: bool) -> Mat<f64> {
    if let Some((u, ..)) = gram.then(|| gram_svd(y)).flatten() {
        return u;
    }
    match cholesky_qr(y) {
        Some((q, _)) => q,
        None => y.qr().compute_thin_Q(),
    }
}

/// [`gram_svd`] runs only where every singular value of Y is at least this fraction of
/// the largest (cond(Y) ≤ 10³).
const GRAM_MIN_RATIO: f64 = 1e-3;

/// The thin SVD of a tall `y` (m × l) from its Gram matrix: G = YᵀY = V Λ Vᵀ (faer's
/// symmetric eigensolver, l × l), S = Λ^½, U = Y·(V S⁻¹). One Gram product and one
/// product with m rows, 4·m·l² flops, where [`tall_svd`]'s CholeskyQR2 and Q·U_R take
/// 10·m·l² (0.23 against 0.54 ms for 3072 × 32 here). The eigenvalues carry an absolute
/// error of ~u·λ₁, so sᵢ is off by ~u·(s₁/sᵢ)²/2 relative and U's columns are orthonormal
/// to ~u·cond(Y)²: below 10⁻¹⁰ for cond(Y) ≤ 10³ ([`GRAM_MIN_RATIO`]), where the f32
/// products Y came from ([`Products`]) leave ~10⁻⁷. So it serves only those; products in
/// f64 (an f32 checkpoint's rounding is at that level) keep CholeskyQR2. `None` when Y
/// is worse conditioned, empty, wider than tall or not finite.
fn gram_svd(y: &Mat<f64>) -> Option<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let l = y.ncols();
    if y.nrows() < l || l == 0 {
        return None;
    }
    let g = y.transpose() * y;
    let evd = g.self_adjoint_eigen(faer::Side::Lower).ok()?;
    // Non-decreasing: reversed, the largest first.
    let lambda: Vec<f64> = evd.S().column_vector().iter().rev().copied().collect();
    let (top, least) = (lambda[0], lambda[l - 1]);
    if !(top.is_finite() && top > 0.0 && least >= GRAM_MIN_RATIO * GRAM_MIN_RATIO * top) {
        return None;
    }
    let s: Vec<f64> = lambda.iter().map(|x| x.sqrt()).collect();
    let ev = evd.U();
    let v = Mat::from_fn(l, l, |i, j| ev[(i, l - 1 - j)]);
    let scaled = Mat::from_fn(l, l, |i, j| v[(i, j)] / s[j]);
    let u = y * &scaled;
    let finite = u.col_iter().all(|c| c.iter().all(|x| x.is_finite()));
    finite.then_some((u, s, v))
}

/// The single-pass B of [`decompose`] runs only where every singular value of Y is at
/// least this fraction of the largest (cond(Y) ≤ 10): its rounding error is cond(Y)
/// times that of the second pass's f32 product (see [`single_pass_b`]).
pub const SINGLE_PASS_MIN_RATIO: f64 = 0.1;

/// (Q, Bᵀ = ΔᵀQ) from Y and the cross product Z = YᵀΔ (l × n) summed in Y's own pass,
/// without reading Δ again (Yu, Gu, Li, Liu & Li, "Single-pass PCA of large
/// high-dimensional data", IJCAI 2017): with Q = Y·M orthonormal ([`gram_svd`]: Y = U S Vᵀ,
/// Q = U, M = V S⁻¹), QᵀΔ = MᵀYᵀΔ = MᵀZ, so Bᵀ = ZᵀM. It is the same B as the second
/// pass's in exact arithmetic, for whatever Y the first pass computed, since Z pairs that
/// Y with the same rows of Δ. In floating point, Z's f32 sums err by ~u·‖Y‖·‖Δ‖ and M
/// scales that by 1/σ_min(Y): the error of B is cond(Y) times the second pass's, so this
/// runs for cond(Y) ≤ 1/[`SINGLE_PASS_MIN_RATIO`]. A full fine-tune's sketch has
/// cond(Y) ≈ (1 + √(l/m))/(1 − √(l/m)), close to 1; a merged LoRA's is the ratio of its
/// top singular value to the rounding noise's, far above, and takes the second pass.
/// `None` when Y does not qualify.
fn single_pass_b(y: &Mat<f64>, z: &Mat<f64>) -> Option<(Mat<f64>, Mat<f64>)> {
    let (u, s, v) = gram_svd(y)?;
    let l = s.len();
    // gram_svd gives finite, positive values.
    if z.nrows() != l || s[l - 1] < SINGLE_PASS_MIN_RATIO * s[0] {
        return None;
    }
    let map = Mat::from_fn(l, l, |i, j| v[(i, j)] / s[j]);
    let bt = z.transpose() * &map;
    let finite = bt.col_iter().all(|c| c.iter().all(|x| x.is_finite()));
    finite.then_some((u, bt))
}

/// CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto, 2014): `y = QR` from the
/// Gram matrix, twice. One pass, G = YᵀY = LLᵀ, Q₁ = Y L⁻ᵀ, is a QR of Y whose loss of
/// orthogonality grows with cond(Y)², ‖Q₁ᵀQ₁ − I‖ ≈ u·cond(Y)²; when that is below 1
/// (cond(Y) ≲ 10⁷ in f64) a second pass on Q₁ makes Q orthonormal to the rounding, and
/// R = R₂R₁. All of it is two l × l Gram products and two triangular solves with m rows,
/// O(m·l²) flops at the matmul rate, where Householder QR runs column by column (and
/// faer's spends most of its time in the overflow-safe column norms: 9 % of a `compare`
/// of an all-linear LoRA pair, BENCHMARKS.md).
///
/// `None` when Y is too ill-conditioned for it (Q₁ far from orthonormal, the Cholesky
/// factorization failing on a numerically singular Gram matrix, non-finite values, as
/// for an exactly low-rank Δ whose sketch has dependent columns): the caller then takes
/// Householder QR, which is stable for any Y.
fn cholesky_qr(y: &Mat<f64>) -> Option<(Mat<f64>, Mat<f64>)> {
    let l = y.ncols();
    if y.nrows() < l || l == 0 {
        return None;
    }
    // One pass: overwrites `q` (Y on entry) with Y L⁻ᵀ and returns R = Lᵀ, after
    // checking the Gram matrix against I when it is that of an almost orthonormal Q₁.
    let pass = |q: &mut Mat<f64>, check: bool| -> Option<Mat<f64>> {
        let g = q.transpose() * &*q;
        if check {
            let far = (0..l).any(|j| {
                (0..l).any(|i| {
                    let e = g[(i, j)] - if i == j { 1.0 } else { 0.0 };
                    // NaN counts as far.
                    e.abs().is_nan() || e.abs() >= 0.1
                })
            });
            if far {
                return None;
            }
        }
        let llt = g.llt(faer::Side::Lower).ok()?;
        let lower = llt.L();
        // Qᵀ = L⁻¹ Yᵀ, solved in place on the transposed view of Y.
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(
            lower,
            q.as_mut().transpose_mut(),
            Par::Seq,
        );
        Some(lower.transpose().to_owned())
    };
    let mut q = y.clone();
    let r1 = pass(&mut q, false)?;
    let r2 = pass(&mut q, true)?;
    let finite = |m: &Mat<f64>| m.col_iter().all(|c| c.iter().all(|x| x.is_finite()));
    if !finite(&q) || !finite(&r2) {
        return None;
    }
    Some((q, r2 * r1))
}

/// The thin SVD of a tall `y` (m × l, m ≥ l): [`gram_svd`] when `gram` (products in
/// f32) allows it and Y is well conditioned; else CholeskyQR2 and the SVD of the l × l R,
/// y = Q R = (Q U_R) S V_Rᵀ, at O(m·l²) matmul flops instead of a bidiagonalization of
/// all m rows; faer's thin SVD when [`cholesky_qr`] declines Y. Returns (U, s, V).
fn tall_svd(name: &str, y: &Mat<f64>, gram: bool) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    if let Some(usv) = gram.then(|| gram_svd(y)).flatten() {
        return Ok(usv);
    }
    let values = |s: faer::diag::DiagRef<'_, f64>| s.column_vector().iter().copied().collect();
    if let Some((q, r)) = cholesky_qr(y) {
        let svd = r.thin_svd().map_err(|e| svd_failed(name, e))?;
        return Ok((&q * svd.U(), values(svd.S()), svd.V().to_owned()));
    }
    let svd = y.thin_svd().map_err(|e| svd_failed(name, e))?;
    Ok((svd.U().to_owned(), values(svd.S()), svd.V().to_owned()))
}

/// The sketch width l = k + oversample of [`decompose`] for an m × n Δ, `None` when it
/// would be as wide as the matrix (the exact SVD is computed instead).
pub fn sketch_width(k: usize, oversample: usize, m: usize, n: usize) -> Option<usize> {
    let min_dim = m.min(n);
    let l = (k + oversample).min(min_dim);
    (l < min_dim && min_dim > 0).then_some(l)
}

/// Ω (n × l, column-major) of [`decompose`]: random signs seeded by (seed, tensor name).
fn omega_signs(seed: u64, name: &str, n: usize, l: usize) -> Vec<f64> {
    let mut g = Gaussian::new(seed, name, "rsvd-omega");
    let mut signs = vec![0f64; n * l];
    g.signs(&mut signs);
    signs
}

/// Y = ΔX (m × l) built block by block of Δ's rows in f32 products, on faer or on
/// tiles: the streamed Δ·X of the stage's pass, and of a source that computes the first
/// product of [`decompose`] itself ([`DeltaRows::sketched`]), so both give the same bits.
pub struct RowProduct {
    kind: RowKind,
    m: usize,
    l: usize,
    /// Rows were added as both sides' values ([`Self::add_pair`]).
    pairs: bool,
    /// YᵀΔ (l × n), summed block by block as the rows of Δ are added, when asked for
    /// ([`Self::with_cross`]): the single-pass B of [`decompose`].
    cross: Option<Mat<f32>>,
}

/// The first product of a sketch, Y = ΔΩ (m × l), and when the same pass computed it
/// the cross product YᵀΔ (l × n) that gives B = QᵀΔ without reading Δ again
/// ([`decompose`]).
pub struct Sketch {
    pub y: Mat<f64>,
    pub cross: Option<Mat<f64>>,
}

enum RowKind {
    /// Xᵀ (l × n) and (ΔX)ᵀ (l × m); with `dot`, rows given as two bf16 sides go to the
    /// dot products ([`PairRange`], made at the first such rows).
    Faer {
        xt: Mat<f32>,
        yt: Mat<f32>,
        dot: Option<Bf16Dot>,
        range: Option<PairRange>,
    },
    /// X packed for the tiles, and Y row-major.
    Tiles { x: Right, y: Vec<f32> },
}

impl RowProduct {
    /// For X (n × l) and m rows of Δ: on `tiles` (a range sketch) or in f32 on faer, and
    /// with `dot` (a range sketch) rows of two bf16 sides by bf16 dot products.
    pub fn new(
        tiles: Option<Tiles>,
        dot: Option<Bf16Dot>,
        x: MatRef<'_, f64>,
        m: usize,
    ) -> RowProduct {
        let l = x.ncols();
        let kind = match tiles {
            Some(t) => RowKind::Tiles {
                x: Right::new(t, x),
                y: vec![0.0; m * l],
            },
            None => RowKind::Faer {
                xt: cast::<f32>(x.transpose()),
                yt: Mat::zeros(l, m),
                dot: dot.filter(|_| PairRange::takes(x.nrows(), l)),
                range: None,
            },
        };
        RowProduct {
            kind,
            m,
            l,
            pairs: false,
            cross: None,
        }
    }

    /// Also sums YᵀΔ (l × n, f32) over the rows given to [`Self::add`], for Δ of `n`
    /// columns, in the order they are given; rows given as both sides' values
    /// ([`Self::add_pair`]) drop it.
    pub fn with_cross(mut self, n: usize) -> Self {
        self.cross = Some(Mat::zeros(self.l, n));
        self
    }

    /// Whether YᵀΔ is being summed ([`Self::with_cross`]).
    pub fn has_cross(&self) -> bool {
        self.cross.is_some()
    }

    /// Stops summing YᵀΔ (Y is still computed).
    pub fn drop_cross(&mut self) {
        self.cross = None;
    }

    /// For the Ω of width `l` that [`decompose`] draws for an m × n Δ named `name`.
    pub fn omega(
        tiles: Option<Tiles>,
        dot: Option<Bf16Dot>,
        seed: u64,
        name: &str,
        (m, n): (usize, usize),
        l: usize,
    ) -> Self {
        let signs = omega_signs(seed, name, n, l);
        Self::new(tiles, dot, MatRef::from_column_major_slice(&signs, n, l), m)
    }

    /// Adds the rows `r0..` of Δ given in `rows` (row-major).
    pub fn add(&mut self, r0: usize, rows: &[f32]) {
        match &mut self.kind {
            RowKind::Faer { xt, yt, .. } => {
                sketch_block(yt.as_mut(), xt.as_ref(), r0, rows);
                if let Some(z) = &mut self.cross {
                    let n = z.ncols();
                    let k = rows.len() / n.max(1);
                    let blk = MatRef::from_row_major_slice(rows, k, n);
                    // Z += Y_bᵀ Δ_b: the rows of Y just computed, with the rows of Δ
                    // still in cache.
                    matmul(
                        z.as_mut(),
                        Accum::Add,
                        yt.as_ref().subcols(r0, k),
                        blk,
                        1.0f32,
                        Par::Seq,
                    );
                }
            }
            RowKind::Tiles { x, y } => {
                x.mul_rows(rows, r0, y);
                if let Some(z) = &mut self.cross {
                    let (l, n) = (self.l, z.ncols());
                    let k = rows.len() / n.max(1);
                    let blk = MatRef::from_row_major_slice(rows, k, n);
                    let yb = MatRef::from_row_major_slice(&y[r0 * l..(r0 + k) * l], k, l);
                    matmul(
                        z.as_mut(),
                        Accum::Add,
                        yb.transpose(),
                        blk,
                        1.0f32,
                        Par::Seq,
                    );
                }
            }
        }
    }

    /// Whether [`Self::add_pair`] runs: on tiles, for rows of whole tiles; by bf16 dot
    /// products ([`PairRange`]) for X of width ≤ 32.
    pub fn takes_pairs(&self) -> bool {
        match &self.kind {
            RowKind::Tiles { x, .. } => x.takes_pairs(),
            RowKind::Faer { dot, .. } => dot.is_some(),
        }
    }

    /// Adds the rows `r0..` of Δ = F − A given as both sides' stored bf16 values
    /// ([`Right::mul_pair_rows`], [`PairRange`]); only when [`Self::takes_pairs`].
    pub fn add_pair(&mut self, r0: usize, base: &[u8], ft: &[u8]) {
        self.pairs = true;
        self.cross = None;
        match &mut self.kind {
            RowKind::Tiles { x, y } => x.mul_pair_rows(base, ft, r0, y),
            RowKind::Faer { xt, yt, dot, range } => {
                let dot = dot.expect("pairs are taken by the dot products");
                let range = range.get_or_insert_with(|| PairRange::new(dot, xt.transpose()));
                let y = range.rows(base, ft);
                for (i, yr) in y.chunks_exact(super::pair_fma::RANGE_WIDTH).enumerate() {
                    for (c, &v) in yr[..xt.nrows()].iter().enumerate() {
                        yt[(c, r0 + i)] = v;
                    }
                }
            }
        }
    }

    /// Y (m × l); `None` when rows were added as both sides' values and a value of Y
    /// is not finite (a side held inf or NaN, which the f32 rows of Δ take as no change).
    pub fn finish(self) -> Option<Mat<f64>> {
        self.finish_sketch().map(|s| s.y)
    }

    /// Y with the cross product YᵀΔ when it was asked for and every row was added in
    /// f32 ([`Self::with_cross`]); `None` as for [`Self::finish`].
    pub fn finish_sketch(self) -> Option<Sketch> {
        let (m, l) = (self.m, self.l);
        let cross = self.cross.as_ref().map(|z| widen(z.as_ref()));
        let y = match self.kind {
            RowKind::Faer { yt, .. } => (!self.pairs
                || yt.col_iter().all(|c| c.iter().all(|v| v.is_finite())))
            .then(|| widen(yt.transpose())),
            RowKind::Tiles { y, .. } => (!self.pairs || y.iter().all(|v| v.is_finite()))
                .then(|| Mat::from_fn(m, l, |i, j| y[i * l + j] as f64)),
        }?;
        Some(Sketch { y, cross })
    }
}

/// Writes the rows `r0..` of Δ given in `rows` (row-major, n columns) into the
/// transposed product `yt` = (ΔX)ᵀ = XᵀΔᵀ (l × m), with `xt` = Xᵀ (l × n): the one block
/// step of a streamed Δ·X on faer.
fn sketch_block<T: Real>(yt: faer::MatMut<'_, T>, xt: MatRef<'_, T>, r0: usize, rows: &[T]) {
    let n = xt.ncols();
    let blk = MatRef::from_row_major_slice(rows, rows.len() / n.max(1), n);
    let k = blk.nrows();
    // (ΔX)ᵀ = XᵀΔᵀ: Δᵀ is column-major as stored, which faer multiplies without
    // repacking it (2x the rate of Δ·X here, BENCHMARKS.md).
    matmul(
        yt.subcols_mut(r0, k),
        Accum::Replace,
        xt,
        blk.transpose(),
        T::of(1.0),
        Par::Seq,
    );
}

/// Decomposes Δ keeping `k` components plus `oversample`, with `power_iters` power
/// iterations, as described in the module docs. `k` is clamped to min(m, n); when the
/// sketch would be as wide as the matrix, Δ's exact SVD is computed.
pub fn decompose(
    op: &mut Operator<'_>,
    name: &str,
    k: usize,
    oversample: usize,
    power_iters: usize,
    seed: u64,
) -> Result<Decomposition> {
    decompose_passes(op, name, k, oversample, power_iters, seed, true)
}

/// [`decompose`], with B from Y's pass where it qualifies only when `single_pass`.
fn decompose_passes(
    op: &mut Operator<'_>,
    name: &str,
    k: usize,
    oversample: usize,
    power_iters: usize,
    seed: u64,
    single_pass: bool,
) -> Result<Decomposition> {
    let (m, n) = (op.src.nrows(), op.src.ncols());
    let Some(l) = sketch_width(k, oversample, m, n) else {
        return exact(op, name);
    };
    let first = op.first_sketch(name, seed, l, single_pass && power_iters == 0)?;
    let mut y = first.y;
    for _ in 0..power_iters {
        let q = orthonormal(&y, op.gram());
        let z = orthonormal(&op.tmul_range(q.as_ref())?, op.gram());
        y = op.mul_range(z.as_ref())?;
    }
    // B = QᵀΔ = (ΔᵀQ)ᵀ, from the first pass's YᵀΔ when Y is well conditioned, else by
    // a pass of its own.
    let cross = first.cross.filter(|_| single_pass && power_iters == 0);
    let one_pass = cross.and_then(|z| single_pass_b(&y, &z));
    let (q, bt) = match one_pass {
        Some(qb) => {
            op.single_pass = true;
            qb
        }
        None => op.project(orthonormal(&y, op.gram()))?,
    };
    // Bᵀ = X S Wᵀ (n × l, tall), so B = W S Xᵀ and Δ ≈ Q B = (Q W) S Xᵀ.
    let (x, s, w) = tall_svd(name, &bt, op.gram())?;
    let (frob2, rounding_var_sum) = op.stats.expect("Δ was read");
    Ok(Decomposition {
        u: &q * &w,
        s,
        v: x,
        frob2,
        rounding_var_sum,
        method: super::Method::Randomized,
        path: op.path(),
        power_iters,
        reads: op.reads,
    })
}

/// A half power iteration seeded with the leading `w` right singular vectors V_w of an
/// earlier decomposition `d` (the screen's, whose V spans ΔᵀQ = ΔᵀΔΩ after
/// orthonormalization): Y = Δ·V_w = U S Wᵀ, and Δ ≈ Δ V_w V_wᵀ = U S (V_w W)ᵀ. One product
/// of width w. The projection is orthogonal (on the right), so the Eckart–Young residual
/// formula of the module docs still holds; and since V_w comes from (ΔᵀΔ)Ω, the leakage
/// of the tail into the rank-k factors shrinks with (σ_{w+1}/σ_k)² instead of
/// σ_{w+1}/σ_k (HMT 2011, §10.4). For a merged LoRA (σ_k/σ_{k+1} ≥ 2, often 50) that turns
/// the screen's factors, whose residual can be 1.4x the optimum when the rounding tail
/// holds a few percent of ‖Δ‖², into the optimal ones (BENCHMARKS.md).
pub fn refine(
    op: &mut Operator<'_>,
    name: &str,
    d: &Decomposition,
    w: usize,
) -> Result<Decomposition> {
    let w = w.min(d.v.ncols());
    let vw = d.v.as_ref().subcols(0, w);
    let y = op.mul(vw)?;
    let (u, s, w) = tall_svd(name, &y, op.gram())?;
    Ok(Decomposition {
        u,
        s,
        v: vw * &w,
        frob2: d.frob2,
        rounding_var_sum: d.rounding_var_sum,
        method: d.method,
        path: d.path,
        power_iters: d.power_iters + 1,
        reads: op.reads,
    })
}

/// One more power iteration on a refined decomposition: V = qr(ΔᵀU), then
/// [`refine`] with V (two products of the width of `d`).
pub fn iterate(op: &mut Operator<'_>, name: &str, d: &Decomposition) -> Result<Decomposition> {
    let v = orthonormal(&op.tmul_range(d.u.as_ref())?, op.gram());
    let seeded = Decomposition {
        u: Mat::zeros(0, 0),
        s: Vec::new(),
        v,
        frob2: d.frob2,
        rounding_var_sum: d.rounding_var_sum,
        method: d.method,
        path: d.path,
        power_iters: d.power_iters,
        reads: d.reads,
    };
    let w = seeded.v.ncols();
    refine(op, name, &seeded, w)
}

fn svd_failed(name: &str, e: faer::linalg::svd::SvdError) -> crate::error::Error {
    crate::error::Error::Numerical {
        tensor: name.to_string(),
        reason: format!("the SVD did not converge ({e:?})"),
    }
}

/// The exact thin SVD, in f64 (Δ is small in one dimension here, min(m, n) ≤ l, so
/// holding it costs O((m + n)·l) anyway).
fn exact(op: &mut Operator<'_>, name: &str) -> Result<Decomposition> {
    let (m, n) = (op.src.nrows(), op.src.ncols());
    let d: Mat<f64> = match op.held.as_ref() {
        Some(Held::F32(b)) => widen(MatRef::from_row_major_slice(b, m, n)),
        Some(Held::F64(b)) => MatRef::from_row_major_slice(b, m, n).to_owned(),
        None => {
            op.cancel.check()?;
            let mut buf = vec![0f64; m * n];
            let st = if m * n == 0 {
                (0.0, 0.0)
            } else {
                op.src.read_rows(0, m, &mut buf)?
            };
            op.reads += 1;
            op.stats.get_or_insert(st);
            op.held = Some(Held::F64(buf));
            let Some(Held::F64(b)) = op.held.as_ref() else {
                unreachable!("just stored")
            };
            MatRef::from_row_major_slice(b, m, n).to_owned()
        }
    };
    let (u, s, v) = if m.min(n) == 0 {
        (Mat::zeros(m, 0), Vec::new(), Mat::zeros(n, 0))
    } else {
        let svd = d.thin_svd().map_err(|e| svd_failed(name, e))?;
        (
            svd.U().to_owned(),
            svd.S().column_vector().iter().copied().collect(),
            svd.V().to_owned(),
        )
    };
    let (frob2, rounding_var_sum) = op.stats.expect("Δ was read");
    Ok(Decomposition {
        u,
        s,
        v,
        frob2,
        rounding_var_sum,
        method: super::Method::Exact,
        path: super::DeltaPath::InMemory,
        power_iters: 0,
        reads: op.reads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::tests::MatrixRows;

    fn run(src: &dyn DeltaRows, k: usize, opts: &LowRankOptions) -> Decomposition {
        let mut op = Operator::new(src, opts, Cancel::never()).unwrap();
        decompose(
            &mut op,
            "a",
            k,
            opts.oversample,
            opts.power_iters,
            opts.seed,
        )
        .unwrap()
    }

    /// A = U diag(σ) Vᵀ with σᵢ = 0.7^i: the randomized values match the exact ones.
    #[test]
    fn randomized_matches_exact_on_a_decaying_spectrum() {
        let (m, n) = (300, 200);
        let mut g = Gaussian::new(3, "a", "test");
        let x = Mat::<f64>::from_fn(m, n, |_, _| g.next());
        let y = Mat::<f64>::from_fn(n, n, |_, _| g.next());
        let qu = x.qr().compute_thin_Q();
        let qv = y.qr().compute_thin_Q();
        let sig: Vec<f64> = (0..n).map(|i| 0.7f64.powi(i as i32)).collect();
        let a = Mat::<f64>::from_fn(m, n, |i, j| {
            (0..n).map(|t| qu[(i, t)] * sig[t] * qv[(j, t)]).sum()
        });
        let opts = LowRankOptions::default();
        for single in [false, true] {
            let src = MatrixRows {
                a: a.clone(),
                single,
            };
            let tol = if single { 1e-5 } else { 1e-9 };
            let r = run(&src, 16, &opts);
            assert_eq!(r.method, crate::lowrank::Method::Randomized);
            for (i, (got, want)) in r.s.iter().zip(&sig).take(16).enumerate() {
                assert!((got - want).abs() <= 1e-3 * want, "σ{i}: {got} vs {want}");
            }
            let streamed = LowRankOptions {
                dense_budget_bytes: 0,
                block_bytes: 8 * n * 7,
                min_block_rows: 1,
                ..opts.clone()
            };
            let rs = run(&src, 16, &streamed);
            assert_eq!(rs.path, crate::lowrank::DeltaPath::Streamed);
            for (x, y) in rs.s.iter().zip(&r.s).take(16) {
                assert!((x - y).abs() <= tol * r.s[0]);
            }
            assert!((rs.frob2 - r.frob2).abs() <= 1e-9 * r.frob2);
        }
    }

    /// The single-pass B (Y's pass also sums YᵀΔ) gives the second pass's values to the
    /// f32 products' rounding where Y qualifies, and is declined where Y is worse
    /// conditioned than [`SINGLE_PASS_MIN_RATIO`] allows.
    #[test]
    fn single_pass_b_matches_the_second_pass() {
        let (m, n, r) = (400, 300, 4);
        let mut g = Gaussian::new(5, "single", "test");
        let noise = Mat::<f64>::from_fn(m, n, |_, _| g.next() / (n as f64).sqrt());
        let u = Mat::<f64>::from_fn(m, r, |_, _| g.next() / (m as f64).sqrt());
        let v = Mat::<f64>::from_fn(n, r, |_, _| g.next() / (n as f64).sqrt());
        let opts = LowRankOptions {
            dense_budget_bytes: 0,
            block_bytes: 4 * n * 7,
            min_block_rows: 1,
            ..LowRankOptions::default()
        };
        // (LoRA scale, cond(Y) of about: 1.5, 9, 94, 940.)
        for c in [0.0, 10.0, 100.0, 1000.0] {
            let a = Mat::<f64>::from_fn(m, n, |i, j| {
                noise[(i, j)] + c * (0..r).map(|t| u[(i, t)] * v[(j, t)]).sum::<f64>()
            });
            let src = MatrixRows { a, single: true };
            let mut op1 = Operator::new(&src, &opts, Cancel::never()).unwrap();
            let one = decompose(&mut op1, "a", 24, 8, 0, 0).unwrap();
            let mut op2 = Operator::new(&src, &opts, Cancel::never()).unwrap();
            let two = decompose_passes(&mut op2, "a", 24, 8, 0, 0, false).unwrap();
            assert_eq!((two.reads, op2.single_pass), (2, false));
            // The rounding error of the smallest values grows with cond(Y)²: measured
            // 3e-8 at cond 1.5, 1.2e-7 at 9, 1.6e-5 at 94.
            let worst = one
                .s
                .iter()
                .zip(&two.s)
                .map(|(x, y)| (x - y).abs() / y)
                .fold(0.0, f64::max);
            if c < 100.0 {
                assert_eq!((one.reads, op1.single_pass), (1, true), "scale {c}");
                assert!(worst <= 1e-6, "scale {c}: {worst}");
            } else {
                assert_eq!((one.reads, op1.single_pass), (2, false), "scale {c}");
                assert_eq!(one.s, two.s);
            }
        }
    }

    /// A held Δ's Δᵀq by the FMA kernel, in chunks of rows with a partial last one,
    /// agrees with faer's product to f32 rounding.
    #[test]
    fn held_fma_tmul_matches_faer() {
        let (m, n, l) = (150, 96, 20);
        let mut g = Gaussian::new(4, "held", "test");
        let buf: Vec<f32> = (0..m * n).map(|_| g.next() as f32).collect();
        let q = Mat::<f64>::from_fn(m, l, |_, _| g.next());
        let Some(z) = held_fma_tmul(&buf, n, q.as_ref()) else {
            eprintln!("no AVX-512 here: the held FMA product is not used");
            return;
        };
        let src = MatrixRows {
            a: Mat::zeros(m, n),
            single: true,
        };
        let want = held_tmul::<f32>(&buf, &src, q.as_ref());
        let scale = want.norm_max();
        for j in 0..n {
            for c in 0..l {
                assert!(
                    (z[(j, c)] - want[(j, c)]).abs() <= 1e-5 * scale,
                    "({j}, {c})"
                );
            }
        }
    }

    /// A pair of bf16 sides (base, fine-tuned), m × n row-major, as the pipeline gives
    /// it: Δ decoded in f32 (non-finite as no change) and both sides' rows as stored.
    struct PairRows {
        base: Vec<half::bf16>,
        ft: Vec<half::bf16>,
        m: usize,
        n: usize,
    }

    impl DeltaRows for PairRows {
        fn nrows(&self) -> usize {
            self.m
        }
        fn ncols(&self) -> usize {
            self.n
        }
        fn read_rows(&self, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)> {
            let mut f2 = 0.0;
            for (o, (a, b)) in out.iter_mut().zip(
                self.base[r0 * self.n..r1 * self.n]
                    .iter()
                    .zip(&self.ft[r0 * self.n..]),
            ) {
                let d = b.to_f32() - a.to_f32();
                *o = if d.is_finite() { d as f64 } else { 0.0 };
                f2 += *o * *o;
            }
            Ok((f2, 0.0))
        }
        fn single_precision(&self) -> bool {
            true
        }
        fn bf16_products(&self) -> bool {
            true
        }
        fn bf16_pair(&self) -> bool {
            true
        }
        fn bf16_pair_rows(
            &self,
            r0: usize,
            r1: usize,
            sums: bool,
            f: &mut dyn FnMut(&[u8], &[u8]),
        ) -> Option<Result<(f64, f64)>> {
            let bytes = |v: &[half::bf16]| -> Vec<u8> {
                v[r0 * self.n..r1 * self.n]
                    .iter()
                    .flat_map(|x| x.to_bits().to_le_bytes())
                    .collect()
            };
            f(&bytes(&self.base), &bytes(&self.ft));
            let mut st = (0.0, 0.0);
            if sums {
                let mut d = vec![0.0; (r1 - r0) * self.n];
                st = self.read_rows(r0, r1, &mut d).ok()?;
            }
            Some(Ok(st))
        }
    }

    /// A streamed Δ of a bf16 pair on tiles (the products with Δᵀ from both sides'
    /// values) gives the spectrum of the f32 products, to the f32 products' own rounding;
    /// with an inf in one side (no change there for the f32 products) the products with
    /// Δᵀ fall back to f32 and still agree.
    #[test]
    fn pair_products_give_the_f32_spectrum() {
        if Tiles::get().is_none() {
            eprintln!("no AMX tiles on this machine: the tile products are not used here");
            return;
        }
        let (m, n, r) = (150, 96, 6);
        let mut g = Gaussian::new(9, "pair", "test");
        let u = Mat::<f64>::from_fn(m, r, |_, _| g.next());
        let v = Mat::<f64>::from_fn(n, r, |_, _| g.next());
        let bf = half::bf16::from_f64;
        let base: Vec<half::bf16> = (0..m * n).map(|_| bf(g.next())).collect();
        let ft: Vec<half::bf16> = (0..m * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                let d: f64 = (0..r).map(|t| u[(i, t)] * v[(j, t)]).sum();
                bf(base[k].to_f64() + 0.02 * d)
            })
            .collect();
        let mut with_inf = ft.clone();
        with_inf[77 * n + 5] = half::bf16::INFINITY;
        for (ft, pair) in [(ft, true), (with_inf, false)] {
            let src = PairRows {
                base: base.clone(),
                ft,
                m,
                n,
            };
            let opts = LowRankOptions {
                dense_budget_bytes: 0,
                block_bytes: 4 * n * 50,
                min_block_rows: 1,
                ..LowRankOptions::default()
            };
            let mut op = Operator::new(&src, &opts, Cancel::never()).unwrap();
            let d = decompose(&mut op, "a", 8, 4, 1, 0).unwrap();
            let want = if pair {
                Precision::Bf16Pair
            } else {
                Precision::F32Bf16Sketch
            };
            assert_eq!(op.precision(), want);
            let f32_opts = LowRankOptions {
                tiles: false,
                ..opts.clone()
            };
            let mut op = Operator::new(&src, &f32_opts, Cancel::never()).unwrap();
            let e = decompose(&mut op, "a", 8, 4, 1, 0).unwrap();
            assert_eq!(op.precision(), Precision::F32);
            // A fallback costs one pair pass, not one per product.
            assert_eq!(d.reads, e.reads + usize::from(!pair), "reads (pair {pair})");
            // The planted values to the f32 products' rounding; beyond them, rounding
            // noise, whose Ritz values move with the subspace the sketch found (its range
            // products run in bf16 either way but on different roundings of Δ).
            for (i, (x, y)) in d.s.iter().zip(&e.s).enumerate() {
                let tol = if i < r { 1e-6 * e.s[0] } else { 5e-3 * y };
                assert!((x - y).abs() <= tol, "σ{i} (pair {pair}): {x} vs {y}");
            }
            // The basis of the tile products is orthonormal to f64 rounding.
            let ortho = d.u.transpose() * &d.u - Mat::<f64>::identity(d.u.ncols(), d.u.ncols());
            assert!(ortho.norm_max() < 1e-12, "{}", ortho.norm_max());
        }
    }

    /// CholeskyQR2 gives an orthonormal Q with QR = Y on a well-conditioned Y, even one
    /// of condition number 10⁶; it declines an exactly rank-deficient Y (its Gram matrix
    /// is singular), for which `orthonormal` still returns an orthonormal basis.
    #[test]
    fn cholesky_qr_is_orthonormal_or_declines() {
        let mut g = Gaussian::new(5, "c", "test");
        let (m, l) = (500, 24);
        let x = Mat::<f64>::from_fn(m, l, |_, _| g.next());
        let scaled =
            Mat::<f64>::from_fn(m, l, |i, j| x[(i, j)] * 10f64.powf(-6.0 * j as f64 / 23.0));
        let ortho_err = |q: &Mat<f64>| {
            let e = q.transpose() * q - Mat::<f64>::identity(q.ncols(), q.ncols());
            e.norm_max()
        };
        for y in [&x, &scaled] {
            let (q, r) = cholesky_qr(y).expect("well enough conditioned");
            assert!(ortho_err(&q) < 1e-13, "{}", ortho_err(&q));
            assert!((&q * &r - y).norm_max() < 1e-12 * y.norm_max());
            let (u, s, v) = tall_svd("c", y, false).unwrap();
            let us = Mat::<f64>::from_fn(m, l, |i, j| u[(i, j)] * s[j]);
            assert!((us * v.transpose() - y).norm_max() < 1e-12 * y.norm_max());
            assert!(s.windows(2).all(|w| w[0] >= w[1]));
        }
        // Rank 8 in 24 columns.
        let a = Mat::<f64>::from_fn(m, 8, |_, _| g.next());
        let b = Mat::<f64>::from_fn(8, l, |_, _| g.next());
        let low = &a * &b;
        assert!(cholesky_qr(&low).is_none());
        assert!(ortho_err(&orthonormal(&low, false)) < 1e-12);
        assert!(ortho_err(&orthonormal(&low, true)) < 1e-12);
        // From the Gram matrix: for cond(Y) ≤ 10³ the values of CholeskyQR2's SVD to
        // u·cond², U orthonormal to the same; declined beyond (cond 10⁶ here) and for Δ
        // of rank 8.
        let mild = Mat::<f64>::from_fn(m, l, |i, j| x[(i, j)] * 10f64.powf(-2.0 * j as f64 / 23.0));
        let (u, s, v) = gram_svd(&mild).expect("cond ~ 100");
        let (_, s2, _) = tall_svd("c", &mild, false).unwrap();
        assert!(ortho_err(&u) < 1e-10, "{}", ortho_err(&u));
        assert!(ortho_err(&v) < 1e-13);
        for (a, b) in s.iter().zip(&s2) {
            assert!((a - b).abs() < 1e-10 * b, "{a} vs {b}");
        }
        let us = Mat::<f64>::from_fn(m, l, |i, j| u[(i, j)] * s[j]);
        assert!((us * v.transpose() - &mild).norm_max() < 1e-10 * mild.norm_max());
        assert!(gram_svd(&scaled).is_none());
        assert!(gram_svd(&low).is_none());
    }

    #[test]
    fn exact_path_is_taken_for_thin_matrices() {
        let mut g = Gaussian::new(1, "b", "test");
        let a = Mat::<f64>::from_fn(50, 10, |_, _| g.next());
        let src = MatrixRows {
            a: a.clone(),
            single: false,
        };
        let r = run(&src, 16, &LowRankOptions::default());
        assert_eq!(r.method, crate::lowrank::Method::Exact);
        let e = a.singular_values().unwrap();
        for (x, y) in r.s.iter().zip(&e) {
            assert!((x - y).abs() < 1e-12);
        }
    }
}
