//! The plan: which tensor pairs a run compares (its shard of a sharded run, `compare
//! --shard I/N`), and the windows each pair is cut into.
//!
//! Assignment: pairs are sorted by size (bytes of both sides, largest first) then name,
//! and each goes to the shard with the fewest bytes so far (ties to the lower index).
//! This balances bytes, and depends only on names and sizes, never on the order of the
//! index or the files, so every process of a job computes the same plan.

use super::*;
use serde::{Deserialize, Serialize};

/// Shard `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// Parses `I/N` with 0 ≤ I < N (SLURM's `--array=0-(N-1)` task ids).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not I/N"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("`{i}` is not a shard index"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("`{n}` is not a shard count"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The shard of each item, given (name, bytes), by the rule of the module docs.
pub fn assign(items: &[(&str, u64)], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].1.cmp(&items[a].1).then(items[a].0.cmp(items[b].0)));
    let mut load = vec![0u64; count];
    let mut out = vec![0; items.len()];
    for i in order {
        let s = (0..count)
            .min_by_key(|&s| (load[s], s))
            .expect("count >= 1");
        load[s] += items[i].1;
        out[i] = s;
    }
    out
}

pub(super) struct Side {
    pub(super) paired: pairing::Pairing,
    pub(super) errors: BTreeMap<String, String>,
    pub(super) filtered_out: usize,
    /// Indices into `paired.pairs` of the pairs to compare (selected, decodable, this shard's).
    pub(super) selected: Vec<usize>,
    /// Results a resumed run takes from its journal.
    pub(super) recovered: BTreeMap<String, TensorMetrics>,
    pub(super) overlap: crate::comparison::Overlap,
}

pub(super) struct Job {
    pub(super) ft: usize,
    pub(super) pair: usize,
    /// Windows of this job.
    pub(super) windows: usize,
    pub(super) bytes: u64,
}

pub(super) fn prepare_side(base: &Checkpoint, ft: &Checkpoint, opts: &CompareOptions) -> Side {
    let mut paired = pairing::pair(base.tensors(), ft.tensors());
    paired.unlist_broken(base.broken.keys(), ft.broken.keys());
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    for (name, why) in base.broken.iter().chain(ft.broken.iter()) {
        errors.insert(name.clone(), why.clone());
    }
    let wanted = |name: &str| {
        opts.include.as_ref().is_none_or(|r| r.is_match(name))
            && !opts.exclude.as_ref().is_some_and(|r| r.is_match(name))
    };
    let mut filtered_out = 0;
    let mut selected = Vec::new();
    for (i, p) in paired.pairs.iter().enumerate() {
        if !wanted(&p.name) {
            filtered_out += 1;
            continue;
        }
        match (&p.base.dtype, &p.finetuned.dtype) {
            (Ok(_), Ok(_)) => selected.push(i),
            (Err(d), _) | (_, Err(d)) => {
                let path = if p.base.dtype.is_err() {
                    base.path_of(&p.base)
                } else {
                    ft.path_of(&p.finetuned)
                };
                errors.insert(
                    p.name.clone(),
                    format!("{}: unsupported dtype {d}", path.display()),
                );
            }
        }
    }
    // A shard keeps its share of the pairs (module `shards` says how it is chosen).
    if let Some(sh) = opts.shard {
        let items: Vec<(&str, u64)> = selected
            .iter()
            .map(|&i| {
                let p = &paired.pairs[i];
                let (sa, sb) = sizes(p);
                (p.name.as_str(), p.compared_elements() * (sa + sb) as u64)
            })
            .collect();
        let owner = plan::assign(&items, sh.count);
        selected = selected
            .into_iter()
            .zip(owner)
            .filter(|(_, o)| *o == sh.index)
            .map(|(i, _)| i)
            .collect();
    }
    Side {
        overlap: crate::relatedness::overlap(base, ft, &paired),
        paired,
        errors,
        filtered_out,
        selected,
        recovered: BTreeMap::new(),
    }
}

pub(super) fn sizes(p: &TensorPair) -> (usize, usize) {
    let da = p.base.dtype.as_ref().expect("dtype checked before cutting");
    let db = p
        .finetuned
        .dtype
        .as_ref()
        .expect("dtype checked before cutting");
    (da.size(), db.size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_balances_bytes_and_ignores_input_order() {
        let items = [("a", 100), ("b", 60), ("c", 50), ("d", 40), ("e", 10)];
        let s = assign(&items, 2);
        let load = |k| {
            items
                .iter()
                .zip(&s)
                .filter(|(_, x)| **x == k)
                .map(|(i, _)| i.1)
                .sum::<u64>()
        };
        assert_eq!((load(0), load(1)), (140, 120));
        let mut rev = items;
        rev.reverse();
        let r = assign(&rev, 2);
        for (i, item) in items.iter().enumerate() {
            let j = rev.iter().position(|x| x.0 == item.0).unwrap();
            assert_eq!(s[i], r[j], "{}", item.0);
        }
        assert_eq!(
            assign(&items, 9).iter().filter(|&&x| x >= 5).count(),
            0,
            "more shards than items: some stay empty"
        );
    }

    #[test]
    fn shard_specs_parse() {
        assert_eq!("2/3".parse::<Shard>(), Ok(Shard { index: 2, count: 3 }));
        assert!("3/3".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
