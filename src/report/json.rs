//! `weight_differences.json` (SPEC §4 schema): one typed document, [`WeightDifferences`],
//! serialized to write the file and deserialized to read it back (`weightdiff report`).
//! Keys added after the first schema carry `#[serde(default)]`, so files of older
//! versions still read.

use crate::checkpoint::HubOrigin;
use crate::comparison::{
    Comparison, ModelInfo, Overlap, Performance, SCHEMA_VERSION, Second, TensorMetrics,
};
use crate::error::{Error, Result};
use crate::pairing::{Mismatch, PrefixAlignment};
use crate::relatedness::Relatedness;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The whole document.
#[derive(Debug, Serialize, Deserialize)]
pub struct WeightDifferences {
    pub schema_version: u32,
    pub complete: bool,
    pub base: String,
    pub finetuned: String,
    pub threshold: f64,
    #[serde(default)]
    pub verify: bool,
    #[serde(default)]
    pub filters: Vec<String>,
    #[serde(default)]
    pub name_alignment: Option<PrefixAlignment>,
    pub modified_layers: Vec<String>,
    /// Tensor name → metrics, in natural name order.
    pub all_differences: Named<TensorMetrics>,
    pub only_in_base: Vec<String>,
    pub only_in_finetuned: Vec<String>,
    pub mismatches: Vec<Mismatch>,
    pub errors: BTreeMap<String, String>,
    #[serde(default)]
    pub relatedness: RelatednessField,
    #[serde(default)]
    pub warnings: PerModel<Vec<String>>,
    pub performance: PerformanceDoc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<PerModel<Option<HubOrigin>>>,
    /// The quantization error per storage, when the two store tensors differently.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantization: Vec<super::quantization::QuantGroup>,
}

/// One value for each model.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PerModel<T> {
    pub base: T,
    pub finetuned: T,
}

/// `performance`: the run's figures and each tensor's times.
#[derive(Debug, Serialize, Deserialize)]
pub struct PerformanceDoc {
    #[serde(flatten)]
    pub run: Performance,
    #[serde(default)]
    pub layer_times: Named<LayerTime>,
}

/// One tensor's times under `performance.layer_times`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LayerTime {
    pub total_time: Second,
    pub compute_time: Second,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_time: Option<Second>,
}

/// `relatedness`: written as the whole evidence with its verdict
/// ([`crate::relatedness::assess`]); read back as the overlap it was derived from, since
/// `assess` recomputes the rest from the recorded comparison.
#[derive(Debug)]
pub enum RelatednessField {
    Written(Box<Relatedness>),
    Read(Overlap),
}

impl Default for RelatednessField {
    fn default() -> Self {
        RelatednessField::Read(Overlap::default())
    }
}

impl Serialize for RelatednessField {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            RelatednessField::Written(r) => r.serialize(s),
            RelatednessField::Read(o) => o.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RelatednessField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Overlap::deserialize(d).map(RelatednessField::Read)
    }
}

/// A JSON object whose keys keep their order: name → value, as the reports list them.
#[derive(Debug, Clone, PartialEq)]
pub struct Named<T>(pub Vec<(String, T)>);

impl<T> Default for Named<T> {
    fn default() -> Self {
        Named(Vec::new())
    }
}

impl<T> Named<T> {
    /// Name → entry, for lookups.
    pub fn map(&self) -> std::collections::HashMap<&str, &T> {
        self.0.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }
}

impl<T: Serialize> Serialize for Named<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Named<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Named<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of named entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Named<T>, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(entry) = a.next_entry()? {
                    v.push(entry);
                }
                Ok(Named(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl WeightDifferences {
    /// The document of a comparison.
    pub fn of(c: &Comparison) -> WeightDifferences {
        let layer_times = c
            .results
            .iter()
            .map(|(name, m)| {
                let t = LayerTime {
                    total_time: m.total_time,
                    compute_time: m.compute_time,
                    reference_time: m.reference_time,
                };
                (name.clone(), t)
            })
            .collect();
        let hubs = c.base.hub.is_some() || c.finetuned.hub.is_some();
        WeightDifferences {
            schema_version: SCHEMA_VERSION,
            complete: c.complete,
            base: c.base.source.clone(),
            finetuned: c.finetuned.source.clone(),
            threshold: c.threshold,
            verify: c.verify,
            filters: c.filters.clone(),
            name_alignment: c.prefix.clone(),
            modified_layers: c.modified().into_iter().map(String::from).collect(),
            all_differences: Named(c.results.clone()),
            only_in_base: c.only_in_base.clone(),
            only_in_finetuned: c.only_in_finetuned.clone(),
            mismatches: c.mismatches.clone(),
            errors: c.errors.clone(),
            relatedness: RelatednessField::Written(Box::new(crate::relatedness::assess(c))),
            warnings: PerModel {
                base: c.base.warnings.clone(),
                finetuned: c.finetuned.warnings.clone(),
            },
            performance: PerformanceDoc {
                run: c.performance.clone(),
                layer_times: Named(layer_times),
            },
            hub: hubs.then(|| PerModel {
                base: c.base.hub.clone(),
                finetuned: c.finetuned.hub.clone(),
            }),
            quantization: super::quantization::by_storage(c),
        }
    }

    /// Reads the document at `path`.
    pub fn read(path: &Path) -> Result<WeightDifferences> {
        let value = crate::fsio::read_json(path)?;
        let version = value.get("schema_version").and_then(|v| v.as_u64());
        if version != Some(u64::from(SCHEMA_VERSION)) {
            return Err(Error::InvalidJson {
                path: path.to_path_buf(),
                reason: format!(
                    "schema_version {version:?}, this weightdiff reads {SCHEMA_VERSION}"
                ),
            });
        }
        serde_json::from_value(value).map_err(|e| Error::InvalidJson {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The comparison the document records. The per-model file lists, configs and
    /// tensor lists are not in it; the text and HTML reports do not need them.
    pub fn into_comparison(self) -> Comparison {
        let (warnings, hub) = (self.warnings, self.hub.unwrap_or_default());
        let model = |source: String, warnings: Vec<String>, hub: Option<HubOrigin>| ModelInfo {
            source,
            files: Vec::new(),
            config: None,
            generation_config: None,
            tensors: Vec::new(),
            warnings,
            hub,
        };
        Comparison {
            base: model(self.base, warnings.base, hub.base),
            finetuned: model(self.finetuned, warnings.finetuned, hub.finetuned),
            threshold: self.threshold,
            verify: self.verify,
            filters: self.filters,
            prefix: self.name_alignment,
            results: self.all_differences.0,
            only_in_base: self.only_in_base,
            only_in_finetuned: self.only_in_finetuned,
            mismatches: self.mismatches,
            errors: self.errors,
            filtered_out: 0,
            performance: self.performance.run,
            complete: self.complete,
            overlap: match self.relatedness {
                RelatednessField::Written(r) => r.overlap,
                RelatednessField::Read(o) => o,
            },
            lora: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_entries_keep_their_order_both_ways() {
        let n = Named(vec![("b".to_string(), 1), ("a".to_string(), 2)]);
        let text = serde_json::to_string(&n).unwrap();
        assert_eq!(text, r#"{"b":1,"a":2}"#);
        let back: Named<i32> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, n);
    }
}
