//! A candle network built from a design: [`Model::build`] turns a [`Network`] into layers whose
//! names, shapes and parameters are exactly those of `deepmad_design::count::walk`.
//!
//! Names follow the IR: `stem.weight`, `stem.bn.*`, `stages.{s}.blocks.{b}.{conv1,conv2,conv3,
//! shortcut,expand,depthwise,project}.weight` (each with `.bn.*`), `...se.{reduce,expand}.*`,
//! `head.*` and `classifier.{weight,bias}`. BatchNorm's running statistics live in the same
//! [`VarMap`] (so checkpoints carry them) but are buffers, never optimised.

use std::fmt;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{Init, Linear, VarBuilder, VarMap};
use deepmad_design::Network;

use crate::error::WorkerError;
use crate::nn::blocks::{Block, BlockPlan, ConvBn, ConvShape};
use crate::nn::init;

/// How the optimiser treats a variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VarRole {
    /// Convolution and classifier weights: trained with weight decay.
    Decay,
    /// BatchNorm weights and biases, SE and classifier biases: trained without weight decay.
    NoDecay,
    /// BatchNorm running statistics: updated by the forward pass, never by the optimiser.
    Buffer,
}

/// One named variable of a model.
#[derive(Clone, Debug)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
    pub role: VarRole,
}

/// A design built in candle; `forward_t(xs, train)` maps `(batch, channels, side, side)` images
/// to `(batch, classes)` logits.
pub struct Model {
    network: Network,
    varmap: VarMap,
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    head: Option<ConvBn>,
    classifier: Linear,
}

impl fmt::Debug for Model {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `VarMap` has no `Debug`; the design's hash identifies the model.
        formatter
            .debug_struct("Model")
            .field("design", &self.network.content_hash())
            .field("stages", &self.stages.len())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Builds `network` on `device` with seeded initial weights (see [`crate::nn::init`]);
    /// `bn_momentum` is PyTorch's BatchNorm momentum (the recipe's, 0.01 in Table 12).
    pub fn build(
        network: &Network,
        seed: u64,
        bn_momentum: f64,
        device: &Device,
    ) -> Result<Model, WorkerError> {
        network.validate()?;
        let model = Model::layers(network, VarMap::new(), bn_momentum, device)?;
        let vars: Vec<(String, Var)> = model
            .named_vars()
            .into_iter()
            .map(|named| (named.name, named.var))
            .collect();
        init::initialize(&vars, seed)?;
        Ok(model)
    }

    fn layers(
        network: &Network,
        varmap: VarMap,
        bn_momentum: f64,
        device: &Device,
    ) -> candle_core::Result<Model> {
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let stem_shape = ConvShape {
            in_channels: network.in_channels as usize,
            out_channels: network.stem.out as usize,
            kernel: network.stem.kernel as usize,
            stride: network.stem.stride as usize,
            groups: 1,
        };
        let stem = ConvBn::new(vb.pp("stem"), stem_shape, bn_momentum)?;
        let mut stages = Vec::with_capacity(network.stages.len());
        for (stage_index, stage) in network.stages.iter().enumerate() {
            let stage_vb = vb.pp(format!("stages.{stage_index}"));
            let blocks = (0..stage.depth)
                .map(|index| {
                    let plan = BlockPlan {
                        index,
                        activation: network.activation,
                        bn_momentum,
                    };
                    Block::new(stage_vb.pp(format!("blocks.{index}")), stage, plan)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            stages.push(blocks);
        }
        let last = network.stages.last().map_or(network.stem.out, |s| s.out) as usize;
        let head = network
            .head
            .map(|out| {
                let shape = ConvShape {
                    in_channels: last,
                    out_channels: out as usize,
                    kernel: 1,
                    stride: 1,
                    groups: 1,
                };
                ConvBn::new(vb.pp("head"), shape, bn_momentum)
            })
            .transpose()?;
        let classifier = classifier(vb.pp("classifier"), network)?;
        Ok(Model {
            network: network.clone(),
            varmap,
            stem,
            stages,
            head,
            classifier,
        })
    }

    /// Returns the design this model was built from.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Returns every variable (parameters and buffers), sorted by name.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let data = self
            .varmap
            .data()
            .lock()
            .expect("the var map lock is never held across a panic");
        let mut vars: Vec<NamedVar> = data
            .iter()
            .map(|(name, var)| NamedVar {
                name: name.clone(),
                var: var.clone(),
                role: role_of(name, var),
            })
            .collect();
        vars.sort_by(|a, b| a.name.cmp(&b.name));
        vars
    }

    /// Returns the number of trainable parameters (buffers excluded): the design's `params`.
    pub fn param_count(&self) -> u64 {
        self.named_vars()
            .iter()
            .filter(|named| named.role != VarRole::Buffer)
            .map(|named| named.var.elem_count() as u64)
            .sum()
    }
}

fn classifier(vb: VarBuilder, network: &Network) -> candle_core::Result<Linear> {
    let shape = (
        network.num_classes as usize,
        network.final_channels() as usize,
    );
    let weight = vb.get_with_hints(shape, "weight", Init::Const(0.0))?;
    let bias = vb.get_with_hints(network.num_classes as usize, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

fn role_of(name: &str, var: &Var) -> VarRole {
    if name.ends_with("running_mean") || name.ends_with("running_var") {
        VarRole::Buffer
    } else if var.rank() == 1 {
        VarRole::NoDecay
    } else {
        VarRole::Decay
    }
}

impl Model {
    /// Returns the backbone's features: the globally pooled output of the last stage (or of
    /// the head conv), `(batch, final_channels)`, the classifier's input.
    pub fn features_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let activation = self.network.activation;
        let mut ys = self.stem.forward_act(xs, train, None, Some(activation))?;
        if self.network.stem.max_pool {
            ys = max_pool_3x3_stride_2(&ys)?;
        }
        for block in self.stages.iter().flatten() {
            ys = block.forward(&ys, activation, train)?;
        }
        if let Some(head) = &self.head {
            ys = head.forward_act(&ys, train, None, Some(activation))?;
        }
        ys.mean((2, 3))
    }

    /// Applies the classifier to [`Model::features_t`]'s features.
    pub fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        candle_core::Module::forward(&self.classifier, features)
    }
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.classify(&self.features_t(xs, train)?)
    }
}

/// PyTorch's `MaxPool2d(3, stride=2, padding=1)`. candle's pooling has no padding; padding
/// with copies of the edge is equivalent for a max over a 3-wide window (each padded value
/// repeats a value already inside that window), and maps side `r` to `ceil(r / 2)` as count.rs.
fn max_pool_3x3_stride_2(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride(3, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_matches_pytorch_padding_semantics() {
        // A 1x1x3x3 map with negative values: zero padding would wrongly win the max at the
        // corners. PyTorch's MaxPool2d(3, 2, 1) pads with -inf: output 2x2 of window maxima.
        let values = vec![-9f32, -8., -7., -6., -5., -4., -3., -2., -1.];
        let xs = Tensor::from_vec(values, (1, 1, 3, 3), &Device::Cpu).unwrap();
        let ys = max_pool_3x3_stride_2(&xs).unwrap();
        let got: Vec<f32> = ys.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![-5., -4., -2., -1.]);
    }
}
