//! `deepmad train DESIGN --dataset KIND:PATH`: trains one network with the worker's trainer,
//! without a coordinator, showing a progress bar on stderr and printing the final accuracy.
//!
//! DESIGN is a built-in network name (made for the dataset's classes and resolution) or a
//! deepmad architecture JSON file, whose classes and resolution must be the dataset's. Images
//! are loaded with the channels the design expects (grayscale replicated for RGB designs).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use deepmad_design::{classic, Network};
use deepmad_worker::{
    CancellationFlag, Control, Dataset, DatasetSpec, DeviceSpec, EpochMetrics, LoadOptions, Recipe,
    StepProgress, TrainHooks, TrainOutcome, Trainer, TrainerOptions, TrialResult, TrialSpec,
    WorkerError,
};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::args::TrainArgs;
use crate::Failure;

/// The side folder images are scaled to for a built-in network (torchvision's 224).
const CLASSIC_FOLDER_SIDE: u32 = 224;

pub async fn run(
    args: &TrainArgs,
    out: &mut impl Write,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let recipe = load_recipe(args)?;
    let spec = dataset_spec(args, &recipe)?;
    let device = args
        .device
        .parse::<DeviceSpec>()
        .map_err(|error| Failure::usage(format!("--device: {error}")))?;
    if let Some(threads) = args.threads {
        // candle reads this once, when its CPU thread pool starts (nothing has run yet).
        std::env::set_var("CANDLE_NUM_THREADS", threads.max(1).to_string());
    }
    let device = device.open().map_err(|error| {
        let hint = if DeviceSpec::cuda_compiled() {
            ""
        } else {
            " (this build has no CUDA: rebuild with --features cuda)"
        };
        Failure::usage(format!("--device: {error}{hint}"))
    })?;
    let file_design = design_file(&args.design)?;
    let dataset = load_dataset(&spec, file_design.as_ref())?;
    let network = match file_design {
        Some(network) => network,
        None => classic_for(&args.design, &dataset)?,
    };
    let trial = TrialSpec {
        network,
        recipe,
        seed: args.seed,
    };
    let options = TrainerOptions {
        checkpoint: args.checkpoint.clone(),
        ..TrainerOptions::new(device)
    };
    let outcome = train_blocking(trial, Arc::new(dataset), options, shutdown).await?;
    report(args, outcome, out)
}

fn load_recipe(args: &TrainArgs) -> Result<Recipe, Failure> {
    let mut recipe = match &args.recipe {
        None => Recipe::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| {
                Failure::usage(format!("--recipe: cannot read {}: {error}", path.display()))
            })?;
            Recipe::from_toml(&text)
                .map_err(|error| Failure::usage(format!("--recipe {}: {error}", path.display())))?
        }
    };
    if let Some(epochs) = args.epochs {
        recipe.epochs = epochs;
        recipe.warmup_epochs = recipe.warmup_epochs.min(epochs);
    }
    recipe
        .validate()
        .map_err(|error| Failure::usage(error.to_string()))?;
    Ok(recipe)
}

fn dataset_spec(args: &TrainArgs, recipe: &Recipe) -> Result<DatasetSpec, Failure> {
    match (&args.dataset, &recipe.dataset) {
        (Some(text), _) => text
            .parse()
            .map_err(|error| Failure::usage(format!("--dataset: {error}"))),
        (None, Some(spec)) => Ok(spec.clone()),
        (None, None) => Err(Failure::usage(
            "--dataset: name the data as KIND:PATH (cifar10, cifar100, idx, folder), \
             for example --dataset idx:data/mnist-subset",
        )),
    }
}

/// Returns the design in DESIGN when it is a file, `None` when it names a built-in network.
fn design_file(design: &str) -> Result<Option<Network>, Failure> {
    let path = Path::new(design);
    if !path.is_file() {
        if classic::NAMES
            .iter()
            .any(|name| name.replace('_', "") == normalize(design))
        {
            return Ok(None);
        }
        return Err(Failure::usage(format!(
            "DESIGN: {design:?} is neither a file nor a built-in network ({})",
            classic::NAMES.join(", ")
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|error| Failure::usage(format!("DESIGN: cannot read {design}: {error}")))?;
    let network = Network::from_json(&text)
        .map_err(|error| Failure::usage(format!("DESIGN {design}: {error}")))?;
    Ok(Some(network))
}

fn normalize(name: &str) -> String {
    name.to_ascii_lowercase().replace(['-', '_'], "")
}

fn load_dataset(spec: &DatasetSpec, design: Option<&Network>) -> Result<Dataset, Failure> {
    // The side matters for image folders only; the binary formats fix their own.
    let options = match design {
        Some(network) => LoadOptions {
            side: network.resolution,
            channels: network.in_channels,
        },
        None => LoadOptions {
            side: CLASSIC_FOLDER_SIDE,
            channels: 3,
        },
    };
    Dataset::load(spec, options).map_err(|error| worker_failure(&error))
}

/// Returns the built-in network `name` for the dataset's classes and resolution (its three
/// input channels are what [`load_dataset`] asked for).
fn classic_for(name: &str, dataset: &Dataset) -> Result<Network, Failure> {
    Ok(classic::by_name(name, dataset.num_classes, dataset.side)?)
}

/// Runs the trainer on a blocking thread (never on the async runtime); a shutdown signal
/// becomes the trainer's cancellation flag.
async fn train_blocking(
    trial: TrialSpec,
    dataset: Arc<Dataset>,
    options: TrainerOptions,
    shutdown: CancellationToken,
) -> Result<TrainOutcome, Failure> {
    let cancel = CancellationFlag::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            cancel.cancel();
        })
    };
    let task = tokio::task::spawn_blocking(move || -> Result<TrainOutcome, WorkerError> {
        let mut trainer = Trainer::new(trial, dataset, options)?;
        let mut hooks = ProgressHooks::new(&trainer);
        let outcome = trainer.run(&mut hooks, &cancel);
        hooks.bar.finish_and_clear();
        outcome
    });
    let outcome = task.await;
    watcher.abort();
    match outcome {
        Ok(result) => result.map_err(|error| worker_failure(&error)),
        Err(join_error) => Err(Failure {
            code: 1,
            message: format!("the training thread failed: {join_error}"),
        }),
    }
}

/// Maps a worker error to an exit code: 2 when the input is at fault, 1 otherwise.
fn worker_failure(error: &WorkerError) -> Failure {
    let message = error.to_string();
    match error {
        WorkerError::Tensor(_)
        | WorkerError::Diverged { .. }
        | WorkerError::Loader { .. }
        | WorkerError::Checkpoint { .. } => Failure { code: 1, message },
        _ => Failure::usage(message),
    }
}

/// Draws the progress bar and prints a line per epoch above it.
struct ProgressHooks {
    bar: ProgressBar,
}

impl ProgressHooks {
    fn new(trainer: &Trainer) -> ProgressHooks {
        let state = trainer.state();
        let history = state.history.len() as u64;
        let total = trainer.steps_per_epoch() * u64::from(trainer.total_epochs());
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed_precise} {msg}")
                .expect("the progress template is valid"),
        );
        bar.set_position(state.position.global_step);
        if trainer.resumed() {
            print_above(
                &bar,
                format!(
                    "resumed at epoch {}, batch {} ({history} epochs done)",
                    state.position.epoch + 1,
                    state.position.batch
                ),
            );
        }
        ProgressHooks { bar }
    }
}

/// Prints a line above the bar, or plainly when the bar is hidden (stderr is not a terminal).
fn print_above(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

impl TrainHooks for ProgressHooks {
    fn on_step(&mut self, progress: &StepProgress) -> Control {
        self.bar.set_position(progress.position.global_step);
        self.bar.set_message(format!(
            "epoch {}/{} loss {:.3} lr {:.4} {:.0} img/s",
            progress.position.epoch + 1,
            progress.epochs,
            progress.loss,
            progress.lr,
            progress.images_per_second
        ));
        Control::Continue
    }

    fn on_epoch(&mut self, metrics: &EpochMetrics) -> Control {
        print_above(
            &self.bar,
            format!(
            "epoch {}: train loss {:.4}, test loss {:.4}, top-1 {:.2}%, top-5 {:.2}% ({:.0} img/s)",
            metrics.epoch,
            metrics.train_loss,
            metrics.test.loss,
            100.0 * metrics.test.top1,
            100.0 * metrics.test.top5,
            metrics.images_per_second
        ),
        );
        Control::Continue
    }
}

fn report(args: &TrainArgs, outcome: TrainOutcome, out: &mut impl Write) -> Result<(), Failure> {
    let result = match outcome {
        TrainOutcome::Completed(result) => result,
        TrainOutcome::Stopped { state, .. } => {
            let resume = match &args.checkpoint {
                Some(path) => format!("; rerun with --checkpoint {} to resume", path.display()),
                None => String::new(),
            };
            return Err(Failure {
                code: 1,
                message: format!(
                    "training interrupted at epoch {}, batch {}{resume}",
                    state.position.epoch + 1,
                    state.position.batch
                ),
            });
        }
    };
    if args.json {
        let text = serde_json::to_string_pretty(&result).expect("a result serializes");
        writeln!(out, "{text}")?;
    } else {
        writeln!(out, "{}", summary_line(&result))?;
    }
    Ok(())
}

fn summary_line(result: &TrialResult) -> String {
    format!(
        "top-1 {:.2}%  top-5 {:.2}%  test loss {:.4}  (epochs {}, params {}, design {}, dataset {})",
        100.0 * result.final_test.top1,
        100.0 * result.final_test.top5,
        result.final_test.loss,
        result.epochs.len(),
        result.params,
        &result.design_hash[..12],
        &result.dataset_hash[..12],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_names_are_recognised_and_garbage_is_a_usage_error() {
        assert!(design_file("resnet18").unwrap().is_none());
        assert!(design_file("MobileNet-V2").unwrap().is_none());
        let failure = design_file("no-such-net").unwrap_err();
        assert_eq!(failure.code, 2);
        assert!(failure.message.contains("resnet50"), "{}", failure.message);
    }

    #[test]
    fn worker_errors_about_input_exit_2() {
        let bad = WorkerError::InvalidDatasetSpec {
            spec: "x".into(),
            reason: "no".into(),
        };
        assert_eq!(worker_failure(&bad).code, 2);
        let diverged = WorkerError::Diverged {
            epoch: 1,
            batch: 2,
            loss: f32::NAN,
        };
        assert_eq!(worker_failure(&diverged).code, 1);
    }
}
