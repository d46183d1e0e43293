//! The registry of output files: every file a run may write, where, from which stage,
//! and whether `weightdiff report` renders it again. Writing the diff's reports,
//! regenerating, listing what a directory holds, and removing what an earlier run left
//! all follow this one table; a new output is one line here plus its renderer.

use super::{architecture, config, html, json, lora, text, trajectory};
use crate::comparison::Comparison;
use crate::fsio::to_json;
use std::path::{Path, PathBuf};

/// The stage of a run that writes a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The diff: rendered from the comparison alone.
    Diff,
    /// The low-rank stage: the analysis, the extracted weights, the adapter.
    LowRank,
    /// The pages for people, written last (they list the other files).
    Pages,
    /// A run of several fine-tunes, across them.
    Trajectory,
    /// A shard of a sharded run (`compare --shard`), for `merge`.
    Part,
}

/// Where in the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Top,
    /// Inside `lora_adapter/`.
    Adapter,
}

/// One output file.
pub struct Output {
    pub name: &'static str,
    pub place: Place,
    pub stage: Stage,
    /// `weightdiff report DIR` renders it again from the JSON files.
    pub regenerated: bool,
    /// The renderer of a [`Stage::Diff`] file: comparison and `--top` to bytes.
    pub render: Option<fn(&Comparison, usize) -> Vec<u8>>,
}

impl Output {
    /// Its path in the output directory `dir`.
    pub fn path(&self, dir: &Path) -> PathBuf {
        match self.place {
            Place::Top => dir.join(self.name),
            Place::Adapter => dir.join(lora::ADAPTER_DIR).join(self.name),
        }
    }
}

const fn file(name: &'static str, stage: Stage) -> Output {
    Output {
        name,
        place: Place::Top,
        stage,
        regenerated: false,
        render: None,
    }
}

/// Every output, in the order a run writes them (SPEC §4).
pub const OUTPUTS: &[Output] = &[
    Output {
        regenerated: true,
        render: Some(|c, top| text::render(c, top).into_bytes()),
        ..file(super::DIFFERENCE_TXT, Stage::Diff)
    },
    Output {
        render: Some(|c, _| to_json(&json::WeightDifferences::of(c))),
        ..file(super::WEIGHT_DIFFERENCES_JSON, Stage::Diff)
    },
    Output {
        render: Some(|c, _| to_json(&config::render(c))),
        ..file(super::CONFIG_COMPARISON_JSON, Stage::Diff)
    },
    Output {
        render: Some(|c, _| to_json(&architecture::render(c))),
        ..file(super::ARCHITECTURE_COMPARISON_JSON, Stage::Diff)
    },
    file(lora::LORA_ANALYSIS_JSON, Stage::LowRank),
    file(lora::EXTRACTED_WEIGHTS, Stage::LowRank),
    Output {
        place: Place::Adapter,
        ..file(lora::ADAPTER_MODEL, Stage::LowRank)
    },
    Output {
        place: Place::Adapter,
        ..file(lora::ADAPTER_CONFIG, Stage::LowRank)
    },
    file(lora::LORA_METADATA_JSON, Stage::LowRank),
    Output {
        regenerated: true,
        ..file(html::REPORT_HTML, Stage::Pages)
    },
    Output {
        regenerated: true,
        ..file(super::COMPARISON_REPORT_TXT, Stage::Pages)
    },
    file(super::TRAJECTORY_JSON, Stage::Trajectory),
    file(super::TRAJECTORY_TXT, Stage::Trajectory),
    Output {
        regenerated: true,
        ..file(trajectory::TRAJECTORY_HTML, Stage::Trajectory)
    },
    file(crate::parts::PART_JSON, Stage::Part),
    file(crate::parts::PART_TENSORS, Stage::Part),
];

/// The outputs of `stage`, in order.
pub fn of(stage: Stage) -> impl Iterator<Item = &'static Output> {
    OUTPUTS.iter().filter(move |o| o.stage == stage)
}

/// The outputs at `place`.
pub fn at(place: Place) -> impl Iterator<Item = &'static Output> {
    OUTPUTS.iter().filter(move |o| o.place == place)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_diff_files_have_renderers() {
        let mut names: Vec<&str> = OUTPUTS.iter().map(|o| o.name).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
        assert!(of(Stage::Diff).all(|o| o.render.is_some()));
        assert!(
            OUTPUTS
                .iter()
                .filter(|o| o.stage != Stage::Diff)
                .all(|o| o.render.is_none())
        );
    }
}
