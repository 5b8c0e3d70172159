#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures of the core engine's tests.

    python3 -m venv /opt/torchvenv && /opt/torchvenv/bin/pip install torch torchvision
    /opt/torchvenv/bin/python tools/gen_core_fixtures.py

Outputs Tests/HRHFTests/Fixtures/core_ops.safetensors. Inputs are float32; the references
are computed by torch in float64 from those same float32 values and stored as float32, so the
Swift float32 results are compared with the exact answer, not with another float32 rounding.
Labels are stored as float32 values. Every tensor name is `case/role`.
"""
import os
import sys

from fixture_io import save_safetensors

import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "HRHFTests", "Fixtures", "core_ops.safetensors")


def f32(t):
    """A float32 tensor and its float64 copy holding the same values."""
    t = t.to(torch.float32)
    return t, t.double()


def main():
    torch.manual_seed(0)
    out = {}

    # conv2d: (name, N, Cin, Cout, H, W, k, stride, padding, dilation, groups, bias)
    conv_cases = [
        ("plain", 2, 3, 4, 7, 6, 3, 1, 1, 1, 1, True),
        ("strided", 2, 4, 6, 9, 8, 3, 2, 1, 1, 1, True),
        ("dilated", 1, 4, 5, 11, 10, 3, 1, 2, 2, 1, False),
        ("grouped", 2, 6, 4, 8, 8, 3, 1, 1, 1, 2, True),
        ("pointwise", 2, 5, 7, 6, 5, 1, 1, 0, 1, 1, True),
        ("strided_pointwise", 1, 4, 3, 7, 7, 1, 2, 0, 1, 1, False),
        ("k7s2", 1, 3, 4, 15, 13, 7, 2, 3, 1, 1, False),
        ("dilated_pad_wide", 1, 3, 2, 6, 6, 3, 1, 4, 4, 1, True),
        # Taps that read only padding (ASPP's large rates on small maps): only the centre is live,
        # then a row and a column of taps dead, then a strided 1x1 whose only tap misses.
        ("dead_taps", 2, 3, 4, 5, 5, 3, 1, 6, 6, 1, True),
        ("dead_tap_rows", 1, 4, 3, 4, 7, 3, 1, 5, 5, 1, False),
        ("no_live_tap", 1, 2, 3, 1, 1, 1, 3, 1, 1, 1, True),
    ]
    for name, n, cin, cout, h, w, k, s, p, d, g, b in conv_cases:
        x32, x = f32(torch.randn(n, cin, h, w))
        w32, wt = f32(torch.randn(cout, cin // g, k, k) * 0.3)
        b32, bt = f32(torch.randn(cout)) if b else (None, None)
        x.requires_grad_(True); wt.requires_grad_(True)
        if bt is not None:
            bt.requires_grad_(True)
        y = F.conv2d(x, wt, bt, stride=s, padding=p, dilation=d, groups=g)
        gy32, gy = f32(torch.randn_like(y))
        y.backward(gy)
        pre = f"conv/{name}/"
        out[pre + "x"], out[pre + "weight"], out[pre + "y"], out[pre + "gy"] = x32, w32, y, gy32
        out[pre + "gx"], out[pre + "gweight"] = x.grad, wt.grad
        out[pre + "config"] = torch.tensor([s, p, d, g], dtype=torch.float32)
        if bt is not None:
            out[pre + "bias"], out[pre + "gbias"] = b32, bt.grad

    # batch norm, train and eval
    for mode in ("train", "eval"):
        x32, x = f32(torch.randn(3, 4, 5, 6) * 2 + 0.5)
        bn = nn.BatchNorm2d(4).double()
        with torch.no_grad():
            bn.weight.copy_(torch.randn(4).float().double())
            bn.bias.copy_(torch.randn(4).float().double())
            bn.running_mean.copy_(torch.randn(4).float().double())
            bn.running_var.copy_((torch.rand(4) + 0.5).float().double())
        pre = f"batchnorm/{mode}/"
        out[pre + "weight"], out[pre + "bias"] = bn.weight.float(), bn.bias.float()
        out[pre + "running_mean_before"], out[pre + "running_var_before"] = bn.running_mean.float(), bn.running_var.float()
        bn.train(mode == "train")
        x.requires_grad_(True)
        y = bn(x)
        gy32, gy = f32(torch.randn_like(y))
        y.backward(gy)
        out[pre + "x"], out[pre + "y"], out[pre + "gy"], out[pre + "gx"] = x32, y, gy32, x.grad
        out[pre + "gweight"], out[pre + "gbias"] = bn.weight.grad, bn.bias.grad
        out[pre + "running_mean_after"], out[pre + "running_var_after"] = bn.running_mean, bn.running_var

    # bilinear resize, align_corners=False, up and down and uneven
    for name, (h, w), (oh, ow) in [("up", (5, 7), (13, 16)), ("down", (17, 15), (6, 4)), ("mixed", (8, 9), (3, 20))]:
        x32, x = f32(torch.randn(2, 3, h, w))
        x.requires_grad_(True)
        y = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
        gy32, gy = f32(torch.randn_like(y))
        y.backward(gy)
        pre = f"resize/{name}/"
        out[pre + "x"], out[pre + "y"], out[pre + "gy"], out[pre + "gx"] = x32, y, gy32, x.grad

    # max pool 3x3 stride 2 padding 1 (ResNet's stem), odd and even sizes
    for name, (h, w) in [("even", (8, 10)), ("odd", (9, 7))]:
        x32, x = f32(torch.randn(2, 3, h, w))
        x.requires_grad_(True)
        y = F.max_pool2d(x, 3, 2, 1)
        gy32, gy = f32(torch.randn_like(y))
        y.backward(gy)
        pre = f"maxpool/{name}/"
        out[pre + "x"], out[pre + "y"], out[pre + "gy"], out[pre + "gx"] = x32, y, gy32, x.grad

    # cross-entropy with ignore index 255, plain and with per-pixel weights
    x32, x = f32(torch.randn(2, 5, 4, 6) * 2)
    labels = torch.randint(0, 5, (2, 4, 6))
    labels[torch.rand(2, 4, 6) < 0.25] = 255
    weights32, weights = f32(torch.rand(2, 4, 6) * 1.5 + 0.5)
    x.requires_grad_(True)
    loss = F.cross_entropy(x, labels, ignore_index=255)
    loss.backward()
    out["ce/x"], out["ce/labels"], out["ce/loss"], out["ce/gx"] = x32, labels.float(), loss.reshape(1), x.grad
    x.grad = None
    valid = (labels != 255).sum()
    wloss = (F.cross_entropy(x, labels, ignore_index=255, reduction="none") * weights).sum() / valid
    wloss.backward()
    out["ce/weights"], out["ce/weighted_loss"], out["ce/weighted_gx"] = weights32, wloss.reshape(1), x.grad

    # softmax family over channels
    x32, x = f32(torch.randn(2, 4, 3, 5) * 3)
    out["softmax/x"] = x32
    out["softmax/softmax"] = F.softmax(x, 1)
    out["softmax/log_softmax"] = F.log_softmax(x, 1)
    out["softmax/logsumexp"] = torch.logsumexp(x, 1, keepdim=True)

    # one torchvision ResNet bottleneck with a strided downsample, train mode, end to end
    from torchvision.models.resnet import Bottleneck

    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    block = Bottleneck(16, 8, stride=2, downsample=down)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if name.endswith("bn1.weight") else 0))
        for name, b in block.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    for name, t in block.state_dict().items():
        out["block/param/" + name] = t.float()
    block = block.double().train()
    x32, x = f32(torch.randn(2, 16, 10, 9))
    x.requires_grad_(True)
    y = block(x)
    gy32, gy = f32(torch.randn_like(y))
    y.backward(gy)
    out["block/x"], out["block/y"], out["block/gy"], out["block/gx"] = x32, y, gy32, x.grad
    for name, p in block.named_parameters():
        out["block/grad/" + name] = p.grad
    for name, b in block.named_buffers():
        out["block/after/" + name] = b.float()

    # optimizers: the same gradient sequence through torch.optim for five steps
    p0 = torch.randn(3, 4)
    grads = [torch.randn(3, 4) for _ in range(5)]
    out["optim/p0"] = p0
    for i, g in enumerate(grads):
        out[f"optim/grad{i}"] = g
    configs = {
        "sgd_momentum": lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-2),
        "sgd_nesterov": lambda p: torch.optim.SGD([p], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        "sgd_plain": lambda p: torch.optim.SGD([p], lr=0.2),
        "adam": lambda p: torch.optim.Adam([p], lr=0.01),
        "adam_inversion": lambda p: torch.optim.Adam([p], lr=0.05, betas=(0.5, 0.9), weight_decay=1e-3),
    }
    for name, make in configs.items():
        p = p0.clone().double().requires_grad_(True)
        opt = make(p)
        for i, g in enumerate(grads):
            p.grad = g.double().clone()
            opt.step()
            out[f"optim/{name}/step{i}"] = p.detach().clone()

    # torch.optim.swa_utils.update_bn over three batches of a conv-bn-relu-conv-bn model (its
    # own seed, so the cases above keep their values).
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            t.copy_(torch.randn_like(t) * 0.5)
            if "running_var" in name:  # positive, around 1
                t.add_(1.0).abs_()
    model = model.double()
    for name, t in model.state_dict().items():
        out["update_bn/before/" + name] = t.float()
    batches = [f32(torch.randn(2, 3, 5, 6) * (1 + i) + i) for i in range(3)]
    for i, (b32, _) in enumerate(batches):
        out[f"update_bn/batch{i}"] = b32
    model.eval()
    torch.optim.swa_utils.update_bn([b for _, b in batches], model)
    assert not model.training
    for name, t in model.state_dict().items():
        out["update_bn/after/" + name] = t.float()

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_safetensors(OUT, out, {"generator": "tools/gen_core_fixtures.py", "torch": torch.__version__})
    print(f"wrote {len(out)} tensors to {os.path.relpath(OUT)} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
