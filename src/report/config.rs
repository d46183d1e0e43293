//! `config_comparison.json`: keys of `config.json` and `generation_config.json` that
//! changed, or exist on one side only.

use crate::comparison::Comparison;
use serde_json::{Map, Value, json};

/// Renders `config_comparison.json`.
pub fn render(c: &Comparison) -> Value {
    json!({
        "config": compare(c.base.config.as_ref(), c.finetuned.config.as_ref()),
        "generation_config": compare(
            c.base.generation_config.as_ref(),
            c.finetuned.generation_config.as_ref()
        ),
    })
}

/// Compares two optional JSON objects key by key (top level; nested values are
/// compared whole).
pub fn compare(base: Option<&Value>, ft: Option<&Value>) -> Value {
    let empty = Map::new();
    let b = base.and_then(Value::as_object).unwrap_or(&empty);
    let f = ft.and_then(Value::as_object).unwrap_or(&empty);
    let mut changed = Map::new();
    let mut only_base = Map::new();
    let mut only_ft = Map::new();
    let mut same = 0;
    for (k, bv) in b {
        match f.get(k) {
            Some(fv) if fv == bv => same += 1,
            Some(fv) => {
                changed.insert(k.clone(), json!({"base": bv, "finetuned": fv}));
            }
            None => {
                only_base.insert(k.clone(), bv.clone());
            }
        }
    }
    for (k, fv) in f {
        if !b.contains_key(k) {
            only_ft.insert(k.clone(), fv.clone());
        }
    }
    json!({
        "present": {"base": base.is_some(), "finetuned": ft.is_some()},
        "identical": base.is_some() && changed.is_empty() && only_base.is_empty() && only_ft.is_empty(),
        "unchanged_keys": same,
        "changed": changed,
        "only_in_base": only_base,
        "only_in_finetuned": only_ft,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_changed_and_one_sided_keys() {
        let b = json!({"a": 1, "b": 2, "c": [1, 2]});
        let f = json!({"a": 1, "b": 3, "d": true});
        let v = compare(Some(&b), Some(&f));
        assert_eq!(v["changed"]["b"], json!({"base": 2, "finetuned": 3}));
        assert_eq!(v["only_in_base"]["c"], json!([1, 2]));
        assert_eq!(v["only_in_finetuned"]["d"], json!(true));
        assert_eq!(v["unchanged_keys"], 1);
        assert_eq!(v["identical"], false);
    }
}
