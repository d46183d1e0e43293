//! The data flows one way (ARCHITECTURE.md): every library module may use only the
//! modules below it in [`LAYERS`], and inside `checkpoint` the submodules form no cycle.
//! These tests read the sources, so a `use` that points up fails here, naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's top-level modules, bottom first. A module may use the ones before it.
const LAYERS: &[&str] = &[
    "error",
    "fsio",
    "rng",
    "checkpoint",
    "hub",
    "pairing",
    "kernels",
    "lowrank",
    "peft",
    "comparison",
    "relatedness",
    "synthetic",
    "journal",
    "pipeline",
    "parts",
    "report",
    "jobs",
    "cli",
];

/// Files of the binary, not the library (`crate::` there is the binary crate). The
/// command line itself is the library's top layer, `cli` (shared with the Python
/// package's console script).
const BINARY: &[&str] = &["main.rs"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` module (tests may
/// use anything).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module path of a file relative to `src`: `checkpoint/shard.rs` → [checkpoint, shard].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b` path a piece of code names, as [a, b] (b may be missing),
/// including the items of `use crate::{a, b::c}` groups.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .take(2)
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let p = ident(item.trim());
                if !p.is_empty() {
                    out.push(p);
                }
            }
        } else {
            let p = ident(after);
            if !p.is_empty() {
                out.push(p);
            }
        }
        rest = after;
    }
    out
}

/// Uses between top-level modules: (from, to) → the files that make them.
fn edges() -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src()).unwrap().to_path_buf();
        let name = rel.to_string_lossy().to_string();
        if BINARY.contains(&name.as_str()) || name == "lib.rs" {
            continue;
        }
        let from = module_of(&rel)[0].clone();
        for p in crate_paths(&code(&f)) {
            // `crate::Checkpoint` and friends are the root's re-exports.
            let to = match p[0].as_str() {
                "Checkpoint" => "checkpoint".to_string(),
                "Comparison" | "TensorMetrics" => "comparison".to_string(),
                "Error" | "Result" => "error".to_string(),
                "CompareOptions" | "compare" => "pipeline".to_string(),
                m => m.to_string(),
            };
            if to != from {
                out.entry((from.clone(), to))
                    .or_default()
                    .insert(name.clone());
            }
        }
    }
    out
}

#[test]
fn every_module_uses_only_the_modules_below_it() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = Vec::new();
    for ((from, to), files) in edges() {
        match (rank(&from), rank(&to)) {
            (Some(a), Some(b)) if b < a => {}
            (None, _) => wrong.push(format!("module `{from}` is not in LAYERS")),
            (_, None) => wrong.push(format!("`{to}` (used by {from}) is not in LAYERS")),
            _ => wrong.push(format!(
                "{from} uses {to}, which is above it ({})",
                files.into_iter().collect::<Vec<_>>().join(", ")
            )),
        }
    }
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "the data flow points up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    let layered: BTreeSet<&str> = LAYERS.iter().copied().collect();
    assert_eq!(declared, layered, "lib.rs's modules and LAYERS differ");
}

/// Inside `checkpoint`, submodules use each other without a cycle.
#[test]
fn checkpoint_submodules_form_no_cycle() {
    let mut files = Vec::new();
    rust_files(&src().join("checkpoint"), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(src()).unwrap();
        let m = module_of(rel);
        let Some(from) = m.get(1).cloned() else {
            continue; // checkpoint/mod.rs: the parent may use its children
        };
        let text = code(f);
        let mut uses: BTreeSet<String> = crate_paths(&text)
            .into_iter()
            .filter(|p| p[0] == "checkpoint" && p.len() == 2)
            .map(|p| p[1].clone())
            .collect();
        for s in text.split("super::").skip(1) {
            let id: String = s
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !id.is_empty() {
                uses.insert(id);
            }
        }
        let siblings: BTreeSet<String> = files
            .iter()
            .filter_map(|g| module_of(g.strip_prefix(src()).unwrap()).get(1).cloned())
            .collect();
        uses.retain(|u| siblings.contains(u) && *u != from);
        graph.entry(from).or_default().extend(uses);
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!("checkpoint's submodules form a cycle: {}", c.join(" → "));
        }
    }
}

#[test]
fn the_scanner_sees_groups_and_paths() {
    let p = crate_paths(
        "use crate::{fsio::write_atomic, error};\nlet x = crate::pairing::natural_cmp;",
    );
    assert_eq!(
        p,
        vec![
            vec!["fsio".to_string(), "write_atomic".to_string()],
            vec!["error".to_string()],
            vec!["pairing".to_string(), "natural_cmp".to_string()],
        ]
    );
}
