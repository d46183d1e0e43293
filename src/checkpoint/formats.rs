//! The registry of weight formats: which files of a directory (or of a hub repository)
//! hold a model's weights, and how one weights file is recognised and opened.
//!
//! Two tables, both tried in order, first match wins:
//!
//! - [`DIRECTORY`]: the layouts of a model directory, in the preference order of
//!   `transformers` (an index and its shards, then one file, then loose files;
//!   safetensors before PyTorch). [`Checkpoint::open`](super::Checkpoint::open) applies
//!   it to a directory's listing and [`crate::hub`] to a repository's file list, so a
//!   download fetches exactly the files that opening the snapshot will read.
//! - [`FILES`]: the formats of a single weights file given as the model: GGUF by its
//!   magic, PyTorch by its extension, and safetensors for the rest (its reader says
//!   what is wrong with a file that is none of them).
//!
//! A new format is one module and one line here.

use super::shard::Shard;
use super::{Checkpoint, gguf, torch};
use crate::error::Result;
use std::path::Path;

/// How a directory holds its weights.
pub struct DirFormat {
    /// What it is, for messages.
    pub name: &'static str,
    /// Which of the directory's files it takes.
    pub select: Select,
    /// What this layout's weight files are named like (files like that which the
    /// selection leaves out are reported).
    pub weight_file: fn(&str) -> bool,
    /// The format of its files.
    pub format: &'static FileFormat,
}

/// The rule by which a [`DirFormat`] picks its files from a directory listing.
pub enum Select {
    /// An index file whose `weight_map` names the shards.
    Index(&'static str),
    /// One file of this name.
    File(&'static str),
    /// Every top-level file its `weight_file` accepts.
    Matching,
    /// The one top-level file its `weight_file` accepts; several are ambiguous (GGUF
    /// repositories hold one file per quantization, and reading all is never meant).
    Single,
}

/// The directory layouts, in order of preference.
pub const DIRECTORY: &[DirFormat] = &[
    DirFormat {
        name: "sharded safetensors",
        select: Select::Index("model.safetensors.index.json"),
        weight_file: is_safetensors,
        format: &SAFETENSORS,
    },
    DirFormat {
        name: "safetensors",
        select: Select::File("model.safetensors"),
        weight_file: is_safetensors,
        format: &SAFETENSORS,
    },
    DirFormat {
        name: "loose safetensors",
        select: Select::Matching,
        weight_file: is_safetensors,
        format: &SAFETENSORS,
    },
    DirFormat {
        name: "GGUF",
        select: Select::Single,
        weight_file: is_gguf,
        format: &GGUF,
    },
    DirFormat {
        name: "sharded PyTorch",
        select: Select::Index("pytorch_model.bin.index.json"),
        weight_file: is_torch_weights,
        format: &PYTORCH,
    },
    DirFormat {
        name: "PyTorch",
        select: Select::File("pytorch_model.bin"),
        weight_file: is_torch_weights,
        format: &PYTORCH,
    },
    DirFormat {
        name: "loose PyTorch files",
        select: Select::Matching,
        weight_file: is_torch_weights,
        format: &PYTORCH,
    },
];

/// What a directory's listing selects.
#[derive(Debug, PartialEq, Eq)]
pub enum Selected {
    /// Read this index, then the shards it names.
    Index(String),
    /// Read these files.
    Files(Vec<String>),
    /// Several files where the layout takes one: the user must name it.
    Ambiguous(Vec<String>),
}

/// The first [`DIRECTORY`] layout that `names` (the top-level file names of a directory
/// or repository) hold, and the files it takes.
pub fn select(names: &[&str]) -> Option<(&'static DirFormat, Selected)> {
    DIRECTORY.iter().find_map(|f| {
        let picked = match f.select {
            Select::Index(index) => names
                .contains(&index)
                .then(|| Selected::Index(index.to_string())),
            Select::File(file) => names
                .contains(&file)
                .then(|| Selected::Files(vec![file.to_string()])),
            Select::Matching | Select::Single => {
                let mut files: Vec<String> = names
                    .iter()
                    .filter(|n| (f.weight_file)(n))
                    .map(|n| n.to_string())
                    .collect();
                files.sort();
                match (files.len(), &f.select) {
                    (0, _) => None,
                    (1, _) | (_, Select::Matching) => Some(Selected::Files(files)),
                    _ => Some(Selected::Ambiguous(files)),
                }
            }
        };
        picked.map(|p| (f, p))
    })
}

/// Every weights file name the directory layouts know, for "no weights here" messages.
pub fn expected_names() -> String {
    let named: Vec<&str> = DIRECTORY
        .iter()
        .filter_map(|f| match f.select {
            Select::Index(n) | Select::File(n) => Some(n),
            Select::Matching | Select::Single => None,
        })
        .collect();
    format!(
        "{}, *.safetensors, *.gguf or *.bin / *.pt",
        named.join(", ")
    )
}

fn is_gguf(name: &str) -> bool {
    name.ends_with(".gguf")
}

fn is_safetensors(name: &str) -> bool {
    name.ends_with(".safetensors")
}

/// A PyTorch file that is not training state (`optimizer.pt`, `training_args.bin`, …).
fn is_torch_weights(name: &str) -> bool {
    torch::is_torch_file(Path::new(name)) && !torch::is_training_state(name)
}

/// A format of one weights file.
pub struct FileFormat {
    /// What it is, for messages.
    pub name: &'static str,
    /// Whether a file given as the model is of this format, from its path and first
    /// bytes (up to 64).
    pub recognise: fn(&Path, &[u8]) -> bool,
    /// How its tensors are read.
    pub open: Open,
}

/// How a [`FileFormat`]'s tensors are read.
pub enum Open {
    /// As one shard of a model (which an index can name).
    Shard(fn(&Path) -> Result<Shard>),
    /// As a whole model: the reader maps names and decodes encodings itself.
    Model(fn(&mut Checkpoint, &Path) -> Result<()>),
}

pub const SAFETENSORS: FileFormat = FileFormat {
    name: "safetensors",
    recognise: |_, _| true,
    open: Open::Shard(Shard::open),
};

pub const PYTORCH: FileFormat = FileFormat {
    name: "PyTorch",
    recognise: |path, _| torch::is_torch_file(path),
    open: Open::Shard(torch::open),
};

pub const GGUF: FileFormat = FileFormat {
    name: "GGUF",
    recognise: |_, head| gguf::recognise(head),
    open: Open::Model(|ck, path| ck.add_gguf(gguf::decode::open(path)?)),
};

/// The formats of a single file given as the model, in the order tried; safetensors
/// takes what no other claims.
pub const FILES: &[&FileFormat] = &[&GGUF, &PYTORCH, &SAFETENSORS];

/// The format of the file at `path`, given its first bytes.
pub fn recognise(path: &Path, head: &[u8]) -> &'static FileFormat {
    FILES
        .iter()
        .copied()
        .find(|f| (f.recognise)(path, head))
        .expect("the last file format accepts every file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_layouts_follow_transformers_preference() {
        let pick = |names: &[&str]| select(names).map(|(f, s)| (f.name, s));
        assert_eq!(
            pick(&["model.safetensors.index.json", "model.safetensors", "x.bin"]),
            Some((
                "sharded safetensors",
                Selected::Index("model.safetensors.index.json".into())
            ))
        );
        assert_eq!(
            pick(&["consolidated.safetensors", "model.safetensors"]),
            Some((
                "safetensors",
                Selected::Files(vec!["model.safetensors".into()])
            ))
        );
        assert_eq!(
            pick(&["b.safetensors", "a.safetensors", "config.json"]),
            Some((
                "loose safetensors",
                Selected::Files(vec!["a.safetensors".into(), "b.safetensors".into()])
            ))
        );
        assert_eq!(
            pick(&["pytorch_model.bin", "training_args.bin"]),
            Some(("PyTorch", Selected::Files(vec!["pytorch_model.bin".into()])))
        );
        assert_eq!(
            pick(&["weights.pt", "optimizer.pt", "training_args.bin"]),
            Some((
                "loose PyTorch files",
                Selected::Files(vec!["weights.pt".into()])
            ))
        );
        assert_eq!(
            pick(&["model-Q8_0.gguf", "pytorch_model.bin"]),
            Some(("GGUF", Selected::Files(vec!["model-Q8_0.gguf".into()])))
        );
        assert_eq!(
            pick(&["b.gguf", "a.gguf"]),
            Some((
                "GGUF",
                Selected::Ambiguous(vec!["a.gguf".into(), "b.gguf".into()])
            ))
        );
        assert_eq!(pick(&["config.json", "README.md", "optimizer.pt"]), None);
    }
}
