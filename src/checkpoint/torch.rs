//! PyTorch checkpoint files (`pytorch_model.bin`, `*.pt`, `*.pth`), read without
//! running anything: the pickle goes through the restricted machine of [`super::pickle`],
//! and tensor data stays on disk, found as byte ranges of the file like a safetensors
//! shard's.
//!
//! Two containers exist. The zip format `torch.save` writes since PyTorch 1.6:
//! `PREFIX/data.pkl` (the pickle), `PREFIX/data/KEY` (one uncompressed entry per
//! storage), `PREFIX/byteorder`. And the legacy format before it: a magic-number
//! pickle, a protocol-version pickle, a system-info pickle, the main pickle, a pickle
//! listing the storage keys, then each storage as an 8-byte element count and its raw
//! bytes, in that order.
//!
//! A tensor is a view of a storage: an element offset, a shape and strides. Views that
//! are row-major contiguous (the usual case, also slices such as a chunk of a fused
//! qkv) become plain byte ranges; others (a transposed weight) keep their layout and
//! are gathered when read. Tensors sharing a storage (tied embeddings) point at the same
//! bytes.

use super::layout::Strided;
use super::pickle::{self, StorageRef, TensorRef, Value};
use super::shard::{Shard, ShardTensor};
use crate::error::{Error, Result, TorchError};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Largest pickle we parse (a state dict's pickle is kilobytes to a few megabytes; the
/// tensor data is elsewhere).
pub const MAX_PICKLE: u64 = 256 << 20;

/// Largest non-contiguous view gathered into memory (such views are rare in state dicts:
/// a transposed weight; a broadcast view with zero strides could otherwise claim any
/// size from a few bytes of storage).
pub const MAX_GATHER: u64 = 1 << 30;

/// Extensions of PyTorch checkpoint files.
pub const EXTENSIONS: &[&str] = &["bin", "pt", "pth"];

/// Files of a training run that are pickles but not model weights.
pub fn is_training_state(file_name: &str) -> bool {
    matches!(
        file_name,
        "training_args.bin" | "optimizer.pt" | "optimizer.bin" | "scheduler.pt" | "scaler.pt"
    ) || file_name.starts_with("rng_state")
}

/// Whether `path` names a PyTorch checkpoint file (by extension).
pub fn is_torch_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e))
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    TorchError::new(path, reason).into()
}

/// Where each storage's bytes are: file offset and length.
type Storages = BTreeMap<String, (u64, u64)>;

/// Opens a PyTorch checkpoint file as a shard: its tensors and where their bytes are.
pub fn open(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat", e))?
        .len();
    let mut magic = [0u8; 4];
    let n = file
        .read_at(&mut magic, 0)
        .map_err(|e| Error::io(path, "cannot read", e))?;
    let (root, storages) = if n == 4 && &magic == b"PK\x03\x04" {
        read_zip(path, &file)?
    } else if n >= 2 && magic[0] == 0x80 {
        read_legacy(path, &file, file_len)?
    } else {
        return Err(invalid(
            path,
            "neither a zip archive nor a pickle: not a file written by torch.save",
        ));
    };
    let mut found = Vec::new();
    let mut ignored = 0usize;
    collect(&root, "", &mut found, &mut ignored, 0);
    if found.is_empty() {
        return Err(invalid(
            path,
            "the pickle holds no tensors (is this a state dict?)",
        ));
    }
    let mut tensors = Vec::with_capacity(found.len());
    for (name, t) in found {
        tensors.push(place(path, name, t, &storages)?);
    }
    let mut shard = Shard::from_tensors(path, file, file_len, tensors);
    if ignored > 0 {
        shard.notes.push(format!(
            "{}: {ignored} non-tensor values in the pickle were ignored",
            path.display()
        ));
    }
    Ok(shard)
}

/// Tensors of a state dict; nested dicts (`{"model": {...}}`) give dotted names.
fn collect<'a>(
    v: &'a Value,
    prefix: &str,
    out: &mut Vec<(String, &'a TensorRef)>,
    ignored: &mut usize,
    depth: usize,
) {
    let Value::Dict(items) = v else {
        *ignored += 1;
        return;
    };
    for (k, v) in items {
        let key = match k {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => {
                *ignored += 1;
                continue;
            }
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match v {
            Value::Tensor(t) => out.push((name, t)),
            Value::Dict(_) if depth < 8 => collect(v, &name, out, ignored, depth + 1),
            _ => *ignored += 1,
        }
    }
}

/// Turns a tensor view into a shard entry, checking it stays inside its storage.
fn place(path: &Path, name: String, t: &TensorRef, storages: &Storages) -> Result<ShardTensor> {
    let bad = |why: String| Error::from(TorchError::tensor(path, &name, why));
    let StorageRef { key, dtype, numel } = &t.storage;
    let &(start, len) = storages
        .get(key)
        .ok_or_else(|| bad(format!("storage `{key}` is not in the file")))?;
    let es = dtype.as_ref().map_or(1, |d| d.size()) as u64;
    if numel.checked_mul(es) != Some(len) {
        return Err(bad(format!(
            "storage `{key}` holds {len} bytes, not {numel} elements of {es} bytes"
        )));
    }
    let count = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| bad("shape overflows".into()))?;
    // The last element the view touches, relative to its offset.
    let reach = t
        .shape
        .iter()
        .zip(&t.strides)
        .try_fold(0u64, |a, (&d, &s)| {
            (d as u64)
                .saturating_sub(1)
                .checked_mul(s as u64)
                .and_then(|x| a.checked_add(x))
        })
        .ok_or_else(|| bad("strides overflow".into()))?;
    let span = if count == 0 { 0 } else { reach + 1 };
    if t.storage_offset
        .checked_add(span)
        .is_none_or(|e| e > *numel)
    {
        return Err(bad(format!(
            "view (offset {}, shape {:?}, strides {:?}) reaches past its storage of {numel} elements",
            t.storage_offset, t.shape, t.strides
        )));
    }
    let offset = start + t.storage_offset * es;
    let row_major = is_row_major(&t.shape, &t.strides);
    if !row_major && count * es > MAX_GATHER {
        return Err(bad(format!(
            "a non-contiguous view of {} bytes (strides {:?}); weightdiff gathers such views in memory up to {MAX_GATHER} bytes",
            count * es,
            t.strides
        )));
    }
    let layout = (!row_major).then(|| {
        Arc::new(Strided {
            span_start: offset,
            span_len: span * es,
            shape: t.shape.clone(),
            strides: t.strides.clone(),
            elem_size: es as usize,
        })
    });
    Ok(ShardTensor {
        name,
        dtype: dtype.clone(),
        shape: t.shape.clone(),
        offset,
        len: count * es,
        layout,
    })
}

/// Row-major contiguous: each stride is the product of the later sizes (dimensions of
/// size 1 may carry any stride).
fn is_row_major(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

fn pickle_error(path: &Path, what: &str, e: pickle::PickleError) -> Error {
    invalid(path, format!("{what}: {e}"))
}

/// The zip format: the pickle from `PREFIX/data.pkl`, storages from `PREFIX/data/KEY`.
fn read_zip(path: &Path, file: &File) -> Result<(Value, Storages)> {
    let reader = file
        .try_clone()
        .map_err(|e| Error::io(path, "cannot open", e))?;
    let zerr = |e: zip::result::ZipError| invalid(path, format!("bad zip archive: {e}"));
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(reader)).map_err(zerr)?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|s| s.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(zerr)?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| {
            invalid(
                path,
                "zip archive without PREFIX/data.pkl: not written by torch.save",
            )
        })?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let small = |zip: &mut zip::ZipArchive<_>, name: &str| -> Result<Option<Vec<u8>>> {
        let Some(i) = zip.index_for_name(name) else {
            return Ok(None);
        };
        let mut f = zip.by_index(i).map_err(zerr)?;
        if f.size() > MAX_PICKLE {
            return Err(invalid(
                path,
                format!(
                    "{name} is {} bytes, over the {MAX_PICKLE}-byte limit",
                    f.size()
                ),
            ));
        }
        let mut buf = Vec::with_capacity(f.size() as usize);
        std::io::Read::read_to_end(&mut f, &mut buf)
            .map_err(|e| invalid(path, format!("cannot read {name}: {e}")))?;
        Ok(Some(buf))
    };
    if let Some(order) = small(&mut zip, &format!("{prefix}byteorder"))?
        && order != b"little"
    {
        return Err(invalid(
            path,
            format!(
                "byte order `{}`: only little-endian checkpoints are supported",
                String::from_utf8_lossy(&order)
            ),
        ));
    }
    let data = small(&mut zip, &pkl)?.expect("listed");
    let (root, _) = pickle::load(&data).map_err(|e| pickle_error(path, &pkl, e))?;
    let mut storages = Storages::new();
    let data_dir = format!("{prefix}data/");
    for (i, name) in names.iter().enumerate() {
        let Some(key) = name.strip_prefix(&data_dir) else {
            continue;
        };
        let f = zip.by_index_raw(i).map_err(zerr)?;
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(invalid(
                path,
                format!(
                    "{name} is compressed ({}); torch.save stores storages uncompressed",
                    f.compression()
                ),
            ));
        }
        let start = f
            .data_start()
            .ok_or_else(|| invalid(path, format!("{name}: no data offset")))?;
        storages.insert(key.to_string(), (start, f.size()));
    }
    Ok((root, storages))
}

/// Magic number of the legacy format (`torch.serialization.MAGIC_NUMBER`), as the
/// little-endian bytes of the pickled integer.
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
const LEGACY_PROTOCOL: i64 = 1001;

/// The legacy format: five pickles, then the storages in the order the last one lists.
fn read_legacy(path: &Path, file: &File, file_len: u64) -> Result<(Value, Storages)> {
    // The pickles come first and are small; read a growing prefix until they parse.
    let mut want = file_len.min(1 << 20);
    let (values, pickles_end) = loop {
        let mut buf = vec![0u8; want as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| Error::io(path, "cannot read", e))?;
        match parse_legacy_pickles(&buf) {
            Ok(v) => break v,
            Err(e) if e.reason == "truncated pickle" && want < file_len.min(MAX_PICKLE) => {
                want = (want * 4).min(file_len).min(MAX_PICKLE);
            }
            Err(e) => return Err(pickle_error(path, "legacy checkpoint", e)),
        }
    };
    let [magic, protocol, sys_info, root, keys] = values;
    let magic_ok = match magic {
        Value::BigInt(b) if b.len() <= 16 => {
            let mut x = [0u8; 16];
            x[..b.len()].copy_from_slice(&b);
            u128::from_le_bytes(x) == LEGACY_MAGIC
        }
        _ => false,
    };
    if !magic_ok {
        return Err(invalid(
            path,
            "a pickle, but not a torch.save checkpoint (wrong magic number)",
        ));
    }
    if protocol != Value::Int(LEGACY_PROTOCOL) {
        return Err(invalid(
            path,
            format!("legacy protocol {protocol:?}, expected {LEGACY_PROTOCOL}"),
        ));
    }
    if let Value::Dict(items) = &sys_info
        && items
            .iter()
            .any(|(k, v)| *k == Value::Str("little_endian".into()) && *v == Value::Bool(false))
    {
        return Err(invalid(
            path,
            "big-endian checkpoint: only little-endian ones are supported",
        ));
    }
    // Element sizes of the storages the tensors name.
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    let mut found = Vec::new();
    collect(&root, "", &mut found, &mut 0, 0);
    for (_, t) in &found {
        let es = t.storage.dtype.as_ref().map_or(1, |d| d.size()) as u64;
        sizes.insert(t.storage.key.clone(), es);
    }
    let Value::List(keys) = keys else {
        return Err(invalid(path, "the storage key list is not a list"));
    };
    let mut storages = Storages::new();
    let mut pos = pickles_end;
    for k in keys {
        let Value::Str(k) = k else {
            return Err(invalid(path, "a storage key is not a string"));
        };
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, pos).map_err(|_| {
            invalid(
                path,
                format!("storage `{k}` starts past the end of the file (truncated?)"),
            )
        })?;
        let numel = i64::from_le_bytes(n);
        let es = sizes.get(&k).copied().unwrap_or(1);
        let len = u64::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(es))
            .ok_or_else(|| invalid(path, format!("storage `{k}` has a bad size {numel}")))?;
        let start = pos + 8;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("storage `{k}` runs past the end of the file (truncated?)"),
                )
            })?;
        storages.insert(k, (start, len));
        pos = end;
    }
    if pos != file_len {
        return Err(invalid(
            path,
            format!("{} bytes after the last storage", file_len - pos),
        ));
    }
    Ok((root, storages))
}

/// The five pickles of a legacy file and where they end.
fn parse_legacy_pickles(buf: &[u8]) -> std::result::Result<([Value; 5], u64), pickle::PickleError> {
    let mut pos = 0;
    let mut next = || -> std::result::Result<Value, pickle::PickleError> {
        let (v, used) = pickle::load(&buf[pos..]).map_err(|mut e| {
            e.offset += pos;
            e
        })?;
        pos += used;
        Ok(v)
    };
    let values = [next()?, next()?, next()?, next()?, next()?];
    Ok((values, pos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_detection() {
        assert!(is_row_major(&[2, 3], &[3, 1]));
        assert!(is_row_major(&[1, 3], &[99, 1]));
        assert!(is_row_major(&[], &[]));
        assert!(!is_row_major(&[3, 2], &[1, 3]));
        assert!(!is_row_major(&[2, 3], &[4, 1]));
    }

    #[test]
    fn views_must_stay_inside_their_storage_and_bounded() {
        let storage = |numel| StorageRef {
            key: "0".into(),
            dtype: Ok(crate::checkpoint::dtype::DType::F32),
            numel,
        };
        let storages: Storages = [("0".to_string(), (100, 24))].into();
        let view = |offset, shape: &[usize], strides: &[usize]| TensorRef {
            storage: storage(6),
            storage_offset: offset,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        };
        let p = Path::new("m.bin");
        let ok = place(p, "t".into(), &view(2, &[2, 2], &[2, 1]), &storages).unwrap();
        assert_eq!((ok.offset, ok.len, ok.layout.is_none()), (108, 16, true));
        let tr = place(p, "t".into(), &view(0, &[3, 2], &[1, 3]), &storages).unwrap();
        assert!(tr.layout.is_some());
        for (v, why) in [
            (view(3, &[2, 2], &[2, 1]), "reaches past"),
            (view(0, &[1 << 40, 3], &[0, 1]), "gathers such views"),
            (view(0, &[usize::MAX, 3], &[1, 1]), "overflow"),
        ] {
            let e = place(p, "t".into(), &v, &storages).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        let wrong_size: Storages = [("0".to_string(), (100, 20))].into();
        assert!(place(p, "t".into(), &view(0, &[6], &[1]), &wrong_size).is_err());
    }

    #[test]
    fn gather_transposes() {
        // Storage [[0,1,2],[3,4,5]] (u8); the view is its transpose, shape [3,2].
        let s = Strided {
            span_start: 0,
            span_len: 6,
            shape: vec![3, 2],
            strides: vec![1, 3],
            elem_size: 1,
        };
        assert_eq!(s.gather(&[0, 1, 2, 3, 4, 5]), [0, 3, 1, 4, 2, 5]);
        let empty = Strided {
            shape: vec![0, 2],
            ..s.clone()
        };
        assert!(empty.gather(&[]).is_empty());
    }
}
