//! `deepmad design`: solves one design problem and prints the design.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use deepmad_design::solver::{solve, Family, Problem, SearchSpace, Solution};
use deepmad_design::tinynas::TinyNet;
use serde_json::json;

use super::{parse_budget, Scoring};
use crate::args::{DesignArgs, FormatArg};
use crate::{render, Failure};

pub fn run(args: &DesignArgs, out: &mut impl Write) -> Result<(), Failure> {
    let problem = problem_from_args(args)?;
    let started = Instant::now();
    let solution = solve(&problem)?;
    let solve_ms = started.elapsed().as_secs_f64() * 1e3;
    if let Some(path) = &args.out {
        write_atomically(path, &solution.network.canonical_json())?;
    }
    match args.format {
        FormatArg::Table => render::solution(out, &problem, &solution, solve_ms)?,
        FormatArg::Json => {
            let value = solution_json(&problem, &solution, solve_ms);
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&value).expect("JSON serializes")
            )?;
        }
        FormatArg::Tinynas => {
            let tiny = TinyNet::from_network(&solution.network)?;
            writeln!(out, "{}", tiny.to_python_literal())?;
        }
    }
    Ok(())
}

/// Validates the flags into a [`Problem`], naming the flag at fault.
pub fn problem_from_args(args: &DesignArgs) -> Result<Problem, Failure> {
    let scoring = Scoring::from_args(&args.scoring)?;
    let family = Family::parse(&args.block)?;
    let rho: f64 = args.rho.trim().parse().map_err(|_| {
        Failure::usage(format!(
            "--rho: expected a positive number, got {:?}",
            args.rho
        ))
    })?;
    let mut problem = Problem::new(
        family,
        parse_budget("params", args.params.as_ref())?,
        parse_budget("flops", args.flops.as_ref())?,
        rho,
    );
    problem.objective = scoring.objective;
    problem.alpha = scoring.alpha;
    problem.beta = scoring.beta;
    problem.resolution = args.resolution;
    problem.num_classes = args.num_classes;
    problem.max_layers = args.max_layers;
    if let Some(strides) = &args.strides {
        let mut space = SearchSpace::default_for(family, args.resolution);
        space.stage_strides = strides.clone();
        problem.space = Some(space);
    }
    problem.validate()?;
    Ok(problem)
}

/// Returns the solution as JSON: the analysis keys at the top level, plus the architecture,
/// its content hash, the solve time, the certificate and the problem solved.
pub fn solution_json(problem: &Problem, solution: &Solution, solve_ms: f64) -> serde_json::Value {
    let mut value = serde_json::to_value(&solution.analysis).expect("analyses serialize");
    let object = value.as_object_mut().expect("an analysis is a JSON object");
    object.insert("architecture".into(), json!(solution.network));
    object.insert(
        "content_hash".into(),
        json!(solution.network.content_hash()),
    );
    object.insert("solve_ms".into(), json!(solve_ms));
    object.insert("evaluations".into(), json!(solution.evaluations));
    object.insert("certificate".into(), json!(solution.certificate));
    object.insert("problem".into(), json!(problem));
    value
}

/// Writes `text` to a temporary file beside `path`, then renames it: never half-written.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<(), Failure> {
    write_bytes_atomically(path, text.as_bytes())
}

/// Writes `bytes` like [`write_atomically`].
pub(crate) fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let fail =
        |error: std::io::Error| Failure::usage(format!("cannot write {}: {error}", path.display()));
    let temporary = path.with_extension("tmp-deepmad");
    std::fs::write(&temporary, bytes).map_err(fail)?;
    std::fs::rename(&temporary, path).map_err(fail)
}
