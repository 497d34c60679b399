"""Time ldm_pipeline against diffusers' StableDiffusionPipeline on the same components.

Both pipelines share one set of random-weight components built from configs/ (full-size SD 1.5
by default), the same scheduler config, prompt, seed and arguments; runs alternate between
them so that drift of the machine hits both alike. Prints seconds per call (median and best)
and, on CUDA, peak memory.

    python benchmarks/bench_vs_diffusers.py                              # CPU: 256 px, 5 steps
    python benchmarks/bench_vs_diffusers.py --device cuda --size 512 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionPipeline

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.components import build_random
from ldm_pipeline.pipeline import default_dtype


def timed(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(call, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    call()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = default_dtype(device)
    components = build_random(args.config, torch_dtype=dtype)
    for name in ("text_encoder", "vae", "unet"):
        components[name].to(device)
    ours = LatentDiffusionPipeline(**components)
    theirs = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    prompts = ["a photograph of an astronaut riding a horse"] * args.batch
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)
    runs = {
        "ldm_pipeline": lambda: ours(prompts, seed=0, progress=False, **common),
        "diffusers": lambda: theirs(prompts, generator=[torch.Generator().manual_seed(i) for i in range(args.batch)],
                                    **common),
    }
    for run in runs.values():  # warm-up: kernels, allocator, lazy imports
        run()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device))
    print(f"{args.config} {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, {device.type} {dtype}, "
          f"{args.repeats} timed runs each")
    for name, values in times.items():
        memory = peak_memory(runs[name], device)
        extra = f", peak {memory:.2f} GiB" if memory is not None else ""
        print(f"  {name:13s} median {statistics.median(values):7.3f} s  best {min(values):7.3f} s{extra}")
    ratio = statistics.median(times["ldm_pipeline"]) / statistics.median(times["diffusers"])
    print(f"  ldm_pipeline / diffusers: {ratio:.3f}")


if __name__ == "__main__":
    main()
