"""Peak memory (and time) of the memory helpers, with and without each, on the SD 1.5 shape.

Every configuration runs in a fresh process with random SD 1.5 weights from configs/sd15, so
one run's memory cannot leak into the next. What is measured:

- CPU: the peak resident memory of the work alone. The kernel's peak-RSS counter (VmHWM) is
  reset just before the work (`/proc/self/clear_refs`), read after it, and the resident memory
  before the work (weights, Python, torch) is subtracted; both figures are written.
- CUDA (`--device cuda`, fp16): `torch.cuda.max_memory_allocated` over the work, and the
  memory allocated before it.

Configurations:
  vae-decode-1024[-tiled]         one 1024x1024 decode, untiled / pipe.enable_vae_tiling()
  vae-encode-1024[-tiled]         one 1024x1024 encode (image-to-image's first step)
  sdxl-vae-decode-1024[-tiled[-512]]  the SDXL VAE's shape (configs/sdxl: the same decoder, sample_size 1024):
                                  untiled / pipe.enable_vae_tiling() (tiles of sample_size, 1024 px: a
                                  1024x1024 decode is one tile) / enable_vae_tiling(512); not in the default run
  vae-decode-512x4[-sliced]       a batch of four 512x512 decodes / pipe.enable_vae_slicing()
  unet-512x2[-attention-sliced]   one UNet call at 512x512 with guidance / enable_attention_slicing("max")
  call-64[-offload]               a whole one-step call (text encoder, UNet, VAE) with and without
                                  pipe.enable_model_cpu_offload(); on the CPU the models cannot
                                  leave their memory, so the figure is the bytes of weights that
                                  the hooks hold on the execution device at once (cpu:0 stands for
                                  the GPU, as in tests/test_memory.py); on CUDA, the allocator's peak.

    OMP_NUM_THREADS=1 python benchmarks/memory.py                 # all, CPU, into docs/benchmarks/memory.json
    python benchmarks/memory.py --only vae-decode-1024 vae-decode-1024-tiled
    python benchmarks/memory.py --device cuda --out docs/benchmarks/memory-cuda.json
    OMP_NUM_THREADS=1 python benchmarks/memory.py --only sdxl-vae-decode-1024 sdxl-vae-decode-1024-tiled-512 \
        --out docs/benchmarks/memory-sdxl.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = ["vae-decode-1024", "vae-decode-1024-tiled", "vae-encode-1024", "vae-encode-1024-tiled",
           "vae-decode-512x4", "vae-decode-512x4-sliced", "unet-512x2", "unet-512x2-attention-sliced",
           "call-64", "call-64-offload"]
PAIRS = [("vae-decode-1024", "vae-decode-1024-tiled"), ("vae-encode-1024", "vae-encode-1024-tiled"),
         ("vae-decode-512x4", "vae-decode-512x4-sliced"), ("unet-512x2", "unet-512x2-attention-sliced"),
         ("call-64", "call-64-offload")]
SDXL_CONFIGS = ["sdxl-vae-decode-1024", "sdxl-vae-decode-1024-tiled", "sdxl-vae-decode-1024-tiled-512"]
PAIRS += [("sdxl-vae-decode-1024", tiled) for tiled in SDXL_CONFIGS[1:]]


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _vae(device, dtype, shape="sd15"):
    import torch
    from diffusers import AutoencoderKL

    from ldm_pipeline.loading.single_file import config_dir

    torch.manual_seed(0)
    return AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir(shape) / "vae")).to(device, dtype).eval()


def _tiling(name: str) -> tuple[bool, int | None]:
    """Whether a configuration tiles, and its tile size in pixels (None: the VAE's sample_size)."""
    _, tiled, size = name.partition("-tiled")
    return bool(tiled), int(size[1:]) if size else None


def child(name: str, device: str, save: str | None) -> dict:
    """Run one configuration in this process; return its figures."""
    import numpy as np
    import torch

    from ldm_pipeline.runtime import memory

    torch.set_grad_enabled(False)
    dtype = torch.float16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    extra = {}
    if name.startswith(("vae-", "sdxl-vae-")):
        vae = _vae(device, dtype, "sdxl" if name.startswith("sdxl-") else "sd15")
        tiled, tile_size = _tiling(name)
        if tiled:
            memory.enable_vae_tiling(vae, tile_size, 8)
            extra["tile_size"] = vae.tile_sample_min_size
        if name.endswith("-sliced"):
            memory.enable_vae_slicing(vae)
        if "encode" in name:
            # a smooth picture (a gradient with a few waves), so the encoder sees something like an image
            y, x = torch.meshgrid(torch.linspace(-1, 1, 1024), torch.linspace(-1, 1, 1024), indexing="ij")
            pixels = torch.stack([x, y, torch.sin(6 * x) * torch.cos(4 * y)])[None].to(device, dtype) * 0.8
            work = lambda: vae.encode(pixels).latent_dist.mean  # noqa: E731
        else:
            batch, side = (4, 64) if "512x4" in name else (1, 128)
            latents = torch.randn((batch, 4, side, side), generator=generator).to(device, dtype)
            work = lambda: vae.decode(latents).sample  # noqa: E731
    elif name.startswith("unet-"):
        from diffusers import UNet2DConditionModel

        from ldm_pipeline.loading.single_file import config_dir

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir("sd15") / "unet"))
        unet = unet.to(device, dtype).eval()
        if name.endswith("-attention-sliced"):
            memory.enable_attention_slicing(unet, "max")
        latents = torch.randn((2, 4, 64, 64), generator=generator).to(device, dtype)
        context = torch.randn((2, 77, 768), generator=generator).to(device, dtype)
        work = lambda: unet(latents, 500, encoder_hidden_states=context).sample  # noqa: E731
    else:
        from ldm_pipeline import LatentDiffusionPipeline
        from ldm_pipeline.loading.random_components import build_random

        dtype = torch.float16  # fp16 on the CPU too: half the memory of this machine, the GPU's byte counts
        pipe = LatentDiffusionPipeline(**build_random("sd15", torch_dtype=dtype))
        sizes = {n: sum(p.numel() * p.element_size() for p in m.parameters())
                 for n, m in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae", pipe.vae))}
        extra["model_bytes"] = sizes
        target = torch.device(device if device == "cuda" else "cpu:0")
        held = {"now": set(), "peak": 0}
        if name.endswith("-offload"):
            for key, model in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae", pipe.vae)):
                def to(*args, _key=key, _to=model.to, **kwargs):  # the ledger of what the hooks hold on the device
                    where = args[0] if args and isinstance(args[0], (str, torch.device)) else kwargs.get("device")
                    if where is not None:
                        (held["now"].add if torch.device(where) == target else held["now"].discard)(_key)
                        held["peak"] = max(held["peak"], sum(sizes[k] for k in held["now"]))
                    return _to(*args, **kwargs)
                model.to = to
            pipe.enable_model_cpu_offload(target)
        else:
            pipe.to(device, dtype)
            held["peak"] = sum(sizes.values())  # every model stays where it runs
        work = lambda: pipe("a photograph of an astronaut riding a horse", num_inference_steps=1,  # noqa: E731
                            height=64, width=64, seed=0, output_type="pt", progress=False).images
        extra["held"] = held

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_device = torch.cuda.memory_allocated()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS counter to the current RSS
    start = time.perf_counter()
    output = work()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"name": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "seconds": round(seconds, 2),
              "rss_before_bytes": before, "rss_peak_bytes": _kib("VmHWM"), "work_peak_bytes": _kib("VmHWM") - before}
    if device == "cuda":
        result.update(cuda_before_bytes=before_device, cuda_peak_bytes=torch.cuda.max_memory_allocated(),
                      work_peak_bytes=torch.cuda.max_memory_allocated() - before_device)
    if "tile_size" in extra:
        result["tile_size"] = extra["tile_size"]
    if "held" in extra:
        result["weights_on_device_peak_bytes"] = extra["held"]["peak"]
        result["model_bytes"] = extra["model_bytes"]
    if save:
        np.save(save, output.float().cpu().numpy())
    return result


def run(name: str, device: str, save: str | None) -> dict:
    command = [sys.executable, __file__, "--child", name, "--device", device] + (["--save", save] if save else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", nargs="+", choices=CONFIGS + SDXL_CONFIGS, default=CONFIGS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "memory.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, args.save)))
        return


    # results accumulate in --out, so that configurations can be run a few at a time
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = report.get("results", {}) if report.get("device") == args.device else {}
    scratch = Path(os.environ.get("LDM_CACHE_DIR", Path.home() / ".cache" / "ldm_pipeline")) / "benchmarks"
    scratch.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        save = str(scratch / f"{name}-{args.device}.npy") if name.startswith("vae-decode-1024") else None
        results[name] = run(name, args.device, save)
        r = results[name]
        print(f"{name:32s} work peak {r['work_peak_bytes'] / 2**20:8.0f} MiB   (RSS before {r['rss_before_bytes'] / 2**20:6.0f} MiB, "
              f"peak {r['rss_peak_bytes'] / 2**20:6.0f} MiB)   {r['seconds']:7.2f} s"
              + (f"   weights on the device at once: {r['weights_on_device_peak_bytes'] / 2**20:.0f} MiB"
                 if "weights_on_device_peak_bytes" in r else ""), flush=True)
        write_report(args, results, scratch)


def write_report(args, results: dict, scratch: Path) -> None:
    import platform

    import numpy as np
    import torch

    summary = {}
    for plain, helped in PAIRS:
        if plain in results and helped in results:
            key = "weights_on_device_peak_bytes" if plain.startswith("call") else "work_peak_bytes"
            summary[helped] = {"peak_ratio": round(results[helped][key] / results[plain][key], 3),
                               "time_ratio": round(results[helped]["seconds"] / max(results[plain]["seconds"], 1e-9), 2)}
    saved = [scratch / f"{name}-{args.device}.npy" for name in ("vae-decode-1024", "vae-decode-1024-tiled")]
    if "vae-decode-1024-tiled" in summary and all(path.is_file() for path in saved):
        plain, tiled = (np.load(path) for path in saved)
        to_uint8 = lambda x: np.round((np.clip(x, -1, 1) + 1) * 127.5)  # noqa: E731
        gap = np.abs(to_uint8(plain) - to_uint8(tiled))
        summary["vae-decode-1024-tiled"].update(max_uint8_gap=float(gap.max()), mean_uint8_gap=round(float(gap.mean()), 2))
    for name, figures in summary.items():
        print(f"{name}: {figures}")
    report = {"device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": os.environ.get("OMP_NUM_THREADS"), "results": results, "summary": summary}
    from ldm_pipeline.files import atomic_path

    with atomic_path(args.out) as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
