//! From stored bytes to a training batch: random crop with zero padding, horizontal flip,
//! normalisation, random erasing, then mixup or cutmix over the batch, with label-smoothed
//! soft targets. Evaluation batches are only normalised.
//!
//! Per image, as torchvision's CIFAR pipeline `RandomCrop(side, padding) ->
//! RandomHorizontalFlip -> ToTensor -> Normalize -> RandomErasing(value=0)`; per batch, as
//! timm's `Mixup` in batch mode (each image mixed with the batch reversed). Every draw comes
//! from the generator passed in, in a fixed order, so a batch is a pure function of
//! (images, indices, generator).

use std::ops::Range;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

use crate::data::{Dataset, Split};
use crate::nn::loss::add_smoothed_one_hot;
use crate::train::recipe::Recipe;

/// A batch ready for the model: `images` is `size x channels x side x side` (normalised
/// floats), `targets` is `size x classes` (soft), `labels` the original hard labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub size: usize,
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub targets: Vec<f32>,
}

/// The augmentation settings of a recipe, and what it needs to know about the images.
#[derive(Clone, Debug, PartialEq)]
pub struct Augmenter {
    channels: usize,
    side: usize,
    classes: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    crop_padding: usize,
    hflip_prob: f64,
    random_erase_prob: f64,
    label_smoothing: f64,
    mixup_alpha: f64,
    cutmix_alpha: f64,
    mix_prob: f64,
    mix_switch_prob: f64,
}

/// How a batch is mixed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mix {
    None,
    Mixup {
        lambda: f32,
    },
    /// The rows `top..bottom` and columns `left..right` come from the reversed batch.
    Cutmix {
        top: usize,
        bottom: usize,
        left: usize,
        right: usize,
    },
}

impl Augmenter {
    /// Returns the augmenter of `recipe` for the images of `dataset`.
    pub fn new(recipe: &Recipe, dataset: &Dataset) -> Augmenter {
        Augmenter {
            channels: dataset.channels as usize,
            side: dataset.side as usize,
            classes: dataset.num_classes as usize,
            mean: dataset.mean.clone(),
            std: dataset.std.clone(),
            crop_padding: recipe.crop_padding as usize,
            hflip_prob: recipe.hflip_prob,
            random_erase_prob: recipe.random_erase_prob,
            label_smoothing: recipe.label_smoothing,
            mixup_alpha: recipe.mixup_alpha,
            cutmix_alpha: recipe.cutmix_alpha,
            mix_prob: recipe.mix_prob,
            mix_switch_prob: recipe.mix_switch_prob,
        }
    }

    fn image_len(&self) -> usize {
        self.channels * self.side * self.side
    }

    /// Returns the augmented training batch of the images at `indices` of `split`.
    pub fn train_batch(&self, split: &Split, indices: &[u32], rng: &mut ChaCha8Rng) -> Batch {
        let len = self.image_len();
        let mut images = vec![0f32; indices.len() * len];
        let mut labels = Vec::with_capacity(indices.len());
        for (out, &index) in images.chunks_exact_mut(len).zip(indices) {
            let index = index as usize;
            let source = &split.images[index * len..(index + 1) * len];
            let dy = rng.random_range(0..=2 * self.crop_padding);
            let dx = rng.random_range(0..=2 * self.crop_padding);
            let flip = rng.random_bool(self.hflip_prob);
            self.crop_flip_normalize(source, (dy, dx), flip, out);
            if rng.random_bool(self.random_erase_prob) {
                self.random_erase(out, rng);
            }
            labels.push(split.labels[index]);
        }
        let mix = self.draw_mix(rng);
        self.apply_mix(&mut images, indices.len(), mix);
        let targets = self.mixed_targets(&labels, mix);
        Batch {
            size: indices.len(),
            images,
            labels,
            targets,
        }
    }

    /// Returns the evaluation batch of images `range` of `split`: normalised, one-hot targets.
    pub fn eval_batch(&self, split: &Split, range: Range<usize>) -> Batch {
        let len = self.image_len();
        let size = range.len();
        let mut images = vec![0f32; size * len];
        let pad = self.crop_padding;
        for (out, index) in images.chunks_exact_mut(len).zip(range.clone()) {
            let source = &split.images[index * len..(index + 1) * len];
            self.crop_flip_normalize(source, (pad, pad), false, out);
        }
        let labels = split.labels[range].to_vec();
        let mut targets = vec![0f32; size * self.classes];
        for (row, &label) in targets.chunks_exact_mut(self.classes).zip(&labels) {
            add_smoothed_one_hot(row, label, 0.0, 1.0);
        }
        Batch {
            size,
            images,
            labels,
            targets,
        }
    }

    /// Writes the crop at offset `(dy, dx)` of the zero-padded image, flipped or not, as
    /// normalised floats. An offset of `(padding, padding)` without flip is the identity.
    fn crop_flip_normalize(
        &self,
        source: &[u8],
        offset: (usize, usize),
        flip: bool,
        out: &mut [f32],
    ) {
        let (side, pad) = (self.side, self.crop_padding);
        let plane = side * side;
        for channel in 0..self.channels {
            let (mean, std) = (self.mean[channel], self.std[channel]);
            let normalize = |byte: u8| (f32::from(byte) / 255.0 - mean) / std;
            let input = &source[channel * plane..(channel + 1) * plane];
            let output = &mut out[channel * plane..(channel + 1) * plane];
            for y in 0..side {
                let source_y = (y + offset.0).checked_sub(pad).filter(|&sy| sy < side);
                for x in 0..side {
                    let column = if flip { side - 1 - x } else { x };
                    let source_x = (column + offset.1).checked_sub(pad).filter(|&sx| sx < side);
                    let byte = match (source_y, source_x) {
                        (Some(sy), Some(sx)) => input[sy * side + sx],
                        _ => 0,
                    };
                    output[y * side + x] = normalize(byte);
                }
            }
        }
    }

    /// torchvision's `RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)`: up to 10
    /// tries to place a rectangle of random area and aspect inside the image, zeroed in every
    /// channel (zero is the mean after normalisation).
    fn random_erase(&self, image: &mut [f32], rng: &mut ChaCha8Rng) {
        let side = self.side;
        let area = (side * side) as f64;
        let (log_low, log_high) = (0.3f64.ln(), 3.3f64.ln());
        for _ in 0..10 {
            let erase_area = area * rng.random_range(0.02..0.33);
            let aspect = rng.random_range(log_low..log_high).exp();
            let height = (erase_area * aspect).sqrt().round() as usize;
            let width = (erase_area / aspect).sqrt().round() as usize;
            if height == 0 || width == 0 || height >= side || width >= side {
                continue;
            }
            let top = rng.random_range(0..=side - height);
            let left = rng.random_range(0..=side - width);
            for plane in image.chunks_exact_mut(side * side) {
                for row in top..top + height {
                    plane[row * side + left..row * side + left + width].fill(0.0);
                }
            }
            return;
        }
    }

    /// Draws whether and how this batch is mixed (timm's `Mixup._params_per_batch`).
    fn draw_mix(&self, rng: &mut ChaCha8Rng) -> Mix {
        let mixup = self.mixup_alpha > 0.0;
        let cutmix = self.cutmix_alpha > 0.0;
        if !(mixup || cutmix) || !rng.random_bool(self.mix_prob) {
            return Mix::None;
        }
        let use_cutmix = if mixup && cutmix {
            rng.random_bool(self.mix_switch_prob)
        } else {
            cutmix
        };
        let alpha = if use_cutmix {
            self.cutmix_alpha
        } else {
            self.mixup_alpha
        };
        let beta = Beta::new(alpha, alpha).expect("alpha validated positive");
        let lambda: f64 = beta.sample(rng);
        if !use_cutmix {
            return Mix::Mixup {
                lambda: lambda as f32,
            };
        }
        // timm's rand_bbox: a box of sides side * sqrt(1 - lambda) around a random center.
        let side = self.side;
        let cut = (side as f64 * (1.0 - lambda).sqrt()) as usize;
        let center_y = rng.random_range(0..side);
        let center_x = rng.random_range(0..side);
        let clip = |value: isize| value.clamp(0, side as isize) as usize;
        let half = (cut / 2) as isize;
        Mix::Cutmix {
            top: clip(center_y as isize - half),
            bottom: clip(center_y as isize + half),
            left: clip(center_x as isize - half),
            right: clip(center_x as isize + half),
        }
    }

    fn apply_mix(&self, images: &mut [f32], size: usize, mix: Mix) {
        let len = self.image_len();
        let original = match mix {
            Mix::None => return,
            _ => images.to_vec(),
        };
        for (index, image) in images.chunks_exact_mut(len).enumerate() {
            let partner = &original[(size - 1 - index) * len..(size - index) * len];
            match mix {
                Mix::None => {}
                Mix::Mixup { lambda } => {
                    for (value, &other) in image.iter_mut().zip(partner) {
                        *value = lambda * *value + (1.0 - lambda) * other;
                    }
                }
                Mix::Cutmix {
                    top,
                    bottom,
                    left,
                    right,
                } => {
                    let side = self.side;
                    for (plane, other) in image
                        .chunks_exact_mut(side * side)
                        .zip(partner.chunks_exact(side * side))
                    {
                        for row in top..bottom {
                            let span = row * side + left..row * side + right;
                            plane[span.clone()].copy_from_slice(&other[span]);
                        }
                    }
                }
            }
        }
    }

    /// Returns `lambda * smooth(label) + (1 - lambda) * smooth(partner's label)` per image,
    /// with cutmix's lambda corrected to the pasted area (timm's `correct_lam`).
    fn mixed_targets(&self, labels: &[u32], mix: Mix) -> Vec<f32> {
        let lambda = match mix {
            Mix::None => 1.0,
            Mix::Mixup { lambda } => f64::from(lambda),
            Mix::Cutmix {
                top,
                bottom,
                left,
                right,
            } => 1.0 - ((bottom - top) * (right - left)) as f64 / (self.side * self.side) as f64,
        };
        let size = labels.len();
        let mut targets = vec![0f32; size * self.classes];
        for (index, row) in targets.chunks_exact_mut(self.classes).enumerate() {
            add_smoothed_one_hot(row, labels[index], self.label_smoothing, lambda);
            if lambda < 1.0 {
                add_smoothed_one_hot(
                    row,
                    labels[size - 1 - index],
                    self.label_smoothing,
                    1.0 - lambda,
                );
            }
        }
        targets
    }
}

/// Returns the order of the training images in `epoch`: a seeded Fisher-Yates shuffle.
pub fn epoch_order(count: usize, seed: u64, epoch: u32) -> Vec<u32> {
    use rand::seq::SliceRandom;
    let mut order: Vec<u32> = (0..count as u32).collect();
    order.shuffle(&mut crate::rng::derived(
        seed,
        "shuffle",
        &[u64::from(epoch)],
    ));
    order
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::data::{DatasetSpec, RawDataset};

    /// Two 1-channel 4x4 images (values 0..16 and 100..116), labels 0 and 2 of 3 classes.
    fn dataset() -> Dataset {
        let mut images: Vec<u8> = (0..16).collect();
        images.extend(100..116);
        let split = Split {
            images,
            labels: vec![0, 2],
        };
        let raw = RawDataset {
            channels: 1,
            side: 4,
            num_classes: 3,
            train: split.clone(),
            test: split,
        };
        Dataset::from_splits("idx:memory".parse::<DatasetSpec>().unwrap(), raw).unwrap()
    }

    fn plain_recipe() -> Recipe {
        Recipe {
            crop_padding: 0,
            hflip_prob: 0.0,
            random_erase_prob: 0.0,
            label_smoothing: 0.0,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            ..Recipe::default()
        }
    }

    fn normalized(data: &Dataset, byte: u8) -> f32 {
        (f32::from(byte) / 255.0 - data.mean[0]) / data.std[0]
    }

    #[test]
    fn eval_batches_are_normalised_with_one_hot_targets() {
        let data = dataset();
        let batch = Augmenter::new(&Recipe::default(), &data).eval_batch(&data.test, 0..2);
        assert_eq!(batch.size, 2);
        assert_eq!(batch.images[5], normalized(&data, 5));
        assert_eq!(batch.images[16 + 3], normalized(&data, 103));
        assert_eq!(batch.targets, vec![1., 0., 0., 0., 0., 1.]);
        assert_eq!(batch.labels, vec![0, 2]);
    }

    #[test]
    fn without_augmentation_a_training_batch_equals_the_evaluation_batch() {
        let data = dataset();
        let augmenter = Augmenter::new(&plain_recipe(), &data);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let train = augmenter.train_batch(&data.train, &[0, 1], &mut rng);
        assert_eq!(train, augmenter.eval_batch(&data.train, 0..2));
    }

    #[test]
    fn crop_offset_shifts_with_zero_padding_and_flip_mirrors() {
        let data = dataset();
        let recipe = Recipe {
            crop_padding: 1,
            ..plain_recipe()
        };
        let augmenter = Augmenter::new(&recipe, &data);
        let source = &data.train.images[..16];
        let mut out = vec![0f32; 16];
        // Offset (0, 0) of the padded image: the content moves one pixel down and right.
        augmenter.crop_flip_normalize(source, (0, 0), false, &mut out);
        assert_eq!(out[0], normalized(&data, 0), "padding is a black pixel");
        assert_eq!(out[5], normalized(&data, 0));
        assert_eq!(out[15], normalized(&data, 10));
        augmenter.crop_flip_normalize(source, (1, 1), true, &mut out);
        assert_eq!(out[0], normalized(&data, 3));
        assert_eq!(out[3], normalized(&data, 0));
    }

    #[test]
    fn mixup_mixes_with_the_reversed_batch_and_its_targets() {
        let data = dataset();
        let augmenter = Augmenter::new(&plain_recipe(), &data);
        let mut batch = augmenter.eval_batch(&data.train, 0..2);
        let before = batch.images.clone();
        let mix = Mix::Mixup { lambda: 0.25 };
        augmenter.apply_mix(&mut batch.images, 2, mix);
        let expected = 0.25 * before[1] + 0.75 * before[16 + 1];
        assert!((batch.images[1] - expected).abs() < 1e-6);
        let targets = augmenter.mixed_targets(&batch.labels, mix);
        assert_eq!(targets, vec![0.25, 0., 0.75, 0.75, 0., 0.25]);
    }

    #[test]
    fn cutmix_pastes_the_box_and_weighs_targets_by_its_area() {
        let data = dataset();
        let augmenter = Augmenter::new(&plain_recipe(), &data);
        let mut batch = augmenter.eval_batch(&data.train, 0..2);
        let before = batch.images.clone();
        let mix = Mix::Cutmix {
            top: 0,
            bottom: 2,
            left: 1,
            right: 3,
        };
        augmenter.apply_mix(&mut batch.images, 2, mix);
        assert_eq!(
            batch.images[1],
            before[16 + 1],
            "inside the box: the partner's pixel"
        );
        assert_eq!(batch.images[0], before[0], "outside the box: unchanged");
        // The box covers 4 of 16 pixels: lambda = 0.75.
        let targets = augmenter.mixed_targets(&batch.labels, mix);
        assert_eq!(targets, vec![0.75, 0., 0.25, 0.25, 0., 0.75]);
    }

    #[test]
    fn random_erasing_zeroes_a_rectangle() {
        let data = dataset();
        let recipe = Recipe {
            random_erase_prob: 1.0,
            ..plain_recipe()
        };
        let augmenter = Augmenter::new(&recipe, &data);
        let mut image = vec![1f32; 16];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        augmenter.random_erase(&mut image, &mut rng);
        let zeros = image.iter().filter(|&&value| value == 0.0).count();
        // Area between 2% and 33% of 16 pixels, rounded sides: 1 to 6 pixels, never all.
        assert!((1..16).contains(&zeros), "{zeros}");
    }

    #[test]
    fn batches_are_reproducible_from_the_generator() {
        let data = dataset();
        let recipe = Recipe {
            cutmix_alpha: 1.0,
            ..Recipe::default()
        };
        let augmenter = Augmenter::new(&recipe, &data);
        let batch = |seed| {
            augmenter.train_batch(&data.train, &[1, 0], &mut ChaCha8Rng::seed_from_u64(seed))
        };
        assert_eq!(batch(9), batch(9));
        assert_ne!(batch(9), batch(10));
        for row in batch(9).targets.chunks_exact(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let order = epoch_order(100, 7, 0);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<u32>>());
        assert_eq!(order, epoch_order(100, 7, 0));
        assert_ne!(order, epoch_order(100, 7, 1));
        assert_ne!(order, epoch_order(100, 8, 0));
    }
}
