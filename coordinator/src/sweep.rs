//! Sweeps: the user's request, its validation, and its expansion into solved designs.
//!
//! A [`SweepSpec`] is a grid over block families, rho values, alpha vectors and budgets, plus
//! a training recipe, a dataset and seeds. [`expand`] solves every grid point with the design
//! crate's solver on blocking threads (never on the async runtime), deduplicates the designs by
//! content hash and returns a [`NewSweep`] ready for one store transaction.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use deepmad_design::digest::sha256_hex;
use deepmad_design::recipe::Recipe;
use deepmad_design::score::ObjectiveKind;
use deepmad_design::solver::{solve, Family, Problem, SearchSpace, Solution};
use deepmad_design::units::parse_count;
use deepmad_design::DesignError;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::{DesignId, SweepId};
use crate::store::{NewDesign, NewGridPoint, NewSweep, NewTask};

/// The version of the solver that produced a design, stored with it.
pub const SOLVER_VERSION: &str = concat!("deepmad-design ", env!("CARGO_PKG_VERSION"));

/// The most deterministic failures a sweep may allow per trial: the bound of the
/// coordinator's own `retry.max_attempts` setting.
pub const MAX_ATTEMPTS: u32 = 100;

/// A budget: parameters and/or FLOPs (multiply-accumulates), in human units in TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    #[serde(default, deserialize_with = "count::optional")]
    pub params: Option<u64>,
    #[serde(default, deserialize_with = "count::optional")]
    pub flops: Option<u64>,
}

/// The grid of design problems.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridSpec {
    /// Block families: basic, bottleneck, mbconv, mbconv-se.
    pub block: Vec<String>,
    pub rho: Vec<f64>,
    /// Alpha vectors; empty means the default {1, ..., 1, 8}.
    #[serde(default)]
    pub alpha: Vec<Vec<f64>>,
    pub budget: Vec<BudgetSpec>,
    pub resolution: u32,
    pub num_classes: u32,
    /// Input channels of the images (3 RGB, 1 grayscale).
    #[serde(default = "default_in_channels")]
    pub in_channels: u32,
    #[serde(default)]
    pub objective: ObjectiveKind,
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub max_layers: Option<u32>,
    /// Stage strides; empty means the family's default search space.
    #[serde(default)]
    pub strides: Vec<u32>,
}

fn default_in_channels() -> u32 {
    3
}

fn default_beta() -> f64 {
    deepmad_design::score::DEFAULT_BETA
}

/// What a downstream evaluation does with a trained backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Freeze the backbone, train a new linear classifier on the task's dataset.
    LinearProbe,
    /// Train the whole network, with a new classifier, on the task's dataset.
    Finetune,
}

impl TaskKind {
    /// Returns `linear-probe` or `finetune`, as the store and the wire spell it.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::LinearProbe => "linear-probe",
            TaskKind::Finetune => "finetune",
        }
    }

    /// Parses [`TaskKind::name`].
    pub fn parse(text: &str) -> Option<TaskKind> {
        match text {
            "linear-probe" => Some(TaskKind::LinearProbe),
            "finetune" => Some(TaskKind::Finetune),
            _ => None,
        }
    }
}

/// One downstream evaluation: queued for each training trial of the sweep once it succeeds,
/// starting from that trial's trained weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamSpec {
    /// The leaderboard column's name, unique in the sweep; defaults to the task's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub task: TaskKind,
    /// `KIND:PATH` of the task's dataset (images are resized to the design's input).
    pub dataset: String,
    /// Overrides of the sweep's recipe for this task (top-level keys replace the sweep's).
    #[serde(default = "empty_object")]
    pub recipe: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

impl DownstreamSpec {
    /// Returns the task's name: the given one or the kind's.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.task.name())
    }
}

/// A sweep request, as a TOML file or a gRPC `SweepSpec` gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub name: String,
    /// `KIND:PATH`, e.g. `idx:data/mnist-subset` or `cifar10:/data/cifar-10-batches-bin`.
    pub dataset: String,
    pub seeds: Vec<u64>,
    pub grid: GridSpec,
    /// The training recipe, passed to workers as JSON as it was given (its hash is part of
    /// each trial's identity); checked with the workers' rules (`Recipe::from_json`) first.
    pub recipe: serde_json::Value,
    /// Downstream evaluations of every trained backbone (`[[downstream]]` tables).
    #[serde(default)]
    pub downstream: Vec<DownstreamSpec>,
    /// Deterministic failures allowed per trial before it is dead.
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

impl SweepSpec {
    /// Parses a sweep file (TOML), naming the line and key on error.
    pub fn from_toml(text: &str) -> Result<SweepSpec, Error> {
        toml::from_str(text).map_err(|error| Error::InvalidArgument {
            field: "sweep file".into(),
            reason: error.to_string().trim_end().to_string(),
        })
    }

    /// Returns the grid's problems, in grid order, after checking every field.
    pub fn problems(&self, max_grid_points: usize) -> Result<Vec<Problem>, Error> {
        self.validate(max_grid_points)?;
        let grid = &self.grid;
        let alphas: Vec<Option<Vec<f64>>> = if grid.alpha.is_empty() {
            vec![None]
        } else {
            grid.alpha.iter().cloned().map(Some).collect()
        };
        let mut problems = Vec::new();
        for block in &grid.block {
            let family = Family::parse(block).map_err(design_error("grid.block"))?;
            for &rho in &grid.rho {
                for alpha in &alphas {
                    for budget in &grid.budget {
                        let problem = self.problem(family, rho, alpha.clone(), budget);
                        problem.validate().map_err(design_error("grid"))?;
                        problems.push(problem);
                    }
                }
            }
        }
        Ok(problems)
    }

    fn problem(
        &self,
        family: Family,
        rho: f64,
        alpha: Option<Vec<f64>>,
        budget: &BudgetSpec,
    ) -> Problem {
        let grid = &self.grid;
        let mut problem = Problem::new(family, budget.params, budget.flops, rho);
        problem.objective = grid.objective;
        problem.alpha = alpha;
        problem.beta = grid.beta;
        problem.resolution = grid.resolution;
        problem.num_classes = grid.num_classes;
        problem.in_channels = grid.in_channels;
        problem.max_layers = grid.max_layers;
        if !grid.strides.is_empty() {
            let mut space = SearchSpace::default_for(family, grid.resolution);
            space.stage_strides = grid.strides.clone();
            problem.space = Some(space);
        }
        problem
    }

    fn validate(&self, max_grid_points: usize) -> Result<(), Error> {
        self.validate_fields()?;
        self.validate_grid_size(max_grid_points)
    }

    /// Checks every field but the grid's size (a limit of the coordinator's settings), so the
    /// CLI refuses a bad sweep file before it connects; `CreateSweep` checks everything.
    pub fn validate_fields(&self) -> Result<(), Error> {
        let invalid = |field: &str, reason: String| Error::InvalidArgument {
            field: field.to_string(),
            reason,
        };
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(invalid("name", "must be 1 to 200 characters".into()));
        }
        check_printable(&self.name, "name")?;
        check_dataset(&self.dataset)?;
        if self.seeds.is_empty() || self.seeds.len() > 100 {
            return Err(invalid(
                "seeds",
                format!("needs 1 to 100 seeds, got {}", self.seeds.len()),
            ));
        }
        check_recipe(&self.recipe, "recipe")?;
        self.validate_downstream()?;
        if let Some(bad) = self
            .max_attempts
            .filter(|n| !(1..=MAX_ATTEMPTS).contains(n))
        {
            let reason = format!("must be between 1 and {MAX_ATTEMPTS}, got {bad}");
            return Err(invalid("max_attempts", reason));
        }
        self.validate_grid()
    }

    fn validate_grid(&self) -> Result<(), Error> {
        let invalid = |field: &str, reason: String| Error::InvalidArgument {
            field: field.to_string(),
            reason,
        };
        let grid = &self.grid;
        for (field, length) in [
            ("grid.block", grid.block.len()),
            ("grid.rho", grid.rho.len()),
            ("grid.budget", grid.budget.len()),
        ] {
            if length == 0 {
                return Err(invalid(field, "must not be empty".into()));
            }
        }
        if let Some(bad) = grid.rho.iter().find(|rho| !rho.is_finite() || **rho <= 0.0) {
            return Err(invalid(
                "grid.rho",
                format!("every rho must be a positive number, got {bad}"),
            ));
        }
        Ok(())
    }

    fn validate_grid_size(&self, max_grid_points: usize) -> Result<(), Error> {
        let grid = &self.grid;
        let points = [
            grid.block.len(),
            grid.rho.len(),
            grid.alpha.len().max(1),
            grid.budget.len(),
        ]
        .iter()
        .try_fold(1usize, |total, n| total.checked_mul(*n))
        .unwrap_or(usize::MAX);
        if points > max_grid_points {
            return Err(Error::ResourceExhausted {
                what: format!(
                    "grid: {} block x {} rho x {} alpha x {} budget = {points} points; the limit \
                     is {max_grid_points} (limits.max_grid_points): split the sweep",
                    grid.block.len(),
                    grid.rho.len(),
                    grid.alpha.len().max(1),
                    grid.budget.len()
                ),
            });
        }
        Ok(())
    }
}

impl SweepSpec {
    fn validate_downstream(&self) -> Result<(), Error> {
        if self.downstream.len() > 16 {
            return Err(Error::InvalidArgument {
                field: "downstream".into(),
                reason: format!("at most 16 tasks, got {}", self.downstream.len()),
            });
        }
        let mut names = std::collections::HashSet::new();
        for (index, task) in self.downstream.iter().enumerate() {
            let field = |key: &str| format!("downstream[{index}].{key}");
            let name = task.name();
            if name.trim().is_empty() || name.len() > 64 {
                return Err(Error::InvalidArgument {
                    field: field("name"),
                    reason: "must be 1 to 64 characters".into(),
                });
            }
            check_printable(name, &field("name"))?;
            if !names.insert(name) {
                return Err(Error::InvalidArgument {
                    field: field("name"),
                    reason: format!("{name:?} names two tasks; give each task its own name"),
                });
            }
            check_dataset_field(&task.dataset, &field("dataset"))?;
            // What the task's workers read: the sweep's recipe with the task's keys on top.
            let merged = merged_recipe(&self.recipe, &task.recipe).ok_or_else(|| {
                Error::InvalidArgument {
                    field: field("recipe"),
                    reason: "must be a table of training settings".into(),
                }
            })?;
            check_recipe(&merged, &field("recipe"))?;
        }
        Ok(())
    }

    /// Returns the sweep's downstream tasks as the store keeps them: the recipe is the
    /// sweep's with the task's keys on top, and the hash identifies (kind, dataset, recipe).
    pub fn tasks(&self) -> Vec<NewTask> {
        self.downstream
            .iter()
            .enumerate()
            .map(|(index, task)| {
                let recipe = merged_recipe(&self.recipe, &task.recipe)
                    .unwrap_or_else(|| self.recipe.clone());
                let recipe_json = canonical_json(&recipe);
                let identity = serde_json::json!({
                    "kind": task.task.name(),
                    "dataset": task.dataset,
                    "recipe": recipe,
                });
                NewTask {
                    index: index as i32,
                    name: task.name().to_string(),
                    kind: task.task.name().to_string(),
                    dataset: task.dataset.clone(),
                    task_hash: sha256_hex(canonical_json(&identity)),
                    recipe_json,
                }
            })
            .collect()
    }
}

/// Refuses control characters in a name: names are printed in terminals and pages, where
/// they would be escape sequences and line breaks.
fn check_printable(name: &str, field: &str) -> Result<(), Error> {
    match name.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(bad) => Err(Error::InvalidArgument {
            field: field.to_string(),
            reason: format!("must not contain control characters, found {bad:?}"),
        }),
    }
}

/// Returns `base` with the keys of `overrides` on top (a downstream task's recipe), or `None`
/// when either is not a table.
fn merged_recipe(
    base: &serde_json::Value,
    overrides: &serde_json::Value,
) -> Option<serde_json::Value> {
    let mut merged = base.as_object()?.clone();
    for (key, value) in overrides.as_object()? {
        merged.insert(key.clone(), value.clone());
    }
    Some(serde_json::Value::Object(merged))
}

/// Checks a training recipe with the workers' rules; `field` is where it sits in the sweep
/// (`recipe`, `downstream[0].recipe`), and the error names the key under it.
fn check_recipe(recipe: &serde_json::Value, field: &str) -> Result<(), Error> {
    match Recipe::from_json(recipe) {
        Ok(_) => Ok(()),
        Err(DesignError::InvalidRecipe { key, reason }) => Err(Error::InvalidArgument {
            field: format!("{field}.{key}"),
            reason,
        }),
        Err(other) => Err(Error::InvalidArgument {
            field: field.to_string(),
            reason: other.to_string(),
        }),
    }
}

/// Checks a `KIND:PATH` dataset spec.
fn check_dataset(dataset: &str) -> Result<(), Error> {
    check_dataset_field(dataset, "dataset")
}

fn check_dataset_field(dataset: &str, field: &str) -> Result<(), Error> {
    let kinds = ["cifar10", "cifar100", "idx", "folder"];
    match dataset.split_once(':') {
        Some((kind, path)) if kinds.contains(&kind) && !path.is_empty() => Ok(()),
        _ => Err(Error::InvalidArgument {
            field: field.into(),
            reason: format!(
                "expected KIND:PATH with KIND one of {}, got {dataset:?}",
                kinds.join(", ")
            ),
        }),
    }
}

fn design_error(field: &'static str) -> impl Fn(DesignError) -> Error {
    move |error| Error::InvalidArgument {
        field: field.to_string(),
        reason: error.to_string(),
    }
}

/// One solved grid point.
#[derive(Debug)]
pub struct Solved {
    pub problem: Problem,
    pub outcome: Result<Solution, DesignError>,
    pub solve_ms: f64,
}

/// Solves every problem on `threads` blocking threads; returns the outcomes in input order,
/// or `None` when `abandoned` was set: each thread checks it before every problem, so a
/// request whose client left stops within one solve (issue 24: a dropped 200-point sweep kept
/// both cores busy for 25 s).
pub fn solve_all(
    problems: Vec<Problem>,
    threads: usize,
    abandoned: &AtomicBool,
    on_solved: &(dyn Fn() + Sync),
) -> Option<Vec<Solved>> {
    let threads = threads.clamp(1, problems.len().max(1));
    let mut slots: Vec<Option<Solved>> = (0..problems.len()).map(|_| None).collect();
    let chunk = problems.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (problems, slots) in problems.chunks(chunk).zip(slots.chunks_mut(chunk)) {
            scope.spawn(move || {
                for (problem, slot) in problems.iter().zip(slots) {
                    if abandoned.load(Ordering::Relaxed) {
                        return;
                    }
                    let started = std::time::Instant::now();
                    let outcome = solve(problem);
                    *slot = Some(Solved {
                        problem: problem.clone(),
                        outcome,
                        solve_ms: started.elapsed().as_secs_f64() * 1e3,
                    });
                    on_solved();
                }
            });
        }
    });
    // A slot is empty only when the threads stopped early.
    slots.into_iter().collect()
}

/// Builds the store's [`NewSweep`] from solved grid points: designs deduplicated by hash.
/// Fails when every grid point is infeasible (nothing would be trained).
pub fn assemble(
    id: SweepId,
    spec: &SweepSpec,
    created_by: &str,
    solved: &[Solved],
    max_attempts: u32,
) -> Result<NewSweep, Error> {
    let mut designs: BTreeMap<String, NewDesign> = BTreeMap::new();
    let mut grid = Vec::new();
    for (index, point) in solved.iter().enumerate() {
        let problem = &point.problem;
        let (design_id, infeasible_reason) = match &point.outcome {
            Ok(solution) => {
                let design = new_design(problem, solution);
                let id = design.id.clone();
                designs.entry(id.0.clone()).or_insert(design);
                (Some(id), None)
            }
            Err(error) => (None, Some(error.to_string())),
        };
        grid.push(NewGridPoint {
            index: index as i32,
            family: problem.family.name().to_string(),
            objective_kind: problem.objective.name().to_string(),
            rho: problem.rho,
            alpha_json: serde_json::to_string(&problem.alpha()).expect("alpha serializes"),
            beta: problem.beta,
            params_budget: problem.params.map(|p| p as i64),
            flops_budget: problem.flops.map(|f| f as i64),
            resolution: problem.resolution as i32,
            design_id,
            infeasible_reason,
            solve_ms: point.solve_ms,
        });
    }
    if designs.is_empty() {
        let reason = grid
            .first()
            .and_then(|point| point.infeasible_reason.clone())
            .unwrap_or_default();
        return Err(Error::InvalidArgument {
            field: "grid".into(),
            reason: format!("every grid point is infeasible; the first: {reason}"),
        });
    }
    let recipe_json = canonical_json(&spec.recipe);
    Ok(NewSweep {
        id,
        name: spec.name.clone(),
        created_by: created_by.to_string(),
        spec_json: serde_json::to_string(spec).expect("specs serialize"),
        dataset: spec.dataset.clone(),
        recipe_hash: sha256_hex(&recipe_json),
        recipe_json,
        seeds: spec.seeds.iter().map(|s| *s as i64).collect(),
        max_attempts: spec.max_attempts.unwrap_or(max_attempts) as i32,
        tasks: spec.tasks(),
        grid,
        designs: designs.into_values().collect(),
    })
}

fn new_design(problem: &Problem, solution: &Solution) -> NewDesign {
    let analysis = &solution.analysis;
    NewDesign {
        id: DesignId(solution.network.content_hash()),
        family: problem.family.name().to_string(),
        objective_kind: analysis.objective_kind.name().to_string(),
        architecture_json: solution.network.canonical_json(),
        params: analysis.params as i64,
        flops: analysis.flops as i64,
        layers: analysis.layers as i32,
        effectiveness: analysis.effectiveness,
        entropy: analysis.entropy,
        penalty: analysis.penalty,
        objective: analysis.objective,
        resolution: solution.network.resolution as i32,
        num_classes: solution.network.num_classes as i32,
        solver_version: SOLVER_VERSION.to_string(),
    }
}

/// Returns JSON with object keys sorted (serde_json's map is ordered by key), no whitespace.
pub fn canonical_json(value: &serde_json::Value) -> String {
    serde_json::to_string(value).expect("JSON values serialize")
}

/// Deserializes budgets written as numbers or human units (`"11.7M"`, `"1.8G"`).
mod count {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Float(f64),
        Text(String),
    }

    pub fn optional<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
        let raw = Option::<Raw>::deserialize(deserializer)?;
        let value = match raw {
            None => return Ok(None),
            Some(Raw::Number(n)) => n,
            Some(Raw::Float(f)) if f.is_finite() && f > 0.0 => f.round() as u64,
            Some(Raw::Float(f)) => {
                return Err(serde::de::Error::custom(format!(
                    "budget must be positive, got {f}"
                )))
            }
            Some(Raw::Text(text)) => {
                super::parse_count("budget", &text).map_err(serde::de::Error::custom)?
            }
        };
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_sweeps_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let spec = SweepSpec::from_toml(&text)
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                spec.problems(10_000)
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                checked.push((path, spec));
            }
        }
        assert!(checked.len() >= 3, "{checked:?}");
        let (_, downstream) = checked
            .iter()
            .find(|(path, _)| path.ends_with("downstream.toml"))
            .expect("examples/downstream.toml");
        let tasks = downstream.tasks();
        assert_eq!(tasks.len(), 2);
        let probe: serde_json::Value = serde_json::from_str(&tasks[0].recipe_json).unwrap();
        assert_eq!(probe["epochs"], 3, "the task's key");
        assert_eq!(probe["batch_size"], 64, "the sweep's key");
        assert_ne!(tasks[0].task_hash, tasks[1].task_hash);
    }

    const EXAMPLE: &str = r#"
name = "rho sweep"
dataset = "idx:data/mnist-subset"
seeds = [0, 1]

[grid]
block = ["basic"]
rho = [0.2, 0.5]
budget = [{ params = "60K", flops = "3M" }]
resolution = 28
num_classes = 10

[recipe]
epochs = 1
warmup_epochs = 0
"#;

    #[test]
    fn parses_toml_with_human_units() {
        let spec = SweepSpec::from_toml(EXAMPLE).unwrap();
        assert_eq!(spec.grid.budget[0].params, Some(60_000));
        assert_eq!(spec.grid.budget[0].flops, Some(3_000_000));
        assert_eq!(spec.problems(100).unwrap().len(), 2);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (EXAMPLE.replace("rho = [0.2, 0.5]", "rho = []"), "grid.rho"),
            (
                EXAMPLE.replace("rho = [0.2, 0.5]", "rho = [0.2, -1.0]"),
                "grid.rho",
            ),
            (
                EXAMPLE.replace("block = [\"basic\"]", "block = [\"vgg\"]"),
                "grid.block",
            ),
            (EXAMPLE.replace("idx:data", "tar:data"), "dataset"),
            (EXAMPLE.replace("seeds = [0, 1]", "seeds = []"), "seeds"),
            (
                EXAMPLE.replace("resolution = 28", "resolution = 28\nalpha = [[1.0, 8.0]]"),
                "alpha",
            ),
            (
                EXAMPLE.replace("[recipe]", "colour = 3\n[recipe]"),
                "colour",
            ),
        ];
        for (text, needle) in cases {
            let message = SweepSpec::from_toml(&text)
                .and_then(|spec| spec.problems(100).map(|_| ()))
                .unwrap_err()
                .to_string();
            assert!(message.contains(needle), "{needle}: {message}");
        }
    }

    #[test]
    fn oversized_grids_are_refused_before_solving() {
        let text = EXAMPLE.replace(
            "rho = [0.2, 0.5]",
            &format!("rho = [{}]", vec!["0.3"; 200].join(", ")),
        );
        let spec = SweepSpec::from_toml(&text).unwrap();
        assert!(matches!(
            spec.problems(100),
            Err(Error::ResourceExhausted { .. })
        ));
    }

    #[test]
    fn expansion_deduplicates_designs_and_reports_infeasible_points() {
        let text = EXAMPLE.replace(
            "budget = [{ params = \"60K\", flops = \"3M\" }]",
            "budget = [{ params = \"60K\", flops = \"3M\" }, { params = \"60K\", flops = \"3M\" }, { params = \"10\" }]",
        );
        let spec = SweepSpec::from_toml(&text).unwrap();
        let problems = spec.problems(100).unwrap();
        let solved = solve_all(problems, 2, &AtomicBool::new(false), &|| {}).unwrap();
        let sweep = assemble(SweepId::new(), &spec, "test", &solved, 3).unwrap();
        assert_eq!(sweep.grid.len(), 6);
        assert_eq!(
            sweep.grid.iter().filter(|p| p.design_id.is_none()).count(),
            2
        );
        assert_eq!(
            sweep.designs.len(),
            2,
            "identical budgets give one design per rho"
        );
        assert!(sweep.grid[2]
            .infeasible_reason
            .as_deref()
            .unwrap()
            .contains("params"));
    }
}
