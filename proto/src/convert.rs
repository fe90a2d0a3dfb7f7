//! Conversions between `deepmad.v1` wire messages and the design crate's domain types.
//!
//! Wire -> domain conversions validate and fail with a [`ConvertError`] that names the wire
//! field (`rho`, `stage_strides`, `analysis.stages[2].block`), so a server can answer
//! `InvalidArgument` with a message the user can act on. Domain -> wire conversions are total.
//!
//! Enums travel as `i32` in prost messages; `*_from_proto` functions take that `i32` and the
//! field's name. An unset (`UNSPECIFIED`) family is an error; an unset objective means the
//! paper's.

use deepmad_design::score::{Analysis, ObjectiveKind, ScaleTerm, StageReport, DEFAULT_BETA};
use deepmad_design::solver::{Certificate, Family, Problem, SearchSpace, Solution};
use deepmad_design::{DesignError, Network};

use crate::v1;

/// A wire message that does not make a valid domain value; `field` is the wire field's path.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

impl ConvertError {
    /// Returns an error naming `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
        ConvertError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The certificate kinds the solver issues (`Certificate::kind` is a `&'static str`).
const CERTIFICATE_KINDS: [&str; 1] = ["local-optimum"];

impl From<Family> for v1::Family {
    fn from(family: Family) -> v1::Family {
        match family {
            Family::Basic => v1::Family::Basic,
            Family::Bottleneck => v1::Family::Bottleneck,
            Family::Mbconv => v1::Family::Mbconv,
            Family::MbconvSe => v1::Family::MbconvSe,
        }
    }
}

/// Reads a required family.
pub fn family_from_proto(value: i32, field: &str) -> Result<Family, ConvertError> {
    match v1::Family::try_from(value) {
        Ok(v1::Family::Basic) => Ok(Family::Basic),
        Ok(v1::Family::Bottleneck) => Ok(Family::Bottleneck),
        Ok(v1::Family::Mbconv) => Ok(Family::Mbconv),
        Ok(v1::Family::MbconvSe) => Ok(Family::MbconvSe),
        Ok(v1::Family::Unspecified) => Err(ConvertError::new(
            field,
            "must be set (basic, bottleneck, mbconv or mbconv-se)",
        )),
        Err(_) => Err(ConvertError::new(field, format!("unknown family {value}"))),
    }
}

impl From<ObjectiveKind> for v1::ObjectiveKind {
    fn from(kind: ObjectiveKind) -> v1::ObjectiveKind {
        match kind {
            ObjectiveKind::Paper => v1::ObjectiveKind::Paper,
            ObjectiveKind::Tinynas => v1::ObjectiveKind::Tinynas,
        }
    }
}

/// Reads an objective kind; unset means the paper's.
pub fn objective_from_proto(value: i32, field: &str) -> Result<ObjectiveKind, ConvertError> {
    match v1::ObjectiveKind::try_from(value) {
        Ok(v1::ObjectiveKind::Unspecified | v1::ObjectiveKind::Paper) => Ok(ObjectiveKind::Paper),
        Ok(v1::ObjectiveKind::Tinynas) => Ok(ObjectiveKind::Tinynas),
        Err(_) => Err(ConvertError::new(
            field,
            format!("unknown objective kind {value}"),
        )),
    }
}

/// Returns the wire analysis; `content_hash` is the analysed network's identity.
pub fn analysis_to_proto(analysis: &Analysis, content_hash: &str) -> v1::Analysis {
    v1::Analysis {
        objective_kind: v1::ObjectiveKind::from(analysis.objective_kind).into(),
        resolution: analysis.resolution,
        params: analysis.params,
        flops: analysis.flops,
        layers: analysis.layers,
        effectiveness: analysis.effectiveness,
        entropy: analysis.entropy,
        penalty: analysis.penalty,
        beta: analysis.beta,
        objective: analysis.objective,
        alpha: analysis.alpha.clone(),
        scales: analysis.scales.iter().map(scale_to_proto).collect(),
        stages: analysis.stages.iter().map(stage_to_proto).collect(),
        content_hash: content_hash.to_string(),
    }
}

fn scale_to_proto(scale: &ScaleTerm) -> v1::ScaleTerm {
    v1::ScaleTerm {
        side: scale.side,
        channels: scale.channels,
        log_width_sum: scale.log_width_sum,
        alpha: scale.alpha,
        entropy: scale.entropy,
    }
}

fn stage_to_proto(stage: &StageReport) -> v1::StageReport {
    v1::StageReport {
        block: stage.block.clone(),
        in_channels: stage.in_channels,
        out_channels: stage.out,
        stride: stage.stride,
        depth: stage.depth,
        kernel: stage.kernel,
        mid: stage.mid,
        se: stage.se,
        side: stage.side,
        params: stage.params,
        flops: stage.flops,
        layers: stage.layers,
    }
}

/// Reads a wire analysis (its `content_hash` stays on the wire message).
pub fn analysis_from_proto(wire: &v1::Analysis) -> Result<Analysis, ConvertError> {
    Ok(Analysis {
        objective_kind: objective_from_proto(wire.objective_kind, "analysis.objective_kind")?,
        resolution: wire.resolution,
        params: wire.params,
        flops: wire.flops,
        layers: wire.layers,
        effectiveness: wire.effectiveness,
        entropy: wire.entropy,
        penalty: wire.penalty,
        beta: wire.beta,
        objective: wire.objective,
        alpha: wire.alpha.clone(),
        scales: wire
            .scales
            .iter()
            .map(|scale| ScaleTerm {
                side: scale.side,
                channels: scale.channels,
                log_width_sum: scale.log_width_sum,
                alpha: scale.alpha,
                entropy: scale.entropy,
            })
            .collect(),
        stages: wire
            .stages
            .iter()
            .map(|stage| StageReport {
                block: stage.block.clone(),
                in_channels: stage.in_channels,
                out: stage.out_channels,
                stride: stage.stride,
                depth: stage.depth,
                kernel: stage.kernel,
                mid: stage.mid,
                se: stage.se,
                side: stage.side,
                params: stage.params,
                flops: stage.flops,
                layers: stage.layers,
            })
            .collect(),
    })
}

impl From<&Certificate> for v1::Certificate {
    fn from(certificate: &Certificate) -> v1::Certificate {
        v1::Certificate {
            kind: certificate.kind.to_string(),
            neighbourhood: certificate.neighbourhood.clone(),
            neighbours_checked: certificate.neighbours_checked,
            upper_bound: certificate.upper_bound,
        }
    }
}

/// Reads a wire certificate; its kind must be one the solver issues.
pub fn certificate_from_proto(wire: &v1::Certificate) -> Result<Certificate, ConvertError> {
    let kind = CERTIFICATE_KINDS
        .iter()
        .find(|kind| **kind == wire.kind)
        .ok_or_else(|| {
            ConvertError::new(
                "certificate.kind",
                format!(
                    "unknown kind {:?} (known: {})",
                    wire.kind,
                    CERTIFICATE_KINDS.join(", ")
                ),
            )
        })?;
    Ok(Certificate {
        kind,
        neighbourhood: wire.neighbourhood.clone(),
        neighbours_checked: wire.neighbours_checked,
        upper_bound: wire.upper_bound,
    })
}

/// Reads a solve request into a validated [`Problem`]; errors name the request's field.
pub fn problem_from_proto(request: &v1::SolveRequest) -> Result<Problem, ConvertError> {
    let family = family_from_proto(request.family, "family")?;
    if request.params.is_none() && request.flops.is_none() {
        return Err(ConvertError::new(
            "params",
            "set a params budget, a flops budget or both",
        ));
    }
    for (field, budget) in [("params", request.params), ("flops", request.flops)] {
        if budget == Some(0) {
            return Err(ConvertError::new(field, "must be positive"));
        }
    }
    let mut problem = Problem::new(family, request.params, request.flops, request.rho);
    problem.objective = objective_from_proto(request.objective, "objective")?;
    problem.alpha = (!request.alpha.is_empty()).then(|| request.alpha.clone());
    problem.beta = request.beta.unwrap_or(DEFAULT_BETA);
    problem.resolution = request.resolution.unwrap_or(problem.resolution);
    problem.num_classes = request.num_classes.unwrap_or(problem.num_classes);
    problem.max_layers = request.max_layers;
    if !request.stage_strides.is_empty() {
        let mut space = SearchSpace::default_for(family, problem.resolution);
        space.stage_strides = request.stage_strides.clone();
        problem.space = Some(space);
    }
    problem.validate().map_err(solve_field_error)?;
    Ok(problem)
}

/// Names the wire field behind a design-crate validation error.
fn solve_field_error(error: DesignError) -> ConvertError {
    match error {
        DesignError::InvalidInput { field, reason } => {
            let wire_field = match field {
                "block" => "family",
                "space" => "stage_strides",
                "budget" => "params",
                other => other,
            };
            ConvertError::new(wire_field, reason)
        }
        other => ConvertError::new("request", other.to_string()),
    }
}

/// Returns the solve request for `problem`. Fails, naming `space`, when the problem's search
/// space differs from the family's default in more than the stage strides (the wire carries
/// only those).
pub fn problem_to_proto(problem: &Problem) -> Result<v1::SolveRequest, ConvertError> {
    let mut stage_strides = Vec::new();
    if let Some(space) = &problem.space {
        let mut expected = SearchSpace::default_for(problem.family, problem.resolution);
        expected.stage_strides = space.stage_strides.clone();
        if *space != expected {
            return Err(ConvertError::new(
                "space",
                "only the stage strides of the search space can be sent",
            ));
        }
        stage_strides = space.stage_strides.clone();
    }
    if problem.in_channels != 3 {
        return Err(ConvertError::new(
            "in_channels",
            "only 3 input channels can be sent",
        ));
    }
    Ok(v1::SolveRequest {
        family: v1::Family::from(problem.family).into(),
        objective: v1::ObjectiveKind::from(problem.objective).into(),
        params: problem.params,
        flops: problem.flops,
        rho: problem.rho,
        alpha: problem.alpha.clone().unwrap_or_default(),
        beta: Some(problem.beta),
        resolution: Some(problem.resolution),
        num_classes: Some(problem.num_classes),
        max_layers: problem.max_layers,
        stage_strides,
    })
}

/// Returns the wire answer to a solve that took `solve_ms` milliseconds.
pub fn solution_to_proto(solution: &Solution, solve_ms: f64) -> v1::SolveResponse {
    let content_hash = solution.network.content_hash();
    v1::SolveResponse {
        analysis: Some(analysis_to_proto(&solution.analysis, &content_hash)),
        architecture_json: solution.network.canonical_json(),
        content_hash,
        solve_ms,
        certificate: Some(v1::Certificate::from(&solution.certificate)),
        evaluations: solution.evaluations,
    }
}

/// Reads a solve response back into a [`Solution`] (its `solve_ms` stays on the wire
/// message). Checks that the content hash is the architecture's.
pub fn solution_from_proto(response: &v1::SolveResponse) -> Result<Solution, ConvertError> {
    let network = Network::from_json(&response.architecture_json)
        .map_err(|error| ConvertError::new("architecture_json", error.to_string()))?;
    if network.content_hash() != response.content_hash {
        return Err(ConvertError::new(
            "content_hash",
            "is not the SHA-256 of the canonical architecture JSON",
        ));
    }
    let analysis = response
        .analysis
        .as_ref()
        .ok_or_else(|| ConvertError::new("analysis", "must be set"))?;
    let certificate = response
        .certificate
        .as_ref()
        .ok_or_else(|| ConvertError::new("certificate", "must be set"))?;
    Ok(Solution {
        network,
        analysis: analysis_from_proto(analysis)?,
        certificate: certificate_from_proto(certificate)?,
        evaluations: response.evaluations,
    })
}

/// Where the network of an analyze request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkSource {
    /// A built-in network's name.
    Builtin(String),
    /// deepmad architecture JSON text (not yet parsed).
    ArchitectureJson(String),
    /// TinyNAS structure text (not yet parsed).
    Tinynas(String),
}

/// A checked analyze request. Parsing the network is the service's work: it needs the
/// resolution and class count too.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalyzeInput {
    pub source: NetworkSource,
    /// `None`: 224, or the architecture JSON's own.
    pub resolution: Option<u32>,
    /// `None`: 1000, or the architecture JSON's own.
    pub num_classes: Option<u32>,
    pub objective: ObjectiveKind,
    /// `None`: the default {1, ..., 1, 8} for the network's scales.
    pub alpha: Option<Vec<f64>>,
    pub beta: f64,
}

/// Reads an analyze request, naming the field at fault.
pub fn analyze_input_from_proto(
    request: &v1::AnalyzeRequest,
) -> Result<AnalyzeInput, ConvertError> {
    use v1::analyze_request::Network as Wire;
    let source = match &request.network {
        None => {
            return Err(ConvertError::new(
                "network",
                "set one of builtin, architecture_json or tinynas",
            ))
        }
        Some(Wire::Builtin(name)) => NetworkSource::Builtin(non_empty("builtin", name)?),
        Some(Wire::ArchitectureJson(text)) => {
            NetworkSource::ArchitectureJson(non_empty("architecture_json", text)?)
        }
        Some(Wire::Tinynas(text)) => NetworkSource::Tinynas(non_empty("tinynas", text)?),
    };
    if let Some(bad) = request.alpha.iter().find(|a| !a.is_finite() || **a < 0.0) {
        return Err(ConvertError::new(
            "alpha",
            format!("entries must be finite and non-negative, got {bad}"),
        ));
    }
    let beta = request.beta.unwrap_or(DEFAULT_BETA);
    if !beta.is_finite() || beta < 0.0 {
        return Err(ConvertError::new(
            "beta",
            format!("must be finite and non-negative, got {beta}"),
        ));
    }
    for (field, value) in [
        ("resolution", request.resolution),
        ("num_classes", request.num_classes),
    ] {
        if value == Some(0) {
            return Err(ConvertError::new(field, "must be positive"));
        }
    }
    Ok(AnalyzeInput {
        source,
        resolution: request.resolution,
        num_classes: request.num_classes,
        objective: objective_from_proto(request.objective, "objective")?,
        alpha: (!request.alpha.is_empty()).then(|| request.alpha.clone()),
        beta,
    })
}

fn non_empty(field: &str, text: &str) -> Result<String, ConvertError> {
    if text.trim().is_empty() {
        return Err(ConvertError::new(field, "must not be empty"));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests;
