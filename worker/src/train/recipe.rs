//! The training recipe: every hyper-parameter of a trial, read from TOML, with defaults from
//! the paper's Table 12 (CIFAR-100 column) and validation that names the offending key.
//!
//! Table 12 (appendix H): warm-up 5 epochs, cool-down 0, 1440 epochs, SGD with Nesterov,
//! BN momentum 0.01, weight decay 5e-4, cosine schedule, label smoothing 0.1, mixup 0.2,
//! cutmix 0, mixup switch probability 0.5, random erasing 0.5, initial lr 0.2, batch 512, no AMP.
//! Not implemented: AutoAugment and Table 12's crop ratio (an ImageNet resize-crop setting);
//! CIFAR-style random crops with padding take its place.

use serde::{Deserialize, Serialize};

use crate::data::DatasetSpec;
use crate::error::WorkerError;

/// All hyper-parameters of one training run. Missing keys take the defaults of Table 12.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// The dataset, `KIND:PATH`; the command line's `--dataset` overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetSpec>,
    /// Epochs of the warm-up + cosine schedule (Table 12: 1440).
    pub epochs: u32,
    /// Linear warm-up epochs, part of `epochs` (Table 12: 5).
    pub warmup_epochs: u32,
    /// Extra epochs at `min_lr` after the cosine (timm's cool-down; Table 12: 0).
    pub cooldown_epochs: u32,
    pub batch_size: u32,
    /// Batch size of evaluation passes (memory only; results do not depend on it).
    pub eval_batch_size: u32,
    /// Peak learning rate (Table 12: 0.2 at batch 512).
    pub lr: f64,
    pub min_lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    /// Weight decay of convolution and classifier weights; BN and biases get none.
    pub weight_decay: f64,
    /// PyTorch's BatchNorm momentum (Table 12: 0.01).
    pub bn_momentum: f64,
    pub label_smoothing: f64,
    /// Beta(alpha, alpha) of mixup; 0 disables it (Table 12: 0.2).
    pub mixup_alpha: f64,
    /// Beta(alpha, alpha) of cutmix; 0 disables it (Table 12: 0).
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all (timm's `mixup_prob`).
    pub mix_prob: f64,
    /// With both mixup and cutmix on, the probability of cutmix (Table 12: 0.5).
    pub mix_switch_prob: f64,
    /// Zero padding of the random crop, in pixels (CIFAR's 4).
    pub crop_padding: u32,
    pub hflip_prob: f64,
    /// Random erasing probability (Table 12: 0.5).
    pub random_erase_prob: f64,
}

impl Default for Recipe {
    fn default() -> Recipe {
        Recipe {
            dataset: None,
            epochs: 1440,
            warmup_epochs: 5,
            cooldown_epochs: 0,
            batch_size: 512,
            eval_batch_size: 512,
            lr: 0.2,
            min_lr: 0.0,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            bn_momentum: 0.01,
            label_smoothing: 0.1,
            mixup_alpha: 0.2,
            cutmix_alpha: 0.0,
            mix_prob: 1.0,
            mix_switch_prob: 0.5,
            crop_padding: 4,
            hflip_prob: 0.5,
            random_erase_prob: 0.5,
        }
    }
}

impl Recipe {
    /// Parses and validates a TOML recipe; errors name the line or the key.
    pub fn from_toml(text: &str) -> Result<Recipe, WorkerError> {
        let recipe: Recipe =
            toml::from_str(text).map_err(|error| WorkerError::MalformedRecipe {
                location: error
                    .span()
                    .map(|span| format!("at byte {}", span.start))
                    .unwrap_or_else(|| "(whole file)".into()),
                reason: error.message().to_string(),
            })?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Returns the recipe as TOML (what a result records).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a recipe has only plain fields and serializes")
    }

    /// Returns the total number of epochs run: cosine epochs plus cool-down.
    pub fn total_epochs(&self) -> u32 {
        self.epochs + self.cooldown_epochs
    }

    /// Returns SHA-256 of the hyper-parameters' canonical JSON, dataset excluded (the dataset
    /// is identified by its content hash, not by where it lies).
    pub fn content_hash(&self) -> String {
        let without_dataset = Recipe {
            dataset: None,
            ..self.clone()
        };
        let json = serde_json::to_string(&without_dataset).expect("a recipe serializes");
        deepmad_design::digest::sha256_hex(json)
    }

    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let invalid = |key: &str, reason: String| {
            Err(WorkerError::InvalidRecipe {
                key: key.to_string(),
                reason,
            })
        };
        for (key, value) in [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        if self.warmup_epochs > self.epochs {
            return invalid(
                "warmup_epochs",
                format!(
                    "is {} but epochs is only {}",
                    self.warmup_epochs, self.epochs
                ),
            );
        }
        if self.batch_size < 2 {
            return invalid(
                "batch_size",
                "must be at least 2 (BatchNorm needs a batch)".into(),
            );
        }
        self.validate_rates()?;
        for (key, value) in self.probabilities() {
            if !(0.0..=1.0).contains(&value) {
                return invalid(key, format!("must be in [0, 1], got {value}"));
            }
        }
        Ok(())
    }

    fn validate_rates(&self) -> Result<(), WorkerError> {
        let invalid = |key: &str, reason: String| {
            Err(WorkerError::InvalidRecipe {
                key: key.to_string(),
                reason,
            })
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return invalid("lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.min_lr.is_finite() && (0.0..=self.lr).contains(&self.min_lr)) {
            return invalid("min_lr", format!("must be in [0, lr], got {}", self.min_lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid(
                "momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            );
        }
        if self.nesterov && self.momentum == 0.0 {
            return invalid("nesterov", "requires a positive momentum".into());
        }
        for (key, value) in [
            ("weight_decay", self.weight_decay),
            ("mixup_alpha", self.mixup_alpha),
            ("cutmix_alpha", self.cutmix_alpha),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return invalid(key, format!("must be zero or positive, got {value}"));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return invalid(
                "label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            );
        }
        Ok(())
    }

    fn probabilities(&self) -> [(&'static str, f64); 5] {
        [
            ("bn_momentum", self.bn_momentum),
            ("mix_prob", self.mix_prob),
            ("mix_switch_prob", self.mix_switch_prob),
            ("hflip_prob", self.hflip_prob),
            ("random_erase_prob", self.random_erase_prob),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_table_12_cifar100() {
        let recipe = Recipe::from_toml("").unwrap();
        assert_eq!(recipe, Recipe::default());
        assert_eq!(
            (recipe.epochs, recipe.warmup_epochs, recipe.batch_size),
            (1440, 5, 512)
        );
        assert_eq!(
            (recipe.lr, recipe.weight_decay, recipe.bn_momentum),
            (0.2, 5e-4, 0.01)
        );
        assert!(recipe.nesterov);
        assert_eq!(
            (
                recipe.label_smoothing,
                recipe.mixup_alpha,
                recipe.cutmix_alpha
            ),
            (0.1, 0.2, 0.0)
        );
        assert_eq!(
            (recipe.mix_switch_prob, recipe.random_erase_prob),
            (0.5, 0.5)
        );
    }

    #[test]
    fn parses_keys_and_dataset() {
        let recipe = Recipe::from_toml(
            "dataset = \"idx:data/mnist-subset\"\nepochs = 3\nwarmup_epochs = 1\nlr = 0.05\n",
        )
        .unwrap();
        assert_eq!(recipe.epochs, 3);
        assert_eq!(recipe.lr, 0.05);
        assert_eq!(recipe.dataset.unwrap().to_string(), "idx:data/mnist-subset");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let message = Recipe::from_toml("learning_rate = 0.1")
            .unwrap_err()
            .to_string();
        assert!(message.contains("learning_rate"), "{message}");
        for (text, key) in [
            ("lr = -1.0", "lr"),
            ("epochs = 2\nwarmup_epochs = 3", "warmup_epochs"),
            ("hflip_prob = 1.5", "hflip_prob"),
            ("momentum = 0.0", "nesterov"),
            ("batch_size = 1", "batch_size"),
            ("label_smoothing = 1.0", "label_smoothing"),
        ] {
            let message = Recipe::from_toml(text).unwrap_err().to_string();
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn shipped_recipes_parse() {
        let table12 =
            Recipe::from_toml(include_str!("../../recipes/cifar100-table12.toml")).unwrap();
        assert_eq!(
            Recipe {
                dataset: None,
                ..table12
            },
            Recipe::default()
        );
        let quick = Recipe::from_toml(include_str!("../../recipes/mnist-quick.toml")).unwrap();
        assert_eq!(
            (quick.epochs, quick.batch_size, quick.hflip_prob),
            (3, 32, 0.0)
        );
    }

    #[test]
    fn hash_ignores_where_the_dataset_lies_but_not_hyperparameters() {
        let a = Recipe::from_toml("dataset = \"idx:/a\"").unwrap();
        let b = Recipe::from_toml("dataset = \"idx:/b\"").unwrap();
        assert_eq!(a.content_hash(), b.content_hash());
        let c = Recipe::from_toml("lr = 0.1").unwrap();
        assert_ne!(a.content_hash(), c.content_hash());
        assert_eq!(Recipe::from_toml(&a.to_toml()).unwrap(), a);
    }
}
