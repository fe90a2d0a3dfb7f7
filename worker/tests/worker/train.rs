//! The trainer end to end on the shipped real data: checkpoints resume into an identical
//! continuation, stops and cancellation leave a resumable state, unloadable checkpoints are set
//! aside, mismatches are refused, and a small designed network learns MNIST well above chance.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use deepmad_design::{Activation, BlockKind, Network, Stage, Stem};
use deepmad_worker::train::checkpoint::write_atomically;
use deepmad_worker::{
    CancellationFlag, Control, Dataset, EpochMetrics, FailureClass, LoadOptions, NoHooks, Recipe,
    StepProgress, StopReason, TrainHooks, TrainOutcome, Trainer, TrainerOptions, TrialResult,
    TrialSpec, WorkerError,
};

use crate::nets;

fn mnist(train: usize, test: usize) -> Arc<Dataset> {
    let options = LoadOptions {
        side: 28,
        channels: 1,
    };
    let full = Dataset::load(&crate::shipped_mnist(), options).unwrap();
    Arc::new(full.truncated(train, test).unwrap())
}

/// A short recipe with every augmentation on (flips make no sense for digits but exercise
/// the code); BN momentum 0.1 so running statistics settle within a few dozen steps.
fn quick_recipe(epochs: u32, batch_size: u32) -> Recipe {
    Recipe {
        epochs,
        warmup_epochs: 1,
        batch_size,
        eval_batch_size: 100,
        lr: 0.05,
        bn_momentum: 0.1,
        cutmix_alpha: 1.0,
        crop_padding: 2,
        ..Recipe::default()
    }
}

fn spec(recipe: Recipe, seed: u64) -> TrialSpec {
    TrialSpec {
        network: nets::tiny(BlockKind::Basic, 1, 28, 10),
        recipe,
        seed,
    }
}

fn weights(trainer: &Trainer) -> Vec<(String, Vec<f32>)> {
    trainer
        .model()
        .named_vars()
        .iter()
        .map(|named| {
            let values = named.var.flatten_all().unwrap().to_vec1().unwrap();
            (named.name.clone(), values)
        })
        .collect()
}

/// The history without wall-clock fields, which legitimately differ between runs.
fn comparable(history: &[EpochMetrics]) -> Vec<(u32, f64, f64, f64, f64, f64)> {
    history
        .iter()
        .map(|m| {
            (
                m.epoch,
                m.lr,
                m.train_loss,
                m.train_top1,
                m.test.loss,
                m.test.top1,
            )
        })
        .collect()
}

fn options(checkpoint: Option<std::path::PathBuf>) -> TrainerOptions {
    TrainerOptions {
        checkpoint,
        ..TrainerOptions::new(crate::cpu())
    }
}

/// Stops after `steps` steps.
struct StopAfter {
    steps: u64,
}

impl TrainHooks for StopAfter {
    fn on_step(&mut self, progress: &StepProgress) -> Control {
        if progress.position.global_step >= self.steps {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

fn run_to_end(trainer: &mut Trainer) -> Vec<EpochMetrics> {
    match trainer.run(&mut NoHooks, &CancellationFlag::new()).unwrap() {
        TrainOutcome::Completed(result) => result.epochs,
        other => panic!("expected completion, got {other:?}"),
    }
}

#[test]
fn resuming_from_a_checkpoint_continues_identically() {
    let data = mnist(256, 64);
    let recipe = quick_recipe(2, 32);
    let mut straight =
        Trainer::new(spec(recipe.clone(), 5), Arc::clone(&data), options(None)).unwrap();
    let straight_history = run_to_end(&mut straight);

    // Interrupted twice: mid-epoch by a hook (step 3 of 8), then at the epoch's end by cancel.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trial.safetensors");
    let mut first = Trainer::new(
        spec(recipe.clone(), 5),
        Arc::clone(&data),
        options(Some(path.clone())),
    )
    .unwrap();
    let outcome = first
        .run(&mut StopAfter { steps: 3 }, &CancellationFlag::new())
        .unwrap();
    let TrainOutcome::Stopped { reason, state } = outcome else {
        panic!("expected a stop");
    };
    assert_eq!(reason, StopReason::Hook);
    assert_eq!((state.position.epoch, state.position.batch), (0, 3));
    drop(first);

    let mut second = Trainer::new(
        spec(recipe.clone(), 5),
        Arc::clone(&data),
        options(Some(path.clone())),
    )
    .unwrap();
    assert!(second.resumed());
    let cancel = CancellationFlag::new();
    let mut cancel_at_epoch_end = CancelAtEpochEnd(cancel.clone());
    let outcome = second.run(&mut cancel_at_epoch_end, &cancel).unwrap();
    assert!(matches!(
        outcome,
        TrainOutcome::Stopped {
            reason: StopReason::Cancelled,
            ..
        }
    ));
    assert_eq!(second.state().history.len(), 1);
    drop(second);

    let mut third = Trainer::new(spec(recipe, 5), data, options(Some(path))).unwrap();
    let resumed_history = run_to_end(&mut third);
    assert_eq!(comparable(&resumed_history), comparable(&straight_history));
    assert_eq!(
        weights(&third),
        weights(&straight),
        "bit-identical weights and BN statistics"
    );
}

/// Records every step the hooks see; stops once `stop_at` steps were seen, if set.
#[derive(Default)]
struct Recorder {
    steps: Vec<(u64, u64, f64)>,
    stop_at: Option<u64>,
}

impl TrainHooks for Recorder {
    fn on_step(&mut self, progress: &StepProgress) -> Control {
        let position = progress.position;
        self.steps
            .push((position.global_step, position.batch, progress.loss));
        match self.stop_at {
            Some(stop) if position.global_step >= stop => Control::Stop,
            _ => Control::Continue,
        }
    }
}

#[test]
fn reading_losses_back_every_few_steps_changes_nothing_but_timing() {
    // 8 steps an epoch, read back every 3: at steps 3 and 6, and at each epoch's end.
    let data = mnist(256, 64);
    let recipe = quick_recipe(2, 32);
    let mut every_step =
        Trainer::new(spec(recipe.clone(), 7), Arc::clone(&data), options(None)).unwrap();
    let mut seen_each = Recorder::default();
    let TrainOutcome::Completed(each) = every_step
        .run(&mut seen_each, &CancellationFlag::new())
        .unwrap()
    else {
        panic!("expected completion");
    };
    let deferred_options = TrainerOptions {
        sync_every_steps: 3,
        ..options(None)
    };
    let mut deferred =
        Trainer::new(spec(recipe.clone(), 7), Arc::clone(&data), deferred_options).unwrap();
    let mut seen_deferred = Recorder::default();
    let TrainOutcome::Completed(later) = deferred
        .run(&mut seen_deferred, &CancellationFlag::new())
        .unwrap()
    else {
        panic!("expected completion");
    };
    assert_eq!(comparable(&later.epochs), comparable(&each.epochs));
    assert_eq!(seen_deferred.steps, seen_each.steps, "every step, in order");
    assert_eq!(seen_each.steps.len(), 16);
    assert_eq!(weights(&deferred), weights(&every_step));

    // A hook's stop at step 4 takes effect at the next read-back, step 6, and the state
    // counts all six steps.
    let mut stopped = Trainer::new(
        spec(recipe, 7),
        data,
        TrainerOptions {
            sync_every_steps: 3,
            ..options(None)
        },
    )
    .unwrap();
    let mut stop_at_4 = Recorder {
        stop_at: Some(4),
        ..Recorder::default()
    };
    let outcome = stopped
        .run(&mut stop_at_4, &CancellationFlag::new())
        .unwrap();
    let TrainOutcome::Stopped { reason, state } = outcome else {
        panic!("expected a stop");
    };
    assert_eq!(reason, StopReason::Hook);
    assert_eq!((state.position.epoch, state.position.batch), (0, 6));
    assert_eq!(state.epoch_sums.samples, 6 * 32);
    assert_eq!(stop_at_4.steps.len(), 6);
}

/// Cancels once the first epoch has been evaluated.
struct CancelAtEpochEnd(CancellationFlag);

impl TrainHooks for CancelAtEpochEnd {
    fn on_epoch(&mut self, _metrics: &EpochMetrics) -> Control {
        self.0.cancel();
        Control::Continue
    }
}

/// The checkpoint files in `folder` that `name` was renamed to when it was set aside.
fn set_aside(folder: &Path, name: &str) -> Vec<PathBuf> {
    std::fs::read_dir(folder)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            file.starts_with(&format!("{name}.corrupt-"))
        })
        .collect()
}

fn completed(trainer: &mut Trainer) -> TrialResult {
    match trainer.run(&mut NoHooks, &CancellationFlag::new()).unwrap() {
        TrainOutcome::Completed(result) => result,
        other => panic!("expected completion, got {other:?}"),
    }
}

#[test]
fn a_checkpoint_of_another_trial_is_set_aside() {
    let data = mnist(64, 32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trial.safetensors");
    let mut trainer = Trainer::new(
        spec(quick_recipe(1, 32), 1),
        Arc::clone(&data),
        options(Some(path.clone())),
    )
    .unwrap();
    run_to_end(&mut trainer);
    let other = Trainer::new(spec(quick_recipe(1, 32), 2), data, options(Some(path))).unwrap();
    assert!(!other.resumed(), "seed 2 never resumes seed 1's weights");
    assert_eq!(other.corrupt_checkpoints(), 1);
    assert_eq!(set_aside(dir.path(), "trial.safetensors").len(), 1);
}

/// Issue 24, item 5: a checkpoint that cannot be loaded used to fail every retry of its trial
/// until the trial was dead. It is now moved aside, kept byte for byte, and the same attempt
/// trains from scratch to exactly the result of a run that never had a checkpoint.
#[test]
fn a_corrupt_or_truncated_checkpoint_is_set_aside_and_training_starts_afresh() {
    let data = mnist(64, 32);
    let recipe = quick_recipe(2, 32);
    let mut straight =
        Trainer::new(spec(recipe.clone(), 3), Arc::clone(&data), options(None)).unwrap();
    let fresh = completed(&mut straight);
    assert_eq!(fresh.corrupt_checkpoints, 0);

    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.safetensors");
    let mut writer = Trainer::new(
        spec(recipe.clone(), 3),
        Arc::clone(&data),
        options(Some(real.clone())),
    )
    .unwrap();
    run_to_end(&mut writer);
    let real_bytes = std::fs::read(&real).unwrap();
    let bad_files = [
        (
            "garbage.safetensors",
            b"\x07not a checkpoint at all".to_vec(),
        ),
        (
            "truncated.safetensors",
            real_bytes[..real_bytes.len() / 2].to_vec(),
        ),
    ];
    for (name, bytes) in bad_files {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let mut trainer = Trainer::new(
            spec(recipe.clone(), 3),
            Arc::clone(&data),
            options(Some(path.clone())),
        )
        .unwrap();
        assert!(!trainer.resumed(), "{name}");
        let result = completed(&mut trainer);
        assert_eq!(result.corrupt_checkpoints, 1, "{name}");
        assert_eq!(
            comparable(&result.epochs),
            comparable(&fresh.epochs),
            "{name}"
        );
        assert_eq!(result.final_test, fresh.final_test, "{name}");
        assert_eq!(weights(&trainer), weights(&straight), "{name}");
        let aside = set_aside(dir.path(), name);
        assert_eq!(aside.len(), 1, "{name}: {aside:?}");
        assert_eq!(
            std::fs::read(&aside[0]).unwrap(),
            bytes,
            "{name} is kept as it was"
        );
        let resumable = Trainer::new(
            spec(recipe.clone(), 3),
            Arc::clone(&data),
            options(Some(path)),
        );
        assert!(
            resumable.unwrap().resumed(),
            "{name}: the new checkpoint loads"
        );
    }
}

#[test]
fn a_design_for_other_data_is_a_deterministic_error() {
    let data = mnist(64, 32);
    let mut wrong = spec(quick_recipe(1, 32), 1);
    wrong.network.num_classes = 100;
    let error = Trainer::new(wrong, data, options(None)).unwrap_err();
    assert!(error.to_string().contains("class count is 100"), "{error}");
    assert_eq!(error.class(), FailureClass::Deterministic);
}

/// The real-learning test. A small ResNet-style design (stride-2 stem, then basic blocks of
/// 8, 16 and 32 channels; 19,810 parameters) trains 2 epochs (188 steps of 32) on the first
/// 3000 shipped MNIST training images and is evaluated on the 2000 shipped test images.
/// Chance is 10%. The run reaches 94.35% (deterministic: the same on every run and in release
/// builds); the assertion asks for 80%, far above chance and 14 points under what it reaches,
/// so that a change of seed, summation order or candle version does not make it flaky.
#[test]
fn a_designed_network_learns_real_digits() {
    let data = mnist(3000, 2000);
    let network = Network {
        resolution: 28,
        in_channels: 1,
        num_classes: 10,
        activation: Activation::Relu,
        stem: Stem {
            out: 8,
            kernel: 3,
            stride: 2,
            max_pool: false,
        },
        stages: vec![basic(8, 8, 1), basic(8, 16, 2), basic(16, 32, 2)],
        head: None,
    };
    let recipe = Recipe {
        epochs: 2,
        warmup_epochs: 0,
        batch_size: 32,
        eval_batch_size: 500,
        lr: 0.2,
        bn_momentum: 0.1,
        mixup_alpha: 0.0,
        hflip_prob: 0.0,
        random_erase_prob: 0.0,
        crop_padding: 2,
        ..Recipe::default()
    };
    let started = Instant::now();
    let spec = TrialSpec {
        network,
        recipe,
        seed: 0,
    };
    let mut trainer = Trainer::new(spec, data, options(None)).unwrap();
    let history = run_to_end(&mut trainer);
    let last = history.last().unwrap();
    eprintln!(
        "real-learning: top-1 {:.4}, top-5 {:.4}, test loss {:.4}, {:.1} s, {:.0} images/s",
        last.test.top1,
        last.test.top5,
        last.test.loss,
        started.elapsed().as_secs_f64(),
        last.images_per_second
    );
    assert!(last.test.top1 > 0.80, "top-1 {}", last.test.top1);
    assert!(last.test.top5 > last.test.top1);
}

fn basic(cin: u32, out: u32, stride: u32) -> Stage {
    Stage {
        block: BlockKind::Basic,
        in_channels: cin,
        out,
        stride,
        depth: 1,
        kernel: 3,
        mid: None,
        se: false,
    }
}

#[test]
fn a_batch_larger_than_the_training_set_is_refused() {
    let data = mnist(16, 16);
    let error = Trainer::new(spec(quick_recipe(1, 32), 1), data, options(None)).unwrap_err();
    assert!(matches!(error, WorkerError::Incompatible { .. }), "{error}");
}

/// Named variable values of a model.
type Named = Vec<(String, Vec<f32>)>;

/// The variables of `trainer`'s model split into (backbone, classifier).
fn split_weights(trainer: &Trainer) -> (Named, Named) {
    weights(trainer)
        .into_iter()
        .partition(|(name, _)| !name.starts_with("classifier."))
}

#[test]
fn downstream_training_starts_from_the_backbone_and_a_probe_keeps_it_frozen() {
    let data = mnist(128, 64);
    let dir = tempfile::tempdir().unwrap();
    let parent_checkpoint = dir.path().join("parent.safetensors");
    let recipe = quick_recipe(1, 32);
    let parent_spec = spec(recipe.clone(), 3);
    let design_hash = parent_spec.network.content_hash();
    let mut parent = Trainer::new(
        parent_spec,
        Arc::clone(&data),
        options(Some(parent_checkpoint.clone())),
    )
    .unwrap();
    run_to_end(&mut parent);
    let (parent_backbone, parent_classifier) = split_weights(&parent);

    for freeze_backbone in [true, false] {
        let options = TrainerOptions {
            pretrained: Some(deepmad_worker::train::Pretrained {
                checkpoint: parent_checkpoint.clone(),
                design_hash: design_hash.clone(),
                freeze_backbone,
            }),
            ..options(None)
        };
        let mut child = Trainer::new(spec(recipe.clone(), 9), Arc::clone(&data), options).unwrap();
        let (backbone, classifier) = split_weights(&child);
        assert_eq!(backbone, parent_backbone, "the backbone starts as trained");
        assert_ne!(
            classifier, parent_classifier,
            "the classifier starts afresh"
        );
        run_to_end(&mut child);
        let (backbone, classifier) = split_weights(&child);
        if freeze_backbone {
            // Weights and BatchNorm statistics alike: the probe runs the backbone in eval mode.
            assert_eq!(
                backbone, parent_backbone,
                "a linear probe leaves the backbone alone"
            );
        } else {
            assert_ne!(backbone, parent_backbone, "a finetune trains the backbone");
        }
        assert_ne!(classifier, parent_classifier);
    }

    // Weights of another design are refused, naming both designs.
    let options = TrainerOptions {
        pretrained: Some(deepmad_worker::train::Pretrained {
            checkpoint: parent_checkpoint,
            design_hash: "another-design".into(),
            freeze_backbone: true,
        }),
        ..options(None)
    };
    let error = Trainer::new(spec(recipe, 9), data, options).unwrap_err();
    assert!(matches!(error, WorkerError::Weights { .. }), "{error}");
    assert_eq!(error.class(), FailureClass::Deterministic);
    assert!(error.to_string().contains("another-design"), "{error}");
}

/// Issue 24: two workers started in one folder wrote their checkpoints through one fixed temp
/// name, so one could rename the other's half-written file into place or find its own gone.
#[test]
fn concurrent_atomic_writes_of_one_path_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trial.safetensors");
    let writers: Vec<_> = (0..4u8)
        .map(|writer| {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    write_atomically(&path, &vec![writer; 256 * 1024]).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 256 * 1024);
    assert!(
        bytes.iter().all(|&b| b == bytes[0]),
        "one writer's file, whole"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "no temp files left behind");
}
