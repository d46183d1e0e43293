//! GGML tensor types and their dequantization into f32.
//!
//! A GGML tensor is a sequence of *blocks*: `block_size(t)` consecutive elements stored in
//! `type_size(t)` bytes. A block never straddles a row (the GGUF reader checks that the
//! first dimension is a multiple of the block size), so a caller can cut windows on block
//! boundaries, reuse one byte buffer and one f32 buffer, and call [`dequantize`] on each
//! window: it works over whole blocks and allocates nothing.
//!
//! # Block layouts
//!
//! All multi-byte fields are little-endian; `f16` is IEEE binary16. Within a block,
//! element `n` is written `w[n]`; a "nibble" is 4 bits, low nibble first.
//!
//! | type | elems | bytes | layout and value |
//! |---|---|---|---|
//! | F32, F16, BF16 | 1 | 4, 2, 2 | the value itself (BF16: the top half of an f32) |
//! | Q8_0 | 32 | 34 | `d: f16, q: [i8; 32]`; `w = q·d` |
//! | Q4_0 | 32 | 18 | `d: f16, qs: [u8; 16]`; `w[j] = d·(lo(qs[j]) − 8)`, `w[j+16] = d·(hi(qs[j]) − 8)` |
//! | Q4_1 | 32 | 20 | `d, m: f16, qs: [u8; 16]`; as Q4_0 without the −8, then `+ m` |
//! | Q5_0 | 32 | 22 | `d: f16, qh: u32, qs: [u8; 16]`; the fifth bit of `w[n]` is bit `n` of `qh`; `w = d·(q − 16)` |
//! | Q5_1 | 32 | 24 | `d, m: f16, qh: u32, qs: [u8; 16]`; `w = d·q + m` |
//! | Q2_K | 256 | 84 | `scales: [u8; 16], qs: [u8; 64], d, dmin: f16`; 16 sub-blocks of 16, each with a 4-bit scale (low nibble) and 4-bit min (high nibble); 2-bit `q`; `w = (d·sc)·q − dmin·m` |
//! | Q3_K | 256 | 110 | `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`; 16 sub-blocks of 16 with 6-bit signed scales (`sc − 32`); 2 low bits of `q` from `qs`, and 4 is subtracted when the `hmask` bit is *clear*; `w = (d·sc)·q` |
//! | Q4_K | 256 | 144 | `d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes; 4-bit `q`; `w = (d·sc)·q − dmin·m` |
//! | Q5_K | 256 | 176 | `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`; as Q4_K plus a fifth bit: bit `j` of `qh[l]` for element `l` of sub-block `j` |
//! | Q6_K | 256 | 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`; 16 sub-blocks of 16 with 8-bit signed scales; 6-bit `q` (4 bits from `ql`, 2 from `qh`), `w = (d·sc)·(q − 32)` |
//! | Q8_K | 256 | 292 | `d: f32, q: [i8; 256], bsums: [i16; 16]` (sums for dot products, unused here); `w = d·q` |
//! | IQ4_NL | 32 | 18 | `d: f16, qs: [u8; 16]`; as Q4_0, but each nibble indexes a fixed non-linear table: `w = d·K[q]` |
//! | IQ4_XS | 256 | 136 | `d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]`; 8 sub-blocks of 32 with 6-bit scales (`sc − 32`), nibbles through the IQ4_NL table |
//! | TQ1_0 | 256 | 54 | `qs: [u8; 48], qh: [u8; 4], d: f16`; five (four in `qh`) base-3 digits per byte, as a fixed-point fraction; `w = d·(t − 1)` |
//! | TQ2_0 | 256 | 66 | `qs: [u8; 64], d: f16`; 2-bit `q`, `w = d·(q − 1)` |
//! | MXFP4 | 32 | 17 | `e: u8, qs: [u8; 16]`; E2M1 nibbles (doubled table) times `2^(e − 128)`; low nibbles are elements 0–15 |
//! | NVFP4 | 64 | 36 | `s: [u8; 4], qs: [u8; 32]`; 4 sub-blocks of 16 with an unsigned E4M3 scale each (halved), E2M1 nibbles |
//!
//! The sub-block layouts of the K-quants (which byte and shift holds element `n`) are
//! spelled out next to each decoder. Every product is computed in f32 in the reference's
//! order (for Q4_K, `(d·sc)` first, then `·q`, then `− (dmin·m)`), without fused
//! multiply-add, so the results are bit-identical to gguf-py's numpy dequantizers
//! (`gguf.quants.dequantize`, the reference tested in `tests/it/gguf.rs`). f16 NaNs keep
//! their payload, as numpy's conversion does.
//!
//! The grid-based types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, whose
//! codebooks are large tables), Q8_1 (ggml's activation format), Q1_0 (which gguf-py
//! 0.19.0 cannot dequantize, so no reference to test against) and the integer/F64 types
//! are known, so their sizes are validated, but not
//! decoded: [`dequantize`] returns [`DequantError::Unsupported`] naming the type.
//!
//! # Speed
//!
//! Plain scalar loops over fixed-size block arrays, which the compiler unrolls and partly
//! vectorizes. `cargo run --release --example gguf_dequant_rate` prints each type's rate.
//! Measured 2026-12-02 on the 2-core AMD EPYC development machine while other builds ran
//! (load average 5), one thread, GB/s of f32 produced: F32 9.7, F16 3.2, BF16 15, Q8_0 4.6,
//! Q4_0 10, Q4_1 8.9, Q5_0 7.6, Q5_1 6.8, Q2_K 8.7, Q3_K 6.2, Q4_K 5.5, Q5_K 12, Q6_K 3.3,
//! Q8_K 16, IQ4_NL 6.2, IQ4_XS 6.4, TQ1_0 2.7, TQ2_0 3.0, MXFP4 3.1, NVFP4 5.4. The slowest
//! (~3 GB/s of f32, i.e. 0.7 GB/s of Q6_K file bytes) is above what a disk delivers per
//! thread, so decoding does not dominate a streaming diff.

use std::fmt;

/// Elements per super-block of the K-quants (`QK_K` in ggml).
const QK_K: usize = 256;

/// A GGML tensor type, as numbered in GGUF tensor infos (`ggml_type` in ggml.h).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// Every known type, in id order (for tests and listings).
pub const ALL_TYPES: [GgmlType; 34] = {
    use GgmlType::*;
    [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ2_XXS,
        IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64, IQ1_M, BF16,
        TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0,
    ]
};

impl GgmlType {
    /// The type with GGUF id `id`, or `None` for an id ggml does not define (ids 4, 5 and
    /// 31–33 belonged to layouts ggml has removed; files using them are refused).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// The GGUF id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            NVFP4 => 40,
            Q1_0 => 41,
        }
    }

    /// The name ggml and gguf-py use (`Q4_K`, `BF16`, …).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }

    /// Whether [`dequantize`] decodes this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
                | IQ4_NL
                | IQ4_XS
                | TQ1_0
                | TQ2_0
                | MXFP4
                | NVFP4
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements per block of `t` (1 for the plain float and integer types).
pub fn block_size(t: GgmlType) -> usize {
    use GgmlType::*;
    match t {
        F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
        NVFP4 => 64,
        Q1_0 => 128,
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ3_S
        | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => QK_K,
    }
}

/// Bytes per block of `t` (`ggml_type_size`).
pub fn type_size(t: GgmlType) -> usize {
    use GgmlType::*;
    match t {
        F32 | I32 => 4,
        F16 | BF16 | I16 => 2,
        I8 => 1,
        I64 | F64 => 8,
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        Q8_0 => 34,
        Q8_1 => 36,
        Q2_K => 84,
        Q3_K => 110,
        Q4_K => 144,
        Q5_K => 176,
        Q6_K => 210,
        Q8_K => 292,
        IQ2_XXS => 66,
        IQ2_XS => 74,
        IQ3_XXS => 98,
        IQ1_S => 50,
        IQ4_NL => 18,
        IQ3_S => 110,
        IQ2_S => 82,
        IQ4_XS => 136,
        IQ1_M => 56,
        TQ1_0 => 54,
        TQ2_0 => 66,
        MXFP4 => 17,
        NVFP4 => 36,
        Q1_0 => 18,
    }
}

/// Why a call to [`dequantize`] was refused. The GGUF reader wraps it with the file and
/// the tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    /// weightdiff knows the type's size but has no decoder for it.
    #[error("GGML type {0} cannot be decoded by weightdiff (supported: {SUPPORTED})")]
    Unsupported(GgmlType),
    /// `bytes` is not a whole number of blocks, or `out` does not hold exactly their
    /// elements (a caller bug, or a window cut off a block boundary).
    #[error(
        "{ty}: {bytes} bytes are not whole {type_size}-byte blocks of {block_size} elements \
         matching an output of {out} elements"
    )]
    Length {
        ty: GgmlType,
        bytes: usize,
        out: usize,
        type_size: usize,
        block_size: usize,
    },
}

const SUPPORTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, \
                         Q6_K, Q8_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4, NVFP4";

/// Decodes whole blocks of type `t` from `bytes` into `out`, which must hold exactly
/// `bytes.len() / type_size(t) * block_size(t)` elements. Allocates nothing.
pub fn dequantize(t: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let (bs, ts) = (block_size(t), type_size(t));
    let length_error = || DequantError::Length {
        ty: t,
        bytes: bytes.len(),
        out: out.len(),
        type_size: ts,
        block_size: bs,
    };
    if !bytes.len().is_multiple_of(ts) {
        return Err(length_error());
    }
    match (bytes.len() / ts).checked_mul(bs) {
        Some(n) if n == out.len() => {}
        _ => return Err(length_error()),
    }
    use GgmlType::*;
    match t {
        F32 => each(bytes, out, |b: &[u8; 4], o: &mut [f32; 1]| {
            o[0] = f32::from_le_bytes(*b)
        }),
        F16 => each(bytes, out, |b: &[u8; 2], o: &mut [f32; 1]| o[0] = f16(b, 0)),
        BF16 => each(bytes, out, |b: &[u8; 2], o: &mut [f32; 1]| {
            o[0] = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16)
        }),
        Q8_0 => each(bytes, out, q8_0),
        Q4_0 => each(bytes, out, q4_0),
        Q4_1 => each(bytes, out, q4_1),
        Q5_0 => each(bytes, out, q5_0),
        Q5_1 => each(bytes, out, q5_1),
        Q2_K => each(bytes, out, q2_k),
        Q3_K => each(bytes, out, q3_k),
        Q4_K => each(bytes, out, q4_k),
        Q5_K => each(bytes, out, q5_k),
        Q6_K => each(bytes, out, q6_k),
        Q8_K => each(bytes, out, q8_k),
        IQ4_NL => each(bytes, out, iq4_nl),
        IQ4_XS => each(bytes, out, iq4_xs),
        TQ1_0 => each(bytes, out, tq1_0),
        TQ2_0 => each(bytes, out, tq2_0),
        MXFP4 => each(bytes, out, mxfp4),
        NVFP4 => each(bytes, out, nvfp4),
        Q8_1 | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ3_S | IQ2_S | IQ1_M | I8 | I16 | I32
        | I64 | F64 | Q1_0 => return Err(DequantError::Unsupported(t)),
    }
    Ok(())
}

/// The quantization step of every element of whole blocks of type `t` (the spacing of
/// the type's values at that element, [`crate::checkpoint::encoding`]'s definition), in
/// the order [`dequantize`] gives their values: the block's `|d|` for the integer codes
/// (times the sub-block scale for the K-quants), E2M1's step times the scale for MXFP4
/// and NVFP4, the larger gap to a neighbouring codebook value times the scale for
/// IQ4_NL / IQ4_XS, the ulp of the value for F32, F16 and BF16. Same contract as
/// [`dequantize`].
pub fn steps(t: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    use crate::checkpoint::quantized::float_step;
    // Checks the lengths and the type, and leaves the values for the float types.
    dequantize(t, bytes, out)?;
    use GgmlType::*;
    match t {
        F32 => out.iter_mut().for_each(|v| *v = float_step(*v, 23, -126)),
        F16 => out.iter_mut().for_each(|v| *v = float_step(*v, 10, -14)),
        BF16 => out.iter_mut().for_each(|v| *v = float_step(*v, 7, -126)),
        Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | IQ4_NL | TQ1_0 | TQ2_0 | Q8_K => {
            let (ts, bs) = (type_size(t), block_size(t));
            for (b, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                let d = match t {
                    Q8_K => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    TQ1_0 => f16(b, 52),
                    TQ2_0 => f16(b, 64),
                    _ => f16(b, 0),
                }
                .abs();
                if t == IQ4_NL {
                    let (lo, hi) = o.split_at_mut(16);
                    for j in 0..16 {
                        let q = b[2 + j];
                        lo[j] = d * iq4nl_gap((q & 0x0f) as usize);
                        hi[j] = d * iq4nl_gap((q >> 4) as usize);
                    }
                } else {
                    o.fill(d);
                }
            }
        }
        Q2_K => each(bytes, out, |b: &[u8; 84], o: &mut [f32; 256]| {
            let d = f16(b, 80);
            for (sub, o) in o.chunks_exact_mut(16).enumerate() {
                o.fill((d * (b[sub] & 0x0f) as f32).abs());
            }
        }),
        Q3_K => each(bytes, out, |b: &[u8; 110], o: &mut [f32; 256]| {
            let sc = q3_k_scales(&b[96..108]);
            let d = f16(b, 108);
            for (sub, o) in o.chunks_exact_mut(16).enumerate() {
                o.fill((d * sc[sub] as f32).abs());
            }
        }),
        Q4_K | Q5_K => {
            let ts = type_size(t);
            for (b, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16(b, 0);
                let (sc, _) = k_scale_min(&b[4..16]);
                for (j, o) in o.chunks_exact_mut(32).enumerate() {
                    o.fill((d * sc[j] as f32).abs());
                }
            }
        }
        Q6_K => each(bytes, out, |b: &[u8; 210], o: &mut [f32; 256]| {
            let d = f16(b, 208);
            for (sub, o) in o.chunks_exact_mut(16).enumerate() {
                o.fill((d * (b[192 + sub] as i8) as f32).abs());
            }
        }),
        IQ4_XS => each(bytes, out, |b: &[u8; 136], o: &mut [f32; 256]| {
            let d = f16(b, 0);
            let scales_h = u16::from_le_bytes([b[2], b[3]]);
            let (scales_l, qs) = (&b[4..8], &b[8..136]);
            for (j, o) in o.chunks_exact_mut(32).enumerate() {
                let low = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0f;
                let high = ((scales_h >> (2 * j)) & 3) as u8;
                let dl = (d * ((low | (high << 4)) as i32 - 32) as f32).abs();
                let q = &qs[16 * j..][..16];
                let (lo, hi) = o.split_at_mut(16);
                for i in 0..16 {
                    lo[i] = dl * iq4nl_gap((q[i] & 0x0f) as usize);
                    hi[i] = dl * iq4nl_gap((q[i] >> 4) as usize);
                }
            }
        }),
        MXFP4 => each(bytes, out, |b: &[u8; 17], o: &mut [f32; 32]| {
            e2m1_doubled_steps(e8m0_half(b[0]), &b[1..17], o)
        }),
        NVFP4 => each(bytes, out, |b: &[u8; 36], o: &mut [f32; 64]| {
            for (s, o) in o.chunks_exact_mut(16).enumerate() {
                e2m1_doubled_steps(ue4m3_half(b[s]), &b[4 + 8 * s..][..8], o);
            }
        }),
        _ => return Err(DequantError::Unsupported(t)),
    }
    Ok(())
}

/// The larger gap from codebook value `k` of IQ4_NL to its neighbours (one side at the ends).
fn iq4nl_gap(k: usize) -> f32 {
    let v = |i: usize| IQ4NL_VALUES[i] as i32;
    let below = if k > 0 { v(k) - v(k - 1) } else { 0 };
    let above = if k < 15 { v(k + 1) - v(k) } else { 0 };
    below.max(above) as f32
}

/// Steps of E2M1 nibbles (low nibbles first, then high) with a halved scale `d`: on the
/// doubled table, 1 below 4 (0.5 below 2), 2 below 8, 4 above.
fn e2m1_doubled_steps(d: f32, qs: &[u8], o: &mut [f32]) {
    let step = |n: u8| {
        let m = E2M1_DOUBLED[n as usize].unsigned_abs();
        d.abs()
            * if m < 4 {
                1.0
            } else if m < 8 {
                2.0
            } else {
                4.0
            }
    };
    let half = qs.len();
    for (i, &q) in qs.iter().enumerate() {
        o[i] = step(q & 0x0f);
        o[i + half] = step(q >> 4);
    }
}

/// Runs `decode` on each (block, output) pair. The fixed-size array types let the
/// compiler drop bounds checks inside the block decoders.
#[inline(always)]
fn each<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    decode: impl Fn(&[u8; TS], &mut [f32; BS]),
) {
    for (b, o) in bytes.chunks_exact(TS).zip(out.chunks_exact_mut(BS)) {
        let b: &[u8; TS] = b.try_into().expect("chunks_exact yields TS bytes");
        let o: &mut [f32; BS] = o.try_into().expect("chunks_exact_mut yields BS elements");
        decode(b, o);
    }
}

/// IEEE binary16 → f32, exactly as numpy converts: every finite value is exact, and a
/// NaN keeps its sign and payload (no quieting), so results compare bit for bit.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    if exp == 0x1f {
        f32::from_bits(sign | 0x7f80_0000 | (man << 13))
    } else if exp == 0 {
        // Zero or subnormal: man · 2^-24, exact in f32.
        let v = man as f32 * (1.0 / 16_777_216.0);
        if sign != 0 { -v } else { v }
    } else {
        f32::from_bits(sign | ((exp + 112) << 23) | (man << 13))
    }
}

#[inline(always)]
fn f16(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn q8_0(b: &[u8; 34], o: &mut [f32; 32]) {
    let d = f16(b, 0);
    for (o, &q) in o.iter_mut().zip(&b[2..]) {
        *o = (q as i8) as f32 * d;
    }
}

fn q4_0(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16(b, 0);
    let (lo, hi) = o.split_at_mut(16);
    for j in 0..16 {
        let q = b[2 + j];
        lo[j] = d * ((q & 0x0f) as i32 - 8) as f32;
        hi[j] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8; 20], o: &mut [f32; 32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    let (lo, hi) = o.split_at_mut(16);
    for j in 0..16 {
        let q = b[4 + j];
        lo[j] = d * (q & 0x0f) as f32 + m;
        hi[j] = d * (q >> 4) as f32 + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: low nibbles of `qs` for elements 0–15, high
/// nibbles for 16–31, and the fifth bit of element `n` is bit `n` of `qh`.
#[inline(always)]
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

fn q5_0(b: &[u8; 22], o: &mut [f32; 32]) {
    let d = f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let q = q5_values(qh, &b[6..22]);
    for (o, &q) in o.iter_mut().zip(&q) {
        *o = d * (q as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8; 24], o: &mut [f32; 32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let q = q5_values(qh, &b[8..24]);
    for (o, &q) in o.iter_mut().zip(&q) {
        *o = d * q as f32 + m;
    }
}

/// Q2_K: element `n = 128·h + 32·s + l` (`h` < 2, `s` < 4, `l` < 32) is bits `2s..2s+2`
/// of `qs[32·h + l]`; its sub-block of 16 is `n / 16`.
fn q2_k(b: &[u8; 84], o: &mut [f32; 256]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16(b, 80), f16(b, 82));
    for (sub, o) in o.chunks_exact_mut(16).enumerate() {
        let dl = d * (scales[sub] & 0x0f) as f32;
        let ml = dmin * (scales[sub] >> 4) as f32;
        let (h, s, l0) = (sub / 8, (sub / 2) % 4, (sub % 2) * 16);
        for (i, o) in o.iter_mut().enumerate() {
            let q = (qs[32 * h + l0 + i] >> (2 * s)) & 3;
            *o = dl * q as f32 - ml;
        }
    }
}

/// The sixteen 6-bit scales of Q3_K: scale `i` has its low 4 bits in the low (i < 8) or
/// high (i ≥ 8) nibble of byte `i % 8`, and its top 2 bits at bits `2·(i / 4)` of byte
/// `8 + i % 4`.
#[inline(always)]
fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0f } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// Q3_K: the 2 low bits of element `n = 128·h + 32·s + l` are as in Q2_K; its high bit is
/// bit `n / 32` of `hmask[n % 32]`, and a *clear* high bit subtracts 4.
fn q3_k(b: &[u8; 110], o: &mut [f32; 256]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let sc = q3_k_scales(&b[96..108]);
    let d = f16(b, 108);
    for (sub, o) in o.chunks_exact_mut(16).enumerate() {
        let dl = d * sc[sub] as f32;
        let (h, s, l0) = (sub / 8, (sub / 2) % 4, (sub % 2) * 16);
        let bit = sub / 2; // n / 32
        for (i, o) in o.iter_mut().enumerate() {
            let l = l0 + i;
            let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
            let high_clear = ((hmask[l] >> bit) & 1) ^ 1;
            *o = dl * (low - 4 * high_clear as i32) as f32;
        }
    }
}

/// The eight 6-bit (scale, min) pairs of Q4_K/Q5_K, packed in 12 bytes: for `j` < 4 the
/// low 6 bits of bytes `j` (scale) and `j + 4` (min); for `j` ≥ 4 the nibbles of byte
/// `j + 4` (scale low, min high) with the top 2 bits of bytes `j − 4` and `j`.
#[inline(always)]
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Q4_K: sub-block `j` (32 elements) takes the low (even `j`) or high (odd `j`) nibbles of
/// `qs[32·(j / 2) ..][..32]`.
fn q4_k(b: &[u8; 144], o: &mut [f32; 256]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (sc, mn) = k_scale_min(&b[4..16]);
    let qs = &b[16..144];
    for (j, o) in o.chunks_exact_mut(32).enumerate() {
        let dl = d * sc[j] as f32;
        let ml = dmin * mn[j] as f32;
        let q = &qs[32 * (j / 2)..][..32];
        let shift = 4 * (j % 2);
        for (o, &q) in o.iter_mut().zip(q) {
            *o = dl * ((q >> shift) & 0x0f) as f32 - ml;
        }
    }
}

/// Q5_K: as Q4_K, plus the fifth bit of element `l` of sub-block `j`: bit `j` of `qh[l]`.
fn q5_k(b: &[u8; 176], o: &mut [f32; 256]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (sc, mn) = k_scale_min(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (j, o) in o.chunks_exact_mut(32).enumerate() {
        let dl = d * sc[j] as f32;
        let ml = dmin * mn[j] as f32;
        let q = &qs[32 * (j / 2)..][..32];
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let v = ((q[l] >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4);
            o[l] = dl * v as f32 - ml;
        }
    }
}

/// Q6_K: element `n = 128·h + r` takes 4 bits of `ql[64·h + r % 64]` (the high nibble when
/// `r` ≥ 64) and 2 bits at `2·(r / 32)` of `qh[32·h + r % 32]`; its sub-block is `n / 16`.
fn q6_k(b: &[u8; 210], o: &mut [f32; 256]) {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let scales = &b[192..208];
    let d = f16(b, 208);
    for (sub, o) in o.chunks_exact_mut(16).enumerate() {
        let dl = d * (scales[sub] as i8) as f32;
        let (h, r0) = (sub / 8, (sub % 8) * 16);
        for (i, o) in o.iter_mut().enumerate() {
            let r = r0 + i;
            let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
            let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
            *o = dl * ((low | (high << 4)) as i32 - 32) as f32;
        }
    }
}

fn q8_k(b: &[u8; 292], o: &mut [f32; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in o.iter_mut().zip(&b[4..260]) {
        *o = d * (q as i8) as f32;
    }
}

/// The non-linear 4-bit codebook of IQ4_NL and IQ4_XS (`kvalues_iq4nl` in ggml).
const IQ4NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

fn iq4_nl(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16(b, 0);
    let (lo, hi) = o.split_at_mut(16);
    for j in 0..16 {
        let q = b[2 + j];
        lo[j] = d * IQ4NL_VALUES[(q & 0x0f) as usize] as f32;
        hi[j] = d * IQ4NL_VALUES[(q >> 4) as usize] as f32;
    }
}

/// IQ4_XS: sub-block `j` (32 elements) has a 6-bit scale (low 4 bits in nibble `j % 2` of
/// `scales_l[j / 2]`, top 2 bits at `2·j` of `scales_h`) minus 32, and its nibbles in
/// `qs[16·j ..][..16]`, low nibbles first.
fn iq4_xs(b: &[u8; 136], o: &mut [f32; 256]) {
    let d = f16(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for (j, o) in o.chunks_exact_mut(32).enumerate() {
        let low = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0f;
        let high = ((scales_h >> (2 * j)) & 3) as u8;
        let dl = d * ((low | (high << 4)) as i32 - 32) as f32;
        let q = &qs[16 * j..][..16];
        let (lo, hi) = o.split_at_mut(16);
        for i in 0..16 {
            lo[i] = dl * IQ4NL_VALUES[(q[i] & 0x0f) as usize] as f32;
            hi[i] = dl * IQ4NL_VALUES[(q[i] >> 4) as usize] as f32;
        }
    }
}

/// TQ1_0: a byte holds base-3 digits as a fixed-point fraction of 256: digit `p` of byte
/// `x` is `((x·3^p mod 256)·3) >> 8`. Elements 0–159 are digit `n / 32` of `qs[n % 32]`,
/// 160–239 digit `(n − 160) / 16` of `qs[32 + n % 16]`, 240–255 digit `(n − 240) / 4` of
/// `qh[n % 4]`; `w = d·(t − 1)`.
fn tq1_0(b: &[u8; 54], o: &mut [f32; 256]) {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let (qs, qh) = (&b[0..48], &b[48..52]);
    let d = f16(b, 52);
    let digit = |x: u8, p: usize| ((x.wrapping_mul(POW3[p]) as u16 * 3) >> 8) as i32 - 1;
    for (n, o) in o.iter_mut().enumerate() {
        let t = if n < 160 {
            digit(qs[n % 32], n / 32)
        } else if n < 240 {
            digit(qs[32 + n % 16], (n - 160) / 16)
        } else {
            digit(qh[n % 4], (n - 240) / 4)
        };
        *o = d * t as f32;
    }
}

/// TQ2_0: element `n = 128·h + 32·s + l` is bits `2s..2s+2` of `qs[32·h + l]`, minus 1.
fn tq2_0(b: &[u8; 66], o: &mut [f32; 256]) {
    let qs = &b[0..64];
    let d = f16(b, 64);
    for (n, o) in o.iter_mut().enumerate() {
        let (h, s, l) = (n / 128, (n / 32) % 4, n % 32);
        let q = (qs[32 * h + l] >> (2 * s)) & 3;
        *o = d * (q as i32 - 1) as f32;
    }
}

/// E2M1 values, doubled so that they are integers (`kvalues_mxfp4` in ggml); the scales
/// are halved to match.
const E2M1_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e − 128)`: an E8M0 exponent, halved for the doubled E2M1 table. `e` 0 and 1 give
/// f32 subnormals.
#[inline(always)]
fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits((e as u32 - 1) << 23)
    }
}

fn mxfp4(b: &[u8; 17], o: &mut [f32; 32]) {
    let d = e8m0_half(b[0]);
    let (lo, hi) = o.split_at_mut(16);
    for j in 0..16 {
        let q = b[1 + j];
        lo[j] = d * E2M1_DOUBLED[(q & 0x0f) as usize] as f32;
        hi[j] = d * E2M1_DOUBLED[(q >> 4) as usize] as f32;
    }
}

/// An unsigned E4M3 scale (bias 7; bit 7 ignored; 0x7F, the NaN code, read as 0), halved
/// for the doubled E2M1 table. Every value is exact in f32.
#[inline(always)]
fn ue4m3_half(x: u8) -> f32 {
    if x == 0 || x == 0x7f {
        return 0.0;
    }
    let exp = ((x >> 3) & 0x0f) as i32;
    let man = (x & 7) as f32;
    let v = if exp == 0 {
        man * (1.0 / 512.0)
    } else {
        (1.0 + man / 8.0) * f32::from_bits(((exp - 7 + 127) as u32) << 23)
    };
    v * 0.5
}

/// NVFP4: sub-block `s` (16 elements) has scale `b[s]` and nibbles in `qs[8·s ..][..8]`,
/// low nibbles first.
fn nvfp4(b: &[u8; 36], o: &mut [f32; 64]) {
    let qs = &b[4..36];
    for (s, o) in o.chunks_exact_mut(16).enumerate() {
        let d = ue4m3_half(b[s]);
        let q = &qs[8 * s..][..8];
        let (lo, hi) = o.split_at_mut(8);
        for i in 0..8 {
            lo[i] = d * E2M1_DOUBLED[(q[i] & 0x0f) as usize] as f32;
            hi[i] = d * E2M1_DOUBLED[(q[i] >> 4) as usize] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_refused() {
        for t in ALL_TYPES {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 42, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
    }

    #[test]
    fn f16_conversion_is_exact_for_every_finite_value() {
        for h in 0..=u16::MAX {
            let ours = f16_bits_to_f32(h);
            let theirs = half::f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan());
                // The payload is kept, not quieted.
                assert_eq!(ours.to_bits() & 0x007f_ffff, ((h & 0x3ff) as u32) << 13);
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn q8_0_block_is_scale_times_int8() {
        let mut b = [0u8; 34];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        for (i, q) in b[2..].iter_mut().enumerate() {
            *q = (i as i8 - 16) as u8;
        }
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut out).unwrap();
        for (i, &w) in out.iter().enumerate() {
            assert_eq!(w, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_low_nibbles_are_the_first_half() {
        let mut b = [0u8; 18];
        b[0..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        b[2] = 0xF0; // element 0: 0 - 8, element 16: 15 - 8
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut out).unwrap();
        assert_eq!(out[0], -8.0);
        assert_eq!(out[16], 7.0);
    }

    #[test]
    fn steps_are_each_blocks_scale_by_hand() {
        let f16b = |x: f32| half::f16::from_f32(x).to_bits().to_le_bytes();
        // Q8_0, Q4_0, Q5_0: |d| for every element (a negative d too).
        let mut b = [0u8; 34];
        b[0..2].copy_from_slice(&f16b(-0.5));
        b[2] = 0x80;
        let mut out = [0f32; 32];
        steps(GgmlType::Q8_0, &b, &mut out).unwrap();
        assert_eq!(out, [0.5; 32]);
        let mut b = [0u8; 18];
        b[0..2].copy_from_slice(&f16b(0.25));
        steps(GgmlType::Q4_0, &b, &mut out).unwrap();
        assert_eq!(out, [0.25; 32]);
        let mut b = [0u8; 22];
        b[0..2].copy_from_slice(&f16b(-0.125));
        b[6] = 0xff;
        steps(GgmlType::Q5_0, &b, &mut out).unwrap();
        assert_eq!(out, [0.125; 32]);
        // Q4_K: d times each sub-block's 6-bit scale (the min does not change the step).
        let mut b = [0u8; 144];
        b[0..2].copy_from_slice(&f16b(2.0));
        b[2..4].copy_from_slice(&f16b(1.0));
        b[4] = 3; // sub-block 0 scale
        b[8] = 5; // sub-block 0 min
        b[12] = 0x21; // sub-block 4: scale 1, min 2
        let mut out = [0f32; 256];
        steps(GgmlType::Q4_K, &b, &mut out).unwrap();
        assert_eq!(out[0], 6.0);
        assert_eq!(out[31], 6.0);
        assert_eq!(out[32], 0.0, "sub-block 1 has scale 0");
        assert_eq!(out[128], 2.0);
        // Q6_K: d times the signed 8-bit sub-block scale, as a magnitude.
        let mut b = [0u8; 210];
        b[192] = (-3i8) as u8;
        b[193] = 4;
        b[208..210].copy_from_slice(&f16b(0.5));
        steps(GgmlType::Q6_K, &b, &mut out).unwrap();
        assert_eq!((out[0], out[15], out[16]), (1.5, 1.5, 2.0));
        // MXFP4: E8M0 128 = 2 times E2M1's 0.5 / 1 / 2 (codes 0.5, 2, 6; -1.5, 3).
        let mut b = [0u8; 17];
        b[0] = 128;
        b[1] = 0x71; // element 0: 0.5, element 16: 6
        b[2] = 0x5B; // element 1: -1.5, element 17: 3
        b[3] = 0x04; // element 2: 2
        let mut out = [0f32; 32];
        steps(GgmlType::MXFP4, &b, &mut out).unwrap();
        assert_eq!(
            (out[0], out[16], out[1], out[17], out[2]),
            (1.0, 4.0, 1.0, 2.0, 2.0)
        );
        // NVFP4: sub-block scales in unsigned E4M3 (0x38 = 1.0, 0x40 = 2.0).
        let mut b = [0u8; 36];
        b[0] = 0x38;
        b[1] = 0x40;
        b[4] = 0x06; // sub-block 0 element 0: 4
        b[12] = 0x03; // sub-block 1 element 0: 1.5
        let mut out = [0f32; 64];
        steps(GgmlType::NVFP4, &b, &mut out).unwrap();
        assert_eq!((out[0], out[1], out[16]), (2.0, 0.5, 1.0));
        // IQ4_NL: the larger gap to a neighbouring codebook value (-127 → 23, 1 → 12, 113 → 24).
        let mut b = [0u8; 18];
        b[0..2].copy_from_slice(&f16b(0.5));
        b[2] = 0xF0; // element 0: code 0 (-127), element 16: code 15 (113)
        b[3] = 0x08; // element 1: code 8 (1)
        let mut out = [0f32; 32];
        steps(GgmlType::IQ4_NL, &b, &mut out).unwrap();
        assert_eq!((out[0], out[16], out[1]), (11.5, 12.0, 6.0));
        // Plain floats: the ulp of the value.
        let mut out = [0f32; 2];
        let b: Vec<u8> = [f16b(1.0), f16b(-3.0)].concat();
        steps(GgmlType::F16, &b, &mut out).unwrap();
        assert_eq!(out, [1.0 / 1024.0, 2.0 / 1024.0]);
    }

    #[test]
    fn q4_k_applies_scale_and_min_per_sub_block() {
        let mut b = [0u8; 144];
        b[0..2].copy_from_slice(&half::f16::from_f32(2.0).to_bits().to_le_bytes()); // d
        b[2..4].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes()); // dmin
        b[4] = 3; // sub-block 0 scale
        b[8] = 5; // sub-block 0 min
        b[12] = 0x21; // sub-block 4: scale low 1, min low 2
        b[16] = 0x07; // sub-block 0 element 0 = 7, sub-block 1 element 0 = 0
        b[16 + 64] = 0x09; // sub-block 4 element 0 = 9
        let mut out = [0f32; 256];
        dequantize(GgmlType::Q4_K, &b, &mut out).unwrap();
        assert_eq!(out[0], 2.0 * 3.0 * 7.0 - 5.0);
        assert_eq!(out[128], 2.0 * 1.0 * 9.0 - 2.0);
    }

    #[test]
    fn partial_blocks_and_wrong_outputs_are_refused() {
        let mut out = [0f32; 32];
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out),
            Err(DequantError::Length { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 68], &mut out),
            Err(DequantError::Length { .. })
        ));
        assert!(dequantize(GgmlType::Q8_0, &[], &mut []).is_ok());
    }

    #[test]
    fn grid_types_name_themselves_as_unsupported() {
        let err = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut [0f32; 256]).unwrap_err();
        assert_eq!(err, DequantError::Unsupported(GgmlType::IQ2_XXS));
        assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    }

    #[test]
    fn every_decodable_type_accepts_random_blocks_without_panicking() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for t in ALL_TYPES.into_iter().filter(|t| t.can_dequantize()) {
            let bytes: Vec<u8> = (0..3 * type_size(t)).map(|_| byte()).collect();
            let mut out = vec![0f32; 3 * block_size(t)];
            dequantize(t, &bytes, &mut out).unwrap();
        }
    }
}
