#!/usr/bin/env python3
"""PyTorch reference of the zoo model's three jobs (issue 23), for tools/bench-vs-torch.sh.

The small architecture (`deeplabv3-small`) as a torch module loading the zoo's safetensors by
key, checked against the toolkit's logits, then one iteration of a job timed:

  synth     SegInversion at batch 8 (128 px): SAA in/out, absent classes, batch-norm statistics,
            TV (L2 and L1), image L2, random roll and flip; Adam, clip, best-state keeping.
  mib       MiB on 16 real images: new model forward+backward, old model forward, unbiased CE +
            10 x unbiased KD, SGD (nesterov, momentum 0.9, weight decay 1e-4).
  hrhf+gsc  8 real + 8 fake images: prototypical re-labelling, gradient-compensated unbiased CE,
            unbiased KD on both halves, folded CE on the fake half's confident old labels, soft,
            sharp and relation distillation; SGD.

The inputs come from `hrhf-bench --job JOB --dump DIR` (the toolkit's first iteration: images,
labels, targets, augmentation, prototypes, and its loss). The torch iteration recomputes that
loss first and exits 1 when it differs by more than --tolerance (relative); dropout is off for
that check on both sides (its masks come from different generators) and on for the timing.
Data loading is not timed here: the batches are tensors in memory.

    /opt/torchvenv/bin/python tools/bench_small_torch.py --job synth --inputs DIR \
        [--model zoo/shapes-15-5-step0.safetensors] [--threads 2] [--repeats 5] \
        [--logits-check IMAGE.png LOGITS.npy]
Prints one line: `torch JOB batch=... seconds=... it_per_s=... loss_delta=...`.
"""
import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torchvision.models.segmentation.deeplabv3 import ASPP


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, with the dilation the toolkit allows in it."""

    def __init__(self, inplanes, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Backbone(nn.Module):
    """ResNet with basic blocks, output stride 8 (layers 3 and 4 dilated, as torchvision)."""

    def __init__(self, width, layers):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        inplanes, dilation = width, 1
        for stage, blocks in enumerate(layers):
            planes, stride, previous = width << stage, 1 if stage == 0 else 2, dilation
            if stage >= 2:
                dilation, stride = dilation * stride, 1
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            mods = []
            for b in range(blocks):
                mods.append(BasicBlock(inplanes, planes, stride if b == 0 else 1, previous if b == 0 else dilation,
                                       downsample if b == 0 else None))
                inplanes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*mods))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallDeepLab(nn.Module):
    """`deeplabv3-small`: the keys of the zoo file (`backbone.*`, `classifier.0-4`)."""

    def __init__(self, arch, classes):
        super().__init__()
        width, head = arch["baseWidth"], arch["headChannels"]
        self.backbone = Backbone(width, arch["layers"])
        self.classifier = nn.Sequential(ASPP(width * 8, arch["asppRates"], head),
                                        nn.Conv2d(head, head, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(head), nn.ReLU(), nn.Conv2d(head, classes, 1))

    def run(self, x):
        """Logits at the input's size and the head's output (the 64-channel features)."""
        features = self.classifier[:4](self.backbone(x))
        logits = F.interpolate(self.classifier[4](features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, features

    def forward(self, x):
        return self.run(x)[0]


def load_model(path, extra_classes=0):
    """The zoo model; with `extra_classes`, extended as the toolkit's extendModel does (new rows
    copy the background row, their bias and the background's b_bg - log(extra + 1))."""
    with safe_open(path, "pt") as f:
        card = json.loads(f.metadata()["hrhf.card"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    arch = card["architecture"]
    old = sum(arch["classesPerStep"])
    model = SmallDeepLab(arch, old + extra_classes)
    if extra_classes:
        w, b = state["classifier.4.weight"], state["classifier.4.bias"]
        shared = b[0] - math.log(extra_classes + 1)
        state["classifier.4.weight"] = torch.cat([w, w[:1].expand(extra_classes, -1, -1, -1)])
        state["classifier.4.bias"] = torch.cat([b, shared.expand(extra_classes)])
        state["classifier.4.bias"][0] = shared
    model.load_state_dict(state, strict=True)
    return model, card


def npy(path):
    return torch.from_numpy(np.load(path))


# --- SegInversion ---------------------------------------------------------------------------

class BNStatistics:
    """DeepInversion's feature-statistics term, accumulated by forward pre-hooks."""

    def __init__(self, model, first_multiplier):
        self.first_multiplier = first_multiplier
        self.total = None
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        x = inputs[0]
        var, mu = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        term = (torch.sqrt(((mu - module.running_mean) ** 2).sum() + 1e-12)
                + torch.sqrt(((var - module.running_var) ** 2).sum() + 1e-12))
        self.total = term * self.first_multiplier if self.total is None else self.total + term


def top_mean(cumulative, k):
    """Mean of the top-k values per (image, class) from the descending cumulative sums; 0 where k is 0."""
    s = cumulative.gather(2, (k - 1).clamp(min=0).unsqueeze(2)).squeeze(2)
    return torch.where(k > 0, s / k.clamp(min=1), torch.zeros_like(s))


def total_variation(x):
    h, w = x.shape[-2:]
    pairs = [(x[..., :, :w - 1], x[..., :, 1:]), (x[..., :h - 1, :], x[..., 1:, :]),
             (x[..., 1:, :w - 1], x[..., :h - 1, 1:]), (x[..., :h - 1, :w - 1], x[..., 1:, 1:])]
    tv2 = tv1 = 0
    for a, b in pairs:
        d = a - b
        tv2 = tv2 + d.square().mean((1, 2, 3))
        tv1 = tv1 + d.abs().mean((1, 2, 3))
    return tv2, tv1


def synth_job(args, d):
    model, card = load_model(args.model)
    model.eval().requires_grad_(False)
    o = d["options"]
    stats = BNStatistics(model, o["firstBNMultiplier"])
    x = npy(f"{args.inputs}/x.npy").requires_grad_(True)
    b, _, h, w = x.shape
    hw = h * w
    k_in, k_out, k_abs = (torch.tensor(d[k], dtype=torch.long) for k in ("kIn", "kOut", "kAbs"))
    in_mask = (k_in > 0).float()
    out_mask = (k_out > 0).float()
    abs_weight = torch.tensor(d["absentWeights"], dtype=torch.float32)
    norm = card["normalization"]
    mean, std = torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)
    low, high = -mean / std, (1 - mean) / std
    adam = torch.optim.Adam([x], lr=d["learningRate"], betas=(0.5, 0.9), eps=1e-8)
    best = x.detach().clone()
    best_loss = torch.full((b,), math.inf)

    def loss_of(view):
        stats.total = None
        logits = model(view)
        logp = F.log_softmax(logits, 1).flatten(2)
        # One descending sort serves SAA (in) on log P and SAA (out) and absent classes on P.
        s_logp = logp.sort(dim=2, descending=True).values
        cs_logp = s_logp.cumsum(2)
        cs_p = s_logp.exp().cumsum(2)
        inside = -(top_mean(cs_logp, k_in) * in_mask).sum(1)
        beyond = (cs_p[..., -1] - cs_p.gather(2, (k_out - 1).clamp(min=0).unsqueeze(2)).squeeze(2))
        outside = (beyond / (hw - k_out).clamp(min=1) * out_mask).sum(1)
        absent = (top_mean(cs_p, k_abs) * abs_weight).sum(1)
        tv2, tv1 = total_variation(view)
        l2 = torch.sqrt(view.square().mean((1, 2, 3)) + 1e-12)
        per = (inside + o["lambdaOut"] * outside + o["lambdaAbsent"] * absent
               + o["weightTV2"] * tv2 + o["weightTV1"] * tv1 + o["weightL2"] * l2)
        return per, per.mean() + o["weightBN"] * stats.total

    def iteration(dy, dx, flip):
        view = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if flip:
            view = view.flip(3)
        per, loss = loss_of(view)
        with torch.no_grad():
            better = per < best_loss
            best_loss.copy_(torch.where(better, per, best_loss))
            best.copy_(torch.where(better.view(-1, 1, 1, 1), x, best))
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        with torch.no_grad():
            x.clamp_(low, high)
        return loss.item()

    first = iteration(d["dy"], d["dx"], d["flip"])
    jitter = o["jitter"]
    gen = torch.Generator().manual_seed(0)

    def body():
        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
        iteration(dy, dx, bool(torch.rand(1, generator=gen) < 0.5))

    return b, first, body


# --- Distillation ---------------------------------------------------------------------------

def merged_nll(logits, labels, merged, kept, weights):
    """Label 0 scores the union of the `merged` channels, labels 1..kept-1 their own; 255 ignored;
    mean over the pixels not ignored of weight x NLL (the toolkit's mergedBackgroundNLL)."""
    den = torch.logsumexp(logits, 1, keepdim=True)
    background = torch.logsumexp(logits[:, merged], 1, keepdim=True) - den
    logp = torch.cat([background, logits[:, 1:kept] - den], 1)
    nll = F.nll_loss(logp, labels, ignore_index=255, reduction="none")
    valid = (labels != 255).sum()
    if weights is not None:
        nll = nll * weights
    return nll.sum() / valid.clamp(min=1)


def unbiased_kd(new, old_logits, temperature):
    old = old_logits.shape[1]
    x = new / temperature
    q = F.softmax(old_logits / temperature, 1)
    den = torch.logsumexp(x, 1, keepdim=True)
    background = torch.logsumexp(torch.cat([x[:, :1], x[:, old:]], 1), 1, keepdim=True) - den
    per_pixel = q[:, :1] * background + (q[:, 1:] * (x[:, 1:old] - den)).sum(1, keepdim=True)
    return -per_pixel.mean() / old


def compensation_weights(logits, labels, step_of_class, current, z, w_min, w_max, merged):
    """GSC's step-aware weights (the toolkit's gradientCompensationWeights), without a gradient."""
    with torch.no_grad():
        p = F.softmax(logits, 1)
        p = torch.cat([p[:, :1] + p[:, merged].sum(1, keepdim=True), p[:, 1:]], 1)
        valid = labels != 255
        y = torch.where(valid, labels, torch.zeros_like(labels))
        step = step_of_class[y]
        old_px = valid & (step < current)
        g = (1 - p.gather(1, y.unsqueeze(1)).squeeze(1)).clamp(min=0).pow(z)
        sums = torch.zeros(current + 1, dtype=torch.float64).index_add_(0, step[old_px], g[old_px].double())
        counts = torch.bincount(step[old_px], minlength=current + 1).clamp(min=1)
        group_mean = (sums / counts).float()[step]
        w = torch.where(group_mean > 0, (g / group_mean.clamp(min=1e-30)).clamp(w_min, w_max), torch.ones_like(g))
        w = torch.where(old_px, w, torch.ones_like(w))
        return torch.where(valid, w, torch.zeros_like(w))


def relabel(labels, old_logits, old_features, prototypes, o):
    """GSC's prototypical re-labelling of the real labels' background (the toolkit's relabel)."""
    with torch.no_grad():
        n, c, h, w = old_logits.shape
        fh, fw = old_features.shape[-2:]
        confidence, argmax = F.softmax(old_logits, 1).max(1)
        cells = old_features.flatten(2).transpose(1, 2)
        known = ~torch.isnan(prototypes[:, 0])
        dist = torch.cdist(cells, prototypes[known].unsqueeze(0).expand(n, -1, -1),
                           compute_mode="donot_use_mm_for_euclid_dist")
        proto_logits = torch.full((n, cells.shape[1], c), -math.inf)
        proto_logits[..., known] = -dist / o["prototypeTemperature"]
        proto_p = F.softmax(proto_logits, 2)
        nearest = proto_logits.argmax(2)
        cell = ((torch.arange(h) * fh // h).view(-1, 1) * fw + (torch.arange(w) * fw // w).view(1, -1)).flatten()
        nearest_px = nearest[:, cell].view(n, h, w)
        flat = (cell.view(1, h, w) * c + argmax).flatten(1)
        p_px = proto_p.flatten(1).gather(1, flat).view(n, h, w)
        candidate = (labels == 0) & (argmax != 0)
        out = torch.where(candidate & (nearest_px != argmax), torch.full_like(labels, 255), labels)
        accept = (candidate & (nearest_px == argmax) & (p_px >= o["prototypeTau"])
                  & (confidence >= o["prototypeOldConfidence"]))
        return torch.where(accept, argmax, out)


def soft_distillation(new, old_logits, temperature):
    old = old_logits.shape[1]
    logp = F.log_softmax(new[:, :old] / temperature, 1)
    logq = F.log_softmax(old_logits / temperature, 1)
    pixels = old_logits.numel() // old
    return (logq.exp() * (logq - logp)).sum() * (temperature * temperature / pixels)


def sharp_entropy(new, old_logits, confidence):
    mask = (F.softmax(old_logits, 1).amax(1) >= confidence).float()
    logp = F.log_softmax(new, 1)
    entropy = -(logp.exp() * logp).sum(1)
    count = mask.sum()
    return (entropy * mask).sum() / count if count > 0 else (entropy * 0).sum()


def relation_distillation(new, old_logits):
    old = old_logits.shape[1]
    p_new = F.softmax(new[:, :old], 1)
    q = F.softmax(old_logits, 1)
    assign = F.one_hot(q.argmax(1), old).permute(0, 3, 1, 2).float()
    counts = assign.sum((0, 2, 3))
    rows_new = torch.einsum("nkhw,nchw->kc", assign, p_new) / counts.clamp(min=1).unsqueeze(1)
    rows_old = torch.einsum("nkhw,nchw->kc", assign, q) / counts.clamp(min=1).unsqueeze(1)
    rows = int((counts > 0).sum())
    return (rows_new - rows_old).abs().sum() / (max(rows, 1) * old)


def distill_job(args, d):
    old_model, card = load_model(args.model)
    old_model.eval().requires_grad_(False)
    old = sum(card["architecture"]["classesPerStep"])
    added = d["newClasses"]
    model, _ = load_model(args.model, extra_classes=added)
    model.train()
    o = d["options"]
    method = o["method"]
    # The method's loss table: weight by (term, half); the terms and halves this reference mirrors.
    weight = {(t["term"], t["half"]): t["weight"] for t in method["terms"]}
    mirrored = {("ce", "real"), ("kd", "real"), ("ce", "fake"), ("kd", "fake"),
                ("soft", "both"), ("sharp", "both"), ("rel", "both")}
    unmirrored = [f"{t}/{h}" for t, h in weight if (t, h) not in mirrored]
    unmirrored += [k for k in ("splitBatchNorm", "freezeBatchNorm") if o[k]]
    if method["trainingSet"] != "step":
        unmirrored.append(f"training set {method['trainingSet']}")
    if weight.get(("ce", "real"), 0) != 1:
        unmirrored.append("a real cross-entropy weight other than 1")
    if unmirrored or not o["fakeFoldsNewClasses"] or method["background"] not in ("unbiased", "proto"):
        sys.exit(f"options this reference does not mirror: {unmirrored}, background {method['background']}, "
                 f"fakeFoldsNewClasses {o['fakeFoldsNewClasses']}")
    o = dict(o, background=method["background"], gradientCompensation=method["gradientCompensation"],
             realKDWeight=weight.get(("kd", "real"), 0), fakeCEWeight=weight.get(("ce", "fake"), 0),
             fakeKDWeight=weight.get(("kd", "fake"), 0), softWeight=weight.get(("soft", "both"), 0),
             sharpWeight=weight.get(("sharp", "both"), 0), relationWeight=weight.get(("rel", "both"), 0))
    real = npy(f"{args.inputs}/real.npy")
    labels = npy(f"{args.inputs}/labels.npy").long()
    fake = npy(f"{args.inputs}/fake.npy") if d["fake"] else None
    prototypes = npy(f"{args.inputs}/prototypes.npy") if o["background"] == "proto" else None
    x = real if fake is None else torch.cat([real, fake])
    n_real, classes = real.shape[0], old + added
    step_of_class = torch.tensor([0] * old + [1] * added)
    z = old / added
    merged_real = torch.arange(0, old)
    merged_fake = torch.tensor([0] + list(range(old, classes)))
    sgd = torch.optim.SGD(model.parameters(), lr=d["learningRate"], momentum=0.9, weight_decay=1e-4, nesterov=True)

    def loss_of():
        with torch.no_grad():
            old_logits, old_features = old_model.run(x)
        logits = model(x)
        new_real, old_real = logits[:n_real], old_logits[:n_real]
        y = labels
        if o["background"] == "proto":
            y = relabel(labels, old_real, old_features[:n_real], prototypes, o)
        weights = None
        if o["gradientCompensation"]:
            weights = compensation_weights(new_real, y, step_of_class, 1, z, o["compensationMin"], o["compensationMax"],
                                           merged_real[1:])
        total = merged_nll(new_real, y, merged_real, classes, weights)
        if o["realKDWeight"] > 0:
            total = total + o["realKDWeight"] * unbiased_kd(new_real, old_real, o["kdTemperature"])
        if fake is not None:
            new_fake, old_fake = logits[n_real:], old_logits[n_real:]
            with torch.no_grad():
                best, arg = F.softmax(old_fake, 1).max(1)
                fake_labels = torch.where(best >= o["fakeConfidence"], arg, torch.full_like(arg, 255))
            fake_weights = None
            if o["gradientCompensation"]:
                fake_weights = compensation_weights(new_fake, fake_labels, step_of_class, 1, z, o["compensationMin"],
                                                    o["compensationMax"], merged_fake[1:])
            total = total + o["fakeCEWeight"] * merged_nll(new_fake, fake_labels, merged_fake, old, fake_weights)
            total = total + o["fakeKDWeight"] * unbiased_kd(new_fake, old_fake, o["kdTemperature"])
        if o["softWeight"] > 0:
            total = total + o["softWeight"] * soft_distillation(logits, old_logits, o["softTemperature"])
        if o["sharpWeight"] > 0:
            total = total + o["sharpWeight"] * sharp_entropy(logits, old_logits, o["sharpConfidence"])
        if o["relationWeight"] > 0:
            total = total + o["relationWeight"] * relation_distillation(logits, old_logits)
        return total

    def iteration():
        loss = loss_of()
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        sgd.step()
        return loss.item()

    # The parity loss: dropout off, batch-norm statistics of this batch (as the toolkit's dump).
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in dropouts:
        m.eval()
    with torch.no_grad():
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        first = loss_of().item()
        model.load_state_dict(saved)
    for m in dropouts:
        m.train()
    return x.shape[0], first, iteration


def timed(body):
    start = time.perf_counter()
    body()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", choices=["synth", "mib", "hrhf+gsc"], required=True)
    ap.add_argument("--inputs", required=True, help="directory written by `hrhf-bench --job JOB --dump DIR`")
    ap.add_argument("--model", default="zoo/shapes-15-5-step0.safetensors")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=1e-5, help="relative difference allowed in the first loss")
    ap.add_argument("--profile", action="store_true",
                    help="after the timing, torch.profiler's ops of --repeats iterations by self CPU time (on stderr)")
    ap.add_argument("--logits-check", nargs=2, metavar=("IMAGE", "NPY"),
                    help="an image and `hrhf-predict --logits` of it: the logits must agree within 1e-4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.logits_check:
        from torchvision.io import read_image
        model, card = load_model(args.model)
        model.eval()
        norm = card["normalization"]
        image = read_image(args.logits_check[0])[:3].float().unsqueeze(0) / 255
        image = (image - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            ours = model(image)
        theirs = npy(args.logits_check[1])
        diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else math.inf
        scale = theirs.abs().max().item()
        print(f"torch logits parity: max |torch - hrhf| = {diff:.2e} of logits up to {scale:.1f} in magnitude "
              f"({diff / max(scale, 1e-12):.1e} relative; tolerance 1e-4 absolute)", file=sys.stderr)
        if not diff <= 1e-4:
            sys.exit(f"torch logits differ from the toolkit's: {diff} "
                     f"(shapes {tuple(ours.shape)} and {tuple(theirs.shape)})")
    with open(f"{args.inputs}/job.json") as f:
        d = json.load(f)
    if d["job"] != args.job:
        sys.exit(f"{args.inputs} holds the inputs of job {d['job']}, not {args.job}")
    batch, first, body = (synth_job if args.job == "synth" else distill_job)(args, d)
    delta = abs(first - d["loss"]) / max(abs(d["loss"]), 1e-12)
    print(f"torch {args.job} first loss {first:.6f}, toolkit {d['loss']:.6f}: relative difference {delta:.1e} "
          f"(tolerance {args.tolerance:.0e})", file=sys.stderr)
    if not delta <= args.tolerance:
        sys.exit(f"torch {args.job}: the first iteration's loss {first} differs from the toolkit's {d['loss']} "
                 f"by {delta:.2e} relative, more than {args.tolerance}: the reference does not measure the same work")
    body()  # warm-up
    seconds = statistics.median(timed(body) for _ in range(args.repeats))
    print(f"torch {args.job} batch={batch} seconds={seconds:.4f} it_per_s={1 / seconds:.3f} loss_delta={delta:.1e}")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                body()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)


if __name__ == "__main__":
    main()
