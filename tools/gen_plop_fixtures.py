#!/usr/bin/env python3
"""Writes the PLOP reference fixtures from the authors' own code.

    git clone https://github.com/arthurdouillard/CVPR2021_PLOP /tmp/plop
    /opt/torchvenv/bin/python tools/gen_plop_fixtures.py /tmp/plop/train.py

Takes `entropy`, `features_distillation`, `_local_pod` and `Trainer.find_median` from PLOP's
train.py as written (parsed, not imported: the module needs apex and a GPU set-up) and runs them
on fixed inputs, with the settings PLOP's argparser gives method PLOP (pod local, pod_factor 0.01,
pod_logits, switch.after factor 0.0005 with extra channels summed, pseudo entropy, threshold
0.001, classif_adaptive_factor). The pseudo-labelling and adaptive factor of Trainer.train are
inline there; they are restated below line for line. Computed in float64 from float32 inputs.
Outputs Tests/HRHFTests/Fixtures/plop.safetensors; names are `case/role`.
"""
import ast
import math
import os
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from fixture_io import save_safetensors

OUT = os.path.join(os.path.dirname(__file__), "..", "Tests", "HRHFTests", "Fixtures", "plop.safetensors")


def plop_functions(path):
    """PLOP's functions, compiled from its source into one namespace."""
    tree = ast.parse(open(path).read())
    wanted = {"entropy", "features_distillation", "_local_pod", "_global_pod", "bce"}
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    nodes += [n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "find_median"]
    namespace = {"torch": torch, "F": F, "nn": nn, "math": math}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
    return namespace


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_plop_fixtures.py PATH/TO/CVPR2021_PLOP/train.py")
    plop = plop_functions(sys.argv[1])
    torch.manual_seed(0)
    out = {}
    old_classes, new_classes = 5, 2
    current = old_classes + new_classes

    # Local POD: stage sums, head features (10 px: regions of 10 // 4 = 2 leave a margin), logits.
    shapes = [(2, 4, 16, 16), (2, 8, 8, 8), (2, 6, 10, 10)]
    old_maps = [torch.randn(s) for s in shapes] + [torch.randn(2, old_classes, 8, 8) * 2]
    new_maps = [m + 0.3 * torch.randn_like(m) for m in old_maps[:-1]]
    new_maps.append(torch.cat([old_maps[-1], torch.randn(2, new_classes, 8, 8)], dim=1) + 0.2 * torch.randn(
        2, current, 8, 8))
    old64 = [m.float().double() for m in old_maps]
    new64 = [m.float().double().requires_grad_(True) for m in new_maps]
    options = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}
    loss = plop["features_distillation"](
        old64, new64, collapse_channels="local", labels=None, index_new_class=old_classes, pod_factor=0.01,
        prepro="pow", spp_scales=[1, 2, 4], pod_options=options, use_pod_schedule=True,
        nb_current_classes=current, nb_new_classes=new_classes)
    loss.backward()
    for i, (o, n) in enumerate(zip(old_maps, new64)):
        out[f"pod/old{i}"] = o
        out[f"pod/new{i}"] = n.detach()
        out[f"pod/grad_new{i}"] = n.grad
    out["pod/loss"] = loss.detach().reshape(1)

    # Equal maps: the distance is 0 and so is its gradient (the first iteration of a step).
    equal = [m.float().double().requires_grad_(True) for m in old_maps[:1]] + [
        torch.cat([old_maps[-1], torch.full((2, new_classes, 8, 8), -30.0)], dim=1).double().requires_grad_(True)]
    zero = plop["features_distillation"](
        [old64[0], old64[-1]], equal, collapse_channels="local", index_new_class=old_classes, pod_factor=0.01,
        prepro="pow", pod_options=options, nb_current_classes=current, nb_new_classes=new_classes)
    zero.backward()
    out["pod_equal/loss"] = zero.detach().reshape(1)
    out["pod_equal/grad_new0"] = equal[0].grad

    # Pseudo-labels: thresholds from two training batches (find_median), then one batch labelled.
    batches = []
    for _ in range(2):
        logits = torch.randn(3, old_classes, 6, 6) * 4
        labels = torch.randint(0, 3, (3, 6, 6))
        labels = torch.where(labels == 1, torch.full_like(labels, old_classes), labels)  # a new class
        labels = torch.where(labels == 2, torch.zeros_like(labels), labels)
        labels[0, 0, :3] = 255
        batches.append((logits.float().double(), labels))
    trainer = types.SimpleNamespace(
        nb_current_classes=current, pseudo_nb_bins=None, device="cpu", threshold=0.001, step_threshold=None,
        step=1)
    feed = iter(batches)
    trainer.model_old = lambda images, ret_intermediate=False: (next(feed)[0], {})
    loader = [(torch.zeros(1), labels) for _, labels in batches]
    logger = types.SimpleNamespace(info=lambda *a, **k: None)
    thresholds, max_entropy = plop["find_median"](trainer, loader, "cpu", logger, mode="entropy")
    for i, (logits, labels) in enumerate(batches):
        out[f"pseudo/old_logits{i}"] = logits
        out[f"pseudo/labels{i}"] = labels.double()
    out["pseudo/thresholds"] = thresholds[:old_classes].double()

    # Trainer.train with pseudo "entropy" and classif_adaptive_factor, on batch 0.
    outputs_old, labels = batches[0]
    labels = labels.clone()
    mask_background = labels < old_classes
    probs = torch.softmax(outputs_old, dim=1)
    max_probs, pseudo_labels = probs.max(dim=1)
    mask_valid_pseudo = (plop["entropy"](probs) / max_entropy) < thresholds[pseudo_labels]
    labels[~mask_valid_pseudo & mask_background] = 255
    labels[mask_valid_pseudo & mask_background] = pseudo_labels[mask_valid_pseudo & mask_background]
    num = (mask_valid_pseudo & mask_background).float().sum(dim=(1, 2))
    den = mask_background.float().sum(dim=(1, 2))
    factor = (num / (den + 1e-6))[:, None, None]
    outputs = (torch.randn(3, current, 6, 6) * 2).float().double().requires_grad_(True)
    ce = (factor * F.cross_entropy(outputs, labels, ignore_index=255, reduction="none")).mean()
    ce.backward()
    out["pseudo/new_logits"] = outputs.detach()
    out["pseudo/pseudo_labels"] = labels.double()
    out["pseudo/factor"] = factor.reshape(-1).double()
    out["pseudo/ce"] = ce.detach().reshape(1)
    out["pseudo/grad_new_logits"] = outputs.grad
    save_safetensors(OUT, out, metadata={"source": "arthurdouillard/CVPR2021_PLOP train.py"})
    print(f"wrote {len(out)} tensors to {os.path.normpath(OUT)}; pod loss {loss.item():.6g}, "
          f"thresholds {[round(v, 6) for v in thresholds[:old_classes].tolist()]}, ce {ce.item():.6g}")


if __name__ == "__main__":
    main()
