//! `config_comparison.json`: keys of `config.json` and `generation_config.json` that
//! changed, or exist on one side only.

use crate::comparison::Comparison;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `config_comparison.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigComparison {
    pub config: KeyComparison,
    pub generation_config: KeyComparison,
}

/// Two JSON objects compared key by key (top level; nested values compared whole).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyComparison {
    /// Whether each side has the file.
    pub present: Sides<bool>,
    /// Both present and equal.
    pub identical: bool,
    /// Keys with the same value on both sides.
    pub unchanged_keys: usize,
    /// Keys whose value differs, in the base config's order.
    pub changed: IndexMap<String, Sides<Value>>,
    pub only_in_base: Map<String, Value>,
    pub only_in_finetuned: Map<String, Value>,
}

/// One value per side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sides<T> {
    pub base: T,
    pub finetuned: T,
}

/// Renders `config_comparison.json`.
pub fn render(c: &Comparison) -> ConfigComparison {
    ConfigComparison {
        config: compare(c.base.config.as_ref(), c.finetuned.config.as_ref()),
        generation_config: compare(
            c.base.generation_config.as_ref(),
            c.finetuned.generation_config.as_ref(),
        ),
    }
}

/// Compares two optional JSON objects key by key.
pub fn compare(base: Option<&Value>, ft: Option<&Value>) -> KeyComparison {
    let empty = Map::new();
    let b = base.and_then(Value::as_object).unwrap_or(&empty);
    let f = ft.and_then(Value::as_object).unwrap_or(&empty);
    let mut changed = IndexMap::new();
    let mut only_in_base = Map::new();
    let mut unchanged_keys = 0;
    for (k, bv) in b {
        match f.get(k) {
            Some(fv) if fv == bv => unchanged_keys += 1,
            Some(fv) => {
                changed.insert(
                    k.clone(),
                    Sides {
                        base: bv.clone(),
                        finetuned: fv.clone(),
                    },
                );
            }
            None => {
                only_in_base.insert(k.clone(), bv.clone());
            }
        }
    }
    let only_in_finetuned: Map<String, Value> = f
        .iter()
        .filter(|(k, _)| !b.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    KeyComparison {
        present: Sides {
            base: base.is_some(),
            finetuned: ft.is_some(),
        },
        identical: base.is_some()
            && changed.is_empty()
            && only_in_base.is_empty()
            && only_in_finetuned.is_empty(),
        unchanged_keys,
        changed,
        only_in_base,
        only_in_finetuned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_changed_and_one_sided_keys() {
        let b = json!({"a": 1, "b": 2, "c": [1, 2]});
        let f = json!({"a": 1, "b": 3, "d": true});
        let v = compare(Some(&b), Some(&f));
        assert_eq!(
            v.changed["b"],
            Sides {
                base: json!(2),
                finetuned: json!(3)
            }
        );
        assert_eq!(v.only_in_base["c"], json!([1, 2]));
        assert_eq!(v.only_in_finetuned["d"], json!(true));
        assert_eq!(v.unchanged_keys, 1);
        assert!(!v.identical);
        let round: KeyComparison =
            serde_json::from_value(serde_json::to_value(&v).unwrap()).unwrap();
        assert_eq!(round, v);
    }
}
