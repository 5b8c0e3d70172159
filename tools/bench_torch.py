#!/usr/bin/env python3
"""PyTorch's side of tools/bench-vs-torch.sh: one workload of torchvision's DeepLabV3 on the CPU,
printed as one line in the same format as `hrhf-bench --network`.

    /opt/torchvenv/bin/python tools/bench_torch.py --workload eval|train|invert [--threads 2] [--size 256]
"""
import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

ap = argparse.ArgumentParser()
ap.add_argument("--workload", choices=["eval", "train", "invert"], required=True)
ap.add_argument("--arch", default="deeplabv3-resnet50")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--size", type=int, default=256)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--channels-last", action="store_true")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
make = deeplabv3_resnet50 if args.arch == "deeplabv3-resnet50" else deeplabv3_resnet101
model = make(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
batch = {"eval": 1, "train": 2, "invert": 4}[args.workload]
x = torch.randn(batch, 3, args.size, args.size)
labels = torch.randint(0, 21, (batch, args.size, args.size))
if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

if args.workload == "eval":
    model.eval()
    def body():
        with torch.no_grad():
            model(x)["out"]
elif args.workload == "train":
    model.train()
    def body():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)["out"], labels).backward()
else:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x.requires_grad_(True)
    def body():
        x.grad = None
        model(x)["out"].sum().backward()

body()
times = []
for _ in range(args.repeats):
    start = time.perf_counter()
    body()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"torch{'-cl' if args.channels_last else ''} {args.arch} {args.workload} batch={batch} seconds={statistics.median(times):.4f} peak_mb={peak:.0f}")
