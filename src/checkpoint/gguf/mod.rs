//! GGUF, llama.cpp's checkpoint format: a validated reader, block dequantization
//! ([`quant`]) and the GGUF ↔ Hugging Face name map ([`names`]).
//!
//! # The format (versions 2 and 3, little-endian)
//!
//! ```text
//! magic "GGUF" | version: u32 | tensor_count: u64 | kv_count: u64
//! kv_count × (key: string, value_type: u32, value)
//! tensor_count × (name: string, n_dims: u32, dims: [u64; n_dims], ggml_type: u32, offset: u64)
//! padding to `general.alignment` (a u32 key, default 32, a power of two)
//! data section: each tensor at data_start + offset (offset a multiple of the alignment)
//! ```
//!
//! A string is a u64 byte length and UTF-8 bytes (no terminator). A value is one of
//! u8, i8, u16, i16, u32, i32, f32, bool (one byte), string, array, u64, i64, f64 (type
//! ids 0–12); an array is an element type (u32), a u64 count and the elements, and may
//! nest. `dims[0]` is the contiguous dimension (ggml's `ne[0]`, a row), so the PyTorch /
//! Hugging Face shape is `dims` reversed: a `[out, in]` linear weight is stored with
//! `dims = [in, out]`, and the bytes are in the same row-major order as the HF tensor.
//! A tensor's bytes are `numel / block_size · type_size` of its [`GgmlType`]; rows
//! (`dims[0]` elements) hold whole blocks. Version 1 (u32 counts) is long gone and
//! refused; a big-endian file (gguf-py can write one) is refused with its own message.
//!
//! # Validation
//!
//! [`GgufFile::open`] reads the header only, through bounded buffered reads, and checks
//! before reading or allocating anything: every count, string length and array length
//! against the bytes left in the file and in [`MAX_HEADER_BYTES`] (and keys, tensors and
//! nested arrays against their own limits, so that the parsed header takes memory of the
//! order of its bytes); `n_dims` ≤ 4; each
//! dimension, element count and byte size overflow-checked; the type known and the row
//! a whole number of blocks; offsets aligned; every tensor's bytes inside the file; no
//! two tensors overlapping; no duplicate key or tensor name. A hostile file gives a
//! [`GgufError`] naming the file (and the tensor where there is one), never a panic or
//! an allocation larger than the file. Data is read later, by range
//! ([`GgufFile::read_bytes`], [`GgufFile::read_blocks`]).
//!
//! # Plugging into the encoding seam
//!
//! - Registry: [`recognise`] on a file's first bytes; weight files are `*.gguf` (a split
//!   model, `NAME-00001-of-0000N.gguf`, is N complete GGUF files, each with its own tensors
//!   and `split.*` keys).
//! - A logical tensor is a [`GgufTensor`]: HF-order [`GgufTensor::shape`], one stored part
//!   (the blocks carry their own scales). Windows are whole rows, so whole blocks: rows
//!   `r0..r1` are blocks `r0·b..r1·b` with `b =` [`GgufTensor::blocks_per_row`], decoded by
//!   [`GgufFile::read_blocks`] into a reused f32 buffer.
//! - Pairing: [`names::map_file`] gives each GGUF tensor its HF name(s) and the
//!   [`names::Transform`]s to undo, in order: an expert slice selects whole rows of the
//!   stacked tensor, the Q/K permutation needs windows of whole heads
//!   ([`names::Transform::row_granularity`]), the Gemma offset is element-wise, truncated
//!   embedding rows compare with the first rows of the HF tensor only.
//! - Errors: [`GgufError`] converts into `crate::error::Error::Format`; an undecodable type
//!   is an error of that tensor alone ([`GgufError::Dequant`]), raised when it is read.

pub mod decode;
pub mod names;
pub mod quant;

pub use quant::{DequantError, GgmlType, block_size, dequantize, type_size};

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Largest header (metadata and tensor infos) accepted. The biggest real headers are
/// tokenizer vocabularies of a few hundred thousand tokens and merges: tens of MB. The
/// bound keeps a hostile file from making us hold more than this much metadata.
pub const MAX_HEADER_BYTES: u64 = 256 << 20;

/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// Largest single string (a key, a tensor name or a value; chat templates are a few KB).
pub const MAX_STRING_LEN: u64 = 16 << 20;

/// How deep arrays may nest (gguf-py writes arrays of arrays; llama.cpp reads none).
pub const MAX_ARRAY_DEPTH: usize = 3;

/// Most metadata keys accepted (real files have a few dozen). Like the two limits below,
/// it keeps the memory of a parsed header within a small multiple of its bytes: an entry
/// takes 13 bytes on disk but about 80 in memory.
pub const MAX_KEYS: u64 = 1 << 16;

/// Most tensors accepted (the largest models have tens of thousands).
pub const MAX_TENSORS: u64 = 1 << 20;

/// Most arrays nested inside arrays, in the whole header.
pub const MAX_NESTED_ARRAYS: u64 = 1 << 16;

/// Largest alignment accepted (llama.cpp writes 32; anything near this is hostile).
pub const MAX_ALIGNMENT: u64 = 1 << 20;

/// Whether `first_bytes` (the start of a file) is a GGUF file, for the format registry.
/// Only the magic is checked, so that a big-endian or future-version file reaches
/// [`GgufFile::open`] and gets its precise error.
pub fn recognise(first_bytes: &[u8]) -> bool {
    first_bytes.starts_with(&MAGIC)
}

/// Everything that can be wrong with a GGUF file. Each variant names the file, and the
/// tensor or key when there is one.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// An I/O call failed (the OS error is part of the message, as in `Error::Io`).
    #[error("{}: {action}: {error}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{}: not a GGUF file (no GGUF magic)", path.display())]
    NotGguf { path: PathBuf },
    /// A big-endian GGUF file (the version field reads byte-swapped).
    #[error(
        "{}: big-endian GGUF (version {version} byte-swapped) is not supported; convert it \
         to little-endian (llama.cpp's gguf-py `gguf_convert_endian.py`)",
        path.display()
    )]
    BigEndian { path: PathBuf, version: u32 },
    /// A version other than 2 or 3.
    #[error("{}: GGUF version {version} is not supported (only 2 and 3)", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    /// The header needs bytes past the end of the file.
    #[error(
        "{}: GGUF header truncated: {what} needs {needed} bytes at offset {offset}, but the file \
         has {file_len}",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    /// The header runs past [`MAX_HEADER_BYTES`].
    #[error(
        "{}: GGUF header larger than the {limit}-byte limit (at {what})",
        path.display()
    )]
    HeaderTooLarge {
        path: PathBuf,
        what: String,
        limit: u64,
    },
    /// A count or array length that the rest of the file cannot hold, or above its limit
    /// ([`MAX_KEYS`], [`MAX_TENSORS`], [`MAX_NESTED_ARRAYS`]).
    #[error(
        "{}: GGUF {what} {count} is impossible or too large: at most {max} (the {left} header \
         bytes left and the limits allow no more)",
        path.display()
    )]
    CountTooLarge {
        path: PathBuf,
        what: String,
        count: u64,
        left: u64,
        max: u64,
    },
    /// A string longer than [`MAX_STRING_LEN`].
    #[error("{}: GGUF string ({what}) of {len} bytes exceeds the {limit}-byte limit", path.display())]
    StringTooLong {
        path: PathBuf,
        what: String,
        len: u64,
        limit: u64,
    },
    /// A key, name or string value that is not UTF-8.
    #[error("{}: GGUF {what} is not valid UTF-8", path.display())]
    InvalidUtf8 { path: PathBuf, what: String },
    /// A metadata value type outside 0–12.
    #[error("{}: GGUF key `{key}` has unknown value type {type_id}", path.display())]
    UnknownValueType {
        path: PathBuf,
        key: String,
        type_id: u32,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("{}: GGUF key `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}", path.display())]
    NestingTooDeep { path: PathBuf, key: String },
    /// The same key twice.
    #[error("{}: GGUF key `{key}` appears twice", path.display())]
    DuplicateKey { path: PathBuf, key: String },
    /// `general.alignment` is not a u32 power of two up to [`MAX_ALIGNMENT`].
    #[error(
        "{}: GGUF general.alignment {value} is invalid (a u32 power of two up to {MAX_ALIGNMENT} is required)",
        path.display()
    )]
    BadAlignment { path: PathBuf, value: String },
    /// Two tensors with one name.
    #[error("{}: tensor `{tensor}` appears twice in the GGUF tensor infos", path.display())]
    DuplicateTensor { path: PathBuf, tensor: String },
    /// More than [`MAX_DIMS`] dimensions.
    #[error("{}: tensor `{tensor}`: {n_dims} dimensions (GGUF allows at most {MAX_DIMS})", path.display())]
    TooManyDims {
        path: PathBuf,
        tensor: String,
        n_dims: u32,
    },
    /// A dimension, element count or byte size that overflows (or a dimension ggml's
    /// signed 64-bit `ne` cannot hold).
    #[error("{}: tensor `{tensor}`: dimensions {dims:?} overflow", path.display())]
    DimsOverflow {
        path: PathBuf,
        tensor: String,
        dims: Vec<u64>,
    },
    /// A GGML type id that ggml does not define.
    #[error("{}: tensor `{tensor}`: unknown GGML type id {type_id}", path.display())]
    UnknownType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
    /// A row (`dims[0]`) that is not a whole number of blocks.
    #[error(
        "{}: tensor `{tensor}`: row of {row} elements is not a multiple of the {ty} block size {block}",
        path.display()
    )]
    PartialBlock {
        path: PathBuf,
        tensor: String,
        ty: GgmlType,
        row: u64,
        block: usize,
    },
    /// An offset that is not a multiple of the alignment.
    #[error(
        "{}: tensor `{tensor}`: data offset {offset} is not a multiple of the alignment {alignment}",
        path.display()
    )]
    MisalignedOffset {
        path: PathBuf,
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    /// Tensor bytes past the end of the file.
    #[error(
        "{}: tensor `{tensor}`: data bytes {start}..{end} lie outside the file ({file_len} bytes)",
        path.display()
    )]
    DataOutOfBounds {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    /// Two tensors sharing bytes.
    #[error("{}: tensors `{tensor}` and `{other}` overlap in the data section", path.display())]
    Overlap {
        path: PathBuf,
        tensor: String,
        other: String,
    },
    /// A requested range outside the tensor, or not on block boundaries (a caller bug).
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    BadRange {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// The tensor's type cannot be decoded, or a window was cut off block boundaries.
    #[error("{}: tensor `{tensor}`: {source}", path.display())]
    Dequant {
        path: PathBuf,
        tensor: String,
        source: DequantError,
    },
    /// Fewer bytes than the header promised: the file shrank since it was opened.
    #[error(
        "{}: tensor `{tensor}`: the file ended before byte {end} (it changed after it was opened?)",
        path.display()
    )]
    FileChanged {
        path: PathBuf,
        tensor: String,
        end: u64,
    },
}

impl crate::error::FormatError for GgufError {
    fn path(&self) -> &Path {
        use GgufError::*;
        match self {
            Io { path, .. }
            | NotGguf { path }
            | BigEndian { path, .. }
            | UnsupportedVersion { path, .. }
            | Truncated { path, .. }
            | HeaderTooLarge { path, .. }
            | CountTooLarge { path, .. }
            | StringTooLong { path, .. }
            | InvalidUtf8 { path, .. }
            | UnknownValueType { path, .. }
            | NestingTooDeep { path, .. }
            | DuplicateKey { path, .. }
            | BadAlignment { path, .. }
            | DuplicateTensor { path, .. }
            | TooManyDims { path, .. }
            | DimsOverflow { path, .. }
            | UnknownType { path, .. }
            | PartialBlock { path, .. }
            | MisalignedOffset { path, .. }
            | DataOutOfBounds { path, .. }
            | Overlap { path, .. }
            | BadRange { path, .. }
            | Dequant { path, .. }
            | FileChanged { path, .. } => path,
        }
    }

    fn tensor(&self) -> Option<&str> {
        use GgufError::*;
        match self {
            DuplicateTensor { tensor, .. }
            | TooManyDims { tensor, .. }
            | DimsOverflow { tensor, .. }
            | UnknownType { tensor, .. }
            | PartialBlock { tensor, .. }
            | MisalignedOffset { tensor, .. }
            | DataOutOfBounds { tensor, .. }
            | Overlap { tensor, .. }
            | BadRange { tensor, .. }
            | Dequant { tensor, .. }
            | FileChanged { tensor, .. } => Some(tensor),
            _ => None,
        }
    }
}

impl From<GgufError> for crate::error::Error {
    fn from(e: GgufError) -> Self {
        crate::error::Error::Format(Box::new(e))
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored typed (a vocabulary of 256K tokens costs what it costs on
/// disk, not 256K enum values).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Strings),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// An array of strings, stored as one buffer and the end of each string in it, so that it
/// takes no more memory than its bytes on disk (a 256K-token vocabulary is one allocation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Strings {
    bytes: String,
    ends: Vec<usize>,
}

impl Strings {
    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }
    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    /// String `i`.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }
    /// The strings in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|i| self.get(i).expect("i < len"))
    }
    fn push(&mut self, s: &str) {
        self.bytes.push_str(s);
        self.ends.push(self.bytes.len());
    }
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }
    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements as i64 when they are integers that fit (e.g. per-layer head counts).
    pub fn as_ints(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            Array::I64(v) => v.clone(),
            _ => return None,
        })
    }
}

impl Value {
    /// The value as an integer, when it is one (any width or sign) that fits an i64.
    pub fn as_int(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(x) => x as i64,
            Value::I8(x) => x as i64,
            Value::U16(x) => x as i64,
            Value::I16(x) => x as i64,
            Value::U32(x) => x as i64,
            Value::I32(x) => x as i64,
            Value::U64(x) => i64::try_from(x).ok()?,
            Value::I64(x) => x,
            _ => return None,
        })
    }
    /// The value as a float, when it is an f32 or f64.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => None,
        }
    }
    /// The value as a string, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as an array, when it is one.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor of a GGUF file, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Its block encoding.
    pub ggml_type: GgmlType,
    /// Dimensions in GGUF order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub nbytes: u64,
}

impl GgufTensor {
    /// The shape in PyTorch / Hugging Face order (`dims` reversed).
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
    /// Number of elements (checked at open not to overflow).
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Elements per row (`dims[0]`; 1 for a 0-dimensional tensor).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
    /// Blocks per row (rows hold whole blocks, checked at open).
    pub fn blocks_per_row(&self) -> u64 {
        self.row_len() / block_size(self.ggml_type) as u64
    }
    /// Number of blocks.
    pub fn n_blocks(&self) -> u64 {
        self.numel() / block_size(self.ggml_type) as u64
    }
    /// The absolute byte range of the data in the file.
    pub fn byte_range(&self) -> Range<u64> {
        self.offset..self.offset + self.nbytes
    }
}

/// An opened GGUF file: its validated header; tensor data is read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    file_len: u64,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<GgufTensor>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Opens and validates `path`, reading only its header.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io = |action, error| GgufError::Io {
            path: path.clone(),
            action,
            error,
        };
        let file = File::open(&path).map_err(|e| io("cannot open", e))?;
        let file_len = file.metadata().map_err(|e| io("cannot stat", e))?.len();
        let reader = BufReader::with_capacity(64 << 10, &file);
        let header = parse_header(reader, file_len, &path)?;
        Ok(GgufFile {
            path,
            file,
            file_len,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            key_index: header
                .metadata
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect(),
            metadata: header.metadata,
            tensor_index: header
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: header.tensors,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The file's size when opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Alignment of the data section and offsets.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// A string value (`None` when absent or not a string).
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    /// An integer value of any width (`None` when absent, not an integer, or beyond i64).
    pub fn get_int(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_int()
    }
    /// A float value (`None` when absent or not f32/f64).
    pub fn get_float(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_float()
    }
    /// An array value.
    pub fn get_array(&self, key: &str) -> Option<&Array> {
        self.get(key)?.as_array()
    }
    /// `general.architecture` (`llama`, `qwen2`, `gemma3`, …), which selects the name map.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
    /// An integer hyperparameter `{architecture}.{suffix}` (e.g. `attention.head_count`).
    pub fn arch_int(&self, suffix: &str) -> Option<i64> {
        self.get_int(&format!("{}.{suffix}", self.architecture()?))
    }
    /// The tensors, in header order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }
    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Reads bytes `range` (relative to the start of `t`'s data) into `buf`, whose length
    /// must equal the range's.
    pub fn read_bytes(&self, t: &GgufTensor, range: Range<u64>, buf: &mut [u8]) -> Result<()> {
        let bad = |reason: String| GgufError::BadRange {
            path: self.path.clone(),
            tensor: t.name.clone(),
            reason,
        };
        if range.start > range.end || range.end > t.nbytes {
            return Err(bad(format!(
                "byte range {range:?} outside its {} bytes",
                t.nbytes
            )));
        }
        if buf.len() as u64 != range.end - range.start {
            return Err(bad(format!(
                "buffer of {} bytes for range {range:?}",
                buf.len()
            )));
        }
        let at = t.offset + range.start;
        read_exact_at(&self.file, buf, at).map_err(|error| {
            if error.kind() == std::io::ErrorKind::UnexpectedEof {
                GgufError::FileChanged {
                    path: self.path.clone(),
                    tensor: t.name.clone(),
                    end: t.offset + range.end,
                }
            } else {
                GgufError::Io {
                    path: self.path.clone(),
                    action: "cannot read tensor data",
                    error,
                }
            }
        })
    }

    /// Reads blocks `first_block ..` of `t` and dequantizes them into `out`, whose length
    /// (a multiple of the block size) sets how many. `raw` is a reusable byte buffer.
    pub fn read_blocks(
        &self,
        t: &GgufTensor,
        first_block: u64,
        raw: &mut Vec<u8>,
        out: &mut [f32],
    ) -> Result<()> {
        self.read_blocks_or_steps(t, first_block, raw, out, false)
    }

    /// [`Self::read_blocks`], but the quantization step of each element
    /// ([`quant::steps`]) instead of its value.
    pub fn read_block_steps(
        &self,
        t: &GgufTensor,
        first_block: u64,
        raw: &mut Vec<u8>,
        out: &mut [f32],
    ) -> Result<()> {
        self.read_blocks_or_steps(t, first_block, raw, out, true)
    }

    fn read_blocks_or_steps(
        &self,
        t: &GgufTensor,
        first_block: u64,
        raw: &mut Vec<u8>,
        out: &mut [f32],
        steps: bool,
    ) -> Result<()> {
        let (bs, ts) = (block_size(t.ggml_type), type_size(t.ggml_type));
        let dequant = |source| GgufError::Dequant {
            path: self.path.clone(),
            tensor: t.name.clone(),
            source,
        };
        if !t.ggml_type.can_dequantize() {
            return Err(dequant(DequantError::Unsupported(t.ggml_type)));
        }
        if !out.len().is_multiple_of(bs) {
            return Err(GgufError::BadRange {
                path: self.path.clone(),
                tensor: t.name.clone(),
                reason: format!(
                    "window of {} elements is not whole {}-element blocks",
                    out.len(),
                    bs
                ),
            });
        }
        let n_blocks = (out.len() / bs) as u64;
        let len = n_blocks * ts as u64; // ≤ out.len() · 18 bytes: no overflow
        let range = first_block
            .checked_mul(ts as u64)
            .and_then(|start| Some(start..start.checked_add(len)?))
            .filter(|r| r.end <= t.nbytes);
        let Some(range) = range else {
            return Err(GgufError::BadRange {
                path: self.path.clone(),
                tensor: t.name.clone(),
                reason: format!(
                    "blocks {first_block}..+{n_blocks} outside its {} blocks",
                    t.n_blocks()
                ),
            });
        };
        raw.resize(len as usize, 0);
        self.read_bytes(t, range, raw)?;
        if steps {
            quant::steps(t.ggml_type, raw, out).map_err(dequant)
        } else {
            dequantize(t.ggml_type, raw, out).map_err(dequant)
        }
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, at)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}

/// The parsed header.
struct Header {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<GgufTensor>,
}

/// Header bytes read so far, with the two limits every read is checked against.
struct Cursor<'p, R> {
    reader: R,
    pos: u64,
    file_len: u64,
    path: &'p Path,
    /// Arrays met inside arrays so far (bounded by [`MAX_NESTED_ARRAYS`]).
    nested_arrays: u64,
}

impl<R: Read> Cursor<'_, R> {
    /// Bytes the header may still use: the file's rest, within [`MAX_HEADER_BYTES`].
    fn left(&self) -> u64 {
        self.file_len.min(MAX_HEADER_BYTES).saturating_sub(self.pos)
    }

    /// Checks that `n` more bytes exist before anything is read or allocated.
    fn reserve(&self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        let end = self.pos.checked_add(n);
        if end.is_none_or(|e| e > self.file_len) {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos,
                needed: n,
                file_len: self.file_len,
            });
        }
        if end.is_none_or(|e| e > MAX_HEADER_BYTES) {
            return Err(GgufError::HeaderTooLarge {
                path: self.path.to_path_buf(),
                what: what(),
                limit: MAX_HEADER_BYTES,
            });
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        self.reserve(buf.len() as u64, what)?;
        self.reader.read_exact(buf).map_err(|error| {
            if error.kind() == std::io::ErrorKind::UnexpectedEof {
                GgufError::Truncated {
                    path: self.path.to_path_buf(),
                    what: what(),
                    offset: self.pos,
                    needed: buf.len() as u64,
                    file_len: self.pos,
                }
            } else {
                GgufError::Io {
                    path: self.path.to_path_buf(),
                    action: "cannot read GGUF header",
                    error,
                }
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let mut buf = Vec::new();
        self.string_bytes(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| GgufError::InvalidUtf8 {
            path: self.path.to_path_buf(),
            what: what(),
        })
    }

    /// Reads one string's bytes into `buf` (cleared first), checked before allocating.
    fn string_bytes(&mut self, buf: &mut Vec<u8>, what: &dyn Fn() -> String) -> Result<()> {
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                path: self.path.to_path_buf(),
                what: what(),
                len,
                limit: MAX_STRING_LEN,
            });
        }
        self.reserve(len, what)?;
        buf.clear();
        buf.resize(len as usize, 0);
        self.fill(buf, what)
    }

    /// Checks a count of items of at least `min_size` bytes each against the bytes left and
    /// against `cap`.
    fn count(
        &self,
        count: u64,
        min_size: u64,
        cap: u64,
        what: &dyn Fn() -> String,
    ) -> Result<usize> {
        let left = self.left();
        let max = (left / min_size).min(cap);
        if count > max {
            return Err(GgufError::CountTooLarge {
                path: self.path.to_path_buf(),
                what: what(),
                count,
                left,
                max,
            });
        }
        Ok(count as usize)
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value> {
        let what = || format!("value of key `{key}`");
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => Value::Bool(self.array::<1>(&what)?[0] != 0),
            8 => Value::String(self.string(&what)?),
            9 => Value::Array(self.array_value(key, depth + 1)?),
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    type_id,
                });
            }
        })
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                path: self.path.to_path_buf(),
                key: key.to_string(),
            });
        }
        let what = || format!("array of key `{key}`");
        let elem = self.u32(&what)?;
        let len = self.u64(&what)?;
        let count_what = || format!("array length of key `{key}`");
        // Smallest encoding of one element, so that `len` is checked against the bytes left
        // before any allocation: a string is at least its 8-byte length, an array 12 bytes.
        let min_size = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => 8,
            9 => 12,
            10..=12 => 8,
            _ => {
                return Err(GgufError::UnknownValueType {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    type_id: elem,
                });
            }
        };
        let cap = if elem == 9 {
            MAX_NESTED_ARRAYS - self.nested_arrays
        } else {
            u64::MAX
        };
        let n = self.count(len, min_size, cap, &count_what)?;
        macro_rules! fixed {
            ($variant:ident, $t:ty, $n:literal) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.array::<$n>(&what)?));
                }
                Array::$variant(v)
            }};
        }
        Ok(match elem {
            0 => fixed!(U8, u8, 1),
            1 => fixed!(I8, i8, 1),
            2 => fixed!(U16, u16, 2),
            3 => fixed!(I16, i16, 2),
            4 => fixed!(U32, u32, 4),
            5 => fixed!(I32, i32, 4),
            6 => fixed!(F32, f32, 4),
            7 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array::<1>(&what)?[0] != 0);
                }
                Array::Bool(v)
            }
            8 => {
                let mut v = Strings::default();
                let mut buf = Vec::new();
                for _ in 0..n {
                    self.string_bytes(&mut buf, &what)?;
                    let s = std::str::from_utf8(&buf).map_err(|_| GgufError::InvalidUtf8 {
                        path: self.path.to_path_buf(),
                        what: what(),
                    })?;
                    v.push(s);
                }
                Array::String(v)
            }
            9 => {
                self.nested_arrays += n as u64;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(v)
            }
            10 => fixed!(U64, u64, 8),
            11 => fixed!(I64, i64, 8),
            _ => fixed!(F64, f64, 8),
        })
    }
}

fn parse_header(reader: impl Read, file_len: u64, path: &Path) -> Result<Header> {
    let mut c = Cursor {
        reader,
        pos: 0,
        file_len,
        path,
        nested_arrays: 0,
    };
    let what = |s: &'static str| move || s.to_string();
    let magic: [u8; 4] = match c.array(&what("magic")) {
        Ok(m) => m,
        Err(GgufError::Truncated { .. }) => {
            return Err(GgufError::NotGguf {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(e),
    };
    if magic != MAGIC {
        return Err(GgufError::NotGguf {
            path: path.to_path_buf(),
        });
    }
    let version = c.u32(&what("version"))?;
    if version & 0xffff == 0 && (1..=3).contains(&version.swap_bytes()) {
        return Err(GgufError::BigEndian {
            path: path.to_path_buf(),
            version: version.swap_bytes(),
        });
    }
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let tensor_count = c.u64(&what("tensor count"))?;
    let kv_count = c.u64(&what("metadata count"))?;
    // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info
    // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
    let kv_count = c.count(kv_count, 13, MAX_KEYS, &what("metadata count"))?;
    let mut metadata = Vec::new();
    let mut keys = HashMap::new();
    for i in 0..kv_count {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let type_id = c.u32(&|| format!("value type of key `{key}`"))?;
        let value = c.value(type_id, &key, 0)?;
        if keys.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey {
                path: path.to_path_buf(),
                key,
            });
        }
        metadata.push((key, value));
    }
    let alignment = match keys.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(&Value::U32(a)) if a.is_power_of_two() && a as u64 <= MAX_ALIGNMENT => a as u64,
        Some(v) => {
            return Err(GgufError::BadAlignment {
                path: path.to_path_buf(),
                value: format!("{v:?}"),
            });
        }
    };

    let tensor_count = c.count(tensor_count, 24, MAX_TENSORS, &what("tensor count"))?;
    struct Raw {
        name: String,
        dims: Vec<u64>,
        type_id: u32,
        offset: u64,
    }
    let mut raw = Vec::new();
    for i in 0..tensor_count {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let w = || format!("info of tensor `{name}`");
        let n_dims = c.u32(&w)?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                path: path.to_path_buf(),
                tensor: name,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&w)?);
        }
        let type_id = c.u32(&w)?;
        let offset = c.u64(&w)?;
        raw.push(Raw {
            name,
            dims,
            type_id,
            offset,
        });
    }
    let header_end = c.pos;
    let data_start = header_end.div_ceil(alignment) * alignment; // header_end ≤ 256 MiB

    let mut tensors: Vec<GgufTensor> = Vec::with_capacity(raw.len());
    let mut names = HashMap::new();
    for r in raw {
        let tensor = r.name;
        if names.insert(tensor.clone(), ()).is_some() {
            return Err(GgufError::DuplicateTensor {
                path: path.to_path_buf(),
                tensor,
            });
        }
        let Some(ggml_type) = GgmlType::from_id(r.type_id) else {
            return Err(GgufError::UnknownType {
                path: path.to_path_buf(),
                tensor,
                type_id: r.type_id,
            });
        };
        let overflow = |tensor: String, dims: Vec<u64>| GgufError::DimsOverflow {
            path: path.to_path_buf(),
            tensor,
            dims,
        };
        // ggml holds dimensions as signed 64-bit `ne`, and so must their product.
        let numel = r
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        let Some(numel) = numel else {
            return Err(overflow(tensor, r.dims));
        };
        let (bs, ts) = (block_size(ggml_type) as u64, type_size(ggml_type) as u64);
        let row = r.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(bs) {
            return Err(GgufError::PartialBlock {
                path: path.to_path_buf(),
                tensor,
                ty: ggml_type,
                row,
                block: bs as usize,
            });
        }
        let Some(nbytes) = (numel / bs).checked_mul(ts) else {
            return Err(overflow(tensor, r.dims));
        };
        if !r.offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedOffset {
                path: path.to_path_buf(),
                tensor,
                offset: r.offset,
                alignment,
            });
        }
        let start = data_start.checked_add(r.offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(GgufError::DataOutOfBounds {
                path: path.to_path_buf(),
                tensor,
                start: start.unwrap_or(u64::MAX),
                end: u64::MAX,
                file_len,
            });
        };
        if end > file_len {
            return Err(GgufError::DataOutOfBounds {
                path: path.to_path_buf(),
                tensor,
                start,
                end,
                file_len,
            });
        }
        tensors.push(GgufTensor {
            name: tensor,
            ggml_type,
            dims: r.dims,
            offset: start,
            nbytes,
        });
    }

    // No two tensors may share bytes (empty tensors occupy none).
    let mut order: Vec<&GgufTensor> = tensors.iter().filter(|t| t.nbytes > 0).collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        if w[0].offset + w[0].nbytes > w[1].offset {
            return Err(GgufError::Overlap {
                path: path.to_path_buf(),
                tensor: w[1].name.clone(),
                other: w[0].name.clone(),
            });
        }
    }
    Ok(Header {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds GGUF bytes by hand, one field at a time.
    #[derive(Default)]
    struct Bytes(Vec<u8>);

    impl Bytes {
        fn header(version: u32, tensors: u64, kvs: u64) -> Bytes {
            let mut b = Bytes(b"GGUF".to_vec());
            b.u32(version).u64(tensors).u64(kvs);
            b
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name).u32(dims.len() as u32);
            for &d in dims {
                self.u64(d);
            }
            self.u32(ty).u64(offset)
        }
        fn pad(&mut self, align: usize) -> &mut Self {
            while !self.0.len().is_multiple_of(align) {
                self.0.push(0);
            }
            self
        }
        fn zeros(&mut self, n: usize) -> &mut Self {
            self.0.resize(self.0.len() + n, 0);
            self
        }
        fn open(&self) -> Result<GgufFile> {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.gguf");
            std::fs::write(&path, &self.0).unwrap();
            GgufFile::open(&path)
        }
    }

    /// Two F32 tensors `a` [4] and `b` [2, 8] with alignment 32, and two keys.
    fn valid() -> Bytes {
        let mut b = Bytes::header(3, 2, 2);
        b.str("general.architecture").u32(8).str("llama");
        b.str("general.alignment").u32(4).u32(32);
        b.tensor("a", &[4], 0, 0).tensor("b", &[8, 2], 0, 32);
        b.pad(32).zeros(32 + 64);
        b
    }

    #[test]
    fn a_valid_file_lists_its_tensors_in_both_orders() {
        let f = valid().open().unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.get_int("general.alignment"), Some(32));
        let b = f.tensor("b").unwrap();
        assert_eq!(b.dims, vec![8, 2]);
        assert_eq!(b.shape(), vec![2, 8]);
        assert_eq!(b.nbytes, 64);
        assert_eq!((b.blocks_per_row(), b.n_blocks()), (8, 16));
        assert_eq!(b.offset, f.data_start() + 32);
        let mut raw = Vec::new();
        let mut out = vec![1f32; 16];
        f.read_blocks(b, 0, &mut raw, &mut out).unwrap();
        assert_eq!(out, vec![0f32; 16]);
    }

    #[test]
    fn an_open_file_can_be_shared_by_worker_threads() {
        // Reads are positioned (`read_exact_at`), so one `&GgufFile` serves every worker.
        fn shared<T: Send + Sync>() {}
        shared::<GgufFile>();
    }

    #[test]
    fn recognise_looks_at_the_magic_only() {
        assert!(recognise(b"GGUF\x03\0\0\0"));
        assert!(recognise(b"GGUF\0\0\0\x03"));
        assert!(!recognise(b"GGU"));
        assert!(!recognise(&[0x30, 0, 0, 0, 0, 0, 0, 0]));
    }

    fn err(b: &Bytes) -> String {
        let e = b.open().unwrap_err();
        let s = e.to_string();
        assert!(s.contains("m.gguf"), "{s}");
        s
    }

    #[test]
    fn big_endian_and_old_versions_are_refused_by_name() {
        let mut b = Bytes(b"GGUF".to_vec());
        b.0.extend_from_slice(&3u32.to_be_bytes());
        b.u64(0).u64(0);
        assert!(err(&b).contains("big-endian"));
        assert!(err(&Bytes::header(1, 0, 0)).contains("version 1"));
        assert!(err(&Bytes(b"GGUX\x03\0\0\0".to_vec())).contains("not a GGUF"));
        assert!(err(&Bytes(b"GG".to_vec())).contains("not a GGUF"));
    }

    #[test]
    fn truncated_headers_are_refused() {
        let full = valid();
        for cut in [5, 12, 20, 30, 60, 90] {
            let b = Bytes(full.0[..cut].to_vec());
            let e = err(&b);
            assert!(
                e.contains("truncated") || e.contains("impossible"),
                "{cut}: {e}"
            );
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        assert!(err(&Bytes::header(3, u64::MAX, 0)).contains("tensor count"));
        assert!(err(&Bytes::header(3, 0, u64::MAX)).contains("metadata count"));
        let mut b = Bytes::header(3, 0, 1);
        b.str("k").u32(9).u32(0).u64(u64::MAX / 2);
        assert!(err(&b).contains("array length"));
        let mut b = Bytes::header(3, 0, 1);
        b.str("k").u32(9).u32(8).u64(1 << 40);
        assert!(err(&b).contains("array length"));
    }

    #[test]
    fn counts_past_the_limits_are_refused_even_when_the_bytes_exist() {
        let mut b = Bytes::header(3, 0, MAX_KEYS + 1);
        b.zeros(13 * (MAX_KEYS as usize + 1));
        assert!(err(&b).contains("too large"));
        let mut b = Bytes::header(3, 0, 1);
        b.str("k").u32(9).u32(9).u64(MAX_NESTED_ARRAYS + 1);
        b.zeros(12 * (MAX_NESTED_ARRAYS as usize + 1));
        assert!(err(&b).contains("too large"));
    }

    #[test]
    fn string_arrays_read_back_in_order() {
        let mut b = Bytes::header(3, 0, 1);
        b.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(3);
        b.str("a").str("").str("ccc");
        let f = b.open().unwrap();
        let Some(Array::String(s)) = f.get_array("tokenizer.ggml.tokens") else {
            panic!("not a string array");
        };
        assert_eq!(s.iter().collect::<Vec<_>>(), vec!["a", "", "ccc"]);
        assert_eq!((s.len(), s.get(2), s.get(3)), (3, Some("ccc"), None));
    }

    #[test]
    fn huge_and_invalid_strings_are_refused() {
        let mut b = Bytes::header(3, 0, 1);
        b.u64(u64::MAX).zeros(32);
        assert!(err(&b).contains("exceeds"));
        let mut b = Bytes::header(3, 0, 1);
        b.u64(1000).zeros(10);
        assert!(err(&b).contains("truncated"));
        let mut b = Bytes::header(3, 0, 1);
        b.u64(2);
        b.0.extend_from_slice(&[0xff, 0xfe]);
        b.u32(4).u32(0);
        assert!(err(&b).contains("UTF-8"));
    }

    #[test]
    fn unknown_value_types_duplicates_and_deep_nesting_are_refused() {
        let mut b = Bytes::header(3, 0, 1);
        b.str("k").u32(13).u32(0);
        assert!(err(&b).contains("unknown value type 13"));
        let mut b = Bytes::header(3, 0, 2);
        b.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
        assert!(err(&b).contains("twice"));
        let mut b = Bytes::header(3, 0, 1);
        b.str("k").u32(9);
        for _ in 0..=MAX_ARRAY_DEPTH {
            b.u32(9).u64(1);
        }
        b.u32(0).u64(0).zeros(64);
        assert!(err(&b).contains("nested"));
    }

    #[test]
    fn bad_alignments_are_refused() {
        for (ty, v) in [(4u32, 0u32), (4, 3), (4, 1 << 30), (5, 32)] {
            let mut b = Bytes::header(3, 0, 1);
            b.str("general.alignment").u32(ty).u32(v);
            assert!(err(&b).contains("alignment"), "{ty} {v}");
        }
    }

    #[test]
    fn bad_tensor_infos_are_refused_naming_the_tensor() {
        let one = |name: &str, dims: &[u64], ty: u32, offset: u64, data: usize| {
            let mut b = Bytes::header(3, 1, 0);
            b.tensor(name, dims, ty, offset).pad(32).zeros(data);
            b
        };
        let e = err(&one("t", &[1, 1, 1, 1, 1], 0, 0, 4));
        assert!(e.contains("`t`") && e.contains("5 dimensions"), "{e}");
        let e = err(&one("t", &[u64::MAX, 2], 0, 0, 4));
        assert!(e.contains("overflow"), "{e}");
        let e = err(&one("t", &[1 << 62, 4], 0, 0, 4));
        assert!(e.contains("overflow"), "{e}");
        let e = err(&one("t", &[4], 99, 0, 16));
        assert!(e.contains("unknown GGML type id 99"), "{e}");
        let e = err(&one("t", &[33], 8, 0, 64));
        assert!(e.contains("multiple of the Q8_0 block size 32"), "{e}");
        let e = err(&one("t", &[4], 0, 8, 64));
        assert!(e.contains("not a multiple of the alignment"), "{e}");
        let e = err(&one("t", &[4], 0, 0, 8));
        assert!(e.contains("outside the file"), "{e}");
        let e = err(&one("t", &[4], 0, u64::MAX - 31, 8));
        assert!(e.contains("outside the file"), "{e}");
        let mut b = Bytes::header(3, 2, 0);
        b.tensor("a", &[16], 0, 0).tensor("b", &[16], 0, 32);
        b.pad(32).zeros(128);
        let e = err(&b);
        assert!(
            e.contains("overlap") && e.contains("`a`") && e.contains("`b`"),
            "{e}"
        );
        let mut b = Bytes::header(3, 2, 0);
        b.tensor("a", &[4], 0, 0).tensor("a", &[4], 0, 32);
        b.pad(32).zeros(64);
        assert!(err(&b).contains("twice"));
    }

    #[test]
    fn undecodable_types_are_listed_but_refused_when_read() {
        let mut b = Bytes::header(3, 1, 0);
        b.tensor("g", &[256], 16, 0).pad(32).zeros(66);
        let f = b.open().unwrap();
        let t = f.tensor("g").unwrap();
        assert_eq!(t.ggml_type, GgmlType::IQ2_XXS);
        let e = f
            .read_blocks(t, 0, &mut Vec::new(), &mut [0f32; 256])
            .unwrap_err();
        assert!(
            e.to_string().contains("IQ2_XXS") && e.to_string().contains("`g`"),
            "{e}"
        );
    }

    #[test]
    fn reads_outside_a_tensor_are_refused() {
        let f = valid().open().unwrap();
        let a = f.tensor("a").unwrap();
        let e = f.read_bytes(a, 0..17, &mut [0u8; 17]).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let e = f
            .read_blocks(a, 1, &mut Vec::new(), &mut [0f32; 4])
            .unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }
}
