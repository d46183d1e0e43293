//! compressed-tensors checkpoints (`quant_method: compressed-tensors`, written by
//! llm-compressor; vLLM's format), decoded as compressed-tensors' own decompressors do
//! (`compressors/*/base.py` and `quantization/lifecycle/forward_helpers.py`, version
//! 0.20.1).
//!
//! A module `M` is decoded when it has a part of a quantized weight (`M.weight_scale`,
//! `weight_packed`, `weight_zero_point`, `weight_shape` or `weight_global_scale`), or I8 /
//! F8 `M.weight` codes that a naive format's group targets, and `M` is not in the `ignore`
//! list (an exact name or a `re:` pattern matched from the start of the name, as
//! compressed-tensors matches it); an ignored module stays as stored, every tensor of it
//! a tensor of the model. Its scheme is the `config_groups` entry whose targets name it
//! (exact or `re:`), else the first entry whose targets are class names (`Linear`); its
//! format is the group's `format`, else the top-level one. The weight becomes the
//! logical F32 tensor `M.weight` [rows, cols]; `weight_scale`, `weight_zero_point`,
//! `weight_shape`, `weight_global_scale` and the activation parameters (`input_*`,
//! `output_*`) are no longer tensors of the model.
//!
//! **float-, int- and naive-quantized**: `M.weight` holds the codes `q` (I8 or F8_E4M3).
//! **pack-quantized**: `M.weight_packed` I32 [rows, ⌈cols·b/32⌉] holds `b`-bit codes as
//! one dense little-end-first bit stream per row (code `j` at bits `j·b …`, possibly
//! across two words), stored unsigned with offset `2^(b−1)`; `M.weight_shape` gives
//! [rows, cols]; an asymmetric channel or group zero point is packed the same way along
//! dim 0 (`[⌈rows·b/32⌉, groups]`). With `s` the scale of the element's tensor / channel /
//! group of `group_size` columns / block `br×bc` (edge blocks ragged), `z` its zero point
//! (0 when symmetric), and all the arithmetic in the scale's dtype `T` (F32, BF16 or
//! F16; each operation rounded to `T` to nearest even, as torch does on CPU):
//!
//! ```text
//! W[i][j] = T( T(T(q) − T(z)) · s )
//! ```
//!
//! **nvfp4-pack-quantized**: `M.weight_packed` U8 [rows, cols/2], two E2M1 codes a byte
//! (low nibble = even column; magnitude `[0, .5, 1, 1.5, 2, 3, 4, 6][n & 7]`, sign bit
//! 3); `M.weight_scale` F8_E4M3 [rows, cols/16]; `M.weight_global_scale` F32 [1] `g`.
//! The reference unpacks to BF16, divides the BF16 scale by the F32 global scale in F32,
//! multiplies in F32 and casts the result to BF16:
//!
//! ```text
//! W[i][j] = bf16( e2m1(q) · f32(s / g) )
//! ```
//!
//! **mxfp4-pack-quantized**: the same codes with an E8M0 `weight_scale` (U8 `e`, `2^(e−127)`)
//! per 32 values and no global scale: `W = bf16(e2m1(q) · 2^(e−127))`.
//!
//! A missing part (scale, zero point, `weight_shape`, global scale), a scale or zero
//! point grid of the wrong shape, packed sizes that do not match the shape (or a shape no
//! tensor can hold), or a non-finite scale is that weight's error naming its file and the
//! part; the other tensors are compared. Another format (sparse, marlin-24, …) or
//! activation-ordered groups (`weight_g_idx`) are compared as stored, with a warning that
//! they are not dequantized.

use super::super::dtype::{DType, decode_f32, decode_f64};
use super::super::encoding::{Decode, Raw};
use super::super::{Checkpoint, TensorEntry};
use super::{caveat, e2m1_step, float_step};
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// E2M1 magnitudes by the low three bits of a nibble; bit 3 is the sign.
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The value of an E2M1 nibble.
pub(super) fn e2m1(n: u8) -> f32 {
    let m = E2M1[(n & 7) as usize];
    if n & 8 != 0 { -m } else { m }
}

/// Suffixes of the tensors only a quantized weight has.
const QUANTIZED_PARTS: [&str; 5] = [
    ".weight_scale",
    ".weight_packed",
    ".weight_zero_point",
    ".weight_shape",
    ".weight_global_scale",
];

/// Parameters of a module that are not weights of the model.
const PARAMS: [&str; 11] = [
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_global_scale",
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
    "weight_packed",
    "weight",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grid {
    Tensor,
    Channel,
    Group(u64),
    Block(u64, u64),
}

impl std::fmt::Display for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grid::Tensor => f.write_str("per tensor"),
            Grid::Channel => f.write_str("per channel"),
            Grid::Group(g) => write!(f, "group {g}"),
            Grid::Block(r, c) => write!(f, "block {r}×{c}"),
        }
    }
}

/// A `config_groups` entry's weight arguments.
#[derive(Debug, Clone)]
struct Scheme {
    format: String,
    targets: Vec<String>,
    num_bits: u64,
    symmetric: bool,
    strategy: String,
    group_size: Option<u64>,
    block: Option<(u64, u64)>,
}

fn schemes(qc: &Value) -> Vec<Scheme> {
    let top = qc.get("format").and_then(|f| f.as_str()).unwrap_or("");
    let Some(groups) = qc.get("config_groups").and_then(|g| g.as_object()) else {
        return Vec::new();
    };
    groups
        .values()
        .filter_map(|g| {
            let w = g.get("weights").filter(|w| w.is_object())?;
            let u = |k: &str| w.get(k).and_then(|v| v.as_u64());
            Some(Scheme {
                format: g
                    .get("format")
                    .and_then(|f| f.as_str())
                    .unwrap_or(top)
                    .to_string(),
                targets: g
                    .get("targets")
                    .and_then(|t| t.as_array())
                    .map(|t| {
                        t.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                num_bits: u("num_bits").unwrap_or(8),
                symmetric: w.get("symmetric").and_then(|s| s.as_bool()).unwrap_or(true),
                strategy: w
                    .get("strategy")
                    .and_then(|s| s.as_str())
                    .unwrap_or("")
                    .to_string(),
                group_size: u("group_size"),
                block: w
                    .get("block_structure")
                    .and_then(|b| b.as_array())
                    .and_then(|b| match b.as_slice() {
                        [r, c] => Some((r.as_u64()?, c.as_u64()?)),
                        _ => None,
                    }),
            })
        })
        .collect()
}

/// compressed-tensors' name matching: `re:PATTERN` matched from the start, else equality.
fn matches(target: &str, name: &str) -> bool {
    match target.strip_prefix("re:") {
        Some(p) => regex::Regex::new(&format!("^(?:{p})"))
            .map(|r| r.is_match(name))
            .unwrap_or(false),
        None => target == name,
    }
}

/// A class-name target (`Linear`) rather than a module name.
fn is_class(target: &str) -> bool {
    !target.starts_with("re:") && !target.contains('.')
}

/// The `config_groups` entry of module `m`: the one whose targets name it, else the
/// first whose targets are class names.
fn scheme_of<'a>(schemes: &'a [Scheme], m: &str) -> Option<&'a Scheme> {
    schemes
        .iter()
        .find(|s| s.targets.iter().any(|t| matches(t, m)))
        .or_else(|| {
            schemes
                .iter()
                .find(|s| s.targets.iter().any(|t| is_class(t)))
        })
}

/// The decoder of a scheme's format, or `None`: not decoded.
fn kind_of(s: &Scheme) -> Option<Kind> {
    match s.format.as_str() {
        "float-quantized" | "int-quantized" | "naive-quantized" => Some(Kind::Naive),
        "pack-quantized" => Some(Kind::Packed(s.num_bits)),
        "nvfp4-pack-quantized" => Some(Kind::Nvfp4),
        "mxfp4-pack-quantized" => Some(Kind::Mxfp4),
        _ => None,
    }
}

pub(super) fn apply(ck: &mut Checkpoint, qc: &Value) {
    let schemes = schemes(qc);
    let ignore: Vec<String> = qc
        .get("ignore")
        .and_then(|i| i.as_array())
        .map(|i| {
            i.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    // A module is quantized when it has any part of a quantized weight (so that one
    // missing part is its error, not a tensor compared as stored), or I8/F8 codes where
    // a naive format's group targets it (a missing scale must not pass codes for values).
    let modules: BTreeSet<String> = ck
        .tensors
        .iter()
        .filter_map(|(n, e)| {
            if let Some(m) = QUANTIZED_PARTS.iter().find_map(|p| n.strip_suffix(p)) {
                return Some(m.to_string());
            }
            let m = n.strip_suffix(".weight")?;
            // The dtype first: the targets' patterns are matched only for codes.
            let codes = matches!(e.dtype, Ok(DType::I8 | DType::F8E4M3 | DType::F8E5M2));
            (codes && matches!(scheme_of(&schemes, m).and_then(kind_of), Some(Kind::Naive)))
                .then(|| m.to_string())
        })
        .collect();
    let mut decoded = BTreeSet::new();
    let mut as_stored = BTreeSet::new();
    let mut activation = 0usize;
    for m in modules {
        if ignore.iter().any(|t| matches(t, &m)) {
            continue;
        }
        let Some(scheme) = scheme_of(&schemes, &m) else {
            as_stored.insert(format!("{m} (no config group targets it)"));
            continue;
        };
        if ck.tensors.contains_key(&format!("{m}.weight_g_idx")) {
            as_stored.insert(format!("{m} (activation-ordered groups, weight_g_idx)"));
            continue;
        }
        let Some(kind) = kind_of(scheme) else {
            as_stored.insert(format!("{m} (format `{}`)", scheme.format));
            continue;
        };
        let name = format!("{m}.weight");
        let parts: Vec<TensorEntry> = PARAMS
            .iter()
            .filter_map(|p| ck.tensors.remove(&format!("{m}.{p}")))
            .collect();
        activation += parts
            .iter()
            .filter(|e| e.name.contains(".input_") || e.name.contains(".output_"))
            .count();
        let get = |p: &str| parts.iter().find(|e| e.name == format!("{m}.{p}")).cloned();
        match build(ck, &m, scheme, kind, &get) {
            Ok(d) => {
                let (rows, cols) = (d.rows, d.cols);
                let base = d.codes.clone();
                ck.tensors.insert(
                    name.clone(),
                    TensorEntry {
                        name,
                        dtype: Ok(DType::F32),
                        shape: vec![rows as usize, cols as usize],
                        len: rows * cols * 4,
                        layout: None,
                        encoded: Some(Arc::new(d)),
                        ..base
                    },
                );
                decoded.insert(scheme.format.clone());
            }
            Err(why) => {
                // The scale's file, else the codes' (a missing scale), else any part's.
                let part = ["weight_scale", "weight_packed", "weight"]
                    .iter()
                    .find_map(|p| get(p))
                    .or_else(|| parts.first().cloned())
                    .expect("a module is found by one of its parts");
                let path = ck.shards[part.shard].path().display();
                ck.broken.insert(
                    name,
                    format!("{path}: compressed-tensors {} weight: {why}", scheme.format),
                );
            }
        }
    }
    let src = ck.source.display().to_string();
    if !decoded.is_empty() {
        ck.warnings.push(format!(
            "{src}: compressed-tensors checkpoint ({}): weights compared by value, dequantized as compressed-tensors does{}",
            decoded.into_iter().collect::<Vec<_>>().join(", "),
            if activation > 0 {
                format!("; {activation} activation quantization parameters (input_/output_ scales) are not weights and are left out")
            } else {
                String::new()
            }
        ));
    }
    if !as_stored.is_empty() {
        let list: Vec<String> = as_stored.into_iter().collect();
        caveat(
            ck,
            format!(
                "{src}: compressed-tensors: weightdiff does not dequantize {} module(s): {}; their tensors are compared as the stored codes and their scales as tensors of their own, so those numbers are NOT the weights' values",
                list.len(),
                list.join(", ")
            ),
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Naive,
    Packed(u64),
    Nvfp4,
    Mxfp4,
}

/// The arithmetic dtype of the dequantization (the scale's).
#[derive(Debug, Clone, Copy)]
enum Arith {
    F32,
    BF16,
    F16,
}

impl Arith {
    #[inline(always)]
    fn round(self, v: f32) -> f32 {
        match self {
            Arith::F32 => v,
            Arith::BF16 => half::bf16::from_f32(v).to_f32(),
            Arith::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

/// A tensor read as f32 values (any dtype whose values are exact in f32).
fn values(d: DType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / d.size();
    let mut out = vec![0f32; n];
    if d.is_f32_domain() {
        decode_f32(d, bytes, &mut out);
    } else {
        let mut v = vec![0f64; n];
        decode_f64(d, bytes, &mut v);
        for (o, x) in out.iter_mut().zip(v) {
            *o = x as f32;
        }
    }
    out
}

#[derive(Debug)]
struct CtWeight {
    kind: Kind,
    /// `weight` or `weight_packed`.
    codes: TensorEntry,
    code_dtype: DType,
    scale: TensorEntry,
    scale_dtype: DType,
    zero: Option<(TensorEntry, DType, bool)>,
    global: Option<TensorEntry>,
    grid: Grid,
    arith: Arith,
    /// The scale's file, for its errors.
    scale_path: PathBuf,
    rows: u64,
    cols: u64,
    /// Scale grid columns (1 for tensor and channel).
    scale_cols: u64,
    /// Stored bytes per row of the codes.
    row_bytes: u64,
}

fn build(
    ck: &Checkpoint,
    m: &str,
    s: &Scheme,
    kind: Kind,
    get: &dyn Fn(&str) -> Option<TensorEntry>,
) -> std::result::Result<CtWeight, String> {
    let need = |p: &str| get(p).ok_or_else(|| format!("its `{m}.{p}` is missing"));
    let dtype_of = |e: &TensorEntry| e.dtype.clone().map_err(|d| format!("`{}` is {d}", e.name));
    let scale = need("weight_scale")?;
    let scale_dtype = dtype_of(&scale)?;
    let codes = match kind {
        Kind::Naive => need("weight")?,
        _ => need("weight_packed")?,
    };
    let code_dtype = dtype_of(&codes)?;
    let shape2 = |e: &TensorEntry| match e.shape.as_slice() {
        [r, c] => Ok((*r as u64, *c as u64)),
        s => Err(format!("`{}` has shape {s:?}, not 2-D", e.name)),
    };
    let (rows, cols) = match kind {
        Kind::Naive => {
            if !matches!(code_dtype, DType::I8 | DType::F8E4M3 | DType::F8E5M2) {
                return Err(format!(
                    "`{}` is {code_dtype}; I8 and F8 codes are decoded",
                    codes.name
                ));
            }
            shape2(&codes)?
        }
        Kind::Packed(_) => {
            let e = need("weight_shape")?;
            let d = dtype_of(&e)?;
            if d.is_f32_domain() || e.numel() != 2 {
                return Err(format!(
                    "`{}` is {d} {:?}, not the two integers of the shape",
                    e.name, e.shape
                ));
            }
            let bytes = ck.read(&e, 0, e.nbytes()).map_err(|e| e.to_string())?;
            // In f64: exact for any size a tensor can have (f32 is not past 2^24).
            let mut v = [0f64; 2];
            decode_f64(d, &bytes, &mut v);
            if v.iter().any(|&x| x < 0.0) {
                return Err(format!("`{}` holds a negative size {v:?}", e.name));
            }
            (v[0] as u64, v[1] as u64)
        }
        Kind::Nvfp4 | Kind::Mxfp4 => {
            let (r, c) = shape2(&codes)?;
            (r, c * 2)
        }
    };
    // The packed codes' sizes against the shape.
    let (want_dtype, row_bytes) = match kind {
        Kind::Naive => (code_dtype, cols),
        Kind::Packed(b) => {
            if !(1..=8).contains(&b) {
                return Err(format!("num_bits {b} is not packed (1 to 8 are)"));
            }
            let Some(bits) = cols.checked_mul(b) else {
                return Err(format!(
                    "its shape [{rows}, {cols}] (`{m}.weight_shape`) is larger than any tensor"
                ));
            };
            (DType::I32, bits.div_ceil(32) * 4)
        }
        Kind::Nvfp4 | Kind::Mxfp4 => (DType::U8, cols / 2),
    };
    if code_dtype != want_dtype
        || codes.shape.first().map(|&r| r as u64) != Some(rows)
        || rows.checked_mul(row_bytes) != Some(codes.nbytes())
    {
        return Err(format!(
            "`{}` is {code_dtype} {:?}, not the {want_dtype} [{rows}, {}] that packs [{rows}, {cols}]",
            codes.name,
            codes.shape,
            row_bytes / want_dtype.size() as u64
        ));
    }
    // The scale grid.
    let strategy = match (s.strategy.as_str(), kind) {
        ("", Kind::Nvfp4) => "tensor_group",
        ("", Kind::Mxfp4) => "group",
        ("", _) if s.block.is_some() => "block",
        ("", _) if s.group_size.is_some() => "group",
        ("", _) if scale.numel() == 1 => "tensor",
        ("", _) => "channel",
        (st, _) => st,
    };
    let grid = match strategy {
        "tensor" => Grid::Tensor,
        "channel" => Grid::Channel,
        "group" | "tensor_group" => {
            let g = s
                .group_size
                .or(match kind {
                    Kind::Nvfp4 => Some(16),
                    Kind::Mxfp4 => Some(32),
                    _ => None,
                })
                .filter(|&g| g > 0)
                .ok_or("group strategy without a group_size")?;
            if cols % g != 0 {
                return Err(format!(
                    "{cols} columns are not a whole number of groups of {g}"
                ));
            }
            Grid::Group(g)
        }
        "block" => {
            let (r, c) = s
                .block
                .filter(|&(r, c)| r > 0 && c > 0)
                .ok_or("block strategy without a block_structure")?;
            Grid::Block(r, c)
        }
        other => return Err(format!("weight strategy `{other}` is not decoded")),
    };
    let grid_shape = |g: Grid| -> (u64, u64) {
        match g {
            Grid::Tensor => (1, 1),
            Grid::Channel => (rows, 1),
            Grid::Group(g) => (rows, cols / g),
            Grid::Block(r, c) => (rows.div_ceil(r), cols.div_ceil(c)),
        }
    };
    let (gr, gc) = grid_shape(grid);
    let fits = |e: &TensorEntry, (r, c): (u64, u64)| {
        let sh: Vec<u64> = e.shape.iter().map(|&d| d as u64).collect();
        sh == [r, c] || (c == 1 && sh == [r]) || (r == 1 && c == 1 && sh.is_empty())
    };
    if !fits(&scale, (gr, gc)) {
        return Err(format!(
            "its scale `{}` has shape {:?}, not the [{gr}, {gc}] of {grid} scales of [{rows}, {cols}]",
            scale.name, scale.shape
        ));
    }
    let arith = match (kind, scale_dtype) {
        (Kind::Nvfp4, DType::F8E4M3) | (Kind::Mxfp4, DType::U8) => Arith::BF16,
        (Kind::Nvfp4 | Kind::Mxfp4, d) => {
            return Err(format!(
                "its scale `{}` is {d}; {} scales are {}",
                scale.name,
                s.format,
                if matches!(kind, Kind::Nvfp4) {
                    "F8_E4M3"
                } else {
                    "U8 (E8M0)"
                }
            ));
        }
        (_, DType::F32) => Arith::F32,
        (_, DType::BF16) => Arith::BF16,
        (_, DType::F16) => Arith::F16,
        (_, d) => {
            return Err(format!(
                "its scale `{}` is {d}; F32, BF16 and F16 scales are decoded",
                scale.name
            ));
        }
    };
    let global = match kind {
        Kind::Nvfp4 => {
            let g = need("weight_global_scale")?;
            if g.numel() != 1 || !matches!(g.dtype, Ok(DType::F32 | DType::BF16 | DType::F16)) {
                return Err(format!(
                    "its global scale `{}` is {} {:?}, not one float",
                    g.name,
                    g.dtype_name(),
                    g.shape
                ));
            }
            Some(g)
        }
        _ => None,
    };
    let zero = if s.symmetric {
        None
    } else {
        let z = need("weight_zero_point")?;
        let zd = dtype_of(&z)?;
        let packed =
            matches!(kind, Kind::Packed(_)) && matches!(grid, Grid::Channel | Grid::Group(_));
        let want = if packed {
            let Kind::Packed(b) = kind else {
                unreachable!()
            };
            (rows * b).div_ceil(32)
        } else {
            gr
        };
        if !fits(&z, (want, gc)) || (packed && zd != DType::I32) {
            return Err(format!(
                "its zero point `{}` is {zd} {:?}, not the {}[{want}, {gc}] of its scales",
                z.name,
                z.shape,
                if packed { "packed I32 " } else { "" }
            ));
        }
        Some((z, zd, packed))
    };
    Ok(CtWeight {
        kind,
        code_dtype,
        scale_path: ck.shards[scale.shard].path().to_path_buf(),
        scale,
        scale_dtype,
        zero,
        global,
        grid,
        arith,
        rows,
        cols,
        scale_cols: gc,
        row_bytes,
        codes,
    })
}

impl CtWeight {
    /// Grid rows covering logical rows `rows`.
    fn grid_rows(&self, rows: &Range<u64>) -> Range<u64> {
        match self.grid {
            Grid::Tensor => 0..1,
            Grid::Channel | Grid::Group(_) => rows.clone(),
            Grid::Block(r, _) => rows.start / r..rows.end.div_ceil(r),
        }
    }

    /// The grid cell of element (i, j), relative to the first grid row read.
    #[inline(always)]
    fn cell(&self, i: u64, j: u64, g0: u64) -> usize {
        let (r, c) = match self.grid {
            Grid::Tensor => (0, 0),
            Grid::Channel => (i, 0),
            Grid::Group(g) => (i, j / g),
            Grid::Block(br, bc) => (i / br, j / bc),
        };
        ((r - g0) * self.scale_cols + c) as usize
    }

    /// The codes of `rows` as f32 values (exact) into `out`, and the scales (divided by
    /// the global scale) and zero points of the grid rows they cover, with the first
    /// grid row's index; `None` for no rows.
    #[allow(clippy::type_complexity)]
    fn codes_and_grid(
        &self,
        raw: Raw<'_>,
        rows: &Range<u64>,
        out: &mut Vec<f32>,
    ) -> Result<Option<(Vec<f32>, Option<Vec<f32>>, u64)>> {
        let rows = rows.clone();
        let n = (rows.end - rows.start) as usize;
        let cols = self.cols as usize;
        out.clear();
        out.resize(n * cols, 0.0);
        if n == 0 {
            return Ok(None);
        }
        // The codes, as f32 values (exact).
        let bytes = raw(
            &self.codes,
            rows.start * self.row_bytes,
            n as u64 * self.row_bytes,
        )?;
        match self.kind {
            Kind::Naive if self.code_dtype == DType::I8 => {
                for (o, &b) in out.iter_mut().zip(bytes.iter()) {
                    *o = b as i8 as f32;
                }
            }
            Kind::Naive => decode_f32(self.code_dtype, &bytes, out),
            Kind::Packed(b) => {
                let words: Vec<u32> = bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let wpr = (self.row_bytes / 4) as usize;
                let offset = (1u32 << (b - 1)) as f32;
                for (row, w) in out.chunks_exact_mut(cols).zip(words.chunks_exact(wpr)) {
                    unpack_row(w, b as u32, row);
                    for v in row.iter_mut() {
                        *v -= offset;
                    }
                }
            }
            Kind::Nvfp4 | Kind::Mxfp4 => {
                for (pair, &b) in out.chunks_exact_mut(2).zip(bytes.iter()) {
                    pair[0] = e2m1(b & 0x0f);
                    pair[1] = e2m1(b >> 4);
                }
            }
        }
        // Scales (and zero points) of the grid rows the window covers.
        let g = self.grid_rows(&rows);
        let gc = self.scale_cols;
        let es = self.scale_dtype.size() as u64;
        let sbytes = raw(&self.scale, g.start * gc * es, (g.end - g.start) * gc * es)?;
        let mut scales = match self.kind {
            Kind::Mxfp4 => {
                let mut s = vec![0f32; sbytes.len()];
                super::ScaleType::E8M0.decode(&sbytes, &mut s);
                s
            }
            _ => values(self.scale_dtype, &sbytes),
        };
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(self.fail(
                &self.scale,
                format!(
                    "the scale at [{}, {}] is {}",
                    g.start + i as u64 / gc,
                    i as u64 % gc,
                    scales[i]
                ),
            ));
        }
        if let Some(ge) = &self.global {
            let gb = raw(ge, 0, ge.nbytes())?;
            let gv = values(ge.dtype.clone().unwrap_or(DType::F32), &gb)[0];
            if !gv.is_finite() || gv == 0.0 {
                return Err(self.fail(ge, format!("the global scale is {gv}")));
            }
            // scale (F8_E4M3, exact in BF16) / global, in F32.
            for s in scales.iter_mut() {
                *s /= gv;
            }
        }
        let zeros: Option<Vec<f32>> = match &self.zero {
            None => None,
            Some((z, zd, false)) => {
                let es = zd.size() as u64;
                let zb = raw(z, g.start * gc * es, (g.end - g.start) * gc * es)?;
                Some(
                    values(*zd, &zb)
                        .into_iter()
                        .map(|v| self.arith.round(v))
                        .collect(),
                )
            }
            Some((z, _, true)) => {
                let Kind::Packed(b) = self.kind else {
                    unreachable!("packed zero points are pack-quantized's")
                };
                // Dim 0 packed: column c's zero points are one bit stream down the rows.
                let (w0, w1) = ((rows.start * b) / 32, (rows.end * b).div_ceil(32));
                let zb = raw(z, w0 * gc * 4, (w1 - w0) * gc * 4)?;
                let words: Vec<u32> = zb
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let offset = (1u32 << (b - 1)) as f32;
                let mut zs = vec![0f32; n * gc as usize];
                let mut col = vec![0u32; (w1 - w0) as usize];
                let skip = rows.start * b - w0 * 32;
                for c in 0..gc as usize {
                    for (k, w) in col.iter_mut().enumerate() {
                        *w = words[k * gc as usize + c];
                    }
                    // Row r of this column sits at bit r·b of its stream, here r·b − 32·w0.
                    for i in 0..n {
                        let v = bits_at(&col, (skip + i as u64 * b) as u32, b as u32) as f32;
                        zs[i * gc as usize + c] = self.arith.round(v - offset);
                    }
                }
                Some(zs)
            }
        };
        Ok(Some((scales, zeros, g.start)))
    }

    fn fail(&self, e: &TensorEntry, reason: String) -> Error {
        Error::Tensor {
            path: self.scale_path.clone(),
            tensor: e.name.clone(),
            reason,
        }
    }
}

impl Decode for CtWeight {
    fn storage(&self) -> String {
        let codes = match self.kind {
            Kind::Naive => self.code_dtype.to_string(),
            Kind::Packed(b) => format!("I{b} packed"),
            Kind::Nvfp4 | Kind::Mxfp4 => "E2M1 packed".to_string(),
        };
        let scale = match self.kind {
            Kind::Mxfp4 => "F8_E8M0".to_string(),
            _ => self.scale_dtype.to_string(),
        };
        let mut s = format!("{codes}, {scale} scales {}", self.grid);
        if self.global.is_some() {
            s.push_str(", F32 global scale");
        }
        if self.zero.is_some() {
            s.push_str(", zero points");
        }
        s
    }

    fn rows(&self) -> (u64, u64) {
        (self.rows, self.cols)
    }

    fn row_granule(&self) -> u64 {
        1
    }

    fn decode_rows(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<()> {
        let Some((scales, zeros, g0)) = self.codes_and_grid(raw, &rows, out)? else {
            return Ok(());
        };
        let cols = self.cols as usize;
        let arith = self.arith;
        let fp4 = matches!(self.kind, Kind::Nvfp4 | Kind::Mxfp4);
        for (k, row) in out.chunks_exact_mut(cols).enumerate() {
            let i = rows.start + k as u64;
            for (j, v) in row.iter_mut().enumerate() {
                let cell = self.cell(i, j as u64, g0);
                let mut x = *v;
                if let Some(z) = &zeros {
                    x = arith.round(x - z[cell]);
                }
                *v = if fp4 {
                    half::bf16::from_f32(x * scales[cell]).to_f32()
                } else {
                    arith.round(x * scales[cell])
                };
            }
        }
        Ok(())
    }

    /// `|s|` for integer codes, `|s| · 2^(e − m)` for F8 codes (m = 3 for E4M3, 2 for
    /// E5M2), `|s| · e2m1_step(q)` for NVFP4 / MXFP4 (s: the scale over the global scale).
    fn decode_steps(&self, raw: Raw<'_>, rows: Range<u64>, out: &mut Vec<f32>) -> Result<bool> {
        let Some((scales, _, g0)) = self.codes_and_grid(raw, &rows, out)? else {
            return Ok(true);
        };
        let cols = self.cols as usize;
        let unit: fn(f32) -> f32 = match (self.kind, self.code_dtype) {
            (Kind::Nvfp4 | Kind::Mxfp4, _) => e2m1_step,
            (Kind::Naive, DType::F8E4M3) => |q| float_step(q, 3, -6),
            (Kind::Naive, DType::F8E5M2) => |q| float_step(q, 2, -14),
            _ => |_| 1.0,
        };
        for (k, row) in out.chunks_exact_mut(cols).enumerate() {
            let i = rows.start + k as u64;
            for (j, v) in row.iter_mut().enumerate() {
                *v = unit(*v) * scales[self.cell(i, j as u64, g0)].abs();
            }
        }
        Ok(true)
    }
}

/// `b` bits at bit `at` of a little-end-first stream of words (the last word may be
/// followed by nothing: missing bits are 0).
#[inline(always)]
fn bits_at(words: &[u32], at: u32, b: u32) -> u32 {
    let (w, off) = ((at / 32) as usize, at % 32);
    let mut v = words[w] >> off;
    if off + b > 32 {
        v |= words.get(w + 1).copied().unwrap_or(0) << (32 - off);
    }
    v & ((1u32 << b) - 1)
}

/// The first `out.len()` codes of a packed row, unsigned.
fn unpack_row(words: &[u32], b: u32, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = bits_at(words, j as u32 * b, b) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::shard::Window;

    fn entry(name: &str, dtype: DType, shape: Vec<usize>, len: u64) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype: Ok(dtype),
            shape,
            shard: 0,
            offset: 0,
            len,
            layout: None,
            encoded: None,
        }
    }

    /// A weight of `kind` with codes `codes` [rows, row_bytes] and `scales` (F32 unless
    /// NVFP4: F8_E4M3 bytes, with a global scale `global`).
    fn weight(kind: Kind, code_dtype: DType, grid: Grid, (rows, cols): (u64, u64)) -> CtWeight {
        let (scale_dtype, scale_cols) = match grid {
            Grid::Group(g) => (
                if matches!(kind, Kind::Nvfp4) {
                    DType::F8E4M3
                } else {
                    DType::F32
                },
                cols / g,
            ),
            _ => (DType::F32, 1),
        };
        let row_bytes = match kind {
            Kind::Nvfp4 | Kind::Mxfp4 => cols / 2,
            _ => cols,
        };
        CtWeight {
            kind,
            codes: entry(
                "codes",
                code_dtype,
                vec![rows as usize, row_bytes as usize],
                rows * row_bytes,
            ),
            code_dtype,
            scale: entry("scale", scale_dtype, vec![], 64),
            scale_dtype,
            zero: None,
            global: matches!(kind, Kind::Nvfp4).then(|| entry("global", DType::F32, vec![1], 4)),
            grid,
            arith: Arith::F32,
            scale_path: "x".into(),
            rows,
            cols,
            scale_cols,
            row_bytes,
        }
    }

    fn steps_of(w: &CtWeight, codes: &[u8], scales: &[u8], global: f32) -> Vec<f32> {
        let raw = |e: &TensorEntry, s: u64, l: u64| -> Result<Window> {
            let b = match e.name.as_str() {
                "codes" => codes.to_vec(),
                "scale" => scales.to_vec(),
                _ => global.to_le_bytes().to_vec(),
            };
            Ok(Window::Shared(Arc::new(b), s as usize..(s + l) as usize))
        };
        let mut out = Vec::new();
        assert!(w.decode_steps(&raw, 0..w.rows, &mut out).unwrap());
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn int_codes_step_by_their_group_scale() {
        let w = weight(Kind::Naive, DType::I8, Grid::Group(2), (2, 4));
        let codes = [1u8, 0x80, 7, 0, 0, 0, 0x7f, 3];
        let got = steps_of(&w, &codes, &f32s(&[0.5, -2.0, 1.0, 0.25]), 0.0);
        assert_eq!(got, [0.5, 0.5, 2.0, 2.0, 1.0, 1.0, 0.25, 0.25]);
        // Packed int4: the same steps whatever the codes.
        let w = weight(Kind::Packed(4), DType::I32, Grid::Channel, (2, 8));
        let w = CtWeight { row_bytes: 4, ..w };
        let got = steps_of(
            &w,
            &[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0],
            &f32s(&[0.125, 3.0]),
            0.0,
        );
        assert_eq!(got, [[0.125; 8], [3.0; 8]].concat());
    }

    #[test]
    fn fp8_codes_step_by_the_scale_times_their_exponent_spacing() {
        let w = weight(Kind::Naive, DType::F8E4M3, Grid::Tensor, (1, 4));
        // 1.0, 0, 448, -0.5 with a tensor scale of 2.
        let got = steps_of(&w, &[0x38, 0x00, 0x7E, 0xB0], &f32s(&[2.0]), 0.0);
        assert_eq!(got, [0.25, 2.0 / 512.0, 64.0, 0.125]);
    }

    #[test]
    fn nvfp4_codes_step_by_e2m1_spacing_times_scale_over_global() {
        let w = weight(Kind::Nvfp4, DType::U8, Grid::Group(16), (1, 16));
        // Elements 0, 1: 0.5 and 6; 2, 3: 3 and -2. Scale E4M3 1.0 over a global 2.
        let codes = [0x71, 0xC5, 0, 0, 0, 0, 0, 0];
        let got = steps_of(&w, &codes, &[0x38], 2.0);
        assert_eq!(&got[..4], [0.25, 1.0, 0.5, 0.5]);
        assert_eq!(got[4], 0.25);
    }

    #[test]
    fn codes_cross_word_boundaries_little_end_first() {
        // Three 7-bit codes 1, 127, 64 then a code across the first two words.
        let mut bits: u64 = 0;
        let codes = [1u64, 127, 64, 5, 99];
        for (i, c) in codes.iter().enumerate() {
            bits |= c << (7 * i);
        }
        let words = [bits as u32, (bits >> 32) as u32];
        let mut out = [0f32; 5];
        unpack_row(&words, 7, &mut out);
        assert_eq!(out, [1.0, 127.0, 64.0, 5.0, 99.0]);
    }

    #[test]
    fn e2m1_nibbles() {
        assert_eq!(e2m1(0x7), 6.0);
        assert_eq!(e2m1(0xF), -6.0);
        assert_eq!(e2m1(0x3), 1.5);
        assert!(e2m1(0x8).is_sign_negative());
    }

    #[test]
    fn names_match_as_compressed_tensors_matches_them() {
        assert!(matches("lm_head", "lm_head"));
        assert!(!matches("lm_head", "model.lm_head"));
        assert!(matches("re:.*mlp.gate$", "model.layers.3.mlp.gate"));
        assert!(!matches("re:.*mlp.gate$", "model.layers.3.mlp.gate_proj"));
        assert!(is_class("Linear") && !is_class("re:.*") && !is_class("model.x"));
    }
}
