//! The encoding seam: a tensor stored in another form than plain elements (GGUF quant
//! blocks today; block-scaled FP8 or packed int4 with scale tensors next) is presented
//! to the rest of the pipeline as a plain F32 tensor of its logical (Hugging Face)
//! shape. [`super::Checkpoint::read`] asks the tensor's [`Decode`] for the logical rows
//! that cover a window, decoded to f32, and hands out the window's bytes; the kernels
//! and the low-rank stage never see the storage.
//!
//! Windows are cut by the pipeline in elements; the decoder widens each to its own
//! granule (whole blocks, whole attention heads for a row permutation) and the extra
//! values are dropped. A decoder names its storage for the reports (`Q4_K`).
//!
//! # The quantization step
//!
//! A decoder also gives, for each decoded value `W`, its **step** `Δq(W)`: the spacing of
//! the values its format can represent at that element, in the units of `W`. With `s`
//! the element's scale (tile, channel, group or block scale, times a global or
//! super-block scale where the format has one):
//!
//! ```text
//! integer code q (int, pack, GGUF Q4_0 … Q8_0, Q8_K, TQ*)  Δq = |s|   (s: the block's d, times
//!                                                      the sub-block scale for K-quants)
//! E4M3 code (FP8)          Δq = |s| · 2^(e − 3),  e = max(⌊log₂|q|⌋, −6)  (subnormals: e = −6)
//! E5M2 code                Δq = |s| · 2^(e − 2),  e = max(⌊log₂|q|⌋, −14)
//! E2M1 code (NVFP4, MXFP4) Δq = |s| · {0.5 for |q| < 2, 1 for 2 ≤ |q| < 4, 2 for 4 ≤ |q| ≤ 6}
//! codebook (IQ4_NL, IQ4_XS) Δq = |s| · the larger gap from the code's value to its neighbours'
//! plain float (GGUF F32/F16/BF16) Δq = ulp(W) = 2^(max(⌊log₂|W|⌋, e_min) − mantissa bits)
//! ```
//!
//! Round-to-nearest quantization puts the original within Δq/2 of its decoded value
//! (the larger gap of a codebook, and the step above a power of two of a float code,
//! make that bound hold on both sides); two uses follow:
//! - `max_error_steps` (the diff, [`crate::kernels::max_error_steps`]): max |Δ| / Δq of a
//!   pair of which one side is encoded, ≤ 0.5 for a faithful round-to-nearest quant of
//!   the other side, up to the rounding of the scale and of the dequantization
//!   arithmetic (a scale stored to a relative precision u moves a code q by |q|·u steps);
//! - the low-rank stage's noise floor: a rounding error uniform in ±Δq/2 has variance
//!   Δq²/12, summed over the elements of each encoded side.

use super::TensorEntry;
use super::shard::Window;
use crate::error::Result;
use std::ops::Range;
use std::sync::Arc;

/// Reads `len` stored bytes at `start` of another tensor of the checkpoint (a weight's
/// scale tensor, possibly in another shard).
pub type Raw<'a> = &'a dyn Fn(&TensorEntry, u64, u64) -> Result<Window>;

/// A tensor's stored form and how to decode it.
pub trait Decode: Send + Sync + std::fmt::Debug {
    /// What the storage is, in the reports' words (`Q4_K`, `F8_E4M3 + F32 scales 128×128`).
    fn storage(&self) -> String;
    /// Logical rows (`shape[0]`) and elements per row (the product of the rest).
    fn rows(&self) -> (u64, u64);
    /// Rows a decoded range must be a whole number of (1 unless a transform needs more).
    fn row_granule(&self) -> u64;
    /// Decodes logical rows `rows` (whole granules, or up to the last row) into `out`,
    /// which must then hold exactly those rows' values, in the logical order (it comes
    /// holding an earlier window's values, kept for its memory: replace them).
    fn decode_rows(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<()>;
    /// The quantization step of every value [`Self::decode_rows`] gives for the same
    /// `rows`, in the same order (see [`steps`](self#the-quantization-step)): `out` then
    /// holds one step per decoded value, and the call returns `true`. `false` (the
    /// default): the format has no step model, and `out` means nothing.
    fn decode_steps(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<bool> {
        let _ = (raw, rows, out);
        Ok(false)
    }
    /// [`Self::decode_rows`] into `values` and [`Self::decode_steps`] into `steps` (its
    /// result), for a decoder that does both in one pass over the codes.
    fn decode_rows_and_steps(
        &self,
        raw: Raw<'_>,
        rows: Range<u64>,
        values: &mut Vec<f32>,
        steps: &mut Vec<f32>,
    ) -> Result<bool> {
        self.decode_rows(raw, rows.clone(), values)?;
        self.decode_steps(raw, rows, steps)
    }
}

/// Decoded buffers kept per thread, so a window's values land in memory already touched
/// (fresh 8 MiB buffers cost page faults and zeroing: 14 % of an FP8 comparison).
const KEPT_BUFFERS: usize = 4;
/// Larger buffers (a one-off whole tensor) are not kept.
const KEPT_MAX_VALUES: usize = 16 << 20;

thread_local! {
    /// Buffers handed out as windows; one is free again when its window dropped (its
    /// `Arc` is unique).
    static KEPT: std::cell::RefCell<Vec<Arc<Vec<f32>>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer no window holds, from this thread's kept ones when one is free.
fn free_buffer() -> Arc<Vec<f32>> {
    KEPT.try_with(|k| {
        let mut k = k.borrow_mut();
        let i = k.iter().position(|a| Arc::strong_count(a) == 1)?;
        Some(k.swap_remove(i))
    })
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// Keeps `buf` (shared with the window it backs) for a later window of this thread.
fn keep(buf: &Arc<Vec<f32>>) {
    if buf.capacity() > KEPT_MAX_VALUES {
        return;
    }
    let _ = KEPT.try_with(|k| {
        let mut k = k.borrow_mut();
        k.push(buf.clone());
        if k.len() > KEPT_BUFFERS {
            // Forget a buffer still in use first: it then frees with its window.
            let i = k.iter().position(|a| Arc::strong_count(a) > 1).unwrap_or(0);
            k.remove(i);
        }
    });
}

/// The logical elements `elements` of an encoded tensor, as a window of little-endian
/// f32 bytes (the decoded values themselves: no copy).
pub fn decode_elements(d: &dyn Decode, raw: Raw<'_>, elements: Range<u64>) -> Result<Window> {
    let w = cut_window(d, elements, |rows, out| {
        d.decode_rows(raw, rows, out).map(|()| true)
    })?;
    Ok(w.expect("decode_rows always decodes"))
}

/// The quantization steps of the logical elements `elements` (f32 little-endian, as
/// [`decode_elements`] gives their values), or `None` when the format has no step model.
pub fn step_elements(d: &dyn Decode, raw: Raw<'_>, elements: Range<u64>) -> Result<Option<Window>> {
    cut_window(d, elements, |rows, out| d.decode_steps(raw, rows, out))
}

/// The logical elements `elements` of an encoded tensor and their quantization steps
/// (`None` when the format has no step model), decoded in one call.
pub fn decode_elements_and_steps(
    d: &dyn Decode,
    raw: Raw<'_>,
    elements: Range<u64>,
) -> Result<(Window, Option<Window>)> {
    let (rows, skip, n) = granules(d, &elements);
    let (mut values, mut steps) = (free_buffer(), free_buffer());
    let has_steps = d.decode_rows_and_steps(
        raw,
        rows.clone(),
        Arc::get_mut(&mut values).expect("a free buffer is unique"),
        Arc::get_mut(&mut steps).expect("a free buffer is unique"),
    )?;
    let values = cut(d, &rows, values, skip, n);
    Ok((values, has_steps.then(|| cut(d, &rows, steps, skip, n))))
}

/// The whole granules of rows covering `elements`, and where `elements` start in them
/// and how many they are.
fn granules(d: &dyn Decode, elements: &Range<u64>) -> (Range<u64>, usize, usize) {
    let (rows, row_len) = d.rows();
    let row_len = row_len.max(1);
    let g = d.row_granule().max(1);
    let first = elements.start / row_len / g * g;
    let last = elements
        .end
        .div_ceil(row_len)
        .div_ceil(g)
        .saturating_mul(g)
        .min(rows);
    let skip = (elements.start - first * row_len) as usize;
    (first..last, skip, (elements.end - elements.start) as usize)
}

/// The window of `n` values from `skip` of a buffer the decoder filled for `rows`.
fn cut(d: &dyn Decode, rows: &Range<u64>, values: Arc<Vec<f32>>, skip: usize, n: usize) -> Window {
    // The decoder's contract (`decode_rows` fills exactly the rows asked), not input.
    assert!(
        values.len() >= skip + n,
        "decoder of {} gave {} values for rows {rows:?}",
        d.storage(),
        values.len()
    );
    keep(&values);
    Window::Decoded(values, skip * 4..(skip + n) * 4)
}

/// Runs `fill` on the whole granules of rows covering `elements` and cuts the window of
/// `elements` out of what it wrote; `None` when `fill` returned false.
fn cut_window(
    d: &dyn Decode,
    elements: Range<u64>,
    fill: impl FnOnce(Range<u64>, &mut Vec<f32>) -> Result<bool>,
) -> Result<Option<Window>> {
    let (rows, skip, n) = granules(d, &elements);
    let mut values = free_buffer();
    if !fill(
        rows.clone(),
        Arc::get_mut(&mut values).expect("a free buffer is unique"),
    )? {
        return Ok(None);
    }
    Ok(Some(cut(d, &rows, values, skip, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values = their logical index, decoded in granules of 2 rows of 3.
    #[derive(Debug)]
    struct Counting;

    impl Decode for Counting {
        fn storage(&self) -> String {
            "test".into()
        }
        fn rows(&self) -> (u64, u64) {
            (5, 3)
        }
        fn row_granule(&self) -> u64 {
            2
        }
        fn decode_rows(&self, _: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<()> {
            assert!(rows.start.is_multiple_of(2) && (rows.end.is_multiple_of(2) || rows.end == 5));
            out.clear();
            out.extend((rows.start * 3..rows.end * 3).map(|i| i as f32));
            Ok(())
        }
    }

    #[test]
    fn windows_are_cut_out_of_whole_granules() {
        for (a, b) in [(0, 15), (4, 5), (7, 14), (14, 15), (0, 1)] {
            let no_parts = |_: &TensorEntry, _: u64, _: u64| -> Result<Window> { unreachable!() };
            let bytes = decode_elements(&Counting, &no_parts, a..b).unwrap();
            let got: Vec<f32> = bytes[..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let want: Vec<f32> = (a..b).map(|i| i as f32).collect();
            assert_eq!(got, want, "{a}..{b}");
        }
    }
}
