//! The learning-rate schedule of Table 12: linear warm-up, cosine decay (Loshchilov & Hutter,
//! SGDR), then optional cool-down epochs at the minimum rate (timm's `cooldown_epochs`),
//! evaluated per optimiser step rather than per epoch.

/// A per-step learning rate.
///
/// With `W` warm-up steps and `C` steps to the end of the cosine (warm-up included):
/// ```text
/// lr(t) = base * (t + 1) / W                                           t < W
/// lr(t) = min + (base - min) * (1 + cos(pi * (t - W) / (C - W))) / 2   W <= t < C
/// lr(t) = min                                                          t >= C (cool-down)
/// ```
/// The warm-up reaches `base` on its last step, so no step runs at a rate of zero.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Steps until the cosine reaches `min_lr`, warm-up included.
    pub cosine_steps: u64,
}

impl CosineSchedule {
    /// Returns the schedule for `epochs` cosine epochs (warm-up included) of `steps_per_epoch`.
    pub fn from_epochs(
        base_lr: f64,
        min_lr: f64,
        warmup_epochs: u32,
        epochs: u32,
        steps_per_epoch: u64,
    ) -> CosineSchedule {
        CosineSchedule {
            base_lr,
            min_lr,
            warmup_steps: u64::from(warmup_epochs) * steps_per_epoch,
            cosine_steps: u64::from(epochs) * steps_per_epoch,
        }
    }

    /// Returns the learning rate of step `step` (0-based, counted over the whole run).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step >= self.cosine_steps {
            return self.min_lr;
        }
        let progress =
            (step - self.warmup_steps) as f64 / (self.cosine_steps - self.warmup_steps) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.base_lr - self.min_lr) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// base 0.1, min 0, 1 warm-up epoch and 3 epochs of 2 steps: W = 2, C = 6.
    /// Worked by hand from the formula above (cos(pi/4) = 0.70710678...):
    /// t=0: 0.1*1/2 = 0.05; t=1: 0.1; t=2: progress 0 -> 0.1; t=3: progress 1/4 ->
    /// 0.05*(1+0.70710678) = 0.0853553390593; t=4: 1/2 -> 0.05; t=5: 3/4 -> 0.0146446609407;
    /// t=6 (cool-down): 0.
    #[test]
    fn warmup_then_cosine_reference_values() {
        let schedule = CosineSchedule::from_epochs(0.1, 0.0, 1, 3, 2);
        let expected = [
            0.05,
            0.1,
            0.1,
            0.085_355_339_059_327_38,
            0.05,
            0.014_644_660_940_672_62,
            0.0,
            0.0,
        ];
        for (step, want) in expected.iter().enumerate() {
            let got = schedule.lr(step as u64);
            assert!(close(got, *want), "step {step}: {got} vs {want}");
        }
    }

    /// With min 0.01 the midpoint is 0.01 + 0.09/2 = 0.055 and the cool-down stays at 0.01.
    #[test]
    fn min_lr_floors_the_cosine() {
        let schedule = CosineSchedule::from_epochs(0.1, 0.01, 1, 3, 2);
        assert!(close(schedule.lr(4), 0.055));
        assert!(close(schedule.lr(100), 0.01));
    }

    #[test]
    fn no_warmup_starts_at_base() {
        let schedule = CosineSchedule::from_epochs(0.2, 0.0, 0, 10, 5);
        assert!(close(schedule.lr(0), 0.2));
        assert!(schedule.lr(49) > 0.0 && schedule.lr(49) < 0.001);
    }
}
