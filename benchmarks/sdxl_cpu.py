"""SDXL on the CPU: ours compiled (AOTInductor) against diffusers' StableDiffusionXLPipeline, one process.

SDXL 1.0's architecture (configs/sdxl: three levels, transformer depths 0/2/10, two text towers
with 2048-wide cross-attention, pooled text and size conditions) with random weights, fp32, at
256 x 256, a few Euler steps, guidance 5, one image. `--channels` narrows the UNet's levels
(default 128 256 512, with heads of 64 channels as SDXL has; `--channels 320 640 1280` is SDXL
itself, 2.6 B parameters: its fp32 weights and the compiled package's frozen copy of them do not
fit in one process on a 24 GiB machine). The text towers and the VAE are SDXL's own, full size.

Runs alternate (ours compiled, ours eager, diffusers) so that drift hits all alike. It prints the
median seconds per call, each as a ratio to diffusers, and the largest uint8 pixel difference.

    python benchmarks/sdxl_cpu.py                                   # the narrowed UNet, 4 steps
    python benchmarks/sdxl_cpu.py --steps 4 --repeats 5 --out docs/benchmarks/sdxl-cpu.json

Run it on a quiet machine: the compile takes minutes on 2 cores (cached afterwards, see
`ldm_pipeline.fast.compile`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"


def timed(call) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    images = call()
    return time.perf_counter() - start, np.round(np.asarray(images) * 255)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs=3, default=[128, 256, 512])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, help="compiled packages (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if any(c % 64 for c in args.channels):
        parser.error(f"--channels: got {args.channels}; expected multiples of 64 (heads of 64 channels)")
    from diffusers import StableDiffusionXLPipeline

    from ldm_pipeline import LatentDiffusionXLPipeline
    from sdxl_gpu import against_diffusers, random_sdxl, write_json

    start = time.perf_counter()
    parts = random_sdxl(torch.device("cpu"), torch.float32, channels=args.channels)
    params = sum(p.numel() for p in parts["unet"].parameters())
    print(f"built random SDXL components (UNet {params / 1e6:.0f} M parameters) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    common = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=args.size, width=args.size,
                  output_type="np")
    with tempfile.TemporaryDirectory() as scratch:
        eager = LatentDiffusionXLPipeline(**parts)
        compiled = LatentDiffusionXLPipeline(**parts)
        compiled.compile(cache_dir=args.cache_dir or scratch, height=args.size, width=args.size)
        start = time.perf_counter()
        compiled(PROMPT, seed=0, progress=False, **common)
        compile_s = time.perf_counter() - start
        print(f"compiled in {compile_s:.1f} s (first call)", flush=True)
        theirs = StableDiffusionXLPipeline(**parts)
        theirs.set_progress_bar_config(disable=True)
        runs = {"ours_compiled": lambda: compiled(PROMPT, seed=0, progress=False, **common).images,
                "ours_eager": lambda: eager(PROMPT, seed=0, progress=False, **common).images,
                "diffusers": lambda: theirs(PROMPT, generator=torch.Generator().manual_seed(0), **common).images}
        pixels = {key: timed(run)[1] for key, run in runs.items()}  # warm-up
        seconds = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, run in runs.items():
                seconds[key].append(timed(run)[0])
    median = {key: statistics.median(values) for key, values in seconds.items()}
    result = dict(
        torch=torch.__version__, threads=torch.get_num_threads(), channels=args.channels,
        unet_parameters_m=round(params / 1e6), size=args.size, steps=args.steps, repeats=args.repeats,
        compile_first_call_s=round(compile_s, 1),
        seconds={key: [round(v, 3) for v in values] for key, values in seconds.items()},
        **against_diffusers(median, pixels),
    )
    for key in runs:
        print(f"{key:14s} {median[key]:7.3f} s/call  ratio {result['ratio_to_diffusers'][key]:.3f}  "
              f"max uint8 diff {result['max_uint8_diff'][key]:.0f}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
