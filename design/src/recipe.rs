//! The training recipe: every hyper-parameter of a trial, read from TOML (a recipe file) or
//! JSON (a sweep's recipe, a lease), with defaults from the paper's Table 12 (CIFAR-100 column)
//! and validation that names the offending key.
//!
//! Table 12 (appendix H): warm-up 5 epochs, cool-down 0, 1440 epochs, SGD with Nesterov,
//! BN momentum 0.01, weight decay 5e-4, cosine schedule, label smoothing 0.1, mixup 0.2,
//! cutmix 0, mixup switch probability 0.5, random erasing 0.5, initial lr 0.2, batch 512, no AMP.
//! Not implemented: AutoAugment and Table 12's crop ratio (an ImageNet resize-crop setting);
//! CIFAR-style random crops with padding take its place.
//!
//! The type lives here, not in the worker that trains it, so that the coordinator refuses a bad
//! recipe when the sweep is created with the same rules the workers apply ([`Recipe::validate`]).
//! Parsing a string is pure; reading the file is the caller's business.

use std::ops::{Bound, RangeBounds};

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetSpec;
use crate::error::DesignError;

/// The most epochs a recipe may run (cosine epochs; warm-up and cool-down are at most as many).
/// Table 12 trains 1440; the bound keeps `epochs + cooldown_epochs` and step counts far from
/// overflow.
pub const MAX_EPOCHS: u32 = 10_000;
/// The largest training or evaluation batch (Table 12: 512).
pub const MAX_BATCH_SIZE: u32 = 65_536;
/// The largest zero padding of the random crop, in pixels (CIFAR's is 4).
pub const MAX_CROP_PADDING: u32 = 512;
/// The largest peak learning rate (Table 12: 0.2; linear scaling to huge batches stays below).
pub const MAX_LR: f64 = 100.0;
/// The largest weight decay (Table 12: 5e-4).
pub const MAX_WEIGHT_DECAY: f64 = 1.0;
/// The largest Beta(alpha, alpha) parameter of mixup and cutmix (Table 12: 0.2 and 0).
pub const MAX_MIX_ALPHA: f64 = 100.0;

/// All hyper-parameters of one training run. Missing keys take the defaults of Table 12.
///
/// The field order is the order of the canonical JSON that [`Recipe::content_hash`] hashes:
/// changing it changes every recipe's hash.
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
    pub fn from_toml(text: &str) -> Result<Recipe, DesignError> {
        let recipe: Recipe =
            toml::from_str(text).map_err(|error| DesignError::MalformedRecipe {
                location: error
                    .span()
                    .map(|span| format!("at byte {}", span.start))
                    .unwrap_or_else(|| "(whole file)".into()),
                reason: error.message().to_string(),
            })?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Reads and validates a recipe given as a JSON object (a sweep's recipe, a lease's);
    /// errors name the key: unknown keys and values of the wrong type are refused.
    pub fn from_json(value: &serde_json::Value) -> Result<Recipe, DesignError> {
        let Some(table) = value.as_object() else {
            return Err(DesignError::MalformedRecipe {
                location: "(whole recipe)".into(),
                reason: "must be a table of training settings".into(),
            });
        };
        // serde's errors from a JSON value do not say which key they are about, so each key is
        // read alone first: the first one that fails is named.
        for (key, field_value) in table {
            let alone = serde_json::Map::from_iter([(key.clone(), field_value.clone())]);
            serde_json::from_value::<Recipe>(serde_json::Value::Object(alone)).map_err(
                |error| DesignError::InvalidRecipe {
                    key: key.clone(),
                    reason: error.to_string(),
                },
            )?;
        }
        let recipe: Recipe = serde_json::from_value(value.clone()).map_err(|error| {
            DesignError::MalformedRecipe {
                location: "(whole recipe)".into(),
                reason: error.to_string(),
            }
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
        crate::digest::sha256_hex(json)
    }

    /// Checks every value against its range (the `MAX_*` constants bound what no real run
    /// reaches); the error names the first bad key.
    pub fn validate(&self) -> Result<(), DesignError> {
        self.validate_counts()?;
        self.validate_rates()?;
        if self.nesterov && self.momentum == 0.0 {
            return Err(invalid("nesterov", "requires a positive momentum".into()));
        }
        Ok(())
    }

    fn validate_counts(&self) -> Result<(), DesignError> {
        for (key, value, low, high) in [
            ("epochs", self.epochs, 1, MAX_EPOCHS),
            // BatchNorm needs at least two images in a training batch.
            ("batch_size", self.batch_size, 2, MAX_BATCH_SIZE),
            ("eval_batch_size", self.eval_batch_size, 1, MAX_BATCH_SIZE),
            ("crop_padding", self.crop_padding, 0, MAX_CROP_PADDING),
        ] {
            if !(low..=high).contains(&value) {
                let reason = format!("must be between {low} and {high}, got {value}");
                return Err(invalid(key, reason));
            }
        }
        for (key, value) in [
            ("warmup_epochs", self.warmup_epochs),
            ("cooldown_epochs", self.cooldown_epochs),
        ] {
            if value > self.epochs {
                let reason = format!("is {value} but epochs is only {}", self.epochs);
                return Err(invalid(key, reason));
            }
        }
        Ok(())
    }

    fn validate_rates(&self) -> Result<(), DesignError> {
        use Bound::{Excluded, Included};
        let probability = (Included(0.0), Included(1.0));
        for (key, value, (low, high)) in [
            ("lr", self.lr, (Excluded(0.0), Included(MAX_LR))),
            ("min_lr", self.min_lr, (Included(0.0), Included(self.lr))),
            ("momentum", self.momentum, (Included(0.0), Excluded(1.0))),
            (
                "weight_decay",
                self.weight_decay,
                (Included(0.0), Included(MAX_WEIGHT_DECAY)),
            ),
            (
                "label_smoothing",
                self.label_smoothing,
                (Included(0.0), Excluded(1.0)),
            ),
            (
                "mixup_alpha",
                self.mixup_alpha,
                (Included(0.0), Included(MAX_MIX_ALPHA)),
            ),
            (
                "cutmix_alpha",
                self.cutmix_alpha,
                (Included(0.0), Included(MAX_MIX_ALPHA)),
            ),
            ("bn_momentum", self.bn_momentum, probability),
            ("mix_prob", self.mix_prob, probability),
            ("mix_switch_prob", self.mix_switch_prob, probability),
            ("hflip_prob", self.hflip_prob, probability),
            ("random_erase_prob", self.random_erase_prob, probability),
        ] {
            // A NaN is in no range: every comparison with it is false.
            if !(low, high).contains(&value) {
                let reason = format!("must be in {}, got {value}", interval(low, high));
                return Err(invalid(key, reason));
            }
        }
        Ok(())
    }
}

fn invalid(key: &str, reason: String) -> DesignError {
    DesignError::InvalidRecipe {
        key: key.to_string(),
        reason,
    }
}

/// Writes a range as mathematicians do: `[0, 1)`.
fn interval(low: Bound<f64>, high: Bound<f64>) -> String {
    let low = match low {
        Bound::Included(value) => format!("[{value}"),
        Bound::Excluded(value) => format!("({value}"),
        Bound::Unbounded => "(-inf".to_string(),
    };
    let high = match high {
        Bound::Included(value) => format!("{value}]"),
        Bound::Excluded(value) => format!("{value})"),
        Bound::Unbounded => "inf)".to_string(),
    };
    format!("{low}, {high}")
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

    /// The bounds of issue 24 (item 9): each value just past its bound is refused naming its
    /// key, and the bound itself is accepted.
    #[test]
    fn values_beyond_the_bounds_are_refused_naming_the_key() {
        let refused = [
            (serde_json::json!({ "epochs": 0 }), "epochs"),
            (serde_json::json!({ "epochs": 10_001 }), "epochs"),
            (serde_json::json!({ "epochs": 4_000_000_000u32 }), "epochs"),
            (
                serde_json::json!({ "batch_size": 4_000_000_000u32 }),
                "batch_size",
            ),
            (
                serde_json::json!({ "eval_batch_size": 65_537 }),
                "eval_batch_size",
            ),
            (
                serde_json::json!({ "epochs": 10, "cooldown_epochs": 11 }),
                "cooldown_epochs",
            ),
            (serde_json::json!({ "crop_padding": 513 }), "crop_padding"),
            (serde_json::json!({ "lr": 0.0 }), "lr"),
            (serde_json::json!({ "lr": 1e300 }), "lr"),
            (serde_json::json!({ "min_lr": 0.5 }), "min_lr"),
            (serde_json::json!({ "weight_decay": 2.0 }), "weight_decay"),
            (serde_json::json!({ "mixup_alpha": -0.1 }), "mixup_alpha"),
            (serde_json::json!({ "bn_momentum": 1.5 }), "bn_momentum"),
            (serde_json::json!({ "mix_prob": -0.5 }), "mix_prob"),
            (serde_json::json!({ "epochs": -1 }), "epochs"),
            (serde_json::json!({ "lr": "fast" }), "lr"),
            (serde_json::json!({ "dataset": "tar:/x" }), "dataset"),
            (serde_json::json!({ "colour": 3 }), "colour"),
        ];
        for (json, key) in refused {
            match Recipe::from_json(&json) {
                Err(DesignError::InvalidRecipe { key: named, reason }) => {
                    assert_eq!(named, key, "{json}: {reason}")
                }
                other => panic!("{json}: expected a refusal naming {key}, got {other:?}"),
            }
        }
        let at_the_bounds = serde_json::json!({
            "epochs": MAX_EPOCHS, "warmup_epochs": MAX_EPOCHS, "cooldown_epochs": MAX_EPOCHS,
            "batch_size": MAX_BATCH_SIZE, "eval_batch_size": MAX_BATCH_SIZE,
            "crop_padding": MAX_CROP_PADDING, "lr": MAX_LR, "min_lr": MAX_LR,
            "weight_decay": MAX_WEIGHT_DECAY, "mixup_alpha": MAX_MIX_ALPHA, "mix_prob": 0.0,
        });
        let recipe = Recipe::from_json(&at_the_bounds).unwrap();
        assert_eq!(recipe.total_epochs(), 2 * MAX_EPOCHS);
        assert!(Recipe::from_json(&serde_json::json!([1])).is_err());
    }

    #[test]
    fn the_message_names_the_bound() {
        let error = Recipe::from_json(&serde_json::json!({ "epochs": 0 })).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid recipe: epochs must be between 1 and 10000, got 0"
        );
        let error = Recipe::from_json(&serde_json::json!({ "momentum": 1.0 })).unwrap_err();
        assert!(
            error.to_string().contains("must be in [0, 1), got 1"),
            "{error}"
        );
    }

    #[test]
    fn json_and_toml_read_the_same_recipe() {
        let json = serde_json::json!({ "dataset": "idx:/a", "epochs": 30, "lr": 0.05 });
        let from_json = Recipe::from_json(&json).unwrap();
        let from_toml = Recipe::from_toml("dataset = \"idx:/a\"\nepochs = 30\nlr = 0.05").unwrap();
        assert_eq!(from_json, from_toml);
        assert_eq!(Recipe::from_toml(&from_json.to_toml()).unwrap(), from_json);
    }

    /// Pins the hash that results record: these values were computed by the worker's recipe
    /// before the type moved to this crate (issue 24, item 9), and must never change.
    #[test]
    fn content_hash_is_pinned() {
        assert_eq!(
            Recipe::default().content_hash(),
            "0489f6bf987a870960515401e4c62bba6d8067ce47a1af98283c0a70de90f0d1"
        );
        let a = Recipe::from_toml("dataset = \"idx:/a\"").unwrap();
        let b = Recipe::from_toml("dataset = \"idx:/b\"").unwrap();
        assert_eq!(a.content_hash(), b.content_hash());
        let c = Recipe::from_toml("lr = 0.1").unwrap();
        assert_ne!(a.content_hash(), c.content_hash());
    }
}
