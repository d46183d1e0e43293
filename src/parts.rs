//! Splitting one comparison across processes (`compare --shard I/N`) and merging the
//! parts (`merge`) into exactly the outputs a single run writes.
//!
//! Which tensors a shard compares is the pipeline's plan ([`crate::pipeline::plan`]). A
//! part is `part.json` (the comparison of its tensors, the
//! low-rank parts, a fingerprint of inputs and options) plus `part.safetensors` (LoRA
//! factors in f64 and tensors that may be saved whole).

use crate::checkpoint::dtype::DType;
use crate::comparison::{Comparison, ExtractedModule, ModuleKind, SCHEMA_VERSION, SavedTensor};
use crate::error::{Error, PartError, Result};
use crate::fsio::{to_json, write_atomic};
use crate::lowrank::extract::Factors;
use crate::peft::adapter::{AdapterTensor, safetensors_bytes};
pub use crate::pipeline::plan::Shard;
use crate::pipeline::{LoraOptions, LoraParts};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File names of a part.
pub const PART_JSON: &str = "part.json";
pub const PART_TENSORS: &str = "part.safetensors";

#[derive(Serialize, Deserialize)]
struct ExtractedMeta {
    tensor: String,
    module: String,
    kind: ModuleKind,
    rank: usize,
    m: usize,
    n: usize,
    dtype: DType,
    residual: f64,
    residual_stored: f64,
}

#[derive(Serialize, Deserialize)]
struct SavedMeta {
    key: String,
    dtype: DType,
    shape: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
struct LoraPart {
    options: LoraOptions,
    spectra: Vec<(String, crate::lowrank::TensorSpectrum)>,
    extracted: Vec<ExtractedMeta>,
    vectors: Vec<String>,
    candidates: Vec<SavedMeta>,
    /// Modules saved whole whatever else is extracted (task heads, routers).
    #[serde(default)]
    saved_whole: Vec<String>,
    /// (module, length) of the bias deltas, stored as `bias/{module}`.
    #[serde(default)]
    bias_deltas: Vec<(String, usize)>,
    skipped: Vec<(String, String)>,
    errors: BTreeMap<String, String>,
    total_time: f64,
}

#[derive(Serialize, Deserialize)]
struct PartFile {
    schema_version: u32,
    shard: Shard,
    /// Fingerprint of the inputs and the options that change results (not the shard).
    fingerprint: String,
    description: String,
    comparison: Comparison,
    lora: Option<LoraPart>,
}

fn f64_tensor(key: String, shape: Vec<usize>, v: &[f64]) -> AdapterTensor {
    AdapterTensor {
        key,
        dtype: DType::F64,
        shape,
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Writes a shard's part into `dir`.
pub fn write_part(
    dir: &Path,
    shard: Shard,
    fingerprint: &crate::journal::Fingerprint,
    c: &Comparison,
    lora: Option<(&LoraOptions, &LoraParts)>,
) -> Result<Vec<PathBuf>> {
    crate::fsio::create_output_dir(dir)?;
    let mut tensors = Vec::new();
    let lora = lora.map(|(opts, p)| {
        for e in &p.extracted {
            let f = &e.factors;
            tensors.push(f64_tensor(
                format!("A/{}", e.tensor),
                vec![f.rank, f.n],
                &f.a(),
            ));
            tensors.push(f64_tensor(
                format!("B/{}", e.tensor),
                vec![f.m, f.rank],
                &f.b(),
            ));
        }
        for (module, delta) in &p.bias_deltas {
            tensors.push(f64_tensor(
                format!("bias/{module}"),
                vec![delta.len()],
                delta,
            ));
        }
        for t in &p.candidates {
            tensors.push(AdapterTensor {
                key: format!("saved/{}", t.key),
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: t.bytes.clone(),
            });
        }
        LoraPart {
            options: opts.clone(),
            spectra: p.spectra.clone(),
            extracted: p
                .extracted
                .iter()
                .map(|e| ExtractedMeta {
                    tensor: e.tensor.clone(),
                    module: e.module.clone(),
                    kind: e.kind,
                    rank: e.factors.rank,
                    m: e.factors.m,
                    n: e.factors.n,
                    dtype: e.factors.dtype,
                    residual: e.factors.residual,
                    residual_stored: e.factors.residual_stored,
                })
                .collect(),
            vectors: p.vectors.clone(),
            candidates: p
                .candidates
                .iter()
                .map(|t| SavedMeta {
                    key: t.key.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })
                .collect(),
            saved_whole: p.saved_whole.clone(),
            bias_deltas: p
                .bias_deltas
                .iter()
                .map(|(m, d)| (m.clone(), d.len()))
                .collect(),
            skipped: p.skipped.clone(),
            errors: p.errors.clone(),
            total_time: p.total_time,
        }
    });
    tensors.sort_by(|a, b| a.key.cmp(&b.key));
    let part = PartFile {
        schema_version: SCHEMA_VERSION,
        shard,
        fingerprint: fingerprint.hash.clone(),
        description: fingerprint.description.clone(),
        comparison: c.clone(),
        lora,
    };
    let tpath = dir.join(PART_TENSORS);
    write_atomic(&tpath, &safetensors_bytes(&tensors))?;
    let jpath = dir.join(PART_JSON);
    write_atomic(&jpath, &to_json(&part))?;
    Ok(vec![jpath, tpath])
}

fn read_f64(ck: &crate::Checkpoint, key: &str, len: usize, part: &Path) -> Result<Vec<f64>> {
    let path = part.join(PART_TENSORS);
    let bad = |why: &str| Error::from(PartError::tensor(&path, key, why));
    let e = ck.tensors().get(key).ok_or_else(|| bad("missing"))?;
    if e.dtype.as_ref().ok() != Some(&DType::F64) || e.numel() as usize != len {
        return Err(bad(&format!("not F64 of {len} elements")));
    }
    let w = ck.read(e, 0, e.nbytes())?;
    Ok(w.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// One part read back.
struct Part {
    dir: PathBuf,
    file: PartFile,
    lora: Option<(LoraOptions, LoraParts)>,
}

fn read_part(dir: &Path) -> Result<Part> {
    let jpath = dir.join(PART_JSON);
    let value = crate::fsio::read_json(&jpath)?;
    let file: PartFile = serde_json::from_value(value).map_err(|e| Error::InvalidJson {
        path: jpath.clone(),
        reason: format!("not a weightdiff part: {e}"),
    })?;
    let lora = match &file.lora {
        None => None,
        Some(l) => {
            let ck = crate::Checkpoint::open(&dir.join(PART_TENSORS))?;
            let mut extracted = Vec::new();
            for e in &l.extracted {
                // The adapter stores factors in a float dtype; anything else is a part
                // edited by hand, refused here rather than met by the writer.
                if !e.dtype.is_writable_float() {
                    return Err(PartError::tensor(
                        &jpath,
                        &e.tensor,
                        format!(
                            "factor dtype {} is not one weightdiff writes (BF16, F16, F32, F64)",
                            e.dtype
                        ),
                    )
                    .into());
                }
                let a = read_f64(&ck, &format!("A/{}", e.tensor), e.rank * e.n, dir)?;
                let b = read_f64(&ck, &format!("B/{}", e.tensor), e.m * e.rank, dir)?;
                extracted.push(ExtractedModule {
                    tensor: e.tensor.clone(),
                    module: e.module.clone(),
                    kind: e.kind,
                    factors: {
                        let mut f = Factors::new(e.rank, e.m, e.n, e.dtype, &b, &a);
                        f.residual = e.residual;
                        f.residual_stored = e.residual_stored;
                        f
                    },
                    bias: None,
                });
            }
            let mut candidates = Vec::new();
            for t in &l.candidates {
                let key = format!("saved/{}", t.key);
                let entry = ck.tensors().get(&key).ok_or_else(|| {
                    Error::from(PartError::tensor(dir.join(PART_TENSORS), &key, "missing"))
                })?;
                candidates.push(SavedTensor {
                    key: t.key.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    bytes: ck.read(entry, 0, entry.nbytes())?.to_vec(),
                });
            }
            let mut bias_deltas = Vec::new();
            for (module, len) in &l.bias_deltas {
                bias_deltas.push((
                    module.clone(),
                    read_f64(&ck, &format!("bias/{module}"), *len, dir)?,
                ));
            }
            let parts = LoraParts {
                spectra: l.spectra.clone(),
                extracted,
                vectors: l.vectors.clone(),
                candidates,
                saved_whole: l.saved_whole.clone(),
                bias_deltas,
                skipped: l.skipped.clone(),
                errors: l.errors.clone(),
                // A part is written only for a finished stage.
                not_analysed: Vec::new(),
                total_time: l.total_time,
                // Not recorded in a part: a shard's stage runs after its diff.
                during_diff: (0, 0.0),
            };
            Some((l.options.clone(), parts))
        }
    };
    Ok(Part {
        dir: dir.to_path_buf(),
        file,
        lora,
    })
}

/// Reads and checks the parts, and combines them into the comparison (with its LoRA
/// report) that a single run over all tensors produces.
pub fn merge(dirs: &[PathBuf]) -> Result<Comparison> {
    if dirs.is_empty() {
        return Err(Error::InvalidOption(
            "merge needs at least one part directory".into(),
        ));
    }
    let refuse = |dir: &Path, why: String| Error::from(PartError::new(dir.join(PART_JSON), why));
    let parts = dirs
        .iter()
        .map(|d| read_part(d))
        .collect::<Result<Vec<_>>>()?;
    let first = &parts[0];
    let count = first.file.shard.count;
    let mut seen: BTreeMap<usize, &Path> = BTreeMap::new();
    for p in &parts {
        if p.file.fingerprint != first.file.fingerprint {
            return Err(refuse(
                &p.dir,
                format!(
                    "{} was made from other inputs or options than {}.\n  {}: {}\n  {}: {}",
                    p.dir.display(),
                    first.dir.display(),
                    first.dir.display(),
                    first.file.description,
                    p.dir.display(),
                    p.file.description
                ),
            ));
        }
        if p.file.shard.count != count {
            return Err(refuse(
                &p.dir,
                format!(
                    "{} is shard {} but {} is shard {}",
                    p.dir.display(),
                    p.file.shard,
                    first.dir.display(),
                    first.file.shard
                ),
            ));
        }
        let lo = |x: &Part| {
            x.lora
                .as_ref()
                .map(|(o, _)| serde_json::to_string(o).unwrap_or_default())
        };
        if lo(p) != lo(first) {
            return Err(refuse(
                &p.dir,
                format!(
                    "{} and {} were run with different LoRA options",
                    p.dir.display(),
                    first.dir.display()
                ),
            ));
        }
        if let Some(other) = seen.insert(p.file.shard.index, &p.dir) {
            return Err(refuse(
                &p.dir,
                format!(
                    "shard {} appears twice ({} and {})",
                    p.file.shard,
                    other.display(),
                    p.dir.display()
                ),
            ));
        }
    }
    let missing: Vec<String> = (0..count)
        .filter(|i| !seen.contains_key(i))
        .map(|i| format!("{i}/{count}"))
        .collect();
    if !missing.is_empty() {
        return Err(refuse(
            &first.dir,
            format!("missing shard(s) {}", missing.join(", ")),
        ));
    }

    let mut c = first.file.comparison.clone();
    c.results.clear();
    c.errors.clear();
    c.complete = true;
    let mut wall: f64 = 0.0;
    let mut bytes = 0;
    let mut lora: Option<(LoraOptions, LoraParts)> = None;
    for p in parts {
        let pc = p.file.comparison;
        c.results.extend(pc.results);
        c.errors.extend(pc.errors);
        c.complete &= pc.complete;
        wall = wall.max(pc.performance.total_time);
        bytes += pc.performance.bytes_read;
        if let Some((o, lp)) = p.lora {
            match &mut lora {
                None => lora = Some((o, lp)),
                Some((_, acc)) => acc.extend(lp),
            }
        }
    }
    c.results
        .sort_by(|a, b| crate::pairing::natural_cmp(&a.0, &b.0));
    c.performance =
        crate::pipeline::performance(&c.results, bytes, wall, c.performance.threads, c.verify);
    if let Some((opts, lp)) = lora {
        c.lora = Some(crate::pipeline::assemble_lora(&c, &opts, lp));
    }
    Ok(c)
}
