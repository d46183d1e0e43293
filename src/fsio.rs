//! The file system, at the bottom of the data flow: atomic writes, the symlink guard,
//! the output-directory lock, and bounded reads of small JSON files. Every module that
//! puts a file on disk or reads a side file goes through here, so the rules (no
//! half-written output, never write through a planted link, never slurp a huge "JSON")
//! hold everywhere.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Largest `config.json` / index file we are willing to parse (they are a few KB to a
/// few MB in practice; the bound keeps a hostile file from making us allocate freely).
pub const MAX_JSON_FILE: u64 = 100_000_000;

/// Name of the lock file that keeps two runs from writing into one output directory.
pub const LOCK_FILE: &str = ".weightdiff.lock";

/// An exclusive lock on an output directory, held until dropped (or the process ends:
/// the OS releases it even after SIGKILL, so a crashed run never leaves a stale lock).
pub struct OutputLock {
    _file: std::fs::File,
}

/// Creates `dir` if needed and locks it for this run; a second run is refused with
/// [`Error::Locked`] rather than interleaving its files with ours.
pub fn lock_output_dir(dir: &Path) -> Result<OutputLock> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::io(
            dir,
            "cannot use as the output directory",
            std::io::Error::other(
                "it is a file, not a directory; give -o a directory (it is created if missing)",
            ),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(dir, "cannot create output directory", e))?;
    let path = dir.join(LOCK_FILE);
    refuse_symlink(&path)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, "cannot open lock file", e))?;
    match file.try_lock() {
        Ok(()) => Ok(OutputLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
            dir: dir.to_path_buf(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, "cannot lock", e)),
    }
}

/// Refuses a path that is a symbolic link: outputs never follow a link planted in the
/// output directory to somewhere else.
pub fn refuse_symlink(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::io(
            path,
            "refusing to write through a symbolic link",
            std::io::Error::other("the path is a symlink"),
        ));
    }
    Ok(())
}

/// Creates an output subdirectory, refusing a symlink in its place.
pub fn create_output_dir(dir: &Path) -> Result<()> {
    refuse_symlink(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create directory", e))
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, flushed to
/// disk, then renamed over `path`. A reader (or a run killed half-way) sees either the
/// old file or the whole new one, never a truncated one, because rename within a
/// directory is atomic on POSIX filesystems.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".weightdiff-")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, "cannot create a temporary file", e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| Error::io(path, "cannot write", e))?;
    // rename replaces a symlink at `path` itself rather than writing through it.
    tmp.persist(path)
        .map_err(|e| Error::io(path, "cannot rename into place", e.error))?;
    // Make the rename itself durable; best effort (some filesystems refuse fsync on a
    // directory, and the file's own data is already on disk).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Pretty JSON with a trailing newline.
pub fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("our documents always serialize");
    s.push(b'\n');
    s
}

/// Reads a small JSON side file; `Ok(None)` when it does not exist.
pub fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

/// Reads a small JSON file, bounded by [`MAX_JSON_FILE`].
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, "cannot stat", e))?
        .len();
    if len > MAX_JSON_FILE {
        return Err(Error::InvalidJson {
            path: path.into(),
            reason: format!("{len} bytes exceeds the {MAX_JSON_FILE}-byte limit"),
        });
    }
    let text = std::fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
    serde_json::from_slice(&text).map_err(|e| Error::InvalidJson {
        path: path.into(),
        reason: e.to_string(),
    })
}
