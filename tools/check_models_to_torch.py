#!/usr/bin/env python3
"""Models back to PyTorch: a distilled native model loads in torchvision and in MiB's layout with
the logits hrhf-predict gives. Run by hand (CI has no torch):

    swift build -c release --product hrhf-convert   # and hrhf-data, hrhf-distill, hrhf-predict
    /opt/torchvenv/bin/python tools/check_models_to_torch.py [--build-dir .build/release] [--fixture]

For each of a torchvision DeepLabV3-ResNet-50 (16 outputs, random weights) and a MiB ResNet-101
(16 outputs, built by MiB's keys as gen_model_fixtures.py does): save the PyTorch checkpoint,
hrhf-convert it, run one hrhf-distill step (task 15-5 step 1 on a tiny hrhf-data shapes set: the
classifier grows to 21 outputs), then load the distilled .safetensors in PyTorch — torchvision's
model through safetensors.torch.load_file + load_state_dict(strict=True), MiB's by its keys — and
compare its logits with hrhf-predict --logits on the same PNG (relative error: max |a - b| over
max |b|, must be at most 1e-4). Prints the figures; exit status 1 if a comparison fails.

--fixture also writes Tests/HRHFTests/Fixtures/models/distilled_small.safetensors (a distilled
small model) and distilled_small_logits.safetensors (PyTorch's logits on its input), which
DistilledToTorchTests compares with the Swift forward pass.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.models.segmentation import deeplabv3_resnet50

from fixture_io import save_safetensors
from gen_model_fixtures import OUT, ROOT, DilatedBasicBlock, MiBModel, randomise, torchvision_deeplab

TOLERANCE = 1e-4


def run(build_dir, tool, *args):
    start = time.time()
    subprocess.run([os.path.join(build_dir, tool)] + [str(a) for a in args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - start


def torch_logits(model, png):
    """The model's logits on a PNG, normalised with ImageNet's mean and std as the card says."""
    image = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((image - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model.eval()(x)
    return x, (out["out"] if isinstance(out, dict) else out)


def distill(build_dir, tmp, name, pth, arch, extra):
    """hrhf-convert, one hrhf-distill step (15-5, step 1), hrhf-predict --logits; returns the
    distilled model, a PNG and hrhf-predict's logits on it."""
    data = os.path.join(tmp, "shapes")
    if not os.path.isdir(data):
        run(build_dir, "hrhf-data", "shapes", "--out", data, "--train", 8, "--val", 2, "--size", 64)
    native = os.path.join(tmp, name + ".safetensors")
    seconds = run(build_dir, "hrhf-convert", pth, "--arch", arch, "--classes", "shapes", "--step-classes", 16,
                  "--out", native, *extra)
    distilled = os.path.join(tmp, name + "-step1.safetensors")
    seconds_distill = run(build_dir, "hrhf-distill", "--old", native, "--data", data, "--task", "15-5", "--step", 1,
                          "--method", "ft", "--iterations", 2, "--batch", 2, "--crop", 64, "--eval-limit", 1,
                          "--out", distilled)
    png = os.path.join(data, "JPEGImages", sorted(os.listdir(os.path.join(data, "JPEGImages")))[0])
    print(f"{name}: converted in {seconds:.1f} s, one distillation step (2 iterations) in {seconds_distill:.1f} s")
    return distilled, png, predict(build_dir, tmp, distilled, png)


def predict(build_dir, tmp, model, png):
    """hrhf-predict --logits of `model` on `png`."""
    npy = os.path.join(tmp, os.path.basename(model) + ".npy")
    run(build_dir, "hrhf-predict", "--model", model, png, "--out", tmp, "--logits", npy)
    return torch.from_numpy(np.load(npy))


def compare(name, ours, theirs):
    err = ((theirs - ours).abs().max() / ours.abs().max()).item()
    ok = tuple(ours.shape) == tuple(theirs.shape) and err <= TOLERANCE
    print(f"{name}: logits {tuple(theirs.shape)}, max |torch - hrhf-predict| / max |hrhf-predict| = {err:.2e} "
          f"({'within' if ok else 'NOT within'} {TOLERANCE:.0e})")
    return ok


def torchvision_case(build_dir, tmp):
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=16)
    randomise(model, 5)
    pth = os.path.join(tmp, "tv50.pth")
    torch.save(model.state_dict(), pth)
    distilled, png, ours = distill(build_dir, tmp, "tv50", pth, "deeplabv3-resnet50", [])
    # The three lines of docs/pytorch-interop.md:
    grown = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    grown.load_state_dict(load_file(distilled), strict=True)
    return compare("torchvision deeplabv3_resnet50 (16 -> 21 classes)", ours, torch_logits(grown, png)[1])


def mib_case(build_dir, tmp):
    model = MiBModel([3, 4, 23, 3], 64, 256, [16], 16)
    randomise(model, 6)
    pth = os.path.join(tmp, "mib101.pth")
    torch.save({"model_state": OrderedDict(("module." + k, v) for k, v in model.state_dict().items())}, pth)
    distilled, png, ours = distill(build_dir, tmp, "mib101", pth, "deeplabv3-resnet101-mib", [])
    grown = MiBModel([3, 4, 23, 3], 64, 256, [16, 5], 16)
    grown.load_state_dict(load_file(distilled), strict=True)
    return compare("MiB ResNet-101 (cls.0: 16, cls.1: 5)", ours, torch_logits(grown, png)[1])


def fixture(build_dir, tmp):
    """A distilled small torchvision model and PyTorch's logits on its input, for the XCTest."""
    width, head = 4, 8
    model = torchvision_deeplab(DilatedBasicBlock, [1, 1, 1, 1], width, head, 16, 8, aux=False)
    randomise(model, 7)
    pth = os.path.join(tmp, "small.pth")
    torch.save(model.state_dict(), pth)
    arch = os.path.join(tmp, "tiny.json")
    with open(arch, "w") as f:
        json.dump({"name": "deeplabv3-tiny", "flavor": "torchvision", "block": "basic", "layers": [1, 1, 1, 1],
                   "baseWidth": width, "outputStride": 8, "asppRates": [12, 24, 36], "headChannels": head,
                   "auxHead": False, "classesPerStep": [16]}, f)
    distilled, png, _ = distill(build_dir, tmp, "small", pth, arch, [])
    crop = os.path.join(tmp, "crop.png")  # a 24 x 32 corner keeps the committed logits small
    Image.open(png).convert("RGB").crop((0, 0, 32, 24)).save(crop)
    ours = predict(build_dir, tmp, distilled, crop)
    grown = torchvision_deeplab(DilatedBasicBlock, [1, 1, 1, 1], width, head, 21, 8, aux=False)
    grown.load_state_dict(load_file(distilled), strict=True)
    x, theirs = torch_logits(grown, crop)
    ok = compare("small torchvision model (16 -> 21 classes)", ours, theirs)
    with open(distilled, "rb") as f:
        data = f.read()
    with open(os.path.join(OUT, "distilled_small.safetensors"), "wb") as f:
        f.write(data)
    save_safetensors(os.path.join(OUT, "distilled_small_logits.safetensors"), {"input": x, "logits": theirs})
    print(f"wrote {OUT}/distilled_small.safetensors ({len(data)} bytes) and distilled_small_logits.safetensors")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", default=os.path.join(ROOT, ".build", "release"))
    ap.add_argument("--fixture", action="store_true", help="also write the small distilled fixture")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="hrhf-to-torch-") as tmp:  # about 1 GB of checkpoints
        results = [torchvision_case(args.build_dir, tmp), mib_case(args.build_dir, tmp)]
        if args.fixture:
            results.append(fixture(args.build_dir, tmp))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
