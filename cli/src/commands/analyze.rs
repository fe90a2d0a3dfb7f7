//! `deepmad analyze NET|FILE`: the analysis of a built-in network or an architecture file.

use std::io::Write;
use std::path::Path;

use deepmad_design::analyze::{analyze_source, Options, Source};
use deepmad_design::score::Analysis;
use deepmad_design::{classic, Network};
use serde_json::json;

use super::Scoring;
use crate::args::AnalyzeArgs;
use crate::{render, Failure};

pub fn run(args: &AnalyzeArgs, out: &mut impl Write) -> Result<(), Failure> {
    let scoring = Scoring::from_args(&args.scoring)?;
    let (source, path) = load(&args.network)?;
    let options = Options {
        resolution: args.resolution,
        num_classes: args.num_classes,
        objective: scoring.objective,
        alpha: scoring.alpha,
        beta: scoring.beta,
    };
    let reports = analyze_source(&source, &options).map_err(|error| match &path {
        Some(path) => Failure::usage(format!("{}: {error}", path.display())),
        None => Failure::from(error),
    })?;
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
        return Ok(());
    }
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

/// Returns a built-in network by name, else the contents of a file (with its path).
pub(crate) fn load(network: &str) -> Result<(Source, Option<&Path>), Failure> {
    let normalized = network.to_ascii_lowercase().replace(['-', '_'], "");
    if classic::NAMES
        .iter()
        .any(|name| name.replace('_', "") == normalized)
    {
        return Ok((Source::Builtin(network.to_string()), None));
    }
    let path = Path::new(network);
    if !path.exists() {
        return Err(Failure::usage(format!(
            "{network:?} is neither a built-in network ({}) nor an existing file",
            classic::NAMES.join(", ")
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|error| Failure::usage(format!("cannot read {}: {error}", path.display())))?;
    Ok((Source::detect(&text), Some(path)))
}
