//! One `.safetensors` file: strict header validation, and windows onto its data.
//!
//! The header is validated exactly as the official implementation does (the
//! `safetensors` crate's `Metadata` deserializer checks dtypes, contiguous
//! non-overlapping offsets and shape × dtype = byte length; we add the header-length
//! bound and require the data section to end exactly at the end of the file), but
//! without mapping the file: only the header bytes are read.
//!
//! Tensor data is read in windows (see [`Shard::window`]): a window is a range of the
//! file mapped once for the run (the default, [`super::mapped`]) or read into a pooled
//! buffer; it is used and dropped, so resident memory stays bounded by the windows in
//! flight, never by the model size.

use crate::checkpoint::dtype::DType;
use crate::checkpoint::mapped::{Mapped, ShardMap};
use crate::error::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The same bound the official implementation enforces (`MAX_HEADER_SIZE` in
/// safetensors' `tensor.rs`): a header claiming more is rejected before allocating.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Size of the little-endian u64 header length that opens every file.
const N_LEN: u64 = 8;

/// A tensor as described by a shard's header.
#[derive(Debug, Clone)]
pub struct ShardTensor {
    pub name: String,
    /// `Err(name)` for a dtype the format knows but weightdiff does not decode.
    pub dtype: std::result::Result<DType, String>,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Length of the data in bytes.
    pub len: u64,
    /// For a PyTorch view that is not a contiguous run of bytes: how to gather it
    /// (`offset`/`len` then describe the row-major bytes it yields).
    pub layout: Option<std::sync::Arc<crate::checkpoint::layout::Strided>>,
}

/// An open, validated safetensors file.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    file: File,
    file_len: u64,
    /// Tensors in offset order.
    tensors: Vec<ShardTensor>,
    /// `__metadata__` of the header, if any.
    pub metadata: Option<std::collections::HashMap<String, String>>,
    /// Things worth telling the user about this file that did not stop reading it.
    pub notes: Vec<String>,
    /// The whole file mapped on its first in-place window (`None`: it could not be, and
    /// windows are read instead).
    map: std::sync::OnceLock<Option<std::sync::Arc<ShardMap>>>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    crate::error::ShardError::new(path, reason).into()
}

impl Shard {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Shard> {
        let mut file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "cannot stat", e))?
            .len();
        if file_len < N_LEN {
            return Err(invalid(
                path,
                format!("file is {file_len} bytes, too short for the 8-byte header length"),
            ));
        }
        let mut n_bytes = [0u8; N_LEN as usize];
        file.read_exact(&mut n_bytes)
            .map_err(|e| Error::io(path, "cannot read header length", e))?;
        let n = u64::from_le_bytes(n_bytes);
        if n > MAX_HEADER_SIZE {
            return Err(invalid(
                path,
                format!("header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit"),
            ));
        }
        if n > file_len - N_LEN {
            return Err(invalid(
                path,
                format!(
                    "header length {n} runs past the end of the file ({file_len} bytes); the file may be truncated"
                ),
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, "cannot read header", e))?;
        let text = std::str::from_utf8(&header)
            .map_err(|e| invalid(path, format!("header is not valid UTF-8: {e}")))?;
        let meta: safetensors::tensor::Metadata = serde_json::from_str(text).map_err(|e| {
            invalid(
                path,
                format!("header is not a valid safetensors header: {e}"),
            )
        })?;
        let data_start = N_LEN + n;
        let data_len = meta.data_len() as u64;
        if data_start + data_len != file_len {
            return Err(invalid(
                path,
                format!(
                    "tensor data ends at byte {} but the file has {file_len} bytes ({})",
                    data_start + data_len,
                    if data_start + data_len > file_len {
                        "truncated"
                    } else {
                        "trailing bytes"
                    }
                ),
            ));
        }
        let mut tensors: Vec<ShardTensor> = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| ShardTensor {
                dtype: DType::from_safetensors(info.dtype),
                shape: info.shape.clone(),
                offset: data_start + info.data_offsets.0 as u64,
                len: (info.data_offsets.1 - info.data_offsets.0) as u64,
                name,
                layout: None,
            })
            .collect();
        tensors.sort_by_key(|t| t.offset);
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            file_len,
            tensors,
            metadata: meta.metadata().clone(),
            notes: Vec::new(),
            map: Default::default(),
        })
    }

    /// A file whose tensors were located by another reader (PyTorch checkpoints).
    pub(crate) fn from_tensors(
        path: &Path,
        file: File,
        file_len: u64,
        mut tensors: Vec<ShardTensor>,
    ) -> Shard {
        tensors.sort_by(|a, b| a.offset.cmp(&b.offset).then_with(|| a.name.cmp(&b.name)));
        Shard {
            path: path.to_path_buf(),
            file,
            file_len,
            tensors,
            metadata: None,
            notes: Vec::new(),
            map: Default::default(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Tensors in offset order.
    pub fn tensors(&self) -> &[ShardTensor] {
        &self.tensors
    }

    /// Bytes `[offset, offset + len)` of the file.
    ///
    /// The file's current length is checked first: a shard truncated since it was
    /// opened gives an error for the tensors it no longer holds. A shard that shrinks
    /// while a mapped window is in use is caught by the SIGBUS guard of
    /// [`super::mapped`]: the window then reports it through [`Window::intact`].
    pub fn window(&self, offset: u64, len: u64, mode: ReadMode) -> std::io::Result<Window> {
        if len == 0 {
            return Ok(Window::Read(Vec::new()));
        }
        let now = self.file.metadata()?.len();
        if now != self.file_len {
            return Err(std::io::Error::other(format!(
                "file changed size since it was opened ({} -> {now} bytes)",
                self.file_len
            )));
        }
        let end = offset.checked_add(len).filter(|&e| e <= self.file_len);
        if end.is_none() {
            return Err(std::io::Error::other("range past the end of the file"));
        }
        let len_usize = usize::try_from(len).map_err(std::io::Error::other)?;
        if mode == ReadMode::Mapped
            && let Some(map) = self
                .map
                .get_or_init(|| ShardMap::map(&self.file, self.file_len))
        {
            return map.window(&self.path, offset, len).map(Window::InPlace);
        }
        // The bytes start on a cache line: AMX tiles load them a 64-byte row at a time,
        // and a row across two lines is two loads (`lowrank::tiles`).
        let mut buf = take_buffer(len_usize + LINE - 1);
        let start = buf.as_ptr().align_offset(LINE).min(LINE - 1);
        self.file
            .read_exact_at(&mut buf[start..start + len_usize], offset)?;
        Ok(Window::Pooled(buf, start..start + len_usize))
    }
}

/// How tensor bytes are read (`--read-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// In place: each shard mapped once for the run, a window's pages populated before
    /// use and released after it, a SIGBUS guard turning a file that shrinks during a
    /// read into an error for the tensor being read ([`super::mapped`], RELIABILITY.md).
    /// No copy of the bytes, but two `madvise` calls per window: with 1 MiB windows it
    /// measured slower than `Pread` (BENCHMARKS.md), hence not the default.
    Mapped,
    /// Positioned reads (`pread`) into pooled buffers (the default): one kernel copy per
    /// byte, into a buffer small enough to stay in cache; no signal handler installed.
    #[default]
    Pread,
}

impl std::str::FromStr for ReadMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mapped" => Ok(ReadMode::Mapped),
            "pread" => Ok(ReadMode::Pread),
            _ => Err(format!("unknown read mode `{s}` (mapped or pread)")),
        }
    }
}

/// Read buffers kept per thread for the next windows. A window's buffer is given back
/// when the window drops, so a thread that reads window after window (the diff's workers,
/// the low-rank stage's row blocks) reuses the same few buffers instead of asking the
/// allocator for fresh `len`-byte zeroed memory each time: fresh pages cost a page
/// fault and a zeroing per 4 KiB (14 % of the low-rank stage's time on the 32B-shaped
/// pair, and ~2.3 s per GiB first touched on these machines, BENCHMARKS.md).
/// The diff holds at most two windows per thread (base and fine-tuned) and the stage
/// two more, so four buffers suffice; larger ones are kept first.
const POOLED_BUFFERS: usize = 4;
/// A cache line: where a pooled window's bytes start.
const LINE: usize = 64;
/// Buffers larger than this are not kept (a gathered PyTorch tensor, a one-off whole
/// matrix): resident memory stays bounded by threads × POOLED_BUFFERS × this.
const POOLED_MAX_BYTES: usize = 32 << 20;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of at least `len` bytes from this thread's pool: the smallest that holds
/// `len`, else the largest, grown (only the growth is zeroed; the read overwrites the
/// rest). Buffers are never shrunk, so a window smaller than its buffer costs nothing.
fn take_buffer(len: usize) -> Vec<u8> {
    let pooled = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let i = p
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .or_else(|| p.iter().enumerate().max_by_key(|(_, b)| b.len()))
                .map(|(i, _)| i);
            i.map(|i| p.swap_remove(i))
        })
        .ok()
        .flatten();
    let mut buf = pooled.unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf
}

/// Returns a window's buffer to this thread's pool (the smallest goes when it is full).
fn give_back(buf: Vec<u8>) {
    if buf.is_empty() || buf.len() > POOLED_MAX_BYTES {
        return;
    }
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        p.push(buf);
        if p.len() > POOLED_BUFFERS {
            let i = p
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
                .expect("non-empty");
            p.swap_remove(i);
        }
    });
}

/// A view of some bytes of a shard: in place in the shard's mapping, read into a buffer,
/// or a range of a tensor gathered once and shared by its windows.
pub enum Window {
    InPlace(Mapped),
    Read(Vec<u8>),
    /// Bytes `.1` of a buffer of this thread's pool, given back on drop.
    Pooled(Vec<u8>, std::ops::Range<usize>),
    Shared(std::sync::Arc<Vec<u8>>, std::ops::Range<usize>),
    /// Bytes `.1` of decoded f32 values (an encoded tensor's window, `super::encoding`).
    Decoded(std::sync::Arc<Vec<f32>>, std::ops::Range<usize>),
}

impl Window {
    /// Call after using the bytes: an error if the file shrank while they were read in
    /// place (the bytes seen past the new end were zeros, not the file's). Always `Ok`
    /// for bytes that were copied.
    pub fn intact(&self) -> std::io::Result<()> {
        match self {
            Window::InPlace(m) => m.intact(),
            _ => Ok(()),
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Window::Pooled(v, _) = self {
            give_back(std::mem::take(v));
        }
    }
}

impl Deref for Window {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Window::InPlace(m) => m.bytes(),
            Window::Read(v) => v,
            Window::Pooled(v, r) => &v[r.clone()],
            Window::Shared(v, r) => &v[r.clone()],
            Window::Decoded(v, r) => &bytemuck::cast_slice::<f32, u8>(v)[r.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window's buffer goes back to the thread's pool and serves the next read of the
    /// same or a smaller size without a new allocation; reads still see only their bytes.
    #[test]
    fn read_buffers_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let shard = Shard::from_tensors(
            &path,
            File::open(&path).unwrap(),
            data.len() as u64,
            Vec::new(),
        );
        let w = shard.window(0, 2048, ReadMode::Pread).unwrap();
        assert_eq!(&w[..], &data[..2048]);
        let ptr = w.as_ptr();
        drop(w);
        let w = shard.window(100, 1000, ReadMode::Pread).unwrap();
        assert_eq!(w.as_ptr(), ptr, "the pooled buffer is reused");
        assert_eq!(&w[..], &data[100..1100]);
        // Two windows alive at once get two buffers.
        let w2 = shard.window(0, 10, ReadMode::Pread).unwrap();
        assert_ne!(w2.as_ptr(), ptr);
        assert_eq!(&w2[..], &data[..10]);
    }
}
