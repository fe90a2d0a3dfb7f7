#!/usr/bin/env python3
"""PyTorch reference for deepmad's training-throughput benchmark.

Builds, from deepmad design JSON files (the network IR of design/src/arch.rs), the same
networks the worker builds in candle (worker/src/model.rs, worker/src/blocks.rs), layer for
layer, and measures training images per second on synthetic data: forward, soft-target
cross-entropy, backward, SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4) step.

    python3 bench/torch_bench.py --design bench/designs/resnet20.json --device cpu \
        --batch 128 --steps 20 --warmup 5 --threads 2 [--json]

Needs only torch (bench/requirements.txt); nothing is downloaded at run time.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-5
BN_MOMENTUM = 0.01  # PyTorch convention, as the recipe's (Table 12); irrelevant to speed.
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

ACTIVATIONS = ("relu", "relu6", "silu")
BLOCKS = ("basic", "bottleneck", "mbconv")
NETWORK_KEYS = {"resolution", "in_channels", "num_classes", "activation", "stem", "stages", "head"}
STEM_KEYS = {"out", "kernel", "stride", "max_pool"}
STAGE_KEYS = {"block", "in", "out", "stride", "depth", "kernel", "mid", "se"}


class DesignError(ValueError):
    """A design JSON that is not a valid deepmad network."""


# ---------------------------------------------------------------------------------------------
# The IR (design/src/arch.rs)
# ---------------------------------------------------------------------------------------------


def _check_keys(obj, allowed, required, where):
    if not isinstance(obj, dict):
        raise DesignError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = set(obj) - allowed
    if unknown:
        raise DesignError(f"{where}: unknown field(s) {sorted(unknown)}")
    missing = set(required) - set(obj)
    if missing:
        raise DesignError(f"{where}: missing field(s) {sorted(missing)}")


def _positive_int(value, where):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DesignError(f"{where}: expected a positive integer, got {value!r}")
    return value


def parse_mid(mid, where):
    """`Mid` is an externally tagged enum: {"width": w} or {"ratio": t}; returns (kind, n)."""
    if mid is None:
        return None
    if not isinstance(mid, dict) or len(mid) != 1 or next(iter(mid)) not in ("width", "ratio"):
        raise DesignError(f"{where}: expected {{\"width\": n}} or {{\"ratio\": n}}, got {mid!r}")
    kind, value = next(iter(mid.items()))
    return kind, _positive_int(value, f"{where}.{kind}")


def load_network(path):
    """Reads a design: a bare `Network`, or an object holding one under "network" (and maybe
    "params"). Returns (network dict, expected params or None)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    expected = None
    if isinstance(data, dict) and "network" in data:
        expected = data.get("params")
        data = data["network"]
    validate_network(data, "network")
    return data, expected


def validate_network(net, where):
    """Checks the shape of the JSON and the rules of `Network::validate` that the build needs."""
    _check_keys(net, NETWORK_KEYS, NETWORK_KEYS - {"head"}, where)
    for key in ("resolution", "in_channels", "num_classes"):
        _positive_int(net[key], f"{where}: {key}")
    if net["activation"] not in ACTIVATIONS:
        raise DesignError(f"{where}: activation must be one of {ACTIVATIONS}, got {net['activation']!r}")
    stem = net["stem"]
    _check_keys(stem, STEM_KEYS, STEM_KEYS - {"max_pool"}, f"{where}: stem")
    for key in ("out", "kernel", "stride"):
        _positive_int(stem[key], f"{where}: stem.{key}")
    if not isinstance(net["stages"], list) or not net["stages"]:
        raise DesignError(f"{where}: stages must be a non-empty list")
    previous = stem["out"]
    for index, stage in enumerate(net["stages"]):
        at = f"{where}: stages[{index}]"
        _check_keys(stage, STAGE_KEYS, STAGE_KEYS - {"mid", "se"}, at)
        if stage["block"] not in BLOCKS:
            raise DesignError(f"{at}.block must be one of {BLOCKS}, got {stage['block']!r}")
        for key in ("in", "out", "stride", "depth", "kernel"):
            _positive_int(stage[key], f"{at}.{key}")
        if stage["in"] != previous:
            raise DesignError(f"{at}.in is {stage['in']} but the previous layer outputs {previous}")
        if stage["kernel"] % 2 == 0:
            raise DesignError(f"{at}.kernel must be odd, got {stage['kernel']}")
        mid = parse_mid(stage.get("mid"), f"{at}.mid")
        if (stage["block"] == "basic") != (mid is None):
            raise DesignError(f"{at}.mid: basic blocks have none, the other families need one")
        if stage["block"] == "bottleneck" and mid[0] != "width":
            raise DesignError(f"{at}.mid: bottleneck blocks take an absolute width")
        if stage.get("se", False) and stage["block"] != "mbconv":
            raise DesignError(f"{at}.se: squeeze-excitation is only defined for mbconv blocks")
        previous = stage["out"]
    if net.get("head") is not None:
        _positive_int(net["head"], f"{where}: head")


def mid_width(stage, index):
    """`Stage::mid_width`: an absolute width, or the block's input channels times the ratio."""
    mid = parse_mid(stage.get("mid"), "mid")
    if mid is None:
        return None
    block_in = stage["in"] if index == 0 else stage["out"]
    kind, value = mid
    return value if kind == "width" else block_in * value


def final_channels(net):
    return net["head"] if net.get("head") is not None else net["stages"][-1]["out"]


def count_params(net):
    """Trainable parameters as design/src/count.rs counts them (an independent check)."""

    def conv_bn(cin, cout, kernel, groups=1):
        return (cin // groups) * cout * kernel * kernel + 2 * cout

    stem = net["stem"]
    total = conv_bn(net["in_channels"], stem["out"], stem["kernel"])
    for stage in net["stages"]:
        cout, k = stage["out"], stage["kernel"]
        for index, copies in ((0, 1), (1, stage["depth"] - 1)):
            cin = stage["in"] if index == 0 else cout
            stride = stage["stride"] if index == 0 else 1
            projection = conv_bn(cin, cout, 1) if (stride != 1 or cin != cout) else 0
            if stage["block"] == "basic":
                block = conv_bn(cin, cout, k) + conv_bn(cout, cout, k) + projection
            elif stage["block"] == "bottleneck":
                mid = mid_width(stage, index)
                block = conv_bn(cin, mid, 1) + conv_bn(mid, mid, k) + conv_bn(mid, cout, 1) + projection
            else:
                mid = mid_width(stage, index)
                block = 0
                if parse_mid(stage["mid"], "mid") != ("ratio", 1):
                    block += conv_bn(cin, mid, 1)
                block += conv_bn(mid, mid, k, groups=mid)
                if stage.get("se", False):
                    squeeze = max(1, cin // 4)
                    block += mid * squeeze + squeeze + squeeze * mid + mid
                block += conv_bn(mid, cout, 1)
            total += block * copies
    last = net["stages"][-1]["out"]
    if net.get("head") is not None:
        total += conv_bn(last, net["head"], 1)
    total += final_channels(net) * net["num_classes"] + net["num_classes"]
    return total


# ---------------------------------------------------------------------------------------------
# The model (worker/src/model.rs, worker/src/blocks.rs)
# ---------------------------------------------------------------------------------------------


def make_activation(name):
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    return nn.SiLU(inplace=True)


class ConvBn(nn.Sequential):
    """Conv without bias, padding k // 2, then BatchNorm2d (no activation)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
        )


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: pool, 1x1 conv (bias), activation, 1x1 conv, sigmoid."""

    def __init__(self, channels, squeeze, activation):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.act = make_activation(activation)

    def forward(self, xs):
        scale = F.adaptive_avg_pool2d(xs, 1)
        scale = self.expand(self.act(self.reduce(scale)))
        return xs * torch.sigmoid(scale)


class Basic(nn.Module):
    def __init__(self, cin, cout, kernel, stride, activation):
        super().__init__()
        self.conv1 = ConvBn(cin, cout, kernel, stride)
        self.conv2 = ConvBn(cout, cout, kernel)
        needs_projection = stride != 1 or cin != cout
        self.shortcut = ConvBn(cin, cout, 1, stride) if needs_projection else None
        self.act1 = make_activation(activation)
        self.act2 = make_activation(activation)

    def forward(self, xs):
        ys = self.conv2(self.act1(self.conv1(xs)))
        shortcut = xs if self.shortcut is None else self.shortcut(xs)
        return self.act2(ys + shortcut)


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, mid, kernel, stride, activation):
        super().__init__()
        self.conv1 = ConvBn(cin, mid, 1)
        self.conv2 = ConvBn(mid, mid, kernel, stride)
        self.conv3 = ConvBn(mid, cout, 1)
        needs_projection = stride != 1 or cin != cout
        self.shortcut = ConvBn(cin, cout, 1, stride) if needs_projection else None
        self.act1 = make_activation(activation)
        self.act2 = make_activation(activation)
        self.act3 = make_activation(activation)

    def forward(self, xs):
        ys = self.act1(self.conv1(xs))
        ys = self.act2(self.conv2(ys))
        ys = self.conv3(ys)
        shortcut = xs if self.shortcut is None else self.shortcut(xs)
        return self.act3(ys + shortcut)


class Mbconv(nn.Module):
    def __init__(self, cin, cout, mid, kernel, stride, expand, se, activation):
        super().__init__()
        layers = []
        if expand:
            layers += [ConvBn(cin, mid, 1), make_activation(activation)]
        layers += [ConvBn(mid, mid, kernel, stride, groups=mid), make_activation(activation)]
        if se:
            layers.append(SqueezeExcite(mid, max(1, cin // 4), activation))
        layers.append(ConvBn(mid, cout, 1))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, xs):
        ys = self.body(xs)
        return ys + xs if self.residual else ys


class DeepmadNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        activation = net["activation"]
        stem = net["stem"]
        layers = [
            ConvBn(net["in_channels"], stem["out"], stem["kernel"], stem["stride"]),
            make_activation(activation),
        ]
        if stem.get("max_pool", False):
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        for stage in net["stages"]:
            for index in range(stage["depth"]):
                cin = stage["in"] if index == 0 else stage["out"]
                stride = stage["stride"] if index == 0 else 1
                cout, kernel = stage["out"], stage["kernel"]
                if stage["block"] == "basic":
                    layers.append(Basic(cin, cout, kernel, stride, activation))
                elif stage["block"] == "bottleneck":
                    mid = mid_width(stage, index)
                    layers.append(Bottleneck(cin, cout, mid, kernel, stride, activation))
                else:
                    mid = mid_width(stage, index)
                    # As torchvision (and the worker): an expansion ratio of 1 has no expand conv.
                    expand = parse_mid(stage["mid"], "mid") != ("ratio", 1)
                    se = stage.get("se", False)
                    layers.append(Mbconv(cin, cout, mid, kernel, stride, expand, se, activation))
        if net.get("head") is not None:
            layers += [ConvBn(net["stages"][-1]["out"], net["head"], 1), make_activation(activation)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(final_channels(net), net["num_classes"])

    def forward(self, xs):
        return self.classifier(self.features(xs).mean((2, 3)))


def trainable_params(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def soft_cross_entropy(logits, targets):
    """deepmad's loss (worker/src/loss.rs)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def make_optimizer(model):
    # As the worker's Sgd (worker/src/optim.rs): decay on conv and classifier weights only,
    # none on BatchNorm parameters and biases (rank-1 tensors). Same work per step either way.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, nesterov=True)


def measure(net, device, batch, mode, steps, warmup, sync_each_step=False):
    """Returns seconds per timed training step."""
    torch.manual_seed(0)
    model = DeepmadNet(net).to(device)
    model.train()
    side = net["resolution"]
    xs = torch.randn(batch, net["in_channels"], side, side, device=device)
    targets = torch.full((batch, net["num_classes"]), 1.0 / net["num_classes"], device=device)
    bf16 = mode == "bf16-cl"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        xs = xs.contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(model)
    is_cuda = device.type == "cuda"

    def step():
        if bf16:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = soft_cross_entropy(model(xs), targets)
        else:
            loss = soft_cross_entropy(model(xs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync_each_step:
            loss.item()  # waits for the device, as the candle side's `loss.to_scalar()`
        return loss

    for _ in range(warmup):
        step()
    if is_cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if is_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss.detach().float()).item():
        print(f"warning: the last loss is {loss.item()} (not finite)", file=sys.stderr)
    del model, optimizer, xs, targets, loss
    if is_cuda:
        torch.cuda.empty_cache()
    return seconds / steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="PyTorch training throughput of deepmad designs (reference for candle)."
    )
    parser.add_argument("--design", action="append", required=True, type=Path,
                        help="design JSON (deepmad's network IR); repeatable")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", action="append", type=int,
                        help="batch size; repeatable (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--mode", choices=("fp32", "bf16-cl", "all"), default="all",
                        help="fp32: eager NCHW fp32; bf16-cl (cuda only): bf16 autocast + "
                             "channels_last; all (default): every mode valid for the device")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU intra-op threads)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="set torch.backends.cudnn.benchmark (off by default, as PyTorch)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="disable TF32 for cuDNN convolutions (PyTorch enables it by default; "
                             "matmul TF32 is off by default either way)")
    parser.add_argument("--sync-each-step", action="store_true",
                        help="read the loss back after every step (as the candle side does), "
                             "instead of synchronizing only around the timed loop")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    args.batch = args.batch or [128]
    if any(b < 2 for b in args.batch):
        parser.error("--batch must be at least 2 (BatchNorm in training mode)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cpu" and args.mode == "bf16-cl":
        parser.error("--mode bf16-cl needs --device cuda")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but torch.cuda.is_available() is false")
        device = torch.device("cuda", 0)
        device_name = f"cuda:0 ({torch.cuda.get_device_name(device)})"
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        if args.no_tf32:
            torch.backends.cudnn.allow_tf32 = False
        tf32 = bool(torch.backends.cudnn.allow_tf32)
        modes = ["fp32", "bf16-cl"] if args.mode == "all" else [args.mode]
    else:
        device = torch.device("cpu")
        device_name = "cpu"
        tf32 = False
        modes = ["fp32"]

    designs = []
    for path in args.design:
        try:
            net, expected = load_network(path)
        except (OSError, json.JSONDecodeError, DesignError) as error:
            sys.exit(f"error: {path}: {error}")
        params = trainable_params(DeepmadNet(net))
        counted = count_params(net)
        if params != counted:
            sys.exit(f"error: {path}: the module has {params} parameters, count.rs rules give {counted}")
        if expected is not None and expected != params:
            sys.exit(f"error: {path}: the module has {params} parameters, the file says {expected}")
        designs.append((path.stem, net, params))

    for name, net, params in designs:
        for batch in args.batch:
            for mode in modes:
                s_per_step = measure(
                    net, device, batch, mode, args.steps, args.warmup, args.sync_each_step
                )
                images_per_s = batch / s_per_step
                threads = torch.get_num_threads()
                if args.json:
                    record = {
                        "framework": "pytorch",
                        "torch": torch.__version__,
                        "design": name,
                        "params": params,
                        "device": device_name,
                        "threads": threads,
                        "batch": batch,
                        "mode": mode,
                        "steps": args.steps,
                        "images_per_s": round(images_per_s, 2),
                        "s_per_step": round(s_per_step, 6),
                        "cudnn_benchmark": args.device == "cuda" and args.cudnn_benchmark,
                        "tf32": tf32,
                        "sync_each_step": args.sync_each_step,
                    }
                    print(json.dumps(record), flush=True)
                else:
                    extra = ""
                    if args.device == "cuda":
                        extra = f" cudnn.benchmark={args.cudnn_benchmark} tf32={tf32}"
                    if args.sync_each_step:
                        extra += " sync-each-step"
                    print(
                        f"pytorch {torch.__version__} {name:<12} params {params:>9} "
                        f"device {device_name} threads {threads} batch {batch} mode {mode}"
                        f"{extra}: {images_per_s:.1f} images/s ({s_per_step:.4f} s/step, "
                        f"{args.steps} steps after {args.warmup} warm-up)",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
