//! Losses and accuracy: cross-entropy on soft targets (label smoothing, mixup and cutmix all
//! produce soft targets), and top-k counting for evaluation.

use candle_core::{Tensor, D};

/// Returns the mean over the batch of `-sum_k targets[k] * log_softmax(logits)[k]`.
///
/// With `targets` = label-smoothed one-hot vectors this equals PyTorch's
/// `CrossEntropyLoss(label_smoothing=eps)`; with mixed targets it is timm's
/// `SoftTargetCrossEntropy`.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (targets * log_probs)?.sum(D::Minus1)?.neg()?.mean_all()
}

/// Writes the label-smoothed one-hot vector of `label` into `row`, scaled by `weight` and added
/// to what is there: `on = 1 - eps + eps / K`, `off = eps / K` (timm's `mixup_target`).
pub fn add_smoothed_one_hot(row: &mut [f32], label: u32, smoothing: f64, weight: f64) {
    let classes = row.len() as f64;
    let off = smoothing / classes;
    let on = 1.0 - smoothing + off;
    for (class, value) in row.iter_mut().enumerate() {
        let target = if class == label as usize { on } else { off };
        *value += (weight * target) as f32;
    }
}

/// Top-1 and top-5 hits of one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopK {
    pub top1: u64,
    pub top5: u64,
}

/// Counts the rows of `logits` (`batch x classes`, row-major) whose label is the arg-max
/// (top-1) or among the five largest (top-5). The rank of the label is the number of classes
/// with a strictly larger logit, so ties count in the label's favour.
pub fn top_k(logits: &[f32], labels: &[u32], classes: usize) -> TopK {
    let mut hits = TopK::default();
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let own = row[label as usize];
        let rank = row.iter().filter(|&&value| value > own).count();
        hits.top1 += u64::from(rank == 0);
        hits.top5 += u64::from(rank < 5);
    }
    hits
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// logits (1, 2, 3), label 2, smoothing 0.1, three classes. Worked by hand:
    /// logsumexp = 3 + ln(1 + e^-1 + e^-2) = 3.4076059644; log-probs = (-2.4076, -1.4076,
    /// -0.4076); PyTorch's formula (1 - eps) * nll + eps * mean(-log p) = 0.9 * 0.4076059644 +
    /// 0.1 * 4.2228178933 / 3 = 0.5076059644. The gradient is softmax - target =
    /// (0.0566972398, 0.2113951377, -0.2680923776).
    #[test]
    fn label_smoothed_cross_entropy_reference_value_and_gradient() {
        let logits = Var::from_vec(vec![1f32, 2., 3.], (1, 3), &Device::Cpu).unwrap();
        let mut target = vec![0f32; 3];
        add_smoothed_one_hot(&mut target, 2, 0.1, 1.0);
        let targets = Tensor::from_vec(target, (1, 3), &Device::Cpu).unwrap();
        let loss = soft_cross_entropy(logits.as_tensor(), &targets).unwrap();
        let value = loss.to_scalar::<f32>().unwrap();
        assert!((value - 0.507_605_96).abs() < 1e-6, "{value}");
        let grads = loss.backward().unwrap();
        let grad: Vec<f32> = grads
            .get(logits.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = [0.056_697_24, 0.211_395_14, -0.268_092_4];
        for (got, want) in grad.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{grad:?}");
        }
    }

    #[test]
    fn mixed_targets_sum_to_one() {
        let mut row = vec![0f32; 4];
        add_smoothed_one_hot(&mut row, 0, 0.1, 0.7);
        add_smoothed_one_hot(&mut row, 3, 0.1, 0.3);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((row[0] - 0.7 * 0.925 - 0.3 * 0.025).abs() < 1e-6);
    }

    #[test]
    fn top_k_counts_ranks() {
        // Six classes; row 0: label 2 is the max; row 1: label 0 ranks 5th; row 2: 6th.
        let logits = [
            0., 1., 9., 2., 3., 4., //
            2., 6., 5., 4., 3., 1., //
            0., 6., 5., 4., 3., 1.,
        ];
        let hits = top_k(&logits, &[2, 0, 0], 6);
        assert_eq!(hits, TopK { top1: 1, top5: 2 });
    }
}
