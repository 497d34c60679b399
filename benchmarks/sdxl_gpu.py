"""SDXL base at its own shape on a GPU: ours eager, ours compiled and diffusers' StableDiffusionXLPipeline.

Full-size SDXL 1.0 components with random weights (configs/sdxl: a 2.6 B-parameter UNet, both
text towers, the VAE) in fp16, shared by the three pipelines; 1024 x 1024, 30 steps, guidance 5,
one image, Euler (SDXL's scheduler). Runs alternate (ours eager, ours compiled, diffusers) so that
drift of the machine hits all alike. For each it prints the median seconds per call, it/s (steps
per second of the whole call: text, loop and the fp32 decode that SDXL's VAE needs), the
allocator's peak memory during a call, and the largest uint8 pixel difference from diffusers.
Random weights draw noise, but the arithmetic, and so the time and memory, is SDXL's.

    python benchmarks/sdxl_gpu.py                          # about 5 minutes on an H100, compile included
    python benchmarks/sdxl_gpu.py --steps 30 --repeats 3 --out docs/benchmarks/sdxl-h100.json
    python benchmarks/sdxl_gpu.py --skip-compiled          # eager and diffusers only (no compile wait)

Needs a CUDA GPU with about 20 GB free; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"


def random_sdxl(device: torch.device, dtype: torch.dtype, seed: int = 0, channels: list[int] | None = None) -> dict:
    """SDXL 1.0's components (configs/sdxl) with random weights, built on `device` and cast to `dtype`;
    `channels` narrows the UNet's three levels (heads of 64 channels, as SDXL's)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm_pipeline.loading.single_file import bundled_clip_tokenizer

    folder = ROOT / "configs" / "sdxl"  # this checkout's configs, whatever an editable install maps
    torch.manual_seed(seed)
    config = UNet2DConditionModel.load_config(folder / "unet")
    if channels:
        config.update(block_out_channels=list(channels), attention_head_dim=[c // 64 for c in channels])
    with torch.device(device):  # random init on the GPU: minutes faster than 3.5 B parameters on the CPU
        unet = UNet2DConditionModel.from_config(config)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    models = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    for model in models.values():
        model.to(dtype=dtype).eval()
    return dict(**models, tokenizer=bundled_clip_tokenizer(folder, "tokenizer"),
                tokenizer_2=bundled_clip_tokenizer(folder, "tokenizer_2"),
                scheduler=EulerDiscreteScheduler.from_pretrained(folder / "scheduler"))


def against_diffusers(median: dict, pixels: dict) -> dict:
    """Median seconds, their ratio to diffusers' and the largest uint8 difference from its pixels."""
    return dict(median_s={key: round(value, 3) for key, value in median.items()},
                ratio_to_diffusers={key: round(value / median["diffusers"], 3) for key, value in median.items()},
                max_uint8_diff={key: float(np.abs(pixels[key] - pixels["diffusers"]).max()) for key in median})


def write_json(result: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def timed(call) -> tuple[float, float, np.ndarray]:
    """Seconds and peak GiB allocated during one call, and its images as uint8."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = call()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() / 2**30, np.round(np.asarray(images) * 255)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for 'ours compiled'")
    parser.add_argument("--skip-compiled", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from diffusers import StableDiffusionXLPipeline

    from ldm_pipeline import LatentDiffusionXLPipeline

    device, dtype = torch.device("cuda"), torch.float16
    start = time.perf_counter()
    components = random_sdxl(device, dtype)
    print(f"built random SDXL components in {time.perf_counter() - start:.1f} s", flush=True)
    common = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=args.size, width=args.size,
                  output_type="np")
    eager = LatentDiffusionXLPipeline(**components)
    runs = {"ours_eager": lambda: eager(PROMPT, seed=0, progress=False, **common).images}
    compile_s = None
    if not args.skip_compiled:
        compiled = LatentDiffusionXLPipeline(**components)
        compiled.compile(args.mode)
        start = time.perf_counter()
        compiled(PROMPT, seed=0, progress=False, **common)  # the compile itself, and CUDA graphs recorded
        compile_s = time.perf_counter() - start
        print(f"compiled ({args.mode}) in {compile_s:.1f} s (first call)", flush=True)
        runs["ours_compiled"] = lambda: compiled(PROMPT, seed=0, progress=False, **common).images
    theirs = StableDiffusionXLPipeline(**components)
    theirs.set_progress_bar_config(disable=True)
    runs["diffusers"] = lambda: theirs(PROMPT, generator=torch.Generator().manual_seed(0), **common).images

    pixels = {key: timed(run)[2] for key, run in runs.items()}  # warm-up
    seconds, peaks = {key: [] for key in runs}, {key: 0.0 for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            took, peak, _ = timed(run)
            seconds[key].append(took)
            peaks[key] = max(peaks[key], peak)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    result = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, size=args.size, steps=args.steps,
        dtype=str(dtype), compile_mode=None if args.skip_compiled else args.mode,
        compile_first_call_s=round(compile_s, 1) if compile_s else None,
        it_per_s={key: round(args.steps / value, 2) for key, value in median.items()},
        peak_gib={key: round(value, 2) for key, value in peaks.items()}, **against_diffusers(median, pixels),
    )
    for key in runs:
        print(f"{key:14s} {median[key]:7.3f} s/call  {result['it_per_s'][key]:6.2f} it/s  "
              f"peak {result['peak_gib'][key]:5.2f} GiB  max uint8 diff {result['max_uint8_diff'][key]:.0f}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
