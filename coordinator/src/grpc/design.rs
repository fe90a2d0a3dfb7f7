//! `DesignService`: analysis and single solves, run off the async runtime.

use std::time::Instant;

use deepmad_design::analyze::{analyze_source, Options, Source};
use deepmad_design::solver::solve;
use deepmad_proto::convert::{
    analysis_to_proto, analyze_input_from_proto, problem_from_proto, solution_to_proto,
    NetworkSource,
};
use deepmad_proto::v1;
use tonic::{Request, Response, Status};

use crate::error::Error;

#[derive(Debug)]
pub struct DesignHandler;

fn design_error(field: &str) -> impl Fn(deepmad_design::DesignError) -> Error + '_ {
    move |error| Error::InvalidArgument {
        field: field.to_string(),
        reason: error.to_string(),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| Error::Internal(format!("blocking task failed: {error}")))?
}

#[tonic::async_trait]
impl v1::design_service_server::DesignService for DesignHandler {
    async fn analyze(
        &self,
        request: Request<v1::AnalyzeRequest>,
    ) -> Result<Response<v1::AnalyzeResponse>, Status> {
        let input = analyze_input_from_proto(request.get_ref()).map_err(Error::from)?;
        let (source, field) = match input.source {
            NetworkSource::Builtin(name) => (Source::Builtin(name), "builtin"),
            NetworkSource::ArchitectureJson(text) => {
                (Source::ArchitectureJson(text), "architecture_json")
            }
            NetworkSource::Tinynas(text) => (Source::Tinynas(text), "tinynas"),
        };
        let options = Options {
            resolution: input.resolution,
            num_classes: input.num_classes,
            objective: input.objective,
            alpha: input.alpha,
            beta: input.beta,
        };
        let analyzed =
            blocking(move || analyze_source(&source, &options).map_err(design_error(field)))
                .await?;
        let networks = analyzed
            .iter()
            .map(|(net, analysis)| v1::AnalyzedNetwork {
                architecture_json: net.canonical_json(),
                analysis: Some(analysis_to_proto(analysis, &net.content_hash())),
            })
            .collect();
        Ok(Response::new(v1::AnalyzeResponse { networks }))
    }

    async fn solve(
        &self,
        request: Request<v1::SolveRequest>,
    ) -> Result<Response<v1::SolveResponse>, Status> {
        let problem = problem_from_proto(request.get_ref()).map_err(Error::from)?;
        let (solution, solve_ms) = blocking(move || {
            let started = Instant::now();
            let solution = solve(&problem).map_err(design_error("problem"))?;
            Ok((solution, started.elapsed().as_secs_f64() * 1e3))
        })
        .await?;
        Ok(Response::new(solution_to_proto(&solution, solve_ms)))
    }
}
