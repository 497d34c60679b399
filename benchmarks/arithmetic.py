"""How close the bundled UNet's call comes to this machine's arithmetic speed.

It prints the machine's fp32 matrix-multiply speed (square matrices of 2048, the best case for
the CPU's math library) and, for the bundled UNet at batch 2 (one image with guidance) and 32
(sixteen), the floating-point operations of one call (torch's FLOP counter: convolutions,
matrix products, attention), its time eager and compiled (the "aot" package `pipe.compile()`
uses, built into the usual cache on first use) and the arithmetic speed that makes; then a training
step's forward and backward at the recipe's batch of 64. The last line
is the UNet's own per-image cost at batch 32 against batch 2, compiled: the part of the batch-16
goal (per-image time at most 1/3 of batch 1's) that the UNet decides.

    python benchmarks/arithmetic.py
    python benchmarks/arithmetic.py --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm_pipeline import LatentDiffusionPipeline


def best_time(fn, repeats: int) -> float:
    """The median of `repeats` timed calls after two warm-up calls, in seconds."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_speed(n: int, repeats: int) -> float:
    """GFLOP/s of an n x n fp32 matrix product (the fastest of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    fastest = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / fastest / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unet_flops(unet, sample, t, context) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, t, encoder_hidden_states=context, return_dict=False)
    return counter.get_total_flops()


def train_row(unet, sample_shape, context_shape, batch: int, peak: float, repeats: int) -> None:
    """A training step's forward and backward through the UNet (no optimizer), eager, as the trainer runs it."""
    sample = torch.randn(batch, *sample_shape)
    context = torch.randn(batch, *context_shape)
    t = torch.randint(0, 1000, (batch,))
    unet.train()

    def step():
        unet.zero_grad(set_to_none=True)
        unet(sample, t, encoder_hidden_states=context, return_dict=False)[0].square().mean().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = best_time(step, repeats)
    unet.eval()
    rate = flops / seconds / 1e9
    print(f"training forward and backward, batch {batch}: {flops / 1e9:.1f} GFLOP in {seconds * 1e3:.0f} ms, "
          f"{rate:.0f} GFLOP/s ({rate / peak:.2f} of the matrix product); 1.3x the steps a second would need "
          f"{1.3 * rate:.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=20, help="timed UNet calls per figure (median)")
    parser.add_argument("--train-batch", type=int, default=64,
                        help="batch of the training row (the recipe's UNet stage: 64; 0 leaves it out)")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 32], help="UNet batches to time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peak = matmul_speed(2048, 5)
    print(f"threads {torch.get_num_threads()}; fp32 matrix product 2048 x 2048: {peak:.0f} GFLOP/s")

    pipe = LatentDiffusionPipeline.from_pretrained()
    unet = pipe.unet
    side = unet.config.sample_size
    sample_shape = (unet.config.in_channels, side, side)
    context_shape = (pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    pipe.compile(batch=None)
    runner = pipe.compiled.runner_for(unet, sample_shape, context_shape)
    t = torch.tensor(500)

    per_call, per_call_flops = {}, {}
    print("| UNet batch | GFLOP a call | eager ms | compiled ms | eager GFLOP/s | compiled GFLOP/s | compiled / matrix product |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        sample = torch.randn(batch, *sample_shape)
        context = torch.randn(batch, *context_shape)
        flops = unet_flops(unet, sample, t, context)
        with torch.no_grad():
            eager = best_time(lambda: unet(sample, t, encoder_hidden_states=context, return_dict=False), args.repeats)
            compiled = best_time(lambda: runner(sample, t, encoder_hidden_states=context), args.repeats)
        per_call[batch], per_call_flops[batch] = compiled, flops
        rate, crate = flops / eager / 1e9, flops / compiled / 1e9
        print(f"| {batch} | {flops / 1e9:.2f} | {eager * 1e3:.1f} | {compiled * 1e3:.1f} | {rate:.0f} | {crate:.0f} "
              f"| {crate / peak:.2f} |")
    if args.train_batch:
        train_row(unet, sample_shape, context_shape, args.train_batch, peak, max(3, args.repeats // 4))
    if 2 in per_call and 32 in per_call:
        ratio = per_call[32] / (16 * per_call[2])
        needed = 16 * per_call[2] / 3
        print(f"compiled UNet, per image at batch 32 / at batch 2: {ratio:.3f} (the goal for the whole call: 1/3); "
              f"1/3 needs the batch-32 call in {needed * 1e3:.1f} ms, {per_call_flops[32] / needed / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
