//! SGD with momentum and Nesterov momentum, exactly as `torch.optim.SGD`, with two parameter
//! groups: weights with weight decay, BatchNorm parameters and biases without (Table 12's
//! weight decay is "not applied to BN and bias parameters", as timm's `no_weight_decay`).
//!
//! candle-nn ships plain SGD and AdamW only; this is PyTorch's documented rule (dampening 0):
//! ```text
//! g  = grad + weight_decay * p
//! b  = g                      (first step)
//! b  = momentum * b + g       (later steps)
//! g  = g + momentum * b       (nesterov)   or   g = b   (classical momentum)
//! p  = p - lr * g
//! ```
//! Parameters without a gradient are skipped, as PyTorch skips `p.grad is None`.
//!
//! With deepmad's kernels each parameter's update is two in-place ops over f32 data
//! ([`deepmad_kernels::sgd`]); the stock path is the formula above as candle tensor ops (nine
//! ops and allocations per parameter), which the tests compare it with.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use deepmad_kernels::sgd::{self, SgdStep};
use deepmad_kernels::Kernels;

use crate::error::WorkerError;
use crate::nn::model::{NamedVar, VarRole};

/// The optimiser's hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub momentum: f64,
    pub nesterov: bool,
    /// Applied to [`VarRole::Decay`] variables only.
    pub weight_decay: f64,
}

#[derive(Debug)]
struct SgdParam {
    name: String,
    var: Var,
    weight_decay: f64,
    momentum_buffer: Option<Tensor>,
}

/// Momentum SGD over a model's trainable variables.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<SgdParam>,
    config: SgdConfig,
}

impl Sgd {
    /// Creates the optimiser over `vars`; buffers are left out, `NoDecay` variables get no decay.
    pub fn new(vars: Vec<NamedVar>, config: SgdConfig) -> Result<Sgd, WorkerError> {
        if config.nesterov && config.momentum <= 0.0 {
            // PyTorch: "Nesterov momentum requires a momentum and zero dampening".
            return Err(WorkerError::InvalidRecipe {
                key: "nesterov".into(),
                reason: "requires a positive momentum".into(),
            });
        }
        let params = vars
            .into_iter()
            .filter(|named| named.role != VarRole::Buffer)
            .map(|named| SgdParam {
                weight_decay: match named.role {
                    VarRole::Decay => config.weight_decay,
                    VarRole::NoDecay | VarRole::Buffer => 0.0,
                },
                name: named.name,
                var: named.var,
                momentum_buffer: None,
            })
            .collect();
        Ok(Sgd { params, config })
    }

    /// Applies one update with learning rate `lr` from the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<(), WorkerError> {
        self.step_with(deepmad_kernels::current(), grads, lr)
    }

    /// [`Sgd::step`] with the given kernels.
    pub fn step_with(
        &mut self,
        kernels: Kernels,
        grads: &GradStore,
        lr: f64,
    ) -> Result<(), WorkerError> {
        let SgdConfig {
            momentum, nesterov, ..
        } = self.config;
        let fused = kernels == Kernels::Deepmad;
        for param in &mut self.params {
            let Some(grad) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            let value = param.var.as_tensor();
            if fused && sgd::applies_to(value) {
                let grad = grad.detach().contiguous()?;
                let step = SgdStep {
                    lr,
                    momentum,
                    weight_decay: param.weight_decay,
                    nesterov,
                };
                sgd::update(value, &grad, &mut param.momentum_buffer, step)?;
                continue;
            }
            let value = param.var.as_detached_tensor();
            let mut update = grad.detach();
            if param.weight_decay != 0.0 {
                update = (update + (&value * param.weight_decay)?)?;
            }
            if momentum != 0.0 {
                let buffer = match &param.momentum_buffer {
                    None => update.clone(),
                    Some(previous) => ((previous * momentum)? + &update)?,
                };
                update = if nesterov {
                    (&update + (&buffer * momentum)?)?
                } else {
                    buffer.clone()
                };
                param.momentum_buffer = Some(buffer);
            }
            param.var.set(&(value - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Returns the momentum buffers that exist (after a parameter's first step), by name.
    pub fn momentum_buffers(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter_map(|param| {
                let buffer = param.momentum_buffer.as_ref()?;
                Some((param.name.clone(), buffer.clone()))
            })
            .collect()
    }

    /// Restores the momentum buffer of parameter `name` (from a checkpoint).
    pub fn set_momentum_buffer(&mut self, name: &str, buffer: Tensor) -> Result<(), String> {
        let param = self
            .params
            .iter_mut()
            .find(|param| param.name == name)
            .ok_or_else(|| format!("the model has no trainable parameter {name}"))?;
        if buffer.dims() != param.var.dims() {
            return Err(format!(
                "momentum buffer {name} has shape {:?}, the parameter {:?}",
                buffer.dims(),
                param.var.dims()
            ));
        }
        param.momentum_buffer = Some(
            buffer
                .to_device(param.var.device())
                .map_err(|e| e.to_string())?,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn scalar(name: &str, value: f32, role: VarRole) -> NamedVar {
        NamedVar {
            name: name.into(),
            var: Var::from_vec(vec![value], 1, &Device::Cpu).unwrap(),
            role,
        }
    }

    fn value(named: &NamedVar) -> f32 {
        named.var.as_tensor().to_vec1::<f32>().unwrap()[0]
    }

    /// Three steps of SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 0.01) on the loss
    /// `0.5 * (w^2 + b^2)`, so each gradient equals the parameter; `w` decays, `b` does not.
    /// Reference values worked by hand from PyTorch's torch.optim.SGD documentation formula
    /// (and re-checked in double precision):
    /// w: 1 -> 0.8081 -> 0.57121561 -> 0.321859673441
    ///    (g = 1.01, b = 1.01, g' = 1.919; g = 0.816181, b = 1.725181, g' = 2.3688439; ...)
    /// b: 1 -> 0.81 -> 0.5751 -> 0.327321
    ///    (g = 1, b = 1, g' = 1.9; g = 0.81, b = 1.71, g' = 2.349; g = 0.5751, b = 2.1141, ...)
    #[test]
    fn nesterov_with_weight_decay_matches_pytorch_reference() {
        let w = scalar("w", 1.0, VarRole::Decay);
        let b = scalar("b", 1.0, VarRole::NoDecay);
        let config = SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
        };
        let mut sgd = Sgd::new(vec![w.clone(), b.clone()], config).unwrap();
        let expected_w = [0.8081, 0.57121561, 0.321859673441];
        let expected_b = [0.81, 0.5751, 0.327321];
        for step in 0..3 {
            let (w_tensor, b_tensor) = (w.var.as_tensor(), b.var.as_tensor());
            let loss = ((w_tensor.sqr().unwrap() + b_tensor.sqr().unwrap()).unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            sgd.step(&grads, 0.1).unwrap();
            let (got_w, got_b) = (value(&w), value(&b));
            assert!(
                (f64::from(got_w) - expected_w[step]).abs() < 1e-6,
                "w step {step}: {got_w}"
            );
            assert!(
                (f64::from(got_b) - expected_b[step]).abs() < 1e-6,
                "b step {step}: {got_b}"
            );
        }
        assert_eq!(sgd.momentum_buffers().len(), 2);
    }

    /// Classical momentum (no Nesterov) uses the buffer as the step: lr 0.5, momentum 0.5,
    /// constant gradient 1 (loss = p): p = 0 -> -0.5 (b = 1) -> -1.25 (b = 1.5) -> -2.125 (b = 1.75).
    /// Worked by hand from PyTorch's torch.optim.SGD documentation formula.
    #[test]
    fn classical_momentum_matches_pytorch_reference() {
        let p = scalar("p", 0.0, VarRole::Decay);
        let config = SgdConfig {
            momentum: 0.5,
            nesterov: false,
            weight_decay: 0.0,
        };
        let mut sgd = Sgd::new(vec![p.clone()], config).unwrap();
        for expected in [-0.5f32, -1.25, -2.125] {
            let grads = p.var.as_tensor().sum_all().unwrap().backward().unwrap();
            sgd.step(&grads, 0.5).unwrap();
            assert_eq!(value(&p), expected);
        }
    }

    /// The fused in-place update equals the tensor-op formula over several steps, for
    /// Nesterov, classical momentum and plain SGD, with and without weight decay.
    #[test]
    fn fused_update_equals_the_tensor_op_formula() {
        let configs = [
            (0.9, true, 5e-4),
            (0.5, false, 0.01),
            (0.0, false, 0.1),
            (0.9, true, 0.0),
        ];
        for (momentum, nesterov, weight_decay) in configs {
            let config = SgdConfig {
                momentum,
                nesterov,
                weight_decay,
            };
            let start: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
            let make = || {
                vec![NamedVar {
                    name: "w".into(),
                    var: Var::from_vec(start.clone(), (37,), &Device::Cpu).unwrap(),
                    role: VarRole::Decay,
                }]
            };
            let (fused_vars, stock_vars) = (make(), make());
            let mut fused = Sgd::new(fused_vars.clone(), config).unwrap();
            let mut stock = Sgd::new(stock_vars.clone(), config).unwrap();
            for step in 0..4 {
                let lr = 0.1 / (step + 1) as f64;
                for (sgd, vars, kernels) in [
                    (&mut fused, &fused_vars, Kernels::Deepmad),
                    (&mut stock, &stock_vars, Kernels::Stock),
                ] {
                    let w = vars[0].var.as_tensor();
                    let loss = (w.sqr().unwrap().sum_all().unwrap()
                        + w.sin().unwrap().sum_all().unwrap())
                    .unwrap();
                    let grads = loss.backward().unwrap();
                    sgd.step_with(kernels, &grads, lr).unwrap();
                }
                let a: Vec<f32> = fused_vars[0].var.as_tensor().to_vec1().unwrap();
                let b: Vec<f32> = stock_vars[0].var.as_tensor().to_vec1().unwrap();
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-6, "{config:?} step {step}: {x} vs {y}");
                }
            }
            assert_eq!(
                fused.momentum_buffers().len(),
                stock.momentum_buffers().len()
            );
        }
    }

    #[test]
    fn buffers_are_not_optimised_and_nesterov_needs_momentum() {
        let running = scalar("bn.running_mean", 3.0, VarRole::Buffer);
        let config = SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        };
        let sgd = Sgd::new(vec![running], config).unwrap();
        assert!(sgd.params.is_empty());
        let config = SgdConfig {
            momentum: 0.0,
            ..config
        };
        let message = Sgd::new(Vec::new(), config).unwrap_err().to_string();
        assert!(message.contains("nesterov"), "{message}");
    }
}
