#!/usr/bin/env python3
"""Reference DeepLabV3 models for the converter and model tests.

    /opt/torchvenv/bin/python tools/gen_model_fixtures.py            # writes the small fixtures
    swift build -c release && /opt/torchvenv/bin/python tools/gen_model_fixtures.py --full   # full ResNet-50/101 check

Small fixtures (committed, Tests/HRHFTests/Fixtures/models/):
  tv_small.*   torchvision DeepLabV3 (Bottleneck, reduced width and depth, aux head, output
               stride 8) built from torchvision's own ResNet._make_layer, ASPP and FCNHead, so the
               keys are torchvision's: .pth (zip), _legacy.pth, .safetensors, _logits.safetensors
  tv_basic.*   the small basic-block variant (torchvision keys, dilated basic blocks)
  mib_small.*  MiB/PLOP flavour rebuilt here with plain batch norm + leaky ReLU and MiB's key
               names, saved as MiB does: {"model_state": {"module.body...": ...}, "epoch": ...}
Batch-norm statistics and affine parameters are randomised so evaluation mode is exercised.
Each *_logits.safetensors holds `input` (normalised images), `logits` (upsampled) and, for
torchvision models with an aux head, `aux`.

--full builds torchvision's deeplabv3_resnet50 and deeplabv3_resnet101 (random weights),
saves them as .pth, converts them with hrhf-convert, runs hrhf-predict --logits on a PNG, and
prints the relative error of the logits and the conversion time.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

from fixture_io import save_safetensors

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck, BasicBlock, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.models._utils import IntermediateLayerGetter

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "Tests", "HRHFTests", "Fixtures", "models")


class DilatedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with dilation allowed (same keys)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None):
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)


class ReducedResNet(ResNet):
    """torchvision's ResNet with a chosen stem width, built by its own _make_layer."""

    def __init__(self, block, layers, width, replace_stride_with_dilation):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        r = replace_stride_with_dilation
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2, dilate=r[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2, dilate=r[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2, dilate=r[2])


def torchvision_deeplab(block, layers, width, head, num_classes, output_stride, aux):
    replace = [False, True, True] if output_stride == 8 else [False, False, True]
    rates = [12, 24, 36] if output_stride == 8 else [6, 12, 18]
    resnet = ReducedResNet(block, layers, width, replace)
    exp = block.expansion
    return_layers = {"layer4": "out", "layer3": "aux"} if aux else {"layer4": "out"}
    backbone = IntermediateLayerGetter(resnet, return_layers=return_layers)
    classifier = nn.Sequential(ASPP(width * 8 * exp, rates, head), nn.Conv2d(head, head, 3, padding=1, bias=False),
                               nn.BatchNorm2d(head), nn.ReLU(), nn.Conv2d(head, num_classes, 1))
    aux_classifier = FCNHead(width * 4 * exp, num_classes) if aux else None
    return DeepLabV3(backbone, classifier, aux_classifier)


# --- MiB flavour, rebuilt with plain batch norm + leaky ReLU and MiB's key names ---------------

class ABN(nn.Module):
    """inplace-ABN 1.0.7 as batch norm + activation; no num_batches_tracked."""

    def __init__(self, c, activation="leaky_relu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.activation = activation

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)
        return F.leaky_relu(x, 0.01) if self.activation == "leaky_relu" else x


class MiBBlock(nn.Module):
    def __init__(self, in_channels, channels, stride, dilation):
        super().__init__()
        self.convs = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, channels[0], 1, bias=False)), ("bn1", ABN(channels[0])),
            ("conv2", nn.Conv2d(channels[0], channels[1], 3, stride=stride, padding=dilation, dilation=dilation, bias=False)),
            ("bn2", ABN(channels[1])),
            ("conv3", nn.Conv2d(channels[1], channels[2], 1, bias=False)), ("bn3", ABN(channels[2], "identity")),
        ]))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = nn.Conv2d(in_channels, channels[-1], 1, stride=stride, bias=False)
            self.proj_bn = ABN(channels[-1], "identity")

    def forward(self, x):
        residual = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
        return F.leaky_relu(self.convs(x) + residual, 0.01)


class MiBBody(nn.Module):
    def __init__(self, structure, width, output_stride):
        super().__init__()
        dilation = [1, 1, 1, 2] if output_stride == 16 else [1, 1, 2, 4]
        self.mod1 = nn.Sequential(OrderedDict([("conv1", nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)),
                                               ("bn1", ABN(width)), ("pool1", nn.MaxPool2d(3, stride=2, padding=1))]))
        in_channels, channels = width, (width, width, width * 4)
        for mod_id, num in enumerate(structure):
            blocks = []
            for block_id in range(num):
                d = dilation[mod_id]
                s = 2 if d == 1 and block_id == 0 and mod_id > 0 else 1
                blocks.append(("block%d" % (block_id + 1), MiBBlock(in_channels, channels, s, d)))
                in_channels = channels[-1]
            self.add_module("mod%d" % (mod_id + 2), nn.Sequential(OrderedDict(blocks)))
            channels = [c * 2 for c in channels]

    def forward(self, x):
        for m in [self.mod1, self.mod2, self.mod3, self.mod4, self.mod5]:
            x = m(x)
        return x


class MiBHead(nn.Module):
    def __init__(self, in_channels, out_channels, hidden, output_stride):
        super().__init__()
        d = [6, 12, 18] if output_stride == 16 else [12, 24, 32]
        self.map_convs = nn.ModuleList([nn.Conv2d(in_channels, hidden, 1, bias=False)] + [
            nn.Conv2d(in_channels, hidden, 3, bias=False, dilation=r, padding=r) for r in d])
        self.map_bn = ABN(hidden * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.global_pooling_bn = ABN(hidden)
        self.red_conv = nn.Conv2d(hidden * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.red_bn = ABN(out_channels)

    def forward(self, x):
        out = self.red_conv(self.map_bn(torch.cat([m(x) for m in self.map_convs], 1)))
        pool = x.view(x.size(0), x.size(1), -1).mean(dim=-1).view(x.size(0), x.size(1), 1, 1)
        pool = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(pool)))
        return self.red_bn(out + pool.repeat(1, 1, x.size(2), x.size(3)))


class MiBModel(nn.Module):
    def __init__(self, structure, width, hidden, classes, output_stride):
        super().__init__()
        self.body = MiBBody(structure, width, output_stride)
        self.head = MiBHead(width * 32, hidden, hidden, output_stride)
        self.cls = nn.ModuleList([nn.Conv2d(hidden, c, 1) for c in classes])

    def forward(self, x):
        f = self.head(self.body(x))
        out = torch.cat([m(f) for m in self.cls], 1)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, ABN)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def reference_logits(model, x):
    model = model.double().eval()
    with torch.no_grad():
        out = model(x.double())
    model.float()
    if isinstance(out, dict):
        return {k: v.float() for k, v in out.items()}
    return {"out": out.float()}


def write_small(name, model, x, wrap):
    os.makedirs(OUT, exist_ok=True)
    sd = model.state_dict()
    ref = reference_logits(model, x)
    obj = wrap(sd)
    torch.save(obj, os.path.join(OUT, name + ".pth"))
    torch.save(obj, os.path.join(OUT, name + "_legacy.pth"), _use_new_zipfile_serialization=False)
    save_safetensors(os.path.join(OUT, name + ".safetensors"), {k: v for k, v in sd.items()})
    logits = {"input": x, "logits": ref["out"]}
    if "aux" in ref:
        logits["aux"] = ref["aux"]
    save_safetensors(os.path.join(OUT, name + "_logits.safetensors"), logits)
    size = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT) if f.startswith(name))
    print(f"{name}: {len(sd)} keys, {sum(v.numel() for v in sd.values())} values, logits {tuple(ref['out'].shape)}, {size} bytes")


def small_fixtures():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 37, 45)
    tv = torchvision_deeplab(Bottleneck, [1, 1, 1, 1], 4, 8, 5, 8, aux=True)
    randomise(tv, 1)
    write_small("tv_small", tv, x, lambda sd: sd)

    basic = torchvision_deeplab(DilatedBasicBlock, [1, 1, 1, 1], 8, 8, 4, 8, aux=False)
    randomise(basic, 2)
    write_small("tv_basic", basic, x, lambda sd: {"state_dict": sd})

    mib = MiBModel([1, 1, 2, 1], 4, 8, [4, 2], 16)
    randomise(mib, 3)
    x_mib = torch.randn(1, 3, 48, 40)
    write_small("mib_small", mib, x_mib,
                lambda sd: {"model_state": OrderedDict(("module." + k, v) for k, v in sd.items()),
                            "epoch": 29, "best_score": 0.731})


class Exploit:
    """An object whose unpickling would call a function: the restricted reader must refuse it."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def hostile_fixtures():
    """Checkpoints a converter must refuse without running anything (Fixtures/models/hostile)."""
    import builtins
    import io
    import pickle
    import zipfile

    out = os.path.join(OUT, "hostile")
    os.makedirs(out, exist_ok=True)
    marker = "/tmp/hrhf-pwned"
    for name, payload in [("os_system", Exploit(os.system, "touch " + marker)),
                          ("builtins_eval", Exploit(builtins.eval, "open('%s', 'w')" % marker))]:
        body = pickle.dumps({"backbone.conv1.weight": payload}, protocol=2)
        with zipfile.ZipFile(os.path.join(out, name + ".pth"), "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", body)
            z.writestr("archive/version", "3\n")
        with open(os.path.join(out, name + "_legacy.pth"), "wb") as f:
            pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
            pickle.dump(1001, f, protocol=2)
            pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
            f.write(body)
    # A real checkpoint whose first storage record lost its second half.
    src = os.path.join(OUT, "tv_small.pth")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(os.path.join(out, "short_storage.pth"), "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data/0"):
                data = data[: len(data) // 2]
            zout.writestr(info.filename, data)
    # A storage class the reader does not know (complex numbers).
    t = torch.zeros(2, dtype=torch.complex64)
    torch.save({"backbone.conv1.weight": t}, os.path.join(out, "complex_dtype.pth"))
    print("hostile fixtures:", sorted(os.listdir(out)))


def full_check(build_dir):
    from PIL import Image
    from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

    tmp = tempfile.mkdtemp(prefix="hrhf-full-")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    png = os.path.join(tmp, "image.png")
    Image.fromarray(image).save(png)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((torch.from_numpy(image).float() / 255 - mean) / std).permute(2, 0, 1)[None]
    def mib_resnet101():
        return MiBModel([3, 4, 23, 3], 64, 256, [16, 1, 1, 1, 1], 16)

    cases = [("deeplabv3-resnet50", lambda: deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True), False),
             ("deeplabv3-resnet101", lambda: deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True), False),
             ("deeplabv3-resnet101-mib", mib_resnet101, True)]
    for arch, make, mib in cases:
        model = make()
        randomise(model, 4)
        pth = os.path.join(tmp, arch + ".pth")
        if mib:  # as MiB saves: PyTorch 1.2's legacy format, model_state, module. prefix
            torch.save({"model_state": OrderedDict(("module." + k, v) for k, v in model.state_dict().items()), "epoch": 30},
                       pth, _use_new_zipfile_serialization=False)
        else:
            torch.save(model.state_dict(), pth)
        ref = reference_logits(model, x)["out"]
        out = os.path.join(tmp, arch + ".safetensors")
        start = time.time()
        subprocess.run([os.path.join(build_dir, "hrhf-convert"), pth, "--arch", arch, "--classes", "voc",
                        "--out", out] + (["--step-classes", "16,1,1,1,1"] if mib else []), check=True)
        convert_seconds = time.time() - start
        npy = os.path.join(tmp, arch + ".npy")
        subprocess.run([os.path.join(build_dir, "hrhf-predict"), "--model", out, png, "--out", tmp, "--logits", npy],
                       check=True)
        ours = torch.from_numpy(np.load(npy))
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        print(f"{arch}: logits relative error {err:.2e}, conversion {convert_seconds:.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="check full ResNet-50/101 through the executables instead")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, ".build", "release"))
    args = ap.parse_args()
    if args.full:
        full_check(args.build_dir)
        return
    small_fixtures()
    hostile_fixtures()


if __name__ == "__main__":
    sys.exit(main())
