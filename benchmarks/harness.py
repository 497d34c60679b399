"""ldm_pipeline against diffusers' StableDiffusionPipeline, side by side in one process.

Both pipelines share one set of components (the bundled model, or full-size SD 1.5 with random
weights from configs/), the same scheduler config, prompts, seeds and arguments. Runs
alternate (ours eager, ours compiled, diffusers) so that drift of the machine hits all alike.
For each configuration it records median and best seconds per call, the ratios to diffusers,
the largest uint8 pixel difference from diffusers' output, and peak memory (CUDA: the
allocator's peak; CPU: the peak resident memory above the level before the call, sampled).
Results go to a JSON file, and `--plot` draws time against steps, batch and resolution.

    python benchmarks/harness.py                                # every CPU configuration
    python benchmarks/harness.py --only bundled-b1 bundled-b16
    python benchmarks/harness.py --device cuda --only sd15-512  # fp16, 50 steps on a GPU
    python benchmarks/harness.py --cache-timings                # cold / warm first call, new processes
    OMP_NUM_THREADS=1 python benchmarks/harness.py --clock process   # on a machine that is busy

`pipe.compile()` packages go into `--cache-dir` (default: the usual cache), so the first run
of a configuration also pays the compile, before any timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT_BUNDLED = "a red circle in the top left and a large blue square in the bottom right"
PROMPT_SD = "a photograph of an astronaut riding a horse"

# name -> model, image size, steps, images per call (CPU); CUDA runs use cuda_steps.
CONFIGS = {
    "bundled-b1": dict(model="bundled", size=64, steps=50, batch=1, repeats=7),
    "bundled-b16": dict(model="bundled", size=64, steps=50, batch=16, repeats=3),
    "bundled-b4": dict(model="bundled", size=64, steps=50, batch=4, repeats=5),
    "bundled-s1": dict(model="bundled", size=64, steps=1, batch=1, repeats=15),
    "bundled-s2": dict(model="bundled", size=64, steps=2, batch=1, repeats=15),
    "bundled-s4": dict(model="bundled", size=64, steps=4, batch=1, repeats=11),
    "bundled-s10": dict(model="bundled", size=64, steps=10, batch=1, repeats=7),
    "bundled-s20": dict(model="bundled", size=64, steps=20, batch=1, repeats=7),
    "bundled-128": dict(model="bundled", size=128, steps=50, batch=1, repeats=5),
    # fast mode: the bundled LCM-LoRA fused, the lcm scheduler at guidance 1 (diffusers: LCMScheduler + its
    # load_lora_weights and fuse_lora of the same file)
    "bundled-lcm1": dict(model="bundled", size=64, steps=1, batch=1, repeats=15, fast=True),
    "bundled-lcm2": dict(model="bundled", size=64, steps=2, batch=1, repeats=15, fast=True),
    "bundled-lcm4": dict(model="bundled", size=64, steps=4, batch=1, repeats=11, fast=True),
    "sd15-256": dict(model="sd15", size=256, steps=3, batch=1, repeats=3, cuda_steps=50),
    "sd15-512": dict(model="sd15", size=512, steps=2, batch=1, repeats=2, cuda_steps=50),
}
CPU_DEFAULT = ["bundled-b1", "bundled-s1", "bundled-s2", "bundled-s4", "bundled-s10", "bundled-s20", "bundled-lcm1",
               "bundled-lcm2", "bundled-lcm4", "bundled-b4", "bundled-b16", "bundled-128", "sd15-256"]
FAST_LORA = ROOT / "ldm_pipeline" / "models" / "shapes-lcm-lora"


def components_for(model: str, device: torch.device, dtype: torch.dtype) -> tuple[dict, float]:
    """The shared components and the guidance scale the model is used with."""
    from ldm_pipeline import LatentDiffusionPipeline
    from ldm_pipeline.loading.random_components import build_random

    if model == "bundled":
        pipe = LatentDiffusionPipeline.from_pretrained(device=device, torch_dtype=dtype)
        return pipe.components, pipe.defaults["guidance_scale"]
    components = build_random(model, torch_dtype=dtype)
    for name in ("text_encoder", "vae", "unet"):
        components[name].to(device)
    return components, 7.5


MEMORY = """
import json, os, sys, threading
import torch
sys.path.insert(0, {root!r})
from benchmarks.harness import build_pipelines
runs = build_pipelines({name!r}, torch.device({device!r}), {cache!r}, {mode!r}, only={which!r})
run = runs[{which!r}]
cuda = {device!r} != "cpu"

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
before, peak, done = rss(), [0], threading.Event()

def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], rss())

watcher = threading.Thread(target=sample)
watcher.start()
run()
done.set(); watcher.join()
peak = max(peak[0], rss())
print(json.dumps(dict(rss_before_gib=before / 2**30, rss_peak_gib=peak / 2**30, call_gib=(peak - before) / 2**30,
                      cuda_peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)))
"""


def peak_memory(name: str, which: str, device: torch.device, cache_dir: str | None, mode: str) -> dict:
    """Memory of one first call in a new process: resident memory before and at its peak (sampled every
    2 ms) and their difference, the call's own; on CUDA also the allocator's peak."""
    code = MEMORY.format(root=str(ROOT), name=name, device=str(device), cache=cache_dir, mode=mode, which=which)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return {k: (round(v, 3) if v is not None else None) for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def timed(call, device: torch.device, clock: str = "wall") -> float:
    """Seconds of one call: wall time, or the process's CPU time (`clock="process"`).

    CPU time is what a one-thread run costs however busy the machine is, so it is the fair
    clock on a shared machine with `OMP_NUM_THREADS=1`; with more threads it also counts their
    spinning, and on CUDA it misses the GPU's work, so there take wall time on a quiet machine.
    """
    now = CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = now()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return now() - start


def build_pipelines(name: str, device: torch.device, cache_dir: str | None, compile_mode: str,
                    only: str | None = None) -> dict:
    """Calls for "ours_eager", "ours_compiled" and "diffusers" on one shared set of components.

    Each call returns the images as a numpy array (B, H, W, 3) in [0, 1]; "compile_s" holds how
    long `pipe.compile()` took (building or loading the package for this shape).
    """
    from diffusers import StableDiffusionPipeline

    from ldm_pipeline import LatentDiffusionPipeline
    from ldm_pipeline.pipeline import default_dtype

    config = CONFIGS[name]
    steps = config.get("cuda_steps", config["steps"]) if device.type == "cuda" else config["steps"]
    shared, guidance = components_for(config["model"], device, default_dtype(device))
    fast = config.get("fast", False)
    if fast:
        guidance = 1.0

    def components():  # fast mode fuses a LoRA into the weights: each pipeline then gets its own copy
        return copy.deepcopy(shared) if fast else shared
    batch, size = config["batch"], config["size"]
    prompts = [PROMPT_BUNDLED if config["model"] == "bundled" else PROMPT_SD] * batch
    common = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
    runs = {}
    if only in (None, "ours_eager"):
        eager = LatentDiffusionPipeline(**components())
        if fast:
            eager.enable_fast(FAST_LORA)
        runs["ours_eager"] = lambda: eager(prompts, seed=0, progress=False, output_type="np", **common).images
    if only in (None, "ours_compiled"):
        compiled = LatentDiffusionPipeline(**components())
        if fast:
            compiled.enable_fast(FAST_LORA)
        start = time.perf_counter()
        compiled.compile(compile_mode, cache_dir=cache_dir, height=size, width=size,
                         batch=batch * (2 if guidance > 1 else 1))
        runs["compile_s"] = time.perf_counter() - start
        runs["ours_compiled"] = lambda: compiled(prompts, seed=0, progress=False, output_type="np", **common).images
    if only in (None, "diffusers"):
        theirs = StableDiffusionPipeline(**components(), safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
        theirs.set_progress_bar_config(disable=True)
        if fast:
            from diffusers import LCMScheduler

            theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
            theirs.load_lora_weights(FAST_LORA)
            theirs.fuse_lora()

        def diffusers_call():
            generators = [torch.Generator().manual_seed(i) for i in range(batch)]
            return theirs(prompts, generator=generators, output_type="np", **common).images
        runs["diffusers"] = diffusers_call
    runs["settings"] = dict(steps=steps, guidance=guidance, dtype=str(default_dtype(device)), fast=fast)
    return runs


def run_config(name: str, device: torch.device, cache_dir: str | None, compile_mode: str, memory: bool,
               clock: str = "wall") -> dict:
    config = CONFIGS[name]
    runs = build_pipelines(name, device, cache_dir, compile_mode)
    compile_s, settings = runs.pop("compile_s"), runs.pop("settings")
    batch = config["batch"]
    pixels = {key: np.round(np.asarray(run()) * 255) for key, run in runs.items()}  # also the warm-up
    times = {key: [] for key in runs}
    for _ in range(config["repeats"]):
        for key, run in runs.items():
            times[key].append(timed(run, device, clock))
    median = {key: statistics.median(values) for key, values in times.items()}
    result = dict(
        name=name, model=config["model"], size=config["size"], batch=batch, device=device.type,
        threads=torch.get_num_threads(), clock=clock, repeats=config["repeats"], compile_mode=compile_mode,
        compile_s=round(compile_s, 2), **settings,
        median_s={key: round(value, 4) for key, value in median.items()},
        best_s={key: round(min(values), 4) for key, values in times.items()},
        per_image_s={key: round(value / batch, 4) for key, value in median.items()},
        it_per_s={key: round(settings["steps"] / value, 2) for key, value in median.items()},
        ratio_eager=round(median["ours_eager"] / median["diffusers"], 3),
        ratio_compiled=round(median["ours_compiled"] / median["diffusers"], 3),
        max_uint8_diff={"eager": float(np.abs(pixels["ours_eager"] - pixels["diffusers"]).max()),
                        "compiled": float(np.abs(pixels["ours_compiled"] - pixels["diffusers"]).max())},
    )
    if memory:
        result["peak_memory"] = {key: peak_memory(name, key, device, cache_dir, compile_mode) for key in runs}
    return result


FIRST_CALL = """
import json, sys, time
start = time.perf_counter()
from ldm_pipeline import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained()
loaded = time.perf_counter()
pipe.compile(cache_dir=sys.argv[1], verbose=False)
compiled = time.perf_counter()
pipe("a red circle in the top left", seed=0, progress=False)
first = time.perf_counter()
pipe("a red circle in the top left", seed=0, progress=False)
second = time.perf_counter()
print(json.dumps(dict(load_s=loaded - start, compile_s=compiled - loaded, first_call_s=first - compiled,
                      steady_call_s=second - first, process_s=second - start)))
"""


def cache_timings() -> dict:
    """Cold and warm cache, each in a new process: load, compile(), first call, a second call."""
    with tempfile.TemporaryDirectory() as cache:
        result = {}
        for label in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", FIRST_CALL, cache], capture_output=True, text=True,
                                 check=True, cwd=ROOT)
            result[label] = {k: round(v, 2) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
        return result


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    bundled = [r for r in results if r["model"] == "bundled"]
    axes_spec = [("steps", dict(size=64, batch=1), "denoising steps (64x64, batch 1)"),
                 ("batch", dict(size=64, steps=50), "images per call (64x64, 50 steps)"),
                 ("size", dict(steps=50, batch=1), "image side in pixels (50 steps, batch 1)")]
    def chosen_for(fixed):
        return [r for r in bundled if all(r[k] == v for k, v in fixed.items())]

    axes_spec = [spec for spec in axes_spec if len({r[spec[0]] for r in chosen_for(spec[1])}) > 1]  # axes with data
    figure = Figure(figsize=(max(6.5, 4.4 * len(axes_spec)), 4.2))
    for index, (axis, fixed, label) in enumerate(axes_spec):
        ax = figure.add_subplot(1, len(axes_spec), index + 1)
        chosen = chosen_for(fixed)
        for fast, marker in ((False, "o"), (True, "^")):
            rows = sorted((r for r in chosen if r.get("fast", False) == fast), key=lambda r: r[axis])
            if not rows:
                continue
            for key, line in (("diffusers", ":"), ("ours_eager", "--"), ("ours_compiled", "-")):
                what = key.replace("_", " ") + (", LCM-LoRA (guidance 1)" if fast else "")
                ax.plot([r[axis] for r in rows], [r["median_s"][key] for r in rows], marker + line, label=what)
        if axis == "steps":
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per call")
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.suptitle("bundled model, CPU: ldm_pipeline (eager and pipe.compile()) against diffusers", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
    lines = ["| configuration | diffusers s | ours eager s | ours compiled s | eager / diffusers | "
             "compiled / diffusers | max uint8 diff | peak RSS GiB (diffusers / compiled) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r["median_s"]
        memory = r.get("peak_memory")
        rss = (f"{memory['diffusers']['rss_peak_gib']:.2f} / {memory['ours_compiled']['rss_peak_gib']:.2f}"
               if memory else "-")
        lines.append(f"| {r['name']} ({r['size']}px, {r['steps']} steps, batch {r['batch']}) | {m['diffusers']:.3f} | "
                     f"{m['ours_eager']:.3f} | {m['ours_compiled']:.3f} | {r['ratio_eager']:.2f} | "
                     f"{r['ratio_compiled']:.2f} | {r['max_uint8_diff']['compiled']:.0f} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-mode", default="aot", help='pipe.compile mode: "aot" or a torch.compile mode')
    parser.add_argument("--cache-dir", default=None, help="where compiled packages go")
    parser.add_argument("--cache-timings", action="store_true", help="also time cold and warm first calls")
    parser.add_argument("--memory", action="store_true", help="also measure each call's peak memory in a new process")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (quiet machine), or the process's CPU time (with OMP_NUM_THREADS=1 on a "
                             "shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "results.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of time against steps, batch and size")
    args = parser.parse_args()

    device = torch.device(args.device)
    names = args.only or (CPU_DEFAULT if device.type == "cpu" else ["bundled-b1", "bundled-b16", "sd15-512"])
    results = []
    for name in names:
        result = run_config(name, device, args.cache_dir, args.compile_mode, args.memory, args.clock)
        print(json.dumps(result), flush=True)
        results.append(result)
    report = dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                  cpus=os.cpu_count(), results=results)
    if args.cache_timings:
        report["first_call"] = cache_timings()
        print(json.dumps(report["first_call"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
