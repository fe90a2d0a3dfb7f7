//! Sweep specs between the wire and the domain: `CreateSweep` reads them, the CLI writes the
//! TOML files it reads as wire messages.

use deepmad_design::solver::Family;
use deepmad_proto::convert::{family_from_proto, objective_from_proto};
use deepmad_proto::v1;

use crate::error::Error;
use crate::sweep::{BudgetSpec, DownstreamSpec, GridSpec, SweepSpec, TaskKind};

fn invalid(field: &str, reason: &str) -> Error {
    Error::InvalidArgument {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// Reads a wire sweep spec into the domain spec (then validated by `SweepSpec::problems`).
pub fn sweep_spec_from_proto(wire: v1::SweepSpec) -> Result<SweepSpec, Error> {
    let grid = wire
        .grid
        .ok_or_else(|| invalid("spec.grid", "is required"))?;
    let block = grid
        .families
        .iter()
        .map(|f| family_from_proto(*f, "spec.grid.families").map(|f| f.name().to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let recipe: serde_json::Value = if wire.recipe_json.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(&wire.recipe_json)
            .map_err(|e| invalid("spec.recipe_json", &format!("is not JSON: {e}")))?
    };
    let seeds = wire
        .seeds
        .iter()
        .map(|s| u64::try_from(*s).map_err(|_| invalid("spec.seeds", "seeds must be non-negative")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SweepSpec {
        name: wire.name,
        dataset: wire.dataset,
        seeds,
        grid: GridSpec {
            block,
            rho: grid.rho,
            alpha: grid.alpha.into_iter().map(|a| a.values).collect(),
            budget: grid
                .budgets
                .into_iter()
                .map(|b| BudgetSpec {
                    params: b.params,
                    flops: b.flops,
                })
                .collect(),
            resolution: grid.resolution.unwrap_or(224),
            num_classes: grid.num_classes.unwrap_or(1000),
            in_channels: grid.in_channels.unwrap_or(3),
            objective: objective_from_proto(grid.objective, "spec.grid.objective")?,
            beta: grid.beta.unwrap_or(deepmad_design::score::DEFAULT_BETA),
            max_layers: grid.max_layers,
            strides: grid.stage_strides,
        },
        recipe,
        downstream: wire
            .downstream
            .into_iter()
            .enumerate()
            .map(|(index, task)| downstream_from_proto(index, task))
            .collect::<Result<Vec<_>, _>>()?,
        max_attempts: (wire.max_attempts > 0).then_some(wire.max_attempts),
    })
}

/// Writes a domain sweep spec (e.g. read from a TOML file) as the wire message.
pub fn sweep_spec_to_proto(spec: &SweepSpec) -> Result<v1::SweepSpec, Error> {
    let families = spec
        .grid
        .block
        .iter()
        .map(|name| {
            Family::parse(name)
                .map(|family| v1::Family::from(family) as i32)
                .map_err(Error::from)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v1::SweepSpec {
        name: spec.name.clone(),
        grid: Some(v1::Grid {
            families,
            rho: spec.grid.rho.clone(),
            alpha: spec
                .grid
                .alpha
                .iter()
                .map(|values| v1::AlphaVector {
                    values: values.clone(),
                })
                .collect(),
            budgets: spec
                .grid
                .budget
                .iter()
                .map(|b| v1::Budget {
                    params: b.params,
                    flops: b.flops,
                })
                .collect(),
            resolution: Some(spec.grid.resolution),
            num_classes: Some(spec.grid.num_classes),
            in_channels: Some(spec.grid.in_channels),
            objective: v1::ObjectiveKind::from(spec.grid.objective) as i32,
            beta: Some(spec.grid.beta),
            max_layers: spec.grid.max_layers,
            stage_strides: spec.grid.strides.clone(),
        }),
        recipe_json: spec.recipe.to_string(),
        dataset: spec.dataset.clone(),
        seeds: spec.seeds.iter().map(|s| *s as i64).collect(),
        downstream: spec
            .downstream
            .iter()
            .map(|task| v1::DownstreamTask {
                name: task.name.clone().unwrap_or_default(),
                task: task.task.name().to_string(),
                dataset: task.dataset.clone(),
                recipe_json: task.recipe.to_string(),
            })
            .collect(),
        max_attempts: spec.max_attempts.unwrap_or(0),
    })
}

fn downstream_from_proto(index: usize, wire: v1::DownstreamTask) -> Result<DownstreamSpec, Error> {
    let field = |key: &str| format!("spec.downstream[{index}].{key}");
    let task = TaskKind::parse(&wire.task).ok_or_else(|| {
        invalid(
            &field("task"),
            &format!("must be linear-probe or finetune, got {:?}", wire.task),
        )
    })?;
    let recipe = if wire.recipe_json.trim().is_empty() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_str(&wire.recipe_json)
            .map_err(|e| invalid(&field("recipe_json"), &format!("is not JSON: {e}")))?
    };
    Ok(DownstreamSpec {
        name: (!wire.name.is_empty()).then_some(wire.name),
        task,
        dataset: wire.dataset,
        recipe,
    })
}
