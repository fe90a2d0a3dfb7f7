//! The built model has exactly the design's layers: parameter counts and weight shapes equal
//! `deepmad_design::count`'s, for every family and the classic networks; forward and backward
//! shapes; seeded initialisation.

use candle_core::{DType, ModuleT, Tensor};
use deepmad_design::count::{self, Event, Role};
use deepmad_design::{classic, Network};
use deepmad_worker::nn::{Model, VarRole};

use crate::nets;

/// The shapes of every weight `count::walk` lists (convs as `(out, in / groups, k, k)`, the
/// classifier as `(out, in)`), sorted.
fn design_weight_shapes(net: &Network) -> Vec<Vec<usize>> {
    let mut shapes = Vec::new();
    count::walk(net, &mut |event| {
        if let Event::Layer { layer, count, .. } = event {
            let (out, cin) = (layer.out_channels as usize, layer.in_channels as usize);
            let shape = if layer.role == Role::Classifier {
                vec![out, cin]
            } else {
                let k = layer.kernel as usize;
                vec![out, cin / layer.groups as usize, k, k]
            };
            shapes.extend(std::iter::repeat_n(shape, count as usize));
        }
    });
    shapes.sort();
    shapes
}

fn model_weight_shapes(model: &Model) -> Vec<Vec<usize>> {
    let mut shapes: Vec<Vec<usize>> = model
        .named_vars()
        .iter()
        .filter(|named| named.role == VarRole::Decay)
        .map(|named| named.var.dims().to_vec())
        .collect();
    shapes.sort();
    shapes
}

fn assert_matches_design(name: &str, net: &Network) {
    let model = Model::build(net, 0, 0.1, &crate::cpu()).unwrap();
    assert_eq!(
        model.param_count(),
        count::totals(net).params,
        "{name}: params"
    );
    assert_eq!(
        model_weight_shapes(&model),
        design_weight_shapes(net),
        "{name}: weights"
    );
}

#[test]
fn param_counts_and_weight_shapes_match_the_design_for_every_family() {
    for (name, net) in nets::all_families(3, 16, 10) {
        assert_matches_design(name, &net);
    }
}

#[test]
fn param_counts_match_the_design_for_classic_networks() {
    // Small resolution: parameters do not depend on it, and the build stays cheap.
    for name in ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"] {
        let net = classic::by_name(name, 10, 32).unwrap();
        assert_matches_design(name, &net);
    }
}

#[test]
fn forward_and_backward_shapes_for_every_family() {
    for (name, net) in nets::all_families(3, 16, 10) {
        let model = Model::build(&net, 1, 0.1, &crate::cpu()).unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 3, 16, 16), &crate::cpu()).unwrap();
        let logits = model.forward_t(&xs, true).unwrap();
        assert_eq!(logits.dims(), &[2, 10], "{name}");
        let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for named in model.named_vars() {
            let grad = grads.get(named.var.as_tensor());
            match named.role {
                VarRole::Buffer => assert!(grad.is_none(), "{name}: {}", named.name),
                _ => {
                    let grad = grad.unwrap_or_else(|| panic!("{name}: no grad for {}", named.name));
                    assert_eq!(grad.dims(), named.var.dims(), "{name}: {}", named.name);
                }
            }
        }
        let eval = model.forward_t(&xs, false).unwrap();
        assert_eq!(eval.dims(), &[2, 10], "{name}");
    }
}

#[test]
fn classic_networks_run_at_small_resolution() {
    let net = classic::by_name("resnet18", 10, 32).unwrap();
    let model = Model::build(&net, 1, 0.1, &crate::cpu()).unwrap();
    let xs = Tensor::zeros((1, 3, 32, 32), DType::F32, &crate::cpu()).unwrap();
    assert_eq!(model.forward_t(&xs, false).unwrap().dims(), &[1, 10]);
}

#[test]
fn same_seed_gives_identical_weights_and_another_seed_does_not() {
    let net = nets::tiny_mbconv_se(3, 16, 10);
    let weights = |seed| -> Vec<(String, Vec<f32>)> {
        let model = Model::build(&net, seed, 0.1, &crate::cpu()).unwrap();
        model
            .named_vars()
            .iter()
            .map(|named| {
                let values = named.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (named.name.clone(), values)
            })
            .collect()
    };
    assert_eq!(weights(42), weights(42));
    assert_ne!(weights(42), weights(43));
}

#[test]
fn batch_norm_running_stats_move_in_train_mode_only() {
    let net = nets::tiny(deepmad_design::BlockKind::Basic, 3, 8, 10);
    let model = Model::build(&net, 1, 0.1, &crate::cpu()).unwrap();
    let running_mean = || -> Vec<f32> {
        let vars = model.named_vars();
        let named = vars
            .iter()
            .find(|n| n.name == "stem.bn.running_mean")
            .unwrap();
        named.var.to_vec1().unwrap()
    };
    let before = running_mean();
    let xs = (Tensor::randn(0f32, 1., (4, 3, 8, 8), &crate::cpu()).unwrap() + 3.0).unwrap();
    model.forward_t(&xs, false).unwrap();
    assert_eq!(
        running_mean(),
        before,
        "eval mode must not touch running stats"
    );
    model.forward_t(&xs, true).unwrap();
    assert_ne!(running_mean(), before, "train mode updates running stats");
}

/// Same seed, same initial weights on CPU and CUDA (values are drawn on the CPU, then copied),
/// and both devices compute the same training-mode forward pass and gradients up to float
/// rounding. Needs a GPU and a build with `--features cuda`; not run on CI.
#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_cpu_weights_forward_and_gradients() {
    let cuda = candle_core::Device::new_cuda(0).expect("a CUDA device");
    let cpu = crate::cpu();
    let values = |tensor: &Tensor| -> Vec<f32> {
        let on_cpu = tensor.to_device(&cpu).unwrap();
        on_cpu.flatten_all().unwrap().to_vec1().unwrap()
    };
    for (name, net) in nets::all_families(3, 16, 10) {
        let on_cpu = Model::build(&net, 7, 0.1, &cpu).unwrap();
        let on_gpu = Model::build(&net, 7, 0.1, &cuda).unwrap();
        for (a, b) in on_cpu.named_vars().iter().zip(on_gpu.named_vars()) {
            assert_eq!(a.name, b.name);
            assert_eq!(
                values(a.var.as_tensor()),
                values(b.var.as_tensor()),
                "{name}: {}",
                a.name
            );
        }
        let xs = Tensor::randn(0f32, 1., (4, 3, 16, 16), &cpu).unwrap();
        let cpu_logits = on_cpu.forward_t(&xs, true).unwrap();
        let gpu_logits = on_gpu
            .forward_t(&xs.to_device(&cuda).unwrap(), true)
            .unwrap();
        let difference = (cpu_logits.clone() - gpu_logits.to_device(&cpu).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(difference < 1e-3, "{name}: logits differ by {difference}");
        let cpu_grads = cpu_logits
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gpu_grads = gpu_logits
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (a, b) in on_cpu.named_vars().iter().zip(on_gpu.named_vars()) {
            if a.role == VarRole::Buffer {
                continue;
            }
            let (ga, gb) = (
                cpu_grads.get(a.var.as_tensor()),
                gpu_grads.get(b.var.as_tensor()),
            );
            let (ga, gb) = (values(ga.unwrap()), values(gb.unwrap()));
            let worst = ga
                .iter()
                .zip(&gb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let scale = ga.iter().map(|x| x.abs()).fold(1e-3f32, f32::max);
            assert!(
                worst / scale < 1e-2,
                "{name}: gradient of {} differs",
                a.name
            );
        }
    }
}
