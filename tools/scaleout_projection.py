#!/usr/bin/env python3
"""Projected time of Pascal VOC 15-1 with DeepLabV3-ResNet-101 at 512 px on 1, 16 and 64 nodes.

Every input is a flag whose default is the figure measured on this 2-core machine or the stated
assumption of docs/scale-out.md; the model is deliberately simple (no overlap of communication with
computation, cost linear in pixels), so each line of the output can be checked by hand.
"""
import argparse
import math


def ring_allreduce(size_bytes, ranks, bandwidth, latency):
    """Bandwidth-optimal ring: 2(p-1)/p of the buffer crosses each link, in 2(p-1) latency steps."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * size_bytes / bandwidth + 2 * (ranks - 1) * latency


def small_allreduce(ranks, latency):
    """A few-kilobyte allreduce (batch-norm sums, the loss): recursive doubling, latency-bound."""
    return 0.0 if ranks == 1 else math.ceil(math.log2(ranks)) * latency


def main():
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument("--train-image-256", type=float, default=26.8,
                   help="seconds of one training image (forward + backward) at 256 px on one 2-core node "
                        "(measured here under a load of 7-8: see docs/scale-out.md)")
    a.add_argument("--parameters", type=float, default=58.63e6, help="parameters of DeepLabV3-ResNet-101 (fp32)")
    a.add_argument("--bn-layers", type=int, default=111, help="batch-norm layers (3 small allreduces each with sync-bn)")
    a.add_argument("--bandwidth", type=float, default=1.25e9, help="bytes/s per link (10 GbE)")
    a.add_argument("--latency", type=float, default=25e-6, help="seconds per message (TCP over 10 GbE)")
    a.add_argument("--batch", type=int, default=24, help="global batch (MiB/PLOP's)")
    a.add_argument("--step0-images", type=int, default=10000)
    a.add_argument("--step-images", type=int, default=550, help="images holding each new class of 16-20")
    a.add_argument("--epochs", type=int, default=30)
    a.add_argument("--pack-images", type=int, default=1800, help="1000 after step 0 + 200 after each of steps 1-4")
    a.add_argument("--synth-iterations", type=int, default=250)
    a.add_argument("--synth-batch", type=int, default=8)
    a.add_argument("--nodes", default="1,16,24,64")
    args = a.parse_args()

    # 512 px has four times the pixels of 256 px; convolution cost is linear in pixels.
    train_image = 4 * args.train_image_256
    old_forward = train_image / 3          # a forward pass is about a third of forward + backward
    input_gradient = 2 * train_image / 3   # inversion: forward + input backward, no weight gradients
    grad_bytes = 4 * args.parameters
    step0_iterations = args.epochs * args.step0_images // args.batch
    step_iterations = args.epochs * args.step_images // args.batch
    synth_batches = math.ceil(args.pack_images / args.synth_batch)
    synth_batch_seconds = args.synth_iterations * args.synth_batch * input_gradient

    print(f"per image at 512 px: train {train_image:.1f} s, old-model forward {old_forward:.1f} s, "
          f"inversion iteration {input_gradient:.1f} s; gradients {grad_bytes / 1e6:.0f} MB per step")
    print(f"step 0: {step0_iterations} iterations of {args.batch}; steps 1-5: {step_iterations} iterations each "
          f"of {args.batch} real + {args.batch} fake; packs: {synth_batches} batches of {args.synth_batch}")
    print()
    print("| nodes | images per rank | compute s/it | allreduce s/it | step 0 | steps 1-5 | synthesis | total "
          "| efficiency |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    one_node_total = None
    for p in [int(x) for x in args.nodes.split(",")]:
        ranks = min(p, args.batch)  # a rank needs at least one image of the global batch
        per_rank = math.ceil(args.batch / ranks)
        compute0 = per_rank * train_image
        comm = ring_allreduce(grad_bytes, ranks, args.bandwidth, args.latency) \
            + 3 * args.bn_layers * small_allreduce(ranks, args.latency) + small_allreduce(ranks, args.latency)
        step0 = step0_iterations * (compute0 + comm)
        # Distillation: each rank's share of the real and the fake half, new model trained on both,
        # old model run forward on both; the same gradient and batch-norm traffic.
        compute_d = 2 * per_rank * (train_image + old_forward)
        steps = 5 * step_iterations * (compute_d + comm)
        # Synthesis shards whole batches over all p nodes (array jobs); no communication.
        synth = math.ceil(synth_batches / p) * synth_batch_seconds
        total = step0 + steps + synth
        one_node_total = one_node_total or total
        efficiency = one_node_total / (total * p)

        def days(s):
            return f"{s / 86400:.1f} d" if s >= 86400 else f"{s / 3600:.1f} h"
        print(f"| {p} | {per_rank} | {compute0:.1f} | {comm:.3f} | {days(step0)} | {days(steps)} | {days(synth)} "
              f"| {days(total)} | {efficiency:.0%} |")


if __name__ == "__main__":
    main()
