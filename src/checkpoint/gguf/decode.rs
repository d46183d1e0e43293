//! A GGUF file as the tensors of a checkpoint: each Hugging Face tensor the name map
//! pairs with a GGUF tensor becomes a logical F32 tensor of the HF shape, decoded
//! through the encoding seam ([`crate::checkpoint::encoding`]): the stored blocks that
//! cover a window are dequantized ([`super::quant`]), an expert's slice of a stacked
//! tensor is taken, and the converter's transforms are undone ([`super::names`]).

use super::names::{self, Transform};
use super::{GgufFile, GgufTensor, block_size};
use crate::checkpoint::encoding::{Decode, Raw};
use crate::error::{Error, Result};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// One HF tensor read out of a GGUF tensor.
#[derive(Debug)]
pub struct GgufDecode {
    file: Arc<GgufFile>,
    /// The stored tensor (for a stacked expert, the whole stack).
    stored: GgufTensor,
    /// The HF tensor's first element within the stored one (an expert's slice).
    first: u64,
    rows: u64,
    row_len: u64,
    transforms: Vec<Transform>,
}

impl GgufDecode {
    fn fail(&self, reason: impl std::fmt::Display) -> Error {
        Error::Tensor {
            path: self.file.path().to_path_buf(),
            tensor: self.stored.name.clone(),
            reason: reason.to_string(),
        }
    }
}

impl Decode for GgufDecode {
    fn storage(&self) -> String {
        self.stored.ggml_type.name().to_string()
    }

    fn rows(&self) -> (u64, u64) {
        (self.rows, self.row_len)
    }

    fn row_granule(&self) -> u64 {
        self.transforms
            .iter()
            .filter_map(|t| t.row_granularity(self.rows).ok())
            .max()
            .unwrap_or(1)
    }

    fn decode_rows(&self, _: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<()> {
        self.read(rows, out, false)
    }

    /// The stored type's steps ([`super::quant::steps`]), moved as the values are (rows
    /// un-permuted, an expert's slice); Gemma's `+ 1` shifts values, not their spacing.
    fn decode_steps(&self, _: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<bool> {
        self.read(rows, out, true)?;
        Ok(true)
    }
}

impl GgufDecode {
    /// Rows `rows` of the HF tensor, values or (`steps`) their quantization steps.
    fn read(&self, rows: Range<u64>, out: &mut Vec<f32>, steps: bool) -> Result<()> {
        let bs = block_size(self.stored.ggml_type) as u64;
        let e0 = self.first + rows.start * self.row_len;
        let e1 = self.first + rows.end * self.row_len;
        let (b0, b1) = (e0 / bs, e1.div_ceil(bs));
        let mut blocks = vec![0f32; ((b1 - b0) * bs) as usize];
        let mut raw = Vec::new();
        if steps {
            self.file
                .read_block_steps(&self.stored, b0, &mut raw, &mut blocks)
        } else {
            self.file
                .read_blocks(&self.stored, b0, &mut raw, &mut blocks)
        }
        .map_err(Error::from)?;
        let skip = (e0 - b0 * bs) as usize;
        out.clear();
        out.extend_from_slice(&blocks[skip..skip + (e1 - e0) as usize]);
        let mut scratch = Vec::new();
        for t in &self.transforms {
            if steps && matches!(t, Transform::AddOne) {
                continue;
            }
            t.undo(
                out,
                rows.start,
                self.rows,
                self.row_len as usize,
                &mut scratch,
            )
            .map_err(|e| self.fail(format!("cannot undo the converter's {t:?}: {e}")))?;
        }
        Ok(())
    }
}

/// What a GGUF file contributes to a checkpoint.
pub struct Opened {
    pub file: Arc<GgufFile>,
    /// HF name, HF shape, decoder.
    pub tensors: Vec<(String, Vec<usize>, Arc<dyn Decode>)>,
    /// Tensors that cannot be decoded: name → why (an undecodable type names the type).
    pub broken: Vec<(String, String)>,
    /// The name alignment and its problems, for the reports.
    pub notes: Vec<String>,
}

/// Opens `path` as GGUF and maps its tensors to Hugging Face names.
pub fn open(path: &Path) -> Result<Opened> {
    let file = Arc::new(GgufFile::open(path)?);
    let map = names::map_file(&file);
    let mut notes = map.warnings.clone();
    match (&map.architecture, map.mapped) {
        (Some(a), true) => notes.push(format!(
            "{}: GGUF tensor names mapped to Hugging Face names for architecture `{a}` ({} tensors); the converter's transforms are undone before comparing",
            path.display(),
            map.pairs.len()
        )),
        (a, _) => notes.push(format!(
            "{}: no Hugging Face name map for GGUF architecture {}: tensors keep their GGUF names and pair only with tensors of those names",
            path.display(),
            a.as_deref().map_or("(none given)".to_string(), |a| format!("`{a}`"))
        )),
    }
    if !map.gguf_only.is_empty() {
        notes.push(format!(
            "{}: {} GGUF tensors have no Hugging Face counterpart: {}",
            path.display(),
            map.gguf_only.len(),
            map.gguf_only.join(", ")
        ));
    }
    let mut tensors = Vec::new();
    let mut broken = Vec::new();
    for p in &map.pairs {
        let Some(stored) = file.tensor(&p.gguf).cloned() else {
            continue;
        };
        if !stored.ggml_type.can_dequantize() {
            broken.push((
                p.hf.clone(),
                format!(
                    "{}: GGUF tensor `{}` is stored as {}, which weightdiff cannot decode",
                    path.display(),
                    p.gguf,
                    stored.ggml_type.name()
                ),
            ));
            continue;
        }
        let first = match p
            .transforms
            .iter()
            .find(|t| matches!(t, Transform::ExpertSlice { .. }))
        {
            Some(t) => match t.gguf_elements(&stored.shape()) {
                Ok(r) => r.start,
                Err(e) => {
                    broken.push((p.hf.clone(), format!("{}: {e}", path.display())));
                    continue;
                }
            },
            None => 0,
        };
        let shape: Vec<usize> = p.hf_shape.iter().map(|&d| d as usize).collect();
        let rows = p.hf_shape.first().copied().unwrap_or(1);
        let row_len = p.hf_shape.iter().skip(1).product::<u64>().max(1);
        let decode = GgufDecode {
            file: file.clone(),
            stored,
            first,
            rows,
            row_len,
            transforms: p.transforms.clone(),
        };
        if let Some(Err(e)) = p
            .transforms
            .iter()
            .find(|t| matches!(t, Transform::PermuteRows { .. }))
            .map(|t| t.row_granularity(rows))
        {
            broken.push((p.hf.clone(), decode.fail(e).to_string()));
            continue;
        }
        tensors.push((p.hf.clone(), shape, Arc::new(decode) as Arc<dyn Decode>));
    }
    Ok(Opened {
        file,
        tensors,
        broken,
        notes,
    })
}
