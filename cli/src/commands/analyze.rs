//! `deepmad analyze NET|FILE`: the analysis of a built-in network or an architecture file.

use std::io::Write;
use std::path::Path;

use deepmad_design::score::{analyze_paper, default_alpha, scale_count, Analysis, ObjectiveKind};
use deepmad_design::tinynas::{analyze_tinynas, TinyNet};
use deepmad_design::{classic, Network};
use serde_json::json;

use super::Scoring;
use crate::args::AnalyzeArgs;
use crate::{render, Failure};

/// Where the architecture came from.
enum Source {
    Ir(Network),
    Tinynas(Vec<TinyNet>),
}

pub fn run(args: &AnalyzeArgs, out: &mut impl Write) -> Result<(), Failure> {
    let scoring = Scoring::from_args(&args.scoring)?;
    let resolution = args.resolution.unwrap_or(224);
    let num_classes = args.num_classes.unwrap_or(1000);
    let source = load(args, resolution, num_classes)?;
    let nets: Vec<Network> = match &source {
        Source::Ir(net) => vec![net.clone()],
        Source::Tinynas(tiny) => tiny
            .iter()
            .map(|t| t.to_network(num_classes, resolution))
            .collect::<Result<_, _>>()?,
    };
    let mut reports = Vec::new();
    for (index, net) in nets.iter().enumerate() {
        let analysis = match scoring.objective {
            ObjectiveKind::Paper => {
                let alpha = scoring
                    .alpha
                    .clone()
                    .unwrap_or_else(|| default_alpha(scale_count(net)));
                analyze_paper(net, &alpha, scoring.beta)?
            }
            ObjectiveKind::Tinynas => {
                let tiny = match &source {
                    Source::Tinynas(tiny) => tiny[index].clone(),
                    Source::Ir(net) => TinyNet::from_network(net)?,
                };
                let alpha = scoring.alpha.clone().unwrap_or_else(|| default_alpha(5));
                analyze_tinynas(&tiny, resolution, &alpha, scoring.beta)?
            }
        };
        reports.push((net, analysis));
    }
    if args.json {
        let values: Vec<_> = reports
            .iter()
            .map(|(net, analysis)| analysis_json(&args.network, net, analysis))
            .collect();
        let value = if values.len() == 1 {
            values.into_iter().next().expect("one report")
        } else {
            serde_json::Value::Array(values)
        };
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON values serialize")
        )?;
    } else {
        for (index, (net, analysis)) in reports.iter().enumerate() {
            if index > 0 {
                writeln!(out)?;
            }
            let title = if reports.len() > 1 {
                format!("{} [{}]", args.network, index + 1)
            } else {
                args.network.clone()
            };
            render::analysis(out, &title, net, analysis)?;
        }
    }
    Ok(())
}

/// Returns the analysis as JSON, with where it came from and the design's identity.
pub fn analysis_json(name: &str, net: &Network, analysis: &Analysis) -> serde_json::Value {
    let mut value = serde_json::to_value(analysis).expect("analyses serialize");
    let object = value.as_object_mut().expect("an analysis is a JSON object");
    object.insert("network".into(), json!(name));
    object.insert("content_hash".into(), json!(net.content_hash()));
    value
}

/// Loads a built-in network by name, else a file in deepmad JSON or TinyNAS format.
fn load(args: &AnalyzeArgs, resolution: u32, num_classes: u32) -> Result<Source, Failure> {
    if let Ok(net) = classic::by_name(&args.network, num_classes, resolution) {
        return Ok(Source::Ir(net));
    }
    let path = Path::new(&args.network);
    if !path.exists() {
        return Err(Failure::usage(format!(
            "{:?} is neither a built-in network ({}) nor an existing file",
            args.network,
            classic::NAMES.join(", ")
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|error| Failure::usage(format!("cannot read {}: {error}", path.display())))?;
    let in_file = |message: String| Failure::usage(format!("{}: {message}", path.display()));
    if looks_like_ir(&text) {
        let mut net = Network::from_json(&text).map_err(|e| in_file(e.to_string()))?;
        net.resolution = args.resolution.unwrap_or(net.resolution);
        net.num_classes = args.num_classes.unwrap_or(net.num_classes);
        net.validate().map_err(|e| in_file(e.to_string()))?;
        return Ok(Source::Ir(net));
    }
    let nets = TinyNet::parse_all(&text).map_err(|e| in_file(e.to_string()))?;
    if nets.is_empty() {
        return Err(in_file("the file holds no structure".into()));
    }
    Ok(Source::Tinynas(nets))
}

/// A deepmad architecture file is a JSON object with a `stages` key.
fn looks_like_ir(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|value| value.get("stages").is_some())
        .unwrap_or(false)
}
