//! Analysis of a network given as a built-in name, deepmad architecture JSON or TinyNAS text,
//! under either objective: the one entry point the CLI and the gRPC service share.

use crate::arch::Network;
use crate::classic;
use crate::error::DesignError;
use crate::score::{analyze_paper, default_alpha, scale_count, Analysis, ObjectiveKind};
use crate::tinynas::{analyze_tinynas, TinyNet};

/// Where a network comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A built-in network's name (see [`classic::NAMES`]).
    Builtin(String),
    /// deepmad architecture JSON text.
    ArchitectureJson(String),
    /// A TinyNAS structure (Python literal or JSON), possibly several networks.
    Tinynas(String),
}

impl Source {
    /// Classifies file contents: a JSON object with a `stages` key is deepmad architecture
    /// JSON; anything else is read as a TinyNAS structure.
    pub fn detect(text: &str) -> Source {
        let is_ir = serde_json::from_str::<serde_json::Value>(text)
            .map(|value| value.get("stages").is_some())
            .unwrap_or(false);
        if is_ir {
            Source::ArchitectureJson(text.to_string())
        } else {
            Source::Tinynas(text.to_string())
        }
    }
}

/// How to analyze.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// `None`: 224 for built-in and TinyNAS networks, the JSON's own otherwise.
    pub resolution: Option<u32>,
    /// `None`: 1000 for built-in and TinyNAS networks, the JSON's own otherwise.
    pub num_classes: Option<u32>,
    pub objective: ObjectiveKind,
    /// `None`: {1, ..., 1, 8} over the network's scales.
    pub alpha: Option<Vec<f64>>,
    pub beta: f64,
}

/// Returns every network of `source` with its analysis (a TinyNAS file may hold several).
pub fn analyze_source(
    source: &Source,
    options: &Options,
) -> Result<Vec<(Network, Analysis)>, DesignError> {
    let resolution = options.resolution.unwrap_or(224);
    let num_classes = options.num_classes.unwrap_or(1000);
    let pairs: Vec<(Network, Option<TinyNet>)> = match source {
        Source::Builtin(name) => vec![(classic::by_name(name, num_classes, resolution)?, None)],
        Source::ArchitectureJson(text) => {
            let mut net = Network::from_json(text)?;
            net.resolution = options.resolution.unwrap_or(net.resolution);
            net.num_classes = options.num_classes.unwrap_or(net.num_classes);
            net.validate()?;
            vec![(net, None)]
        }
        Source::Tinynas(text) => {
            let nets = TinyNet::parse_all(text)?;
            if nets.is_empty() {
                return Err(DesignError::Malformed {
                    format: "TinyNAS structure",
                    location: "the top level".into(),
                    reason: "it holds no structure".into(),
                });
            }
            nets.into_iter()
                .map(|tiny| Ok((tiny.to_network(num_classes, resolution)?, Some(tiny))))
                .collect::<Result<_, DesignError>>()?
        }
    };
    pairs
        .into_iter()
        .map(|(net, tiny)| {
            let analysis = match options.objective {
                ObjectiveKind::Paper => {
                    let alpha = options
                        .alpha
                        .clone()
                        .unwrap_or_else(|| default_alpha(scale_count(&net)));
                    analyze_paper(&net, &alpha, options.beta)?
                }
                ObjectiveKind::Tinynas => {
                    let tiny = match tiny {
                        Some(tiny) => tiny,
                        None => TinyNet::from_network(&net)?,
                    };
                    let alpha = options.alpha.clone().unwrap_or_else(|| default_alpha(5));
                    analyze_tinynas(&tiny, net.resolution, &alpha, options.beta)?
                }
            };
            Ok((net, analysis))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(objective: ObjectiveKind) -> Options {
        Options {
            resolution: None,
            num_classes: None,
            objective,
            alpha: None,
            beta: 10.0,
        }
    }

    #[test]
    fn detects_formats() {
        let json = classic::by_name("resnet18", 10, 32)
            .unwrap()
            .canonical_json();
        assert!(matches!(Source::detect(&json), Source::ArchitectureJson(_)));
        assert!(matches!(
            Source::detect("{'best_structures': [[]]}"),
            Source::Tinynas(_)
        ));
    }

    #[test]
    fn json_keeps_its_own_resolution_unless_overridden() {
        let json = classic::by_name("resnet18", 10, 32)
            .unwrap()
            .canonical_json();
        let source = Source::ArchitectureJson(json);
        let analyzed = analyze_source(&source, &options(ObjectiveKind::Paper)).unwrap();
        assert_eq!(analyzed[0].1.resolution, 32);
        let wider = Options {
            resolution: Some(64),
            ..options(ObjectiveKind::Paper)
        };
        assert_eq!(analyze_source(&source, &wider).unwrap()[0].1.resolution, 64);
    }

    #[test]
    fn builtin_under_tinynas_is_unsupported() {
        let source = Source::Builtin("resnet18".into());
        let error = analyze_source(&source, &options(ObjectiveKind::Tinynas)).unwrap_err();
        assert!(error.to_string().contains("TinyNAS"), "{error}");
    }
}
