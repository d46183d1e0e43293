//! Reading checkpoints: resolving a model argument to its files, validating them, and
//! giving windows onto tensor bytes.
//!
//! A model argument is a Hugging Face directory (shards named by
//! `model.safetensors.index.json`, or `model.safetensors`, or loose `*.safetensors`;
//! failing those one `.gguf` file, then the PyTorch equivalents: the layouts of
//! [`formats::DIRECTORY`], tried in order), or a single `.safetensors` / `.gguf` /
//! `.bin` / `.pt` file ([`formats::FILES`]; SPEC §1). Nothing here loads tensor
//! data: opening a checkpoint reads headers (or a PyTorch file's pickle) only. Hub ids
//! are resolved to such a directory by [`crate::hub`].

pub mod dtype;
pub mod encoding;
pub mod formats;
pub mod gguf;
pub mod index;
pub mod layout;
pub mod mapped;
pub mod pickle;
pub mod quantized;
pub mod shard;
pub mod torch;

use crate::error::{Error, Result};
use crate::fsio::read_json_if_present;
use dtype::DType;
use serde::{Deserialize, Serialize};
use shard::{ReadMode, Shard, Window};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a model argument came from on the hub (recorded in the reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubOrigin {
    /// `ORG/NAME`.
    pub repo_id: String,
    /// The revision asked for (`main` by default).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// The snapshot directory read.
    pub snapshot: PathBuf,
}

/// Where one tensor's bytes live.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// `Err(name)` for a dtype weightdiff does not decode.
    pub dtype: std::result::Result<DType, String>,
    pub shape: Vec<usize>,
    shard: usize,
    offset: u64,
    len: u64,
    /// Gather plan of a non-contiguous PyTorch view.
    layout: Option<std::sync::Arc<layout::Strided>>,
    /// Stored in another encoding (GGUF blocks): the entry is its decoded F32 view.
    encoded: Option<std::sync::Arc<dyn encoding::Decode>>,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
    /// Bytes on disk.
    pub fn nbytes(&self) -> u64 {
        self.len
    }
    /// The rounding model of its stored values (mantissa bits, smallest normal
    /// exponent): the dtype's. `None` for an encoded tensor, whose error is its
    /// quantization step ([`Checkpoint::read_steps`]), and for integer dtypes.
    pub fn rounding(&self) -> Option<(i32, i32)> {
        match (&self.encoded, &self.dtype) {
            (Some(_), _) => None,
            (None, Ok(d)) => d.rounding(),
            (None, Err(_)) => None,
        }
    }

    /// Whether the values are decoded from another storage (quant blocks, scaled codes).
    pub fn is_encoded(&self) -> bool {
        self.encoded.is_some()
    }

    /// The dtype as written in the header (an encoded tensor's storage, e.g. `Q4_K`).
    pub fn dtype_name(&self) -> String {
        if let Some(d) = &self.encoded {
            return d.storage();
        }
        match &self.dtype {
            Ok(d) => d.as_str().to_string(),
            Err(s) => s.clone(),
        }
    }
}

/// An opened model: its validated shards and the tensors they hold.
#[derive(Debug)]
pub struct Checkpoint {
    /// The argument as given (for reports).
    pub source: PathBuf,
    /// `config.json`, when present.
    pub config: Option<serde_json::Value>,
    /// `generation_config.json`, when present.
    pub generation_config: Option<serde_json::Value>,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
    /// Tensors the index names that cannot be read (absent from their shard, …).
    pub broken: BTreeMap<String, String>,
    /// Problems that do not stop the run (tensor in a shard but not in the index, …).
    pub warnings: Vec<String>,
    /// Warnings that the numbers may be wrong (values not dequantized): also in
    /// `warnings`, and said on stderr by the CLI.
    pub caveats: Vec<String>,
    /// How [`Checkpoint::read`] gets bytes.
    pub read_mode: ReadMode,
    /// Set when the model was resolved from a hub id.
    pub hub: Option<HubOrigin>,
    /// The last non-contiguous tensors gathered, shared by their windows.
    gathered: std::sync::Mutex<Vec<(String, std::sync::Arc<Vec<u8>>)>>,
}

/// Refuses a file that is not weights before it is parsed as weights: `config.json` or
/// an index given as the model would otherwise fail as a safetensors header of absurd
/// length, which sends the user the wrong way.
fn refuse_side_file(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "safetensors" | "bin" | "pt" | "pth") {
        return Ok(());
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut head = [0u8; 64];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| Error::io(path, "cannot read", e))?;
    let first = head[..n].iter().find(|b| !b.is_ascii_whitespace());
    let what = if ext == "json" || matches!(first, Some(b'{' | b'[')) {
        "is JSON, not a checkpoint"
    } else if torch::is_torch_file(path) {
        return Ok(());
    } else if head[..n]
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        "is a text file, not a checkpoint"
    } else {
        // Binary, of an unknown extension: let the parsers judge.
        return Ok(());
    };
    Err(Error::NotAModel {
        path: path.into(),
        reason: format!(
            "{what}; give its directory ({}), or a .safetensors / pytorch_model.bin file",
            dir.display()
        ),
    })
}

/// The first bytes of a file (fewer when it is shorter; none when it cannot be read:
/// the format's reader then reports why).
fn file_head(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64);
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(64).read_to_end(&mut head);
    }
    head
}

/// Gathered non-contiguous tensors kept for the windows that follow.
const GATHERED_KEPT: usize = 2;

impl Checkpoint {
    /// Resolves and opens a model argument.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let mut ck = Self::open_local(path)?;
        quantized::apply(&mut ck);
        tracing::info!(
            model = %path.display(),
            files = ck.shards.len(),
            tensors = ck.tensors().len(),
            "opened checkpoint"
        );
        Ok(ck)
    }

    fn open_local(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotAModel {
                    path: path.into(),
                    reason: "no such file or directory".into(),
                }
            } else {
                Error::io(path, "cannot open model", e)
            }
        })?;
        if meta.is_file() {
            refuse_side_file(path)?;
            let mut ck = Checkpoint::empty(path);
            ck.add_file(formats::recognise(path, &file_head(path)), path)?;
            return Ok(ck);
        }
        if !meta.is_dir() {
            return Err(Error::NotAModel {
                path: path.into(),
                reason: "neither a file nor a directory".into(),
            });
        }
        let mut ck = Checkpoint::empty(path);
        ck.config = read_json_if_present(&path.join("config.json"))?;
        ck.generation_config = read_json_if_present(&path.join("generation_config.json"))?;
        let no_weights = || Error::NotAModel {
            path: path.into(),
            reason: format!("no {} in this directory", formats::expected_names()),
        };
        let names = file_names(path)?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let Some((format, selected)) = formats::select(&names) else {
            return Err(no_weights());
        };
        tracing::debug!(model = %path.display(), format = format.name, "directory layout");
        for skipped in names
            .iter()
            .filter(|n| torch::is_torch_file(Path::new(n)) && torch::is_training_state(n))
        {
            tracing::info!(file = %path.join(skipped).display(), "training state, not weights: skipped");
        }
        let taken: Vec<String> = match selected {
            formats::Selected::Index(index) => {
                let formats::Open::Shard(open) = format.format.open else {
                    unreachable!("an index names shards of a sharded format")
                };
                let index = ck.add_indexed(path, &path.join(index), open)?;
                if ck.shards.is_empty() {
                    return Err(no_weights());
                }
                index.files().into_iter().map(String::from).collect()
            }
            formats::Selected::Files(files) => {
                for f in &files {
                    let f = path.join(f);
                    check_inside(path, &f)?;
                    ck.add_file(format.format, &f)?;
                }
                files
            }
            formats::Selected::Ambiguous(files) => {
                return Err(Error::NotAModel {
                    path: path.into(),
                    reason: format!(
                        "it holds several {} files ({}): give one of them as the model",
                        format.name,
                        files.join(", ")
                    ),
                });
            }
        };
        // Weight files the layout leaves out (a shard the index does not name, a
        // `consolidated.safetensors` beside `model.safetensors`) are said, not read.
        for n in names.iter().filter(|n| (format.weight_file)(n)) {
            if !taken.iter().any(|t| t == n) {
                let why = match format.select {
                    formats::Select::Index(_) => "not named by the index",
                    _ => "not part of this layout",
                };
                ck.warnings
                    .push(format!("{}: {why}; ignored", path.join(n).display()));
            }
        }
        Ok(ck)
    }

    /// Adds the tensors of one weights file of `format`.
    fn add_file(&mut self, format: &formats::FileFormat, path: &Path) -> Result<()> {
        match format.open {
            formats::Open::Shard(open) => {
                self.add_shard(open(path)?, None);
                Ok(())
            }
            formats::Open::Model(open) => open(self, path),
        }
    }

    /// Adds the tensors of a GGUF file, each an F32 view decoded from its blocks.
    fn add_gguf(&mut self, g: gguf::decode::Opened) -> Result<()> {
        let path = g.file.path().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, "cannot open", e))?;
        let si = self.shards.len();
        self.shards.push(Shard::from_tensors(
            &path,
            file,
            g.file.file_len(),
            Vec::new(),
        ));
        for (name, shape, decode) in g.tensors {
            let numel: u64 = shape.iter().map(|&d| d as u64).product();
            self.tensors.insert(
                name.clone(),
                TensorEntry {
                    name,
                    dtype: Ok(DType::F32),
                    shape,
                    shard: si,
                    offset: 0,
                    len: numel * 4,
                    layout: None,
                    encoded: Some(decode),
                },
            );
        }
        self.broken.extend(g.broken);
        self.warnings.extend(g.notes);
        Ok(())
    }

    /// Opens the shards an index names (each must exist inside `dir`) with `open`, takes
    /// the tensors the index assigns to each, and records the tensors it lists that no
    /// shard holds. Returns the index.
    fn add_indexed(
        &mut self,
        dir: &Path,
        index_path: &Path,
        open: fn(&Path) -> Result<Shard>,
    ) -> Result<index::Index> {
        let index = index::Index::read(index_path, dir)?;
        for file in index.files() {
            let shard_path = dir.join(file);
            if !shard_path.is_file() {
                return Err(Error::InvalidIndex {
                    path: index_path.to_path_buf(),
                    tensor: None,
                    reason: format!("shard `{file}` named by the index does not exist"),
                });
            }
            check_inside(dir, &shard_path)?;
            let shard = open(&shard_path)?;
            self.add_shard(shard, Some((&index, file)));
        }
        for (name, file) in &index.weight_map {
            if !self.tensors.contains_key(name) && !self.broken.contains_key(name) {
                self.broken.insert(
                    name.clone(),
                    format!(
                        "{}: listed by the index but absent from this shard",
                        dir.join(file).display()
                    ),
                );
            }
        }
        Ok(index)
    }

    fn empty(path: &Path) -> Checkpoint {
        Checkpoint {
            source: path.to_path_buf(),
            config: None,
            generation_config: None,
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            broken: BTreeMap::new(),
            warnings: Vec::new(),
            caveats: Vec::new(),
            read_mode: ReadMode::default(),
            hub: None,
            gathered: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Registers a shard's tensors. With an index, only the tensors it assigns to this
    /// file are taken (as `transformers` loads them); the others are reported.
    fn add_shard(&mut self, shard: Shard, index: Option<(&index::Index, &str)>) {
        let si = self.shards.len();
        for t in shard.tensors() {
            if let Some((idx, file)) = index {
                match idx.weight_map.get(&t.name) {
                    Some(f) if f == file => {}
                    Some(f) => {
                        self.warnings.push(format!(
                            "{}: tensor `{}` is also in this shard but the index assigns it to `{f}`; ignored here",
                            shard.path().display(),
                            t.name
                        ));
                        continue;
                    }
                    None => {
                        self.warnings.push(format!(
                            "{}: tensor `{}` is in this shard but not in the index; ignored",
                            shard.path().display(),
                            t.name
                        ));
                        continue;
                    }
                }
            }
            if let Some(prev) = self.tensors.get(&t.name) {
                // The earlier one may be in this very file (a pickle can repeat a key).
                let first = self.shards.get(prev.shard).unwrap_or(&shard).path();
                self.warnings.push(format!(
                    "{}: tensor `{}` also appears in {}; the first is used",
                    shard.path().display(),
                    t.name,
                    first.display()
                ));
                continue;
            }
            self.tensors.insert(
                t.name.clone(),
                TensorEntry {
                    name: t.name.clone(),
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                    shard: si,
                    offset: t.offset,
                    len: t.len,
                    layout: t.layout.clone(),
                    encoded: None,
                },
            );
        }
        self.warnings.extend(shard.notes.iter().cloned());
        self.shards.push(shard);
    }

    /// All readable tensors, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// Paths of the shard files.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path())
    }

    /// The file holding `entry`.
    pub fn path_of(&self, entry: &TensorEntry) -> &Path {
        self.shards[entry.shard].path()
    }

    /// Bytes `[start, start + len)` of `entry`'s data.
    pub fn read(&self, entry: &TensorEntry, start: u64, len: u64) -> Result<Window> {
        assert!(
            start + len <= entry.len,
            "window past the end of tensor data"
        );
        if let Some(d) = &entry.encoded {
            // F32 elements of the decoded view: the pipeline cuts windows on elements.
            let raw = |e: &TensorEntry, s: u64, l: u64| self.read(e, s, l);
            return encoding::decode_elements(d.as_ref(), &raw, start / 4..(start + len) / 4);
        }
        let shard = &self.shards[entry.shard];
        let fail = |e: std::io::Error| Error::Tensor {
            path: shard.path().to_path_buf(),
            tensor: entry.name.clone(),
            reason: format!("cannot read data: {e}"),
        };
        let Some(layout) = &entry.layout else {
            return shard
                .window(entry.offset + start, len, self.read_mode)
                .map_err(fail);
        };
        // A non-contiguous view: gather it whole once; its windows slice the copy.
        let range = start as usize..(start + len) as usize;
        let mut kept = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, bytes)) = kept.iter().find(|(n, _)| *n == entry.name) {
            return Ok(Window::Shared(bytes.clone(), range));
        }
        let span = shard
            .window(layout.span_start, layout.span_len, self.read_mode)
            .map_err(fail)?;
        let bytes = std::sync::Arc::new(layout.gather(&span));
        if kept.len() >= GATHERED_KEPT {
            kept.remove(0);
        }
        kept.push((entry.name.clone(), bytes.clone()));
        Ok(Window::Shared(bytes, range))
    }

    /// The quantization steps of the decoded values that [`Self::read`] gives for the
    /// same bytes `[start, start + len)` of an encoded `entry` (one f32 step per f32
    /// value, [`encoding`]'s definition); `None` for a tensor stored as plain elements or
    /// a format without a step model.
    pub fn read_steps(&self, entry: &TensorEntry, start: u64, len: u64) -> Result<Option<Window>> {
        let Some(d) = &entry.encoded else {
            return Ok(None);
        };
        assert!(
            start + len <= entry.len,
            "window past the end of tensor data"
        );
        let raw = |e: &TensorEntry, s: u64, l: u64| self.read(e, s, l);
        encoding::step_elements(d.as_ref(), &raw, start / 4..(start + len) / 4)
    }

    /// [`Self::read`] and [`Self::read_steps`] of the same bytes, decoded in one pass
    /// where the format allows it (the diff of a quant against its original).
    pub fn read_with_steps(
        &self,
        entry: &TensorEntry,
        start: u64,
        len: u64,
    ) -> Result<(Window, Option<Window>)> {
        let Some(d) = &entry.encoded else {
            return Ok((self.read(entry, start, len)?, None));
        };
        assert!(
            start + len <= entry.len,
            "window past the end of tensor data"
        );
        let raw = |e: &TensorEntry, s: u64, l: u64| self.read(e, s, l);
        encoding::decode_elements_and_steps(d.as_ref(), &raw, start / 4..(start + len) / 4)
    }

    /// Call after using a window of `entry`: an error naming the shard and the tensor if
    /// the file shrank while the window's bytes were read in place.
    pub fn check(&self, entry: &TensorEntry, window: &Window) -> Result<()> {
        window.intact().map_err(|e| Error::Tensor {
            path: self.shards[entry.shard].path().to_path_buf(),
            tensor: entry.name.clone(),
            reason: format!("cannot read data: {e}"),
        })
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.len).sum()
    }
}

/// A shard must resolve (after `..` and symlinks) to a file inside the model directory,
/// so a planted symlink cannot make us read elsewhere. The one exception is the Hugging
/// Face cache layout, where `models--ORG--NAME/snapshots/REV/` holds symlinks into
/// `models--ORG--NAME/blobs/`.
fn check_inside(dir: &Path, file: &Path) -> Result<()> {
    let canon = |p: &Path| {
        p.canonicalize()
            .map_err(|e| Error::io(p, "cannot resolve path", e))
    };
    let (cdir, cfile) = (canon(dir)?, canon(file)?);
    if cfile.starts_with(&cdir) {
        return Ok(());
    }
    let repo = cdir
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent);
    if let Some(repo) = repo
        && repo
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("models--"))
        && cfile.starts_with(repo.join("blobs"))
    {
        return Ok(());
    }
    Err(Error::NotAModel {
        path: file.to_path_buf(),
        reason: format!(
            "resolves to {}, outside the model directory {}; refusing to read it",
            cfile.display(),
            cdir.display()
        ),
    })
}

/// The names of the files directly inside `dir`, sorted. Links are followed; a dangling
/// link or a link loop is listed too, so that when it is named like a weights file it
/// is that file's error ("too many levels of symbolic links"), not "no weights here".
fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list directory", e))? {
        let path = entry
            .map_err(|e| Error::io(dir, "cannot list directory", e))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if std::fs::metadata(&path).map_or(true, |m| m.is_file()) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}
