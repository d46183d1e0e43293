//! The low-rank stage: each modified matrix's delta streamed in row blocks from both
//! checkpoints into the randomized SVD ([`crate::lowrank`]), the rank rule and verdict,
//! the LoRA factors, and the adapter's contents by the PEFT policy ([`crate::peft`]);
//! journaled per matrix so `--resume` redoes nothing, and stopped within a block on a
//! cancel.

use super::diff::lock;
use super::*;

/// Options of the low-rank stage (`compare` without `--no-lora`, and `extract-lora`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LoraOptions {
    pub lowrank: LowRankOptions,
    /// Extract factors; when false the deltas are only analysed.
    pub extract: bool,
    /// Leaf module names to extract (`None`: every changed matrix).
    pub modules: Option<Vec<String>>,
    /// Storage dtype of the factors (`None`: the base tensor's, F32 for non-16-bit bases).
    pub dtype: Option<DType>,
    /// Give every module exactly the fixed rank of the rank rule.
    pub uniform_rank: bool,
    /// Leave changed 1-D tensors out of the adapter (with a note) instead of saving them
    /// whole through `modules_to_save`.
    pub skip_undecomposable: bool,
    /// Worker threads; `None` for all cores.
    pub threads: Option<usize>,
    /// `--task-type`: overrides the task type read from `config.json`.
    #[serde(default)]
    pub task_type: Option<crate::peft::TaskOverride>,
    /// The runtime the adapter is written for.
    #[serde(default)]
    pub profile: crate::peft::Profile,
    /// Set (by a signal handler) to stop: the stage ends within a row block, the tensors
    /// not finished are listed in [`LoraParts::not_analysed`] and the report is marked
    /// incomplete.
    #[serde(skip)]
    pub cancel: Option<Arc<AtomicBool>>,
    /// Journal finished matrices in this directory (with the diff's fingerprint), and
    /// with `true` take the ones a journal there holds instead of redoing them
    /// (`--resume`). The journal is keyed by the diff's fingerprint plus these options.
    #[serde(skip)]
    pub journal: Option<(PathBuf, Fingerprint, bool)>,
}

/// Δ rows of a pair, decoded from windows of both checkpoints.
struct PairDelta<'a> {
    base: &'a Checkpoint,
    finetuned: &'a Checkpoint,
    pair: &'a TensorPair,
    m: usize,
    n: usize,
    /// Δ as the diff decoded it from its own windows, if it did.
    captured: Option<&'a Capture<'a>>,
}

/// Elements of Δ per chunk whose sums (Σ Δ², Σ ulp²/12) are taken on their own and then
/// added in chunk order, whether Δ is captured from the diff's windows or read by the
/// stage: the same sums in the same order give the same bits, so an analysis does not
/// depend on which path fed it. The diff's windows are whole chunks (1 MiB of a 16-bit
/// dtype is two); other windows are not captured.
const CHUNK: usize = 1 << 18;

/// What the diff computes from Δ of one matrix while it compares its windows, so the
/// low-rank analysis that follows (during the diff) does not read the tensor again
/// (re-reading and decoding a streamed Δ was half of a `compare` of a full fine-tune of
/// the qwen3-32b shape, BENCHMARKS.md):
/// - a Δ the analysis holds in memory: all of it, decoded to f32 ([`CHUNK`]s);
/// - a streamed Δ: the first product of the sketch, ΔΩ, block by block of the rows
///   the stage's own pass would use ([`lowrank::rsvd::RowProduct`]); the diff then
///   cuts this tensor's windows at those blocks ([`Capture::window_elements`]).
pub(super) struct Capture<'a> {
    len: usize,
    dtypes: (DType, DType),
    kind: Kind,
    pool: &'a BufferPool,
    state: Mutex<Captured>,
}

enum Kind {
    Held,
    /// The first product of a streamed Δ (m × n): Ω of width `l` for tensor `name`,
    /// blocks of `block_rows` rows.
    Sketch {
        name: String,
        seed: u64,
        l: usize,
        m: usize,
        n: usize,
        block_rows: usize,
        products: lowrank::rsvd::Products,
        /// Also sum YᵀΔ, for B in the same pass ([`lowrank::first_sketch`]).
        cross: bool,
    },
}

#[derive(Default)]
struct Captured {
    /// Held: Δ. Sketch: one block of Δ, decoded before its product.
    buf: Vec<f32>,
    /// Per chunk (held) or block (sketch): (Σ Δ², Σ ulp²/12), `None` until decoded.
    sums: Vec<Option<(f64, f64)>>,
    /// Sketch: the product ΔΩ, block by block.
    product: Option<lowrank::rsvd::RowProduct>,
    /// A window could not be captured (not whole chunks or blocks, identical bytes):
    /// the stage reads Δ itself.
    broken: bool,
    /// Seconds of the sketch's products, counted in the analysis's time (Δ's decoding
    /// is the diff's own, shared).
    seconds: f64,
    /// Sketch: the block the sums of YᵀΔ take next. Its f32 sums depend on the order of
    /// the blocks, and the diff's workers may compare them out of order; the stage's own
    /// pass adds them in row order.
    next_block: usize,
    /// A block came out of order while YᵀΔ was summed: the stage computes the sketch
    /// itself, in row order, so that its bits never depend on the diff's schedule.
    cross_lost: bool,
}

/// Buffers of captured deltas, reused from tensor to tensor: fresh pages cost ~20x more
/// to touch than warm ones (BENCHMARKS.md).
#[derive(Default)]
pub(super) struct BufferPool(Mutex<Vec<Vec<f32>>>);

impl BufferPool {
    /// Buffers kept: about one per tensor in flight on two threads.
    const KEPT: usize = 2;

    /// A buffer of `len` values (contents unspecified).
    fn take(&self, len: usize) -> Vec<f32> {
        let mut kept = lock(&self.0);
        let i = kept
            .iter()
            .position(|b| b.capacity() >= len)
            .or_else(|| (!kept.is_empty()).then_some(0));
        let mut buf = i.map(|i| kept.swap_remove(i)).unwrap_or_default();
        drop(kept);
        buf.resize(len, 0.0);
        buf
    }

    fn give(&self, buf: Vec<f32>) {
        let mut kept = lock(&self.0);
        if buf.capacity() > 0 && kept.len() < Self::KEPT {
            kept.push(buf);
        }
    }
}

impl<'a> Capture<'a> {
    /// The elements per window the diff must cut this tensor into, when it must (a
    /// sketch's blocks of rows); held captures take any windows of whole [`CHUNK`]s.
    pub(super) fn window_elements(&self) -> Option<u64> {
        match &self.kind {
            Kind::Held => None,
            Kind::Sketch { n, block_rows, .. } => Some((n * block_rows) as u64),
        }
    }

    /// Compares the window at element `start` (the diff's bytes of both sides) with the
    /// diff's kernel and takes Δ in the same pass ([`kernels::fast::diff_delta`]): the
    /// window's sums, or `None` when this capture cannot take the window (the diff then
    /// compares it alone and the stage reads Δ itself).
    pub(super) fn diff_window(
        &self,
        start: u64,
        wa: &[u8],
        wb: &[u8],
        threshold: f64,
    ) -> Option<Accum> {
        let start = start as usize;
        let len = wa.len() / self.dtypes.0.size();
        let mut st = lock(&self.state);
        let acc = self.take_window(&mut st, start, len, wa, wb, threshold);
        if acc.is_none() {
            st.broken = true;
        }
        acc
    }

    fn take_window(
        &self,
        st: &mut Captured,
        start: usize,
        len: usize,
        wa: &[u8],
        wb: &[u8],
        threshold: f64,
    ) -> Option<Accum> {
        let (da, db) = self.dtypes;
        let rounding = db.rounding()?;
        if st.broken || wb.len() != len * db.size() || start + len > self.len {
            return None;
        }
        match &self.kind {
            Kind::Held => {
                if !start.is_multiple_of(CHUNK)
                    || (!len.is_multiple_of(CHUNK) && start + len != self.len)
                {
                    return None;
                }
                if st.buf.is_empty() {
                    st.buf = self.pool.take(self.len);
                    st.sums = vec![None; self.len.div_ceil(CHUNK)];
                }
                let out = &mut st.buf[start..start + len];
                let (acc, sums) =
                    kernels::fast::diff_delta(wa, da, wb, db, threshold, out, rounding, CHUNK);
                for (i, (f2, var)) in sums.into_iter().enumerate() {
                    // A rounding error uniform in ±ulp/2 has variance ulp²/12.
                    st.sums[start / CHUNK + i] = Some((f2, var / 12.0));
                }
                Some(acc)
            }
            Kind::Sketch {
                name,
                seed,
                l,
                m,
                n,
                block_rows,
                products,
                cross,
            } => {
                let block = n * block_rows;
                if !start.is_multiple_of(block) || (len != block && start + len != self.len) {
                    return None;
                }
                if st.product.is_none() {
                    st.sums = vec![None; m.div_ceil(*block_rows)];
                    let p = lowrank::rsvd::RowProduct::omega(
                        products.range_tiles(),
                        products.range_dot(),
                        *seed,
                        name,
                        (*m, *n),
                        *l,
                    );
                    // As the stage's pass: YᵀΔ only where the rows come in f32.
                    let pairs = (da, db) == (DType::BF16, DType::BF16) && p.takes_pairs();
                    st.product = Some(if *cross && !pairs {
                        p.with_cross(*n)
                    } else {
                        p
                    });
                }
                let Captured {
                    buf,
                    sums,
                    product,
                    seconds,
                    next_block,
                    cross_lost,
                    ..
                } = st;
                let product = product.as_mut()?;
                let b = start / block;
                if product.has_cross() && b != *next_block {
                    // Y's rows are the same in any order; YᵀΔ's f32 sums are not.
                    product.drop_cross();
                    *cross_lost = true;
                }
                *next_block = b + 1;
                // Both sides in bf16: the product takes their values as they are, and Δ
                // is not written (the stage's own pass does the same, `Operator`).
                let pairs = (da, db) == (DType::BF16, DType::BF16) && product.takes_pairs();
                if !pairs && buf.is_empty() {
                    *buf = vec![0.0; block.min(self.len)];
                }
                let (acc, s) = if pairs {
                    kernels::fast::diff_sums(wa, da, wb, db, threshold, rounding, len)
                } else {
                    let rows = &mut buf[..len];
                    kernels::fast::diff_delta(wa, da, wb, db, threshold, rows, rounding, len)
                };
                let (f2, var) = s.first().copied().unwrap_or_default();
                sums[start / block] = Some((f2, var / 12.0));
                let t0 = std::time::Instant::now();
                if pairs {
                    product.add_pair(start / n, wa, wb);
                } else {
                    product.add(start / n, &buf[..len]);
                }
                *seconds += t0.elapsed().as_secs_f64();
                Some(acc)
            }
        }
    }

    /// Gives back what the analysis did not take (the diff calls it after the tensor's
    /// last window and its analysis), so an unused capture holds no memory for the rest of
    /// the run.
    pub(super) fn release(&self) {
        let mut st = lock(&self.state);
        let buf = std::mem::take(&mut st.buf);
        if matches!(self.kind, Kind::Held) {
            self.pool.give(buf);
        }
        st.sums = Vec::new();
        st.product = None;
        st.broken = true;
    }

    /// Seconds of the products computed so far.
    fn seconds(&self) -> f64 {
        lock(&self.state).seconds
    }

    /// This window's bytes are identical: Δ is zero there but its rounding sum is not,
    /// and a tensor with such windows is rarely modified: the stage reads it itself.
    pub(super) fn skip(&self) {
        lock(&self.state).broken = true;
    }

    /// The sums of every chunk or block, in order, once all are known.
    fn total(st: &Captured) -> Option<(f64, f64)> {
        let mut total = (0.0, 0.0);
        for s in &st.sums {
            let (f2, var) = (*s)?;
            total.0 += f2;
            total.1 += var;
        }
        Some(total)
    }

    /// A held capture's Δ, swapped into `out` (whose buffer goes back to the pool), with
    /// its sums; `None` unless every chunk was decoded.
    fn take_into(&self, out: &mut Vec<f32>) -> Option<(f64, f64)> {
        let mut st = lock(&self.state);
        if !matches!(self.kind, Kind::Held) || st.broken || st.buf.len() != self.len {
            return None;
        }
        let total = Self::total(&st)?;
        std::mem::swap(out, &mut st.buf);
        self.pool.give(std::mem::take(&mut st.buf));
        st.sums.clear();
        Some(total)
    }

    /// A sketch capture's ΔΩ for Ω of width `l`, with its sums; `None` unless every
    /// block was taken.
    fn take_sketch(&self, width: usize) -> Option<(lowrank::rsvd::Sketch, (f64, f64))> {
        let mut st = lock(&self.state);
        match self.kind {
            Kind::Sketch { l, .. } if l == width && !st.broken && !st.cross_lost => {}
            _ => return None,
        }
        let total = Self::total(&st)?;
        st.buf = Vec::new();
        Some((st.product.take()?.finish_sketch()?, total))
    }
}

impl Drop for Capture<'_> {
    fn drop(&mut self) {
        if matches!(self.kind, Kind::Held) {
            let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
            self.pool.give(std::mem::take(&mut st.buf));
        }
    }
}

/// The sums of [`delta_chunk`] of two bf16 windows, with its bits, without Δ (for the
/// products that take both sides' values as they are).
fn pair_sums(a: &[u8], b: &[u8]) -> (f64, f64) {
    let (bits, emin) = DType::BF16.rounding().expect("bf16 rounds");
    let (f2, var) = kernels::fast::delta_sums(a, DType::BF16, b, DType::BF16, bits, emin);
    (f2, var / 12.0)
}

/// Δ of one chunk in f32 and its sums (Σ Δ², Σ ulp²/12), the same computation whether
/// the chunk comes from the diff's window or the stage's read.
fn delta_chunk(a: &[u8], da: DType, b: &[u8], db: DType, out: &mut [f32]) -> (f64, f64) {
    let (bits, emin) = db.rounding().expect("a float dtype of at most 16 bits");
    let (f2, var) = kernels::fast::delta_f32(a, da, b, db, out, bits, emin);
    // A rounding error uniform in ±ulp/2 has variance ulp²/12.
    (f2, var / 12.0)
}

impl PairDelta<'_> {
    fn dtypes(&self) -> (DType, DType) {
        (
            *self.pair.base.dtype.as_ref().expect("checked"),
            *self.pair.finetuned.dtype.as_ref().expect("checked"),
        )
    }

    /// The stored bytes of rows `r0..r1` of both tensors.
    fn windows(&self, r0: usize, r1: usize) -> Result<(Window, Window)> {
        self.element_windows(r0 * self.n, (r1 - r0) * self.n)
    }

    /// The stored bytes of elements `start..start + len` of both tensors.
    fn element_windows(&self, start: usize, len: usize) -> Result<(Window, Window)> {
        let (da, db) = self.dtypes();
        let (start, len) = (start as u64, len as u64);
        let (sa, sb) = (da.size() as u64, db.size() as u64);
        let wa = self.base.read(&self.pair.base, start * sa, len * sa)?;
        let wb = self
            .finetuned
            .read(&self.pair.finetuned, start * sb, len * sb)?;
        Ok((wa, wb))
    }

    /// [`Self::windows`], with the quantization steps of each encoded side, decoded with
    /// its values (`None` for a side stored as plain elements, or whose format has no step
    /// model: taken as exact).
    #[allow(clippy::type_complexity)]
    fn windows_and_steps(
        &self,
        r0: usize,
        r1: usize,
    ) -> Result<((Window, Option<Window>), (Window, Option<Window>))> {
        let (da, db) = self.dtypes();
        let (start, len) = ((r0 * self.n) as u64, ((r1 - r0) * self.n) as u64);
        let (sa, sb) = (da.size() as u64, db.size() as u64);
        let a = self
            .base
            .read_with_steps(&self.pair.base, start * sa, len * sa)?;
        let b = self
            .finetuned
            .read_with_steps(&self.pair.finetuned, start * sb, len * sb)?;
        Ok((a, b))
    }

    /// After using the windows: an error if a shard shrank while they were read in place.
    fn intact(&self, wa: &Window, wb: &Window) -> Result<()> {
        self.base.check(&self.pair.base, wa)?;
        self.finetuned.check(&self.pair.finetuned, wb)
    }
}

impl DeltaRows for PairDelta<'_> {
    fn nrows(&self) -> usize {
        self.m
    }
    fn ncols(&self) -> usize {
        self.n
    }
    fn read_rows(&self, r0: usize, r1: usize, out: &mut [f64]) -> Result<(f64, f64)> {
        let (da, db) = self.dtypes();
        // The fine-tuned side's rounding, or for an encoded side its quantization step
        // per element; an encoded base's steps too (both sides of a quantized pair carry
        // their quantization error into Δ). A plain base is taken as exact.
        let ((win_a, steps_a), (win_b, steps_b)) = self.windows_and_steps(r0, r1)?;
        let (wa, wb) = (&win_a[..], &win_b[..]);
        let sb = db.size();
        decode_f64(da, wa, out);
        let (bits, emin) = self.pair.finetuned.rounding().unwrap_or((52, -1022));
        // ulp² = (2^e)², e = max(⌊log₂|v|⌋, e_min) − bits, built from the exponent bits.
        let ulp2 = |v: f64, bits: i32, emin: i32| {
            let e = ((((v.to_bits() >> 52) & 0x7ff) as i32) - 1023).max(emin) - bits;
            f64::from_bits(((2 * e + 1023).max(1) as u64) << 52)
        };
        // Σ step² of each encoded side's steps (f32 values, squared and summed in f64).
        let sum_sq = |w: &Option<Window>| -> f64 {
            w.as_ref().map_or(0.0, |w| {
                w.chunks_exact(4)
                    .map(|c| {
                        let s = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
                        s * s
                    })
                    .sum()
            })
        };
        let plain_ft = !self.pair.finetuned.is_encoded();
        let mut tmp = [0f64; 1024];
        let (mut f2, mut var) = (0.0, sum_sq(&steps_a) + sum_sq(&steps_b));
        for (o, chunk) in out.chunks_mut(1024).zip(wb.chunks(1024 * sb)) {
            let t = &mut tmp[..o.len()];
            decode_f64(db, chunk, t);
            for (x, &y) in o.iter_mut().zip(t.iter()) {
                let d = y - *x;
                // Non-finite values cannot be decomposed; treat them as no change.
                *x = if d.is_finite() { d } else { 0.0 };
                f2 += *x * *x;
                if plain_ft {
                    var += ulp2(y, bits, emin);
                }
            }
        }
        self.intact(&win_a, &win_b)?;
        if let Some(w) = &steps_a {
            self.base.check(&self.pair.base, w)?;
        }
        if let Some(w) = &steps_b {
            self.finetuned.check(&self.pair.finetuned, w)?;
        }
        // A rounding error uniform in ±ulp/2 (±step/2) has variance ulp²/12.
        Ok((f2, var / 12.0))
    }

    fn read_rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<(f64, f64)> {
        let (da, db) = self.dtypes();
        if !self.single_precision() {
            let mut tmp = vec![0f64; out.len()];
            let st = self.read_rows(r0, r1, &mut tmp)?;
            out.iter_mut().zip(tmp).for_each(|(o, t)| *o = t as f32);
            return Ok(st);
        }
        let (win_a, win_b) = self.windows(r0, r1)?;
        let st = delta_chunk(&win_a, da, &win_b, db, out);
        self.intact(&win_a, &win_b)?;
        Ok(st)
    }

    fn sketched(&self, l: usize) -> Option<(lowrank::rsvd::Sketch, (f64, f64))> {
        self.captured?.take_sketch(l)
    }

    fn bf16_pair(&self) -> bool {
        self.dtypes() == (DType::BF16, DType::BF16)
    }

    fn bf16_pair_rows(
        &self,
        r0: usize,
        r1: usize,
        sums: bool,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Option<Result<(f64, f64)>> {
        if !self.bf16_pair() {
            return None;
        }
        Some(self.windows(r0, r1).and_then(|(wa, wb)| {
            let st = if sums {
                pair_sums(&wa, &wb)
            } else {
                (0.0, 0.0)
            };
            f(&wa, &wb);
            self.intact(&wa, &wb)?;
            Ok(st)
        }))
    }

    fn read_all_f32(
        &self,
        out: &mut Vec<f32>,
        cancel: lowrank::Cancel<'_>,
    ) -> Option<Result<(f64, f64)>> {
        if !self.single_precision() {
            return None;
        }
        if let Some(st) = self.captured.and_then(|c| c.take_into(out)) {
            return Some(Ok(st));
        }
        let (da, db) = self.dtypes();
        let len = self.m * self.n;
        out.resize(len, 0.0);
        let mut total = (0.0, 0.0);
        for c0 in (0..len).step_by(CHUNK) {
            let c1 = (c0 + CHUNK).min(len);
            let read = cancel
                .check()
                .and_then(|()| self.element_windows(c0, c1 - c0));
            let (win_a, win_b) = match read {
                Ok(w) => w,
                Err(e) => return Some(Err(e)),
            };
            let st = delta_chunk(&win_a, da, &win_b, db, &mut out[c0..c1]);
            if let Err(e) = self.intact(&win_a, &win_b) {
                return Some(Err(e));
            }
            total.0 += st.0;
            total.1 += st.1;
        }
        Some(Ok(total))
    }

    fn single_precision(&self) -> bool {
        f32_products(self.dtypes())
    }

    fn bf16_products(&self) -> bool {
        bf16_products(self.dtypes())
    }
}

/// Whether the products with Δ of a pair stored so run in f32 (both sides 16- or 8-bit
/// floats; see [`lowrank::rsvd`]).
fn f32_products((da, db): (DType, DType)) -> bool {
    let narrow = |d: DType| matches!(d, DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2);
    narrow(da) && narrow(db)
}

/// Whether the range sketch of such a pair may round Δ to bf16: the fine-tuned side,
/// whose rounding sets the noise floor, is stored in bf16 or fp8, with at most bf16's 8
/// significant bits ([`lowrank::tiles`]).
fn bf16_products((da, db): (DType, DType)) -> bool {
    f32_products((da, db)) && matches!(db, DType::BF16 | DType::F8E4M3 | DType::F8E5M2)
}

/// What is extracted from a modified 2-D tensor that becomes a LoRA module: nothing
/// when extraction is off or its module is not asked for; else the factors in the base's
/// 16-bit dtype, or for a quantized base (decoded to f32) in bf16, the dtype its
/// dequantized model is run in.
fn matrix_target(
    p: &TensorPair,
    opts: &LoraOptions,
    uniform_rank: Option<usize>,
) -> Option<Target> {
    let da = *p.base.dtype.as_ref().expect("compared tensors have dtypes");
    let module = pairing::module_type(&p.name);
    let wanted = opts.extract && opts.modules.as_ref().is_none_or(|ms| ms.contains(&module));
    let dtype = opts
        .dtype
        .unwrap_or(if matches!(da, DType::BF16 | DType::F16) {
            da
        } else if p.base.is_encoded() {
            DType::BF16
        } else {
            DType::F32
        });
    wanted.then_some(Target {
        dtype,
        uniform_rank,
    })
}

/// The low-rank analyses run *during* the diff: a matrix that the stage will analyse
/// as a LoRA module is analysed by the diff's worker right after its last window, while
/// its bytes are still in the page cache. After the diff, [`lora_parts`] takes these
/// results instead of reading the matrix again.
///
/// Why: the stage reads each matrix again (one to three passes). Run after the whole
/// diff, those passes read from the disk again for a pair larger than memory, and the
/// diff of a pair read from disk leaves the cores idle while the stage leaves the disk
/// idle; run alongside, the reads hit the page cache and the two overlap.
///
/// Only matrices whose treatment cannot depend on the rest of the comparison are taken
/// here: modified 2-D float tensors of the same storage on both sides (a pair stored
/// differently may be quantization-only, which skips the stage), not resized, not part
/// of a task head or a router (saved whole). An embedding or LM head stored twice under
/// two names (tied) is known only once every tensor is compared: the stage then drops
/// the analysis of the duplicate, the only work done here in vain. The analysis is the
/// same call with the same options as the stage's, so the results are the same bytes;
/// the stage checks the target matches before it takes one.
pub struct DuringDiff<'a> {
    base: &'a Checkpoint,
    finetuned: &'a Checkpoint,
    opts: LoraOptions,
    facts: ModelFacts,
    names: std::collections::BTreeSet<String>,
    uniform_rank: Option<usize>,
    done: Mutex<BTreeMap<String, DoneDuringDiff>>,
    /// The stage's journal, opened now: a matrix analysed during the diff is journaled
    /// at once, so `--resume` after a kill mid-diff does not redo it.
    journal: Option<Mutex<LowRankJournal>>,
    recovered: BTreeMap<String, (TensorSpectrum, Option<Factors>)>,
    journal_failure: Mutex<Option<Error>>,
    pool: BufferPool,
}

/// One matrix analysed during the diff.
struct DoneDuringDiff {
    target: Option<Target>,
    spectrum: TensorSpectrum,
    factors: Option<Factors>,
}

impl<'a> DuringDiff<'a> {
    /// For `compare`'s default run: the stage's options as it will run with them.
    pub fn new(
        base: &'a Checkpoint,
        finetuned: &'a Checkpoint,
        opts: &LoraOptions,
    ) -> Result<Self> {
        let uniform_rank = uniform_rank(opts)?;
        let paired = pairing::pair(base.tensors(), finetuned.tensors());
        let config = finetuned.config.as_ref().or(base.config.as_ref());
        // Each matrix's linear algebra stays on the diff's worker that runs it.
        faer::set_global_parallelism(faer::Par::Seq);
        let (journal, recovered) = open_journal(opts)?;
        Ok(DuringDiff {
            journal,
            recovered,
            journal_failure: Mutex::new(None),
            base,
            finetuned,
            opts: opts.clone(),
            facts: ModelFacts::from_config(config, opts.task_type),
            names: paired.pairs.into_iter().map(|p| p.name).collect(),
            uniform_rank,
            done: Mutex::new(BTreeMap::new()),
            pool: BufferPool::default(),
        })
    }

    fn eligible(&self, p: &TensorPair, m: &TensorMetrics) -> bool {
        m.is_modified() && m.compared_rows.is_none() && self.eligible_pair(p)
    }

    /// Whether `p`, if the diff finds it modified, is analysed during the diff.
    fn eligible_pair(&self, p: &TensorPair) -> bool {
        let (Ok(da), Ok(db)) = (&p.base.dtype, &p.finetuned.dtype) else {
            return false;
        };
        let name = p.name.as_str();
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        let has_prefix = |prefix: &str| {
            self.names
                .range(prefix.to_string()..)
                .next()
                .is_some_and(|n| n.starts_with(prefix))
        };
        p.base.shape.len() == 2
            && p.finetuned.shape == p.base.shape
            && p.leading_rows.is_none()
            && !da.is_integer()
            && !db.is_integer()
            && p.base.dtype_name() == p.finetuned.dtype_name()
            && self.facts.head_of(name).is_none()
            && !(self.facts.fused_experts() && peft::is_router(module, has_prefix))
    }

    /// Where the diff decodes Δ of `p` as it compares it, when `p` will be analysed
    /// during the diff with Δ held in memory ([`Capture`]).
    pub(super) fn capture(&self, p: &TensorPair) -> Option<Capture<'_>> {
        if !self.eligible_pair(p) || self.recovered.contains_key(&p.name) {
            return None;
        }
        let dtypes = (
            *p.base.dtype.as_ref().ok()?,
            *p.finetuned.dtype.as_ref().ok()?,
        );
        if !f32_products(dtypes) {
            return None;
        }
        let lo = &self.opts.lowrank;
        let (m, n) = (p.base.shape[0], p.base.shape[1]);
        let products = lowrank::rsvd::Products::choose(true, lo.tiles && bf16_products(dtypes));
        let kind = if lowrank::rsvd::Operator::holds(lo, m, n, products) {
            Kind::Held
        } else {
            let extract = matrix_target(p, &self.opts, self.uniform_rank).is_some();
            let (l, cross) = lowrank::first_sketch(lo, extract, m, n)?;
            Kind::Sketch {
                name: p.name.clone(),
                seed: lo.seed,
                l,
                cross,
                m,
                n,
                block_rows: lowrank::rsvd::Operator::rows_per_block(lo, n, products),
                products,
            }
        };
        Some(Capture {
            len: m * n,
            dtypes,
            kind,
            pool: &self.pool,
            state: Mutex::default(),
        })
    }

    /// Called by the diff when a tensor is compared: analyses it now if it is eligible,
    /// from Δ `captured` while it was compared when that holds all of it. A failed or
    /// stopped analysis is left for the stage, which meets the same error.
    pub(super) fn tensor_compared(
        &self,
        p: &TensorPair,
        m: &TensorMetrics,
        captured: Option<&Capture<'_>>,
    ) {
        let cancel = lowrank::Cancel::new(self.opts.cancel.as_deref());
        if !self.eligible(p, m) || cancel.is_set() || self.recovered.contains_key(&p.name) {
            return;
        }
        let src = PairDelta {
            base: self.base,
            finetuned: self.finetuned,
            pair: p,
            m: p.base.shape[0],
            n: p.base.shape[1],
            captured,
        };
        let target = matrix_target(p, &self.opts, self.uniform_rank);
        if let Ok((mut spectrum, factors)) =
            lowrank::analyze(&src, &p.name, &self.opts.lowrank, target, cancel)
        {
            // The part of the analysis the diff's windows did.
            spectrum.time += captured.map_or(0.0, Capture::seconds);
            if let Some(j) = &self.journal
                && let Err(e) = lock(j).record(&p.name, &spectrum, factors.as_ref())
            {
                lock(&self.journal_failure).get_or_insert(e);
            }
            lock(&self.done).insert(
                p.name.clone(),
                DoneDuringDiff {
                    target,
                    spectrum,
                    factors,
                },
            );
        }
    }

    /// The analysis of `name` done during the diff, if it was done for `target`.
    fn take(
        &self,
        name: &str,
        target: Option<Target>,
    ) -> Option<(TensorSpectrum, Option<Factors>)> {
        let d = lock(&self.done).remove(name)?;
        (d.target == target).then_some((d.spectrum, d.factors))
    }
}

/// The low-rank journal of `opts.journal` (keyed by the diff's fingerprint plus these
/// options) and, with `--resume`, the matrices it holds.
type Opened = (
    Option<Mutex<LowRankJournal>>,
    BTreeMap<String, (TensorSpectrum, Option<Factors>)>,
);

fn open_journal(opts: &LoraOptions) -> Result<Opened> {
    match &opts.journal {
        None => Ok((None, BTreeMap::new())),
        Some((dir, fp, resume)) => {
            let options = serde_json::to_string(opts).unwrap_or_default();
            let fp = Fingerprint::new(format!("{} lowrank={options}", fp.description));
            let (j, done) = LowRankJournal::open(dir, &fp, *resume)?;
            Ok((Some(Mutex::new(j)), done))
        }
    }
}

/// Runs the low-rank stage over the modified tensors of a comparison.
pub fn analyze_lora(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
) -> Result<LoraReport> {
    analyze_lora_with(base, finetuned, c, opts, &NoProgress)
}

/// [`analyze_lora`], reporting progress.
pub fn analyze_lora_with(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
) -> Result<LoraReport> {
    analyze_lora_after(base, finetuned, c, opts, progress, None)
}

/// [`analyze_lora_with`] after a diff that ran `during` ([`compare_during`]): the
/// matrices analysed then are not read again.
pub fn analyze_lora_after(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
    during: Option<&DuringDiff>,
) -> Result<LoraReport> {
    let parts = parts_in_pool(base, finetuned, c, opts, progress, during)?;
    Ok(assemble_lora(c, opts, parts))
}

/// The per-tensor half of [`analyze_lora`], for a shard's part.
pub fn analyze_lora_parts(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
) -> Result<LoraParts> {
    analyze_lora_parts_with(base, finetuned, c, opts, &NoProgress)
}

/// [`analyze_lora_parts`], reporting progress.
pub fn analyze_lora_parts_with(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
) -> Result<LoraParts> {
    parts_in_pool(base, finetuned, c, opts, progress, None)
}

fn parts_in_pool(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
    during: Option<&DuringDiff>,
) -> Result<LoraParts> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Threads(e.to_string()))?;
    // Tensors run in parallel; each one's linear algebra stays on its thread.
    faer::set_global_parallelism(faer::Par::Seq);
    pool.install(|| lora_parts_after(base, finetuned, c, opts, progress, during))
}

/// `--uniform-rank` as a rank, checked against the rank rule.
pub fn uniform_rank(opts: &LoraOptions) -> Result<Option<usize>> {
    match (opts.uniform_rank, opts.lowrank.rank_rule) {
        (false, _) => Ok(None),
        (true, RankRule::Fixed { rank }) => Ok(Some(rank)),
        (true, _) => Err(Error::InvalidOption(
            "--uniform-rank needs a fixed rank (--rank), not an energy or ratio rule".into(),
        )),
    }
}

/// The adapter-side name of an aligned tensor name: the fine-tuned model's own name,
/// which is the one the PEFT model built from that checkpoint's class uses.
pub fn adapter_name(c: &Comparison, aligned: &str) -> String {
    match &c.prefix {
        Some(p) if p.side == pairing::Side::Finetuned => format!("{}{aligned}", p.prefix),
        _ => aligned.to_string(),
    }
}

/// The facts of the fine-tuned model (its config, else the base's) the adapter follows.
pub fn model_facts(c: &Comparison, opts: &LoraOptions) -> ModelFacts {
    let config = c.finetuned.config.as_ref().or(c.base.config.as_ref());
    ModelFacts::from_config(config, opts.task_type)
}

/// Modified embedding tables and LM heads that are one storage under several names
/// (a checkpoint that stores tied weights twice): every name but the canonical one →
/// the canonical one. Equal shapes and bit-equal metrics in both models identify them.
fn tied_duplicates(c: &Comparison, facts: &ModelFacts) -> BTreeMap<String, String> {
    let tieable =
        |n: &str| facts.kind_of(n) == ModuleKind::Embedding || pairing::module_type(n) == "lm_head";
    let key = |m: &TensorMetrics| {
        (
            m.shape.clone(),
            m.l2_diff.to_bits(),
            m.base_l2.to_bits(),
            m.finetuned_l2.to_bits(),
            m.max_abs_diff.to_bits(),
            m.mean_abs_diff.to_bits(),
        )
    };
    let mut groups: BTreeMap<_, Vec<&str>> = BTreeMap::new();
    for (n, m) in c
        .results
        .iter()
        .filter(|(n, m)| m.is_modified() && tieable(n))
    {
        groups.entry(key(m)).or_default().push(n.as_str());
    }
    let mut out = BTreeMap::new();
    for names in groups.into_values().filter(|g| g.len() > 1) {
        // The input embedding is where PEFT applies a tied adapter.
        let rank = |n: &str| match pairing::module_type(n).as_str() {
            "shared" => 0,
            "lm_head" => 2,
            _ => 1,
        };
        let canon = *names
            .iter()
            .min_by(|a, b| rank(a).cmp(&rank(b)).then(natural_cmp(a, b)))
            .expect("groups are not empty");
        for n in names.iter().filter(|n| **n != canon) {
            out.insert(n.to_string(), canon.to_string());
        }
    }
    out
}

/// The per-tensor work of the low-rank stage (run in the caller's thread pool).
pub fn lora_parts(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
) -> Result<LoraParts> {
    lora_parts_after(base, finetuned, c, opts, progress, None)
}

/// [`lora_parts`], taking the matrices analysed during the diff from `during`.
fn lora_parts_after(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    c: &Comparison,
    opts: &LoraOptions,
    progress: &dyn Progress,
    during: Option<&DuringDiff>,
) -> Result<LoraParts> {
    let t0 = Instant::now();
    let facts = model_facts(c, opts);
    let paired = pairing::pair(base.tensors(), finetuned.tensors());
    let by_name: BTreeMap<&str, &TensorPair> =
        paired.pairs.iter().map(|p| (p.name.as_str(), p)).collect();
    let has_prefix = |prefix: &str| paired.pairs.iter().any(|q| q.name.starts_with(prefix));
    let tied = tied_duplicates(c, &facts);
    let uniform_rank = uniform_rank(opts)?;
    let mut skipped = Vec::new();
    let mut matrices: Vec<(&TensorPair, ModuleKind, Option<Target>)> = Vec::new();
    let mut vectors: Vec<&TensorPair> = Vec::new();
    let mut saved_whole: Vec<String> = Vec::new();
    for (name, m) in c.results.iter().filter(|(_, m)| m.is_modified()) {
        let p = by_name[name.as_str()];
        let da = *p.base.dtype.as_ref().expect("compared tensors have dtypes");
        let db = *p
            .finetuned
            .dtype
            .as_ref()
            .expect("compared tensors have dtypes");
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        let head = facts.head_of(name).is_some();
        if head || (facts.fused_experts() && peft::is_router(module, has_prefix)) {
            // Saved whole (a task head with the rest of its head, below); its matrices
            // are still analysed for the report.
            if !head {
                push_unique(&mut saved_whole, adapter_name(c, module));
            }
            if p.base.shape.len() == 2 && m.compared_rows.is_none() && !da.is_integer() {
                matrices.push((p, facts.kind_of(name), None));
            }
            continue;
        }
        if m.compared_rows.is_some() {
            skipped.push((
                name.clone(),
                "shape changed (resized): the delta of the new rows has no base; not extracted"
                    .into(),
            ));
        } else if da.is_integer() || db.is_integer() {
            skipped.push((name.clone(), "integer tensor: not decomposable".into()));
        } else if let Some(canon) = tied.get(name) {
            skipped.push((
                name.clone(),
                format!(
                    "tied to `{canon}` (one storage, stored twice): adapted once, through `{canon}`"
                ),
            ));
        } else if p.base.shape.len() == 2 {
            matrices.push((p, facts.kind_of(name), matrix_target(p, opts, uniform_rank)));
        } else if p.base.shape.len() <= 1 {
            vectors.push(p);
        } else {
            skipped.push((
                name.clone(),
                format!(
                    "{}-D tensor (fused experts or a convolution): not extracted; PEFT's \
                     target_parameters form for fused parameters is not written by weightdiff",
                    p.base.shape.len()
                ),
            ));
        }
    }

    tracing::info!(
        matrices = matrices.len(),
        vectors = vectors.len(),
        "low-rank analysis"
    );
    // The journal the analyses during the diff have been recording into, or a new one.
    let opened;
    let (journal, recovered) = match during {
        Some(d) => (&d.journal, &d.recovered),
        None => {
            opened = open_journal(opts)?;
            (&opened.0, &opened.1)
        }
    };
    let journal_failure: Mutex<Option<Error>> = Mutex::new(None);
    if let Some(e) = during.and_then(|d| lock(&d.journal_failure).take()) {
        return Err(e);
    }
    let cancel = lowrank::Cancel::new(opts.cancel.as_deref());
    let elements = |p: &TensorPair| p.base.shape.iter().product::<usize>() as u64;
    let elements_total: u64 = matrices.iter().map(|(p, _, _)| elements(p)).sum();
    let (tensors_done, elements_done) = (AtomicUsize::new(0), AtomicU64::new(0));
    let (during_diff, during_time) = (AtomicUsize::new(0), Mutex::new(0.0f64));
    let outs: Vec<Result<(TensorSpectrum, Option<Factors>)>> = matrices
        .par_iter()
        .map(|(p, _, target)| {
            let journaled = recovered.get(&p.name).cloned();
            if journaled.is_none() {
                cancel.check()?;
            }
            let src = PairDelta {
                base,
                finetuned,
                pair: p,
                m: p.base.shape[0],
                n: p.base.shape[1],
                captured: None,
            };
            let out = match journaled {
                Some(done) => Ok(done),
                None => match during.and_then(|d| d.take(&p.name, *target)) {
                    // Journaled when it was analysed.
                    Some(done) => {
                        during_diff.fetch_add(1, Ordering::Relaxed);
                        *lock(&during_time) += done.0.time;
                        Ok(done)
                    }
                    None => {
                        let out = lowrank::analyze(&src, &p.name, &opts.lowrank, *target, cancel);
                        if let (Ok((spectrum, factors)), Some(j)) = (&out, journal)
                            && let Err(e) = lock(j).record(&p.name, spectrum, factors.as_ref())
                        {
                            lock(&journal_failure).get_or_insert(e);
                        }
                        out
                    }
                },
            };
            if !matches!(out, Err(Error::Cancelled)) {
                let e = elements(p);
                progress.lowrank(LowRankUpdate {
                    tensors_done: tensors_done.fetch_add(1, Ordering::AcqRel) + 1,
                    tensors_total: matrices.len(),
                    elements_done: elements_done.fetch_add(e, Ordering::AcqRel) + e,
                    elements_total,
                    tensor: &p.name,
                });
            }
            out
        })
        .collect();

    if let Some(e) = journal_failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e);
    }
    if let Some(j) = journal {
        lock(j).sync()?;
    }
    let mut spectra = Vec::new();
    let mut extracted = Vec::new();
    let mut errors = BTreeMap::new();
    let mut not_analysed = Vec::new();
    for ((p, kind, _), out) in matrices.iter().zip(outs) {
        match out {
            Ok((spectrum, factors)) => {
                tracing::debug!(
                    tensor = %p.name,
                    detected_rank = ?spectrum.detected_rank,
                    method = %spectrum.method,
                    seconds = spectrum.time,
                    "low-rank analysis"
                );
                spectra.push((p.name.clone(), spectrum));
                if let Some(factors) = factors {
                    let tensor = adapter_name(c, &p.name);
                    extracted.push(ExtractedModule {
                        module: tensor
                            .strip_suffix(".weight")
                            .unwrap_or(&tensor)
                            .to_string(),
                        tensor: p.name.clone(),
                        kind: *kind,
                        factors,
                        bias: None,
                    });
                }
            }
            Err(Error::Cancelled) => not_analysed.push(p.name.clone()),
            Err(e) => {
                errors.insert(p.name.clone(), e.to_string());
            }
        }
    }

    // Bias deltas of the extracted modules, for PEFT's `lora_bias` (whether the adapter
    // can use it depends on every module: decided in `assemble_lora`).
    let mut bias_deltas = Vec::new();
    let extracted_tensors: std::collections::BTreeSet<&str> =
        extracted.iter().map(|e| e.tensor.as_str()).collect();
    for v in &vectors {
        let Some(module) = v.name.strip_suffix(".bias") else {
            continue;
        };
        if extracted_tensors.contains(format!("{module}.weight").as_str()) {
            let src = PairDelta {
                base,
                finetuned,
                pair: v,
                m: 1,
                n: v.base.shape.iter().product(),
                captured: None,
            };
            let mut delta = vec![0.0; src.n];
            src.read_rows(0, 1, &mut delta)?;
            bias_deltas.push((adapter_name(c, module), delta));
        }
    }

    // Candidates for saving whole: the modules of changed 1-D tensors (whether each is
    // saved depends on every tensor: is it extracted as a LoRA somewhere? decided in
    // `assemble_lora`, which a merge of shards runs too), task heads and routers.
    let mut candidates: Vec<SavedTensor> = Vec::new();
    let ft_names: Vec<&str> = finetuned.tensors().keys().map(String::as_str).collect();
    if opts.extract {
        // The PEFT task model saves its head whole by itself: the adapter must carry it,
        // changed or not, compared or only in the fine-tune.
        for head in facts.task_type.map_or(&[][..], |t| t.head_modules()) {
            let prefix = format!("{head}.");
            if ft_names.iter().any(|n| n.starts_with(&prefix)) {
                push_unique(&mut saved_whole, head.to_string());
            }
        }
        for module in &saved_whole {
            let prefix = format!("{module}.");
            for n in ft_names.iter().filter(|n| n.starts_with(&prefix)) {
                push_candidate(&mut candidates, finetuned, n)?;
            }
        }
        if !opts.skip_undecomposable {
            for v in &vectors {
                // A module extracted here as a LoRA is never saved whole as well: its
                // weight need not be read into memory (`assemble_lora` decides the rest).
                let aligned = v.name.rsplit_once('.').map_or("", |(m, _)| m);
                if extracted_tensors.contains(format!("{aligned}.weight").as_str()) {
                    continue;
                }
                let name = adapter_name(c, &v.name);
                let Some((module, _)) = name.rsplit_once('.') else {
                    continue;
                };
                let prefix = format!("{module}.");
                for n in ft_names
                    .iter()
                    .filter(|n| n.strip_prefix(&prefix).is_some_and(|r| !r.contains('.')))
                {
                    push_candidate(&mut candidates, finetuned, n)?;
                }
            }
        }
    }
    let parts = LoraParts {
        spectra,
        extracted,
        vectors: vectors.iter().map(|p| p.name.clone()).collect(),
        candidates,
        saved_whole,
        bias_deltas,
        skipped,
        errors,
        not_analysed,
        total_time: t0.elapsed().as_secs_f64(),
        during_diff: (
            during_diff.into_inner(),
            during_time.into_inner().unwrap_or_else(|p| p.into_inner()),
        ),
    };
    Ok(parts)
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// Adds the fine-tuned tensor `name` (stored bytes) as a candidate for saving whole.
fn push_candidate(out: &mut Vec<SavedTensor>, finetuned: &Checkpoint, name: &str) -> Result<()> {
    let key = format!("base_model.model.{name}");
    if out.iter().any(|c| c.key == key) {
        return Ok(());
    }
    let Some(t) = finetuned.tensors().get(name) else {
        return Ok(());
    };
    let dtype = *t.dtype.as_ref().map_err(|d| Error::Tensor {
        path: finetuned.path_of(t).to_path_buf(),
        tensor: name.to_string(),
        reason: format!("unsupported dtype {d}"),
    })?;
    out.push(SavedTensor {
        key,
        dtype,
        shape: t.shape.clone(),
        bytes: finetuned.read(t, 0, t.nbytes())?.to_vec(),
    });
    Ok(())
}

/// What the low-rank stage computed for some tensors, before the decisions that need all
/// of them (which modules are saved whole, whether biases go in, the verdict). A shard
/// stores this; a merge concatenates the shards' parts and assembles them as a single run
/// would.
#[derive(Debug, Clone, Default)]
pub struct LoraParts {
    pub spectra: Vec<(String, TensorSpectrum)>,
    pub extracted: Vec<ExtractedModule>,
    /// Changed 1-D tensors (aligned names).
    pub vectors: Vec<String>,
    /// Fine-tuned tensors of modules that may be saved whole (`modules_to_save`).
    pub candidates: Vec<SavedTensor>,
    /// Modules saved whole whatever else is extracted: task heads, MoE routers.
    pub saved_whole: Vec<String>,
    /// Δ of the bias of extracted modules (module path → values).
    pub bias_deltas: Vec<(String, Vec<f64>)>,
    pub skipped: Vec<(String, String)>,
    pub errors: BTreeMap<String, String>,
    /// Matrices left unanalysed because the stage was stopped (`cancel`).
    pub not_analysed: Vec<String>,
    pub total_time: Second,
    /// Matrices analysed during the diff ([`DuringDiff`]) and the seconds their analyses
    /// took, summed over the diff's workers (not in `total_time`).
    pub during_diff: (usize, Second),
}

impl LoraParts {
    /// Adds another shard's parts.
    pub fn extend(&mut self, o: LoraParts) {
        self.spectra.extend(o.spectra);
        self.extracted.extend(o.extracted);
        self.vectors.extend(o.vectors);
        for c in o.candidates {
            if !self.candidates.iter().any(|x| x.key == c.key) {
                self.candidates.push(c);
            }
        }
        for m in o.saved_whole {
            push_unique(&mut self.saved_whole, m);
        }
        self.bias_deltas.extend(o.bias_deltas);
        self.skipped.extend(o.skipped);
        self.errors.extend(o.errors);
        self.not_analysed.extend(o.not_analysed);
        self.total_time += o.total_time;
        self.during_diff.0 += o.during_diff.0;
        self.during_diff.1 += o.during_diff.1;
    }
}

/// Why a profile leaves an extracted module out, if it does.
fn profile_excludes(profile: Profile, e: &ExtractedModule) -> Option<&'static str> {
    match profile {
        Profile::Peft => None,
        Profile::Vllm if e.kind == ModuleKind::Embedding => {
            Some("left out (--profile vllm): vLLM loads no LoRA on embedding tables")
        }
        Profile::Vllm if pairing::module_type(&e.tensor) == "lm_head" => {
            Some("left out (--profile vllm): vLLM loads no LoRA on the LM head")
        }
        Profile::Vllm => None,
    }
}

/// Turns parts into the report: natural order everywhere, `modules_to_save`, `lora_bias`
/// and the profile's rules decided over all tensors, the verdict computed from the
/// comparison and the spectra.
pub fn assemble_lora(c: &Comparison, opts: &LoraOptions, mut parts: LoraParts) -> LoraReport {
    let facts = model_facts(c, opts);
    let profile = opts.profile;
    parts.spectra.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    parts
        .extracted
        .sort_by(|a, b| natural_cmp(&a.tensor, &b.tensor));
    parts.vectors.sort_by(|a, b| natural_cmp(a, b));
    let mut skipped = parts.skipped;
    let mut notes: Vec<String> = facts.task_note.iter().cloned().collect();

    // The profile's exclusions.
    let mut extracted = Vec::new();
    for e in parts.extracted {
        match profile_excludes(profile, &e) {
            Some(why) => skipped.push((e.tensor.clone(), why.to_string())),
            None => extracted.push(e),
        }
    }
    let mut saved_whole = parts.saved_whole;
    if profile == Profile::Vllm {
        for m in saved_whole.drain(..) {
            skipped.push((
                m,
                "left out (--profile vllm): vLLM does not load modules_to_save".into(),
            ));
        }
    }

    // Biases of extracted modules: through `lora_bias` when PEFT can take it for every
    // module of the adapter (it is one flag; embedding layers reject it, and a module
    // without a bias could not be merged).
    let lora_modules: std::collections::BTreeSet<String> =
        extracted.iter().map(|e| e.module.clone()).collect();
    let compared: std::collections::BTreeSet<&str> =
        c.results.iter().map(|(n, _)| n.as_str()).collect();
    let bias_deltas: BTreeMap<String, Vec<f64>> = parts
        .bias_deltas
        .into_iter()
        .filter(|(m, _)| lora_modules.contains(m))
        .collect();
    let no_bias_reason = if bias_deltas.is_empty() {
        None
    } else if profile == Profile::Vllm {
        Some("left out (--profile vllm): vLLM loads no LoRA bias".to_string())
    } else if let Some(e) = extracted.iter().find(|e| e.kind == ModuleKind::Embedding) {
        Some(format!(
            "bias of a module extracted as a LoRA, left out: PEFT's lora_bias is one flag for the adapter and its embedding layers reject it (`{}` is an embedding LoRA)",
            e.module
        ))
    } else {
        extracted
            .iter()
            .find(|e| {
                let t = e.tensor.strip_suffix(".weight").unwrap_or(&e.tensor);
                !compared.contains(format!("{t}.bias").as_str())
            })
            .map(|e| format!(
                "bias of a module extracted as a LoRA, left out: PEFT's lora_bias is one flag for the adapter, and `{}` has no bias to merge it into",
                e.module
            ))
    };
    let lora_bias = !bias_deltas.is_empty() && no_bias_reason.is_none();
    if lora_bias {
        for e in &mut extracted {
            let out = match e.kind {
                ModuleKind::Conv1d => e.factors.n,
                _ => e.factors.m,
            };
            e.bias = Some(
                bias_deltas
                    .get(&e.module)
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; out]),
            );
        }
    }

    // Changed 1-D tensors: a bias in the LoRA, a module saved whole, or left out.
    let in_saved = |aligned: &str| {
        let n = adapter_name(c, aligned);
        saved_whole.iter().any(|m| {
            n.strip_prefix(m.as_str())
                .is_some_and(|r| r.starts_with('.'))
        })
    };
    let mut modules_to_save: Vec<String> = saved_whole.clone();
    for v in &parts.vectors {
        if in_saved(v) {
            continue;
        }
        let module = adapter_name(c, v)
            .rsplit_once('.')
            .map_or(String::new(), |(m, _)| m.to_string());
        let why = if !opts.extract {
            "1-D tensor: analysed as changed, not decomposable".to_string()
        } else if lora_modules.contains(&module) {
            if lora_bias && v.ends_with(".bias") {
                continue;
            }
            no_bias_reason.clone().filter(|_| v.ends_with(".bias")).unwrap_or_else(|| {
                "1-D tensor of a module extracted as a LoRA: PEFT cannot also save that module whole".into()
            })
        } else if opts.skip_undecomposable {
            "1-D tensor left out (--skip-undecomposable)".into()
        } else if profile == Profile::Vllm {
            "left out (--profile vllm): vLLM does not load modules_to_save".into()
        } else if module.is_empty() {
            "top-level tensor without a module: not representable in PEFT".into()
        } else {
            push_unique(&mut modules_to_save, module);
            continue;
        };
        skipped.push((v.clone(), why));
    }
    skipped.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    let mut saved: Vec<SavedTensor> = parts
        .candidates
        .into_iter()
        .filter(|t| {
            let name = t.key.strip_prefix("base_model.model.").unwrap_or(&t.key);
            modules_to_save.iter().any(|m| {
                let rest = name
                    .strip_prefix(m.as_str())
                    .and_then(|r| r.strip_prefix('.'));
                // A head or router is saved with everything under it; a module of a
                // 1-D tensor with its own parameters only.
                rest.is_some_and(|r| saved_whole.contains(m) || !r.contains('.'))
            })
        })
        .collect();
    saved.sort_by(|a, b| a.key.cmp(&b.key));

    // transformers 5 stacks the experts of a fused-expert model into one 3-D parameter per
    // projection, and PEFT converts a per-expert adapter to it by stacking the factors:
    // every expert needs the same rank (padding with zero components is exact).
    if facts.fused_experts() {
        let is_expert = |e: &ExtractedModule| peft::expert_of(&e.tensor).is_some();
        let top = extracted
            .iter()
            .filter(|e| is_expert(e))
            .map(|e| e.factors.rank)
            .max();
        if let Some(top) = top {
            for e in extracted.iter_mut().filter(|e| is_expert(e)) {
                e.factors.pad_to(top);
            }
        }
    }

    // One rank for every module where the runtime takes one.
    let mut uniform = uniform_rank(opts).ok().flatten();
    if profile == Profile::Vllm {
        let top = extracted.iter().map(|e| e.factors.rank).max().unwrap_or(0);
        let r = uniform.unwrap_or(top).max(top);
        match crate::peft::vllm_rank(r) {
            Some(v) => {
                for e in &mut extracted {
                    e.factors.pad_to(v);
                }
                uniform = Some(v);
            }
            None => notes.push(format!(
                "rank {r} is above the largest rank vLLM accepts (512): ranks left as extracted"
            )),
        }
    }

    let all_modules: Vec<String> = c
        .finetuned
        .tensors
        .iter()
        .filter_map(|t| t.name.rsplit_once('.').map(|(m, _)| m.to_string()))
        .collect();
    let target_names: Vec<String> = extracted.iter().map(|e| e.module.clone()).collect();
    let target_modules = crate::peft::target_modules(&target_names, &all_modules);

    let detected: BTreeMap<&str, Option<usize>> = parts
        .spectra
        .iter()
        .map(|(n, s)| (n.as_str(), s.detected_rank))
        .collect();
    // Thin matrices changed in every direction cannot tell a LoRA from a dense change.
    let uninformative: std::collections::BTreeSet<&str> = parts
        .spectra
        .iter()
        .filter(|(_, s)| {
            crate::lowrank::detect::is_full_spectrum(
                &s.singular_values,
                s.noise_floor,
                s.shape[0],
                s.shape[1],
            )
        })
        .map(|(n, _)| n.as_str())
        .collect();
    let modified: Vec<(&String, &TensorMetrics)> = c
        .results
        .iter()
        .filter(|(_, m)| m.is_modified())
        .map(|(n, m)| (n, m))
        .collect();
    let modules: Vec<String> = modified
        .iter()
        .map(|(n, _)| pairing::module_type(n))
        .collect();
    // A task head is trained whole by design (PEFT's task models save it whole), and a
    // thin matrix changed in every direction looks the same under a LoRA and a dense
    // change: neither says whether the rest was a LoRA.
    let evidence: Vec<Evidence> = modified
        .iter()
        .zip(&modules)
        .filter(|((n, _), _)| facts.head_of(n).is_none() && !uninformative.contains(n.as_str()))
        .map(|((n, m), module)| Evidence {
            module,
            is_matrix: m.shape.len() == 2,
            detected_rank: detected.get(n.as_str()).copied().flatten(),
        })
        .collect();
    LoraReport {
        options: opts.lowrank.clone(),
        dtype: opts.dtype,
        uniform_rank: uniform,
        base_model: c
            .base
            .hub
            .as_ref()
            .map_or_else(|| c.base.source.clone(), |h| h.repo_id.clone()),
        base_revision: c.base.hub.as_ref().map(|h| h.commit.clone()),
        verdict: verdict(&evidence),
        spectra: parts.spectra,
        extracted,
        modules_to_save,
        saved,
        skipped,
        errors: parts.errors,
        not_analysed: parts.not_analysed,
        total_time: parts.total_time,
        during_diff: parts.during_diff,
        facts,
        profile,
        lora_bias,
        target_modules,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::dtype::encode;

    /// A sketch capture sums YᵀΔ in the order its blocks come: in row order it hands the
    /// stage the sketch with YᵀΔ; a block out of order (the diff's workers do not keep
    /// a matrix's windows in order) leaves the sketch to the stage's own pass.
    #[test]
    fn a_sketch_capture_out_of_order_is_left_to_the_stage() {
        let (m, n, rows) = (8, 16, 2);
        let block = n * rows;
        let base: Vec<f64> = (0..m * n).map(|i| (i % 7) as f64 * 0.25 - 0.5).collect();
        let ft: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, v)| v + ((i * 13) % 5) as f64 * 0.0625)
            .collect();
        let (a, b) = (
            encode(DType::BF16, &base).unwrap(),
            encode(DType::BF16, &ft).unwrap(),
        );
        let pool = BufferPool::default();
        let capture = || Capture {
            len: m * n,
            dtypes: (DType::BF16, DType::BF16),
            kind: Kind::Sketch {
                name: "w".into(),
                seed: 0,
                l: 4,
                m,
                n,
                block_rows: rows,
                products: lowrank::rsvd::Products::F32,
                cross: true,
            },
            pool: &pool,
            state: Mutex::default(),
        };
        let window = |c: &Capture<'_>, k: usize| {
            let (s, e) = (2 * k * block, 2 * (k + 1) * block);
            assert!(
                c.diff_window((k * block) as u64, &a[s..e], &b[s..e], 1e-6)
                    .is_some()
            );
        };
        let in_order = capture();
        (0..m / rows).for_each(|k| window(&in_order, k));
        let (sketch, _) = in_order.take_sketch(4).expect("every block, in order");
        assert!(sketch.cross.is_some());
        let shuffled = capture();
        [0, 2, 1, 3].into_iter().for_each(|k| window(&shuffled, k));
        assert!(shuffled.take_sketch(4).is_none());
    }
}
