//! The trainer: epochs of augmented batches through SGD on the cosine schedule, an evaluation
//! on the held-out split after every epoch, checkpoints to resume from.
//!
//! A coordinator-driven loop uses it as: load the [`Dataset`] (once per worker), build a
//! [`Trainer`] for each leased trial (it resumes from the checkpoint path if a checkpoint is
//! there, and sets an unloadable one aside), call [`Trainer::run`] on a blocking thread with hooks that heartbeat and a
//! [`CancellationFlag`], then report the [`TrainOutcome`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor};
use deepmad_design::{count, Network};
use serde::Serialize;
use tracing::warn;

use crate::data::Dataset;
use crate::error::WorkerError;
use crate::nn::loss::{soft_cross_entropy, top_k};
use crate::nn::model::Model;
use crate::rng;
use crate::train::augment::{epoch_order, Augmenter, Batch};
use crate::train::checkpoint::{self, TrainState, TrialIdentity};
use crate::train::control::{CancellationFlag, Control, StepProgress, StopReason, TrainHooks};
use crate::train::metrics::{EpochMetrics, EpochSums, EvalMetrics, Position};
use crate::train::optim::{Sgd, SgdConfig};
use crate::train::prefetch::Prefetcher;
use crate::train::recipe::Recipe;
use crate::train::schedule::CosineSchedule;

/// What to train: the key of a trial (the dataset is passed loaded, see [`Trainer::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TrialSpec {
    pub network: Network,
    pub recipe: Recipe,
    pub seed: u64,
}

/// Where and how to train.
#[derive(Clone, Debug)]
pub struct TrainerOptions {
    pub device: Device,
    /// Checkpoint file: resumed from when it exists, written after every epoch and on stop.
    pub checkpoint: Option<PathBuf>,
    /// Also write the checkpoint every this many steps within an epoch.
    pub checkpoint_every_steps: Option<u64>,
    /// Batches the loader thread may prepare ahead of the model.
    pub prefetch_depth: usize,
    /// Start from trained weights (a downstream evaluation) instead of from scratch.
    pub pretrained: Option<Pretrained>,
    /// Read the steps' losses and logits back from the device every this many steps (at
    /// least 1), instead of after every step: reading waits for the device, and on a GPU the
    /// host then has nothing queued for it. Checks, sums and progress hooks still see every
    /// step, in order, only later; a checkpoint, the epoch's end and a stop read all pending
    /// steps first. A hook's stop takes effect at the next read (up to this many steps late),
    /// and a loss that is not finite fails the trial with its own step's position. New
    /// options use 1 on the CPU (where nothing is gained) and [`CUDA_SYNC_EVERY_STEPS`] on
    /// CUDA.
    pub sync_every_steps: u64,
}

/// [`TrainerOptions::sync_every_steps`] on CUDA. Measured on an H200: ResNet-20 at batch 128
/// trained 11% faster when the loss was read once per timed loop rather than after every step
/// (`docs/performance.md`); 16 steps keeps the progress and the divergence check close.
pub const CUDA_SYNC_EVERY_STEPS: u64 = 16;

/// A downstream evaluation's start: a trained backbone, and whether it stays frozen.
#[derive(Clone, Debug, PartialEq)]
pub struct Pretrained {
    /// The training trial's final checkpoint.
    pub checkpoint: PathBuf,
    /// The design the backbone was trained as (its classifier had that design's classes).
    pub design_hash: String,
    /// Linear probe: only the new classifier trains; the backbone runs in evaluation mode
    /// (BatchNorm uses its trained statistics) and gets no gradients.
    pub freeze_backbone: bool,
}

impl TrainerOptions {
    /// Returns options for `device` without checkpoints.
    pub fn new(device: Device) -> TrainerOptions {
        TrainerOptions {
            checkpoint: None,
            checkpoint_every_steps: None,
            prefetch_depth: 4,
            pretrained: None,
            sync_every_steps: if device.is_cuda() {
                CUDA_SYNC_EVERY_STEPS
            } else {
                1
            },
            device,
        }
    }
}

/// A trained step whose loss and logits are still on the device.
struct PendingStep {
    /// Where the step trained (its epoch and batch).
    position: Position,
    lr: f64,
    loss: Tensor,
    logits: Tensor,
    labels: Vec<u32>,
}

/// The result of a finished trial, with what identifies its inputs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrialResult {
    pub design_hash: String,
    pub recipe_hash: String,
    pub dataset_hash: String,
    pub seed: u64,
    pub params: u64,
    pub flops: u64,
    pub epochs: Vec<EpochMetrics>,
    /// The last epoch's held-out metrics.
    pub final_test: EvalMetrics,
    /// Checkpoints of this trial that could not be loaded and were set aside before training
    /// started from scratch (0 or 1; see [`Trainer::new`]). Not sent to the coordinator (the
    /// protocol has no field for it): the worker logs it.
    pub corrupt_checkpoints: u32,
}

/// How [`Trainer::run`] ended.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainOutcome {
    Completed(TrialResult),
    /// Stopped early; the checkpoint (if configured) holds `state`.
    Stopped {
        reason: StopReason,
        state: TrainState,
    },
}

/// One trial being trained.
#[derive(Debug)]
pub struct Trainer {
    spec: TrialSpec,
    dataset: Arc<Dataset>,
    augmenter: Arc<Augmenter>,
    model: Model,
    optimizer: Sgd,
    schedule: CosineSchedule,
    identity: TrialIdentity,
    options: TrainerOptions,
    steps_per_epoch: u64,
    state: TrainState,
    resumed: bool,
    corrupt_checkpoints: u32,
}

impl Trainer {
    /// Builds the model and optimiser for `spec` on `dataset`, resuming from the checkpoint
    /// when `options.checkpoint` exists. A checkpoint that cannot be loaded (corrupt,
    /// truncated, or of another trial) is renamed aside ([`checkpoint::set_aside`]) and
    /// training starts from scratch: retrying with it in place would fail the same way.
    pub fn new(
        spec: TrialSpec,
        dataset: Arc<Dataset>,
        options: TrainerOptions,
    ) -> Result<Trainer, WorkerError> {
        let mut trainer = Trainer::fresh(spec, dataset, options)?;
        let Some(path) = trainer.options.checkpoint.clone() else {
            return Ok(trainer);
        };
        if !path.exists() {
            return Ok(trainer);
        }
        match trainer.resume(&path) {
            Ok(()) => Ok(trainer),
            Err(error) if unloadable(&error) => {
                let moved_to = checkpoint::set_aside(&path)?;
                warn!(
                    path = %path.display(),
                    moved_to = %moved_to.display(),
                    reason = %error,
                    "checkpoint cannot be loaded; set aside, training from scratch"
                );
                // A restore that failed half-way has overwritten part of the model and the
                // optimiser: a fresh build is the only clean start.
                let mut fresh = Trainer::fresh(trainer.spec, trainer.dataset, trainer.options)?;
                fresh.corrupt_checkpoints = 1;
                Ok(fresh)
            }
            Err(error) => Err(error),
        }
    }

    /// Builds the model and optimiser for `spec` on `dataset`, at the start of training.
    fn fresh(
        spec: TrialSpec,
        dataset: Arc<Dataset>,
        options: TrainerOptions,
    ) -> Result<Trainer, WorkerError> {
        spec.recipe.validate()?;
        spec.network.validate()?;
        check_compatible(&spec.network, &spec.recipe, &dataset)?;
        let recipe = &spec.recipe;
        let steps_per_epoch = (dataset.train.len() / recipe.batch_size as usize) as u64;
        let model = Model::build(
            &spec.network,
            spec.seed,
            recipe.bn_momentum,
            &options.device,
        )?;
        let config = SgdConfig {
            momentum: recipe.momentum,
            nesterov: recipe.nesterov,
            weight_decay: recipe.weight_decay,
        };
        if let Some(pretrained) = &options.pretrained {
            checkpoint::load(&pretrained.checkpoint, &options.device)?
                .restore_backbone(&model, &pretrained.design_hash)?;
        }
        let frozen = options
            .pretrained
            .as_ref()
            .is_some_and(|pretrained| pretrained.freeze_backbone);
        let trained_vars = model
            .named_vars()
            .into_iter()
            .filter(|named| !frozen || named.name.starts_with("classifier."))
            .collect();
        let optimizer = Sgd::new(trained_vars, config)?;
        let schedule = CosineSchedule::from_epochs(
            recipe.lr,
            recipe.min_lr,
            recipe.warmup_epochs,
            recipe.epochs,
            steps_per_epoch,
        );
        let identity = TrialIdentity {
            design_hash: spec.network.content_hash(),
            recipe_hash: recipe.content_hash(),
            dataset_hash: dataset.content_hash.clone(),
            seed: spec.seed,
        };
        let augmenter = Arc::new(Augmenter::new(recipe, &dataset));
        Ok(Trainer {
            spec,
            dataset,
            augmenter,
            model,
            optimizer,
            schedule,
            identity,
            options,
            steps_per_epoch,
            state: TrainState::default(),
            resumed: false,
            corrupt_checkpoints: 0,
        })
    }

    /// Continues from the checkpoint at `path`, which must belong to this trial.
    fn resume(&mut self, path: &Path) -> Result<(), WorkerError> {
        let loaded = checkpoint::load(path, &self.options.device)?;
        loaded.check_identity(&self.identity)?;
        loaded.restore(&self.model, &mut self.optimizer)?;
        self.state = loaded.state;
        self.resumed = true;
        Ok(())
    }

    /// Returns the model (its weights are the trained ones after [`Trainer::run`]).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Returns where training is and the epochs measured so far.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// Returns true when this trainer continued from a checkpoint.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Returns how many unloadable checkpoints this trainer set aside (0 or 1).
    pub fn corrupt_checkpoints(&self) -> u32 {
        self.corrupt_checkpoints
    }

    /// Returns the number of epochs the run has in all (cosine plus cool-down).
    pub fn total_epochs(&self) -> u32 {
        self.spec.recipe.total_epochs()
    }

    /// Returns the training steps of one epoch (the last partial batch is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Trains until the last epoch, a hook's stop or `cancel`; blocks the calling thread.
    pub fn run(
        &mut self,
        hooks: &mut dyn TrainHooks,
        cancel: &CancellationFlag,
    ) -> Result<TrainOutcome, WorkerError> {
        let total_epochs = self.spec.recipe.total_epochs();
        while self.state.position.epoch < total_epochs {
            if let Some(reason) = self.train_epoch(hooks, cancel)? {
                self.save_checkpoint()?;
                return Ok(self.stopped(reason));
            }
            let metrics = self.finish_epoch()?;
            self.save_checkpoint()?;
            let last = self.state.position.epoch == total_epochs;
            if hooks.on_epoch(&metrics) == Control::Stop && !last {
                return Ok(self.stopped(StopReason::Hook));
            }
        }
        Ok(TrainOutcome::Completed(self.result()))
    }

    fn stopped(&self, reason: StopReason) -> TrainOutcome {
        TrainOutcome::Stopped {
            reason,
            state: self.state.clone(),
        }
    }

    /// Trains the rest of the current epoch; returns why it stopped early, if it did.
    fn train_epoch(
        &mut self,
        hooks: &mut dyn TrainHooks,
        cancel: &CancellationFlag,
    ) -> Result<Option<StopReason>, WorkerError> {
        let epoch = self.state.position.epoch;
        let first = self.state.position.batch as usize;
        let mut loader = self.epoch_loader(epoch, first)?;
        let started = Instant::now();
        let seconds_before = self.state.epoch_sums.seconds;
        let mut trained = 0usize;
        let sync_every = self.options.sync_every_steps.max(1) as usize;
        let mut pending = Vec::with_capacity(sync_every);
        let stop = loop {
            if cancel.is_cancelled() {
                break Some(StopReason::Cancelled);
            }
            let Some(batch) = loader.next_item()? else {
                break None;
            };
            pending.push(self.train_step(batch)?);
            trained += self.spec.recipe.batch_size as usize;
            let elapsed = started.elapsed().as_secs_f64();
            self.state.epoch_sums.seconds = seconds_before + elapsed;
            let rate = trained as f64 / elapsed.max(1e-9);
            let checkpoint_due = self.periodic_checkpoint_due();
            if pending.len() < sync_every && !checkpoint_due {
                continue;
            }
            let stop = self.settle(&mut pending, hooks, rate)?;
            if checkpoint_due {
                self.save_checkpoint()?;
            }
            if stop {
                break Some(StopReason::Hook);
            }
        };
        // The epoch's end or a stop: every trained step is counted before anything is saved.
        let rate = trained as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let hook_stop = self.settle(&mut pending, hooks, rate)?;
        Ok(stop.or(hook_stop.then_some(StopReason::Hook)))
    }

    /// Reads the pending steps' losses and logits back (one wait for the device), then, step by
    /// step in order: fails on a loss that is not finite, adds the step to the epoch's sums and
    /// calls the step hook. Returns whether a hook asked to stop.
    fn settle(
        &mut self,
        pending: &mut Vec<PendingStep>,
        hooks: &mut dyn TrainHooks,
        images_per_second: f64,
    ) -> Result<bool, WorkerError> {
        if pending.is_empty() {
            return Ok(false);
        }
        let steps = std::mem::take(pending);
        let losses: Vec<f32> =
            Tensor::stack(&steps.iter().map(|step| &step.loss).collect::<Vec<_>>(), 0)?
                .to_vec1()?;
        let classes = self.dataset.num_classes as usize;
        let logits: Vec<f32> = Tensor::cat(
            &steps
                .iter()
                .map(|step| step.logits.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?
        .to_vec1()?;
        let mut stop = false;
        let mut offset = 0;
        for (step, loss) in steps.iter().zip(losses) {
            if !loss.is_finite() {
                return Err(WorkerError::Diverged {
                    epoch: step.position.epoch + 1,
                    batch: step.position.batch,
                    loss,
                });
            }
            let len = step.labels.len() * classes;
            let hits = top_k(&logits[offset..offset + len], &step.labels, classes);
            offset += len;
            let sums = &mut self.state.epoch_sums;
            sums.loss += f64::from(loss) * step.labels.len() as f64;
            sums.top1_hits += hits.top1;
            sums.samples += step.labels.len() as u64;
            let mut position = step.position;
            position.batch += 1;
            position.global_step += 1;
            let progress = StepProgress {
                position,
                epochs: self.spec.recipe.total_epochs(),
                batches_per_epoch: self.steps_per_epoch,
                lr: step.lr,
                loss: f64::from(loss),
                images_per_second,
            };
            stop |= hooks.on_step(&progress) == Control::Stop;
        }
        Ok(stop)
    }

    /// Starts the loader thread for batches `first..` of `epoch`.
    fn epoch_loader(&self, epoch: u32, first: usize) -> Result<Prefetcher<Batch>, WorkerError> {
        let dataset = Arc::clone(&self.dataset);
        let augmenter = Arc::clone(&self.augmenter);
        let seed = self.spec.seed;
        let batch_size = self.spec.recipe.batch_size as usize;
        let order = epoch_order(dataset.train.len(), seed, epoch);
        let batches = self.steps_per_epoch as usize;
        Prefetcher::spawn(self.options.prefetch_depth, first..batches, move |batch| {
            let indices = &order[batch * batch_size..(batch + 1) * batch_size];
            let mut rng = rng::derived(seed, "augment", &[u64::from(epoch), batch as u64]);
            augmenter.train_batch(&dataset.train, indices, &mut rng)
        })
    }

    /// Runs forward, backward and the SGD update on one batch and advances the position;
    /// returns the step with its loss and logits still on the device (see [`Trainer::settle`]).
    fn train_step(&mut self, batch: Batch) -> Result<PendingStep, WorkerError> {
        let (xs, targets) = self.batch_tensors(&batch)?;
        let lr = self.schedule.lr(self.state.position.global_step);
        let logits = if self.frozen_backbone() {
            let features = self.model.features_t(&xs, false)?.detach();
            self.model.classify(&features)?
        } else {
            self.model.forward_t(&xs, true)?
        };
        let loss = soft_cross_entropy(&logits, &targets)?;
        let grads = loss.backward()?;
        self.optimizer.step(&grads, lr)?;
        let step = PendingStep {
            position: self.state.position,
            lr,
            // Detached: a pending step must not keep its graph (the activations) alive.
            loss: loss.detach(),
            logits: logits.detach(),
            labels: batch.labels,
        };
        let position = &mut self.state.position;
        position.batch += 1;
        position.global_step += 1;
        Ok(step)
    }

    fn frozen_backbone(&self) -> bool {
        self.options
            .pretrained
            .as_ref()
            .is_some_and(|pretrained| pretrained.freeze_backbone)
    }

    fn batch_tensors(&self, batch: &Batch) -> Result<(Tensor, Tensor), WorkerError> {
        let (channels, side) = (self.dataset.channels as usize, self.dataset.side as usize);
        let classes = self.dataset.num_classes as usize;
        let device = &self.options.device;
        let xs = Tensor::from_slice(&batch.images, (batch.size, channels, side, side), device)?;
        let targets = Tensor::from_slice(&batch.targets, (batch.size, classes), device)?;
        Ok((xs, targets))
    }

    /// Evaluates, records the epoch's metrics and moves to the next epoch.
    fn finish_epoch(&mut self) -> Result<EpochMetrics, WorkerError> {
        let test = self.evaluate()?;
        let sums = self.state.epoch_sums;
        let metrics = EpochMetrics {
            epoch: self.state.position.epoch + 1,
            lr: self
                .schedule
                .lr(self.state.position.global_step.saturating_sub(1)),
            train_loss: sums.mean_loss(),
            train_top1: sums.top1_hits as f64 / sums.samples.max(1) as f64,
            test,
            images_per_second: sums.samples as f64 / sums.seconds.max(1e-9),
            seconds: sums.seconds,
        };
        self.state.history.push(metrics);
        self.state.epoch_sums = EpochSums::default();
        self.state.position.epoch += 1;
        self.state.position.batch = 0;
        Ok(metrics)
    }

    /// Returns loss, top-1 and top-5 of the current model on the held-out split (eval mode:
    /// BatchNorm uses its running statistics).
    pub fn evaluate(&self) -> Result<EvalMetrics, WorkerError> {
        let test_len = self.dataset.test.len();
        let batch_size = self.spec.recipe.eval_batch_size as usize;
        let dataset = Arc::clone(&self.dataset);
        let augmenter = Arc::clone(&self.augmenter);
        let batches = test_len.div_ceil(batch_size);
        let mut loader =
            Prefetcher::spawn(self.options.prefetch_depth, 0..batches, move |batch| {
                let end = ((batch + 1) * batch_size).min(test_len);
                augmenter.eval_batch(&dataset.test, batch * batch_size..end)
            })?;
        let classes = self.dataset.num_classes as usize;
        let (mut loss_sum, mut top1, mut top5) = (0f64, 0u64, 0u64);
        while let Some(batch) = loader.next_item()? {
            let (xs, targets) = self.batch_tensors(&batch)?;
            let logits = self.model.forward_t(&xs, false)?;
            let loss = soft_cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
            loss_sum += f64::from(loss) * batch.size as f64;
            let hits = top_k(&logits.flatten_all()?.to_vec1()?, &batch.labels, classes);
            top1 += hits.top1;
            top5 += hits.top5;
        }
        let samples = test_len as u64;
        Ok(EvalMetrics {
            loss: loss_sum / samples as f64,
            top1: top1 as f64 / samples as f64,
            top5: top5 as f64 / samples as f64,
            samples,
        })
    }

    fn save_checkpoint(&self) -> Result<(), WorkerError> {
        match &self.options.checkpoint {
            Some(path) => checkpoint::save(
                path,
                &self.identity,
                &self.model,
                &self.optimizer,
                &self.state,
            ),
            None => Ok(()),
        }
    }

    /// Whether a periodic checkpoint falls on the step just taken.
    fn periodic_checkpoint_due(&self) -> bool {
        let step = self.state.position.global_step;
        matches!(self.options.checkpoint_every_steps, Some(every) if every > 0 && step.is_multiple_of(every))
    }

    fn result(&self) -> TrialResult {
        let totals = count::totals(&self.spec.network);
        let final_test = self
            .state
            .history
            .last()
            .map(|metrics| metrics.test)
            .unwrap_or_default();
        TrialResult {
            design_hash: self.identity.design_hash.clone(),
            recipe_hash: self.identity.recipe_hash.clone(),
            dataset_hash: self.identity.dataset_hash.clone(),
            seed: self.spec.seed,
            params: totals.params,
            flops: totals.flops,
            epochs: self.state.history.clone(),
            final_test,
            corrupt_checkpoints: self.corrupt_checkpoints,
        }
    }
}

/// Whether resuming failed because the checkpoint's contents are bad (unparseable, truncated,
/// another trial's, tensors missing or misshapen), not because the file could not be read: an
/// I/O error (a permission, a full disk) is no reason to set the file aside.
fn unloadable(error: &WorkerError) -> bool {
    matches!(
        error,
        WorkerError::Checkpoint { .. } | WorkerError::Tensor(_)
    )
}

/// Checks that the design was made for this data and the recipe fits it.
fn check_compatible(
    network: &Network,
    recipe: &Recipe,
    dataset: &Dataset,
) -> Result<(), WorkerError> {
    let mismatch = |what: &str, design: u32, data: u32| WorkerError::Incompatible {
        reason: format!("the design's {what} is {design} but the dataset's is {data}"),
    };
    if network.in_channels != dataset.channels {
        return Err(mismatch(
            "input channel count",
            network.in_channels,
            dataset.channels,
        ));
    }
    if network.num_classes != dataset.num_classes {
        return Err(mismatch(
            "class count",
            network.num_classes,
            dataset.num_classes,
        ));
    }
    if network.resolution != dataset.side {
        return Err(mismatch("resolution", network.resolution, dataset.side));
    }
    if (recipe.batch_size as usize) > dataset.train.len() {
        return Err(WorkerError::Incompatible {
            reason: format!(
                "batch_size {} exceeds the {} training images",
                recipe.batch_size,
                dataset.train.len()
            ),
        });
    }
    Ok(())
}
