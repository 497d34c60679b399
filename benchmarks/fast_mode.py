"""Fast mode on the bundled model: what one image costs at 1 and 2 steps with the LCM-LoRA, against 50 steps
and the stored default, in one process, eager all; and the shipped LoRA's pixels against diffusers' LCM path.

    python benchmarks/fast_mode.py                 # 64x64, one image per call, 15 rounds
    python benchmarks/fast_mode.py --batch 16      # the README's first command's batch

Rounds alternate the calls (50 steps at the model's guidance, the stored default, fast mode at 1 and 2), so
that drift of the machine hits all alike; medians and their ratios are printed. Target (issue 41): fast /
50 steps <= 0.05.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FAST_LORA = ROOT / "ldm_pipeline" / "models" / "shapes-lcm-lora"
PROMPT = "a red circle in the top left and a large blue square in the bottom right"


def diffusers_pixels(components: dict, prompt: str, seed: int, steps: int) -> np.ndarray:
    """diffusers' LCM path: LCMScheduler, load_lora_weights of the shipped LoRA, guidance 1."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    theirs = StableDiffusionPipeline(**copy.deepcopy(components), safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    theirs.load_lora_weights(FAST_LORA)
    theirs.set_progress_bar_config(disable=True)
    return np.asarray(theirs(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                             guidance_scale=1.0).images[0], dtype=int)


def main() -> None:
    from ldm_pipeline import LatentDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    base = LatentDiffusionPipeline.from_pretrained()
    components = copy.deepcopy(base.components)
    fast = LatentDiffusionPipeline.from_pretrained().enable_fast(FAST_LORA)
    prompts = [PROMPT] * args.batch
    calls = {
        "50 steps": lambda: base(prompts, seed=0, num_inference_steps=50, progress=False),
        f"default ({base.defaults['num_inference_steps']} steps)": lambda: base(prompts, seed=0, progress=False),
        "fast (1 step)": lambda: fast(prompts, seed=0, num_inference_steps=1, progress=False),
        "fast (2 steps)": lambda: fast(prompts, seed=0, num_inference_steps=2, progress=False),
    }
    times = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["50 steps"]
    report = {"batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "median_s": {k: round(v, 4) for k, v in medians.items()},
              "ratio_to_50_steps": {k: round(v / reference, 4) for k, v in medians.items()}}
    for steps in (1, 2):
        for seed in (0, 1, 2):
            ours = np.asarray(fast(PROMPT, seed=seed, num_inference_steps=steps, progress=False).images[0], dtype=int)
            theirs = diffusers_pixels(components, PROMPT, seed, steps)
            report.setdefault("max_uint8_diff_vs_diffusers", []).append(int(np.abs(ours - theirs).max()))
    for name in calls:
        print(f"{name:>24}: {medians[name] * 1000:8.1f} ms  ({medians[name] / reference:.4f} of 50 steps)")
    print(f"fast mode vs diffusers' LCMScheduler + load_lora_weights, largest uint8 difference (1 then 2 steps, "
          f"seeds 0-2): "
          f"{report['max_uint8_diff_vs_diffusers']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
