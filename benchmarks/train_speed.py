"""Steps per second of the bundled recipe's UNet stage (configs/shapes/unet.json), on this machine.

It trains the recipe's UNet with the recipe's batch size and settings, on top of the bundled
model's CLIP and VAE (so no earlier stage has to run), with a smaller latent cache so that
encoding the data takes seconds. It prints steps per second over the timed steps, after
warm-up steps, and the losses, so that two versions of the trainer can be compared.

    python benchmarks/train_speed.py                 # 60 steps, 10 of them warm-up
    python benchmarks/train_speed.py --steps 120 --warmup 20

Several processes on one machine (each with one thread; the global batch is split over them;
on a CPU-only machine `--multi_gpu` starts them with torchrun and they meet over gloo):

    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no benchmarks/train_speed.py --run-dir /tmp/speed
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ldm_pipeline import DEFAULT_MODEL
from ldm_pipeline.training.plan import read_stage
from ldm_pipeline.training.unet import train_unet

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate")
    parser.add_argument("--cache-size", type=int, default=2048)
    parser.add_argument("--run-dir", default=None,
                        help="an empty folder for the run (needed with several processes; default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        run = args.run_dir or scratch
        overrides = dict(steps=args.steps, log_every=1, checkpoint_every=10**9)
        _, config = read_stage(ROOT / "configs" / "shapes" / "unet.json", run, overrides)
        config.clip = str(DEFAULT_MODEL.parent / "shapes_clip")
        config.vae = str(DEFAULT_MODEL / "vae")
        config.cache_size = args.cache_size
        started = time.perf_counter()
        train_unet(config, progress=False)
        total = time.perf_counter() - started
        if int(os.environ.get("RANK", "0")) != 0:  # only the main process logs
            return
        records = [json.loads(line) for line in (Path(config.loop.output_dir) / "log.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > args.warmup]
    seconds = timed[-1]["seconds"] - records[args.warmup - 1]["seconds"]
    rate = len(timed) / seconds
    print(json.dumps({"steps_per_s": round(rate, 3), "timed_steps": len(timed), "batch_size": config.loop.batch_size,
                      "processes": records[-1]["processes"], "threads": torch.get_num_threads(),
                      "total_s": round(total, 1), "losses": [round(r["loss"], 4) for r in records]}))


if __name__ == "__main__":
    main()
