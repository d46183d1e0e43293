//! `model.safetensors.index.json`: the `weight_map` from tensor name to shard file.
//!
//! The index is untrusted: a shard name must be a relative path that stays inside the
//! model directory (no absolute paths, no `..`), so a hostile index cannot make us
//! read arbitrary files.

use crate::error::{Error, Result};
use crate::fsio::read_json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

/// A parsed, path-checked index.
#[derive(Debug)]
pub struct Index {
    /// Tensor name → shard file name (relative to the model directory).
    pub weight_map: BTreeMap<String, String>,
}

impl Index {
    /// Reads and checks the index at `path` for the model directory `dir`.
    pub fn read(path: &Path, dir: &Path) -> Result<Index> {
        let bad = |tensor: Option<&str>, reason: String| Error::InvalidIndex {
            path: path.to_path_buf(),
            tensor: tensor.map(str::to_string),
            reason,
        };
        let value = read_json(path)?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad(None, "no `weight_map` object".into()))?;
        let mut weight_map = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(Some(name), "its `weight_map` entry is not a string".into()))?;
            check_confined(file).map_err(|why| {
                bad(
                    Some(name),
                    format!(
                        "shard `{file}` {why}; shards must be inside {}",
                        dir.display()
                    ),
                )
            })?;
            weight_map.insert(name.clone(), file.to_string());
        }
        Ok(Index { weight_map })
    }

    /// The distinct shard files, sorted.
    pub fn files(&self) -> Vec<&str> {
        let set: BTreeSet<&str> = self.weight_map.values().map(String::as_str).collect();
        set.into_iter().collect()
    }
}

/// A shard name must be a plain relative path with no `..`, root or prefix component.
fn check_confined(file: &str) -> std::result::Result<(), &'static str> {
    if file.is_empty() {
        return Err("is empty");
    }
    for c in Path::new(file).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("climbs out with `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_confined;

    #[test]
    fn shard_names_must_stay_inside_the_directory() {
        assert!(check_confined("model-00001-of-00002.safetensors").is_ok());
        assert!(check_confined("sub/model.safetensors").is_ok());
        assert!(check_confined("../x.safetensors").is_err());
        assert!(check_confined("a/../../x.safetensors").is_err());
        assert!(check_confined("/etc/passwd").is_err());
        assert!(check_confined("").is_err());
    }
}
