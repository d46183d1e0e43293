//! The shard plan: which tensor pairs one process of a sharded run (`compare --shard
//! I/N`) compares.
//!
//! Assignment: pairs are sorted by size (bytes of both sides, largest first) then name,
//! and each goes to the shard with the fewest bytes so far (ties to the lower index).
//! This balances bytes, and depends only on names and sizes, never on the order of the
//! index or the files, so every process of a job computes the same plan.

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
