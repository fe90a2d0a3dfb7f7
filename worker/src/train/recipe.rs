//! The training recipe ([`Recipe`]): every hyper-parameter of a trial, with the defaults of
//! the paper's Table 12 and validation that names the offending key.
//!
//! The type, its parsing and its bounds live in `deepmad_design::recipe`, so the coordinator
//! refuses a bad recipe when a sweep is created, with the rules the workers apply; this module
//! re-exports it where the trainer has always found it, and checks the recipes shipped with
//! the worker (`worker/recipes/`).

pub use deepmad_design::recipe::Recipe;

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Pins what results record of a recipe: its hash, JSON and TOML were computed before the
    /// type moved to the design crate (issue 24, item 9) and must stay byte for byte.
    #[test]
    fn recorded_forms_are_pinned() {
        let quick = Recipe::from_toml(include_str!("../../recipes/mnist-quick.toml")).unwrap();
        assert_eq!(
            quick.content_hash(),
            "c48dcd0b6b5460425d0f775562f7a6150977ccb75596d84971e8a17c0d2b83a9"
        );
        let json = "{\"dataset\":\"idx:data/mnist-subset\",\"epochs\":3,\"warmup_epochs\":0,\
            \"cooldown_epochs\":0,\"batch_size\":32,\"eval_batch_size\":500,\"lr\":0.2,\
            \"min_lr\":0.0,\"momentum\":0.9,\"nesterov\":true,\"weight_decay\":0.0005,\
            \"bn_momentum\":0.1,\"label_smoothing\":0.1,\"mixup_alpha\":0.0,\"cutmix_alpha\":0.0,\
            \"mix_prob\":1.0,\"mix_switch_prob\":0.5,\"crop_padding\":2,\"hflip_prob\":0.0,\
            \"random_erase_prob\":0.0}";
        assert_eq!(serde_json::to_string(&quick).unwrap(), json);
        let toml = "dataset = \"idx:data/mnist-subset\"\nepochs = 3\nwarmup_epochs = 0\n\
            cooldown_epochs = 0\nbatch_size = 32\neval_batch_size = 500\nlr = 0.2\nmin_lr = 0.0\n\
            momentum = 0.9\nnesterov = true\nweight_decay = 0.0005\nbn_momentum = 0.1\n\
            label_smoothing = 0.1\nmixup_alpha = 0.0\ncutmix_alpha = 0.0\nmix_prob = 1.0\n\
            mix_switch_prob = 0.5\ncrop_padding = 2\nhflip_prob = 0.0\nrandom_erase_prob = 0.0\n";
        assert_eq!(quick.to_toml(), toml);
    }
}
