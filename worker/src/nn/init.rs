//! Seeded, device-independent initialisation, as torchvision initialises its classic networks.
//!
//! torchvision's ResNet, MobileNetV2 and EfficientNet all initialise convolutions with
//! `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, convolution biases with zeros,
//! BatchNorm with weight 1 and bias 0. Their classifiers differ; we use one rule for every
//! family, so a design's initialisation does not depend on its block family: the weight as
//! ResNet's (PyTorch's default `Linear` init, `U(-1/sqrt(in), 1/sqrt(in))`) and a zero bias as
//! MobileNetV2's and EfficientNet's. (MobileNetV2's `normal_(0, 0.01)` weight was tried first:
//! it scales the gradient reaching the backbone by 0.01, and the small networks of a short
//! trial then barely learn in their first epochs.)
//!
//! Values are drawn on the CPU from ChaCha8, one stream per tensor name, and then copied to the
//! device: the same seed gives bit-identical weights on CPU and CUDA, and adding a layer does
//! not change the values of the others.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::WorkerError;

/// How one tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InitRule {
    Zeros,
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal {
        std: f64,
    },
    /// Uniform on `[-bound, bound)`.
    Uniform {
        bound: f64,
    },
}

/// Returns the rule for a tensor of the model, from its name and shape.
///
/// Rank-4 tensors are convolution weights: Kaiming-normal with fan-out, `std = sqrt(2 / fan_out)`
/// where `fan_out = shape[0] * shape[2] * shape[3]` (PyTorch's `_calculate_fan_in_and_fan_out`,
/// which ignores groups, so a depthwise conv's fan-out is `channels * k * k`). Rank-2 tensors
/// are the classifier's weight, `U(-1/sqrt(in), 1/sqrt(in))` with `in = shape[1]`. Rank-1 tensors are BatchNorm weights (ones), running variances
/// (ones), running means and biases (zeros).
pub fn rule_for(name: &str, shape: &[usize]) -> InitRule {
    match shape.len() {
        4 => {
            let fan_out = shape[0] * shape[2] * shape[3];
            InitRule::Normal {
                std: (2.0 / fan_out as f64).sqrt(),
            }
        }
        2 => InitRule::Uniform {
            bound: 1.0 / (shape[1] as f64).sqrt(),
        },
        _ if name.ends_with("running_var") => InitRule::Ones,
        _ if name.ends_with("bn.weight") => InitRule::Ones,
        _ => InitRule::Zeros,
    }
}

/// Returns the initial values of tensor `name` (row-major) for `seed`.
pub fn initial_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let count: usize = shape.iter().product();
    match rule_for(name, shape) {
        InitRule::Zeros => vec![0.0; count],
        InitRule::Ones => vec![1.0; count],
        InitRule::Normal { std } => {
            let mut rng = rng_for(name, seed);
            (0..count)
                .map(|_| {
                    let standard: f64 = rng.sample(StandardNormal);
                    (standard * std) as f32
                })
                .collect()
        }
        InitRule::Uniform { bound } => {
            let mut rng = rng_for(name, seed);
            (0..count)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        }
    }
}

/// Sets every variable to its initial value for `seed`; `vars` are (name, variable) pairs.
pub fn initialize(vars: &[(String, Var)], seed: u64) -> Result<(), WorkerError> {
    for (name, var) in vars {
        let shape = var.dims().to_vec();
        let values = initial_values(name, &shape, seed);
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&tensor)?;
    }
    Ok(())
}

/// Returns the generator of tensor `name`: ChaCha8 keyed by the seed, on a stream named by the
/// first 8 bytes of SHA-256(name).
fn rng_for(name: &str, seed: u64) -> ChaCha8Rng {
    let digest = deepmad_design::digest::sha256(name);
    let mut stream = [0u8; 8];
    stream.copy_from_slice(&digest[..8]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from_le_bytes(stream));
    rng
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_torchvision() {
        // 3x3 conv 16 -> 32: fan_out = 32 * 9 = 288.
        let conv = rule_for("stages.0.blocks.0.conv1.weight", &[32, 16, 3, 3]);
        assert_eq!(
            conv,
            InitRule::Normal {
                std: (2.0f64 / 288.0).sqrt()
            }
        );
        // Depthwise 3x3 on 96 channels: fan_out = 96 * 9, groups ignored as PyTorch does.
        let depthwise = rule_for("x.depthwise.weight", &[96, 1, 3, 3]);
        assert_eq!(
            depthwise,
            InitRule::Normal {
                std: (2.0f64 / 864.0).sqrt()
            }
        );
        assert_eq!(rule_for("stem.bn.weight", &[16]), InitRule::Ones);
        assert_eq!(rule_for("stem.bn.bias", &[16]), InitRule::Zeros);
        assert_eq!(rule_for("stem.bn.running_var", &[16]), InitRule::Ones);
        assert_eq!(rule_for("stem.bn.running_mean", &[16]), InitRule::Zeros);
        assert_eq!(rule_for("x.se.reduce.bias", &[4]), InitRule::Zeros);
        assert_eq!(
            rule_for("classifier.weight", &[10, 64]),
            InitRule::Uniform { bound: 0.125 }
        );
        assert_eq!(rule_for("classifier.bias", &[10]), InitRule::Zeros);
    }

    #[test]
    fn same_seed_same_values_and_names_are_independent() {
        let a = initial_values("stem.weight", &[8, 3, 3, 3], 7);
        let b = initial_values("stem.weight", &[8, 3, 3, 3], 7);
        assert_eq!(a, b);
        assert_ne!(a, initial_values("stem.weight", &[8, 3, 3, 3], 8));
        assert_ne!(a, initial_values("head.weight", &[8, 3, 3, 3], 7));
    }

    #[test]
    fn kaiming_values_have_the_right_spread() {
        // 64 x 64 x 3 x 3 = 36864 draws; fan_out = 576, std = 0.0589. The sample standard
        // deviation of that many normals is within 2% of the true one with overwhelming odds.
        let values = initial_values("w.weight", &[64, 64, 3, 3], 1);
        let count = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
        let variance = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / count;
        let expected = (2.0f64 / 576.0).sqrt();
        assert!(mean.abs() < 0.002, "{mean}");
        assert!(
            (variance.sqrt() - expected).abs() / expected < 0.02,
            "{variance}"
        );
    }
}
