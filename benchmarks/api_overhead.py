"""What the HTTP API adds to a pipeline call: POST /sdapi/v1/txt2img against `pipe(...)`, in one process.

The bundled model (`LatentDiffusionPipeline.from_pretrained()`, its own 4 DDIM steps and guidance)
draws 64x64 pictures two ways, on one pipeline object:

- direct: `pipe(prompt, seed=s, width=64, height=64, progress=False).images`, the PIL images a
  Python user gets;
- api: the same settings POSTed to /sdapi/v1/txt2img of `build_api(Runner(pipe))` served by uvicorn
  on a thread of this process (no web page), the answer's JSON read and its base64 PNGs opened as
  PIL images, as `webuiapi` does. So the difference is what the HTTP path adds: the request queue
  (`Runner`: its lock, step callback and live previews), request checking, PNG writing with the
  recipe's text chunks, `info`, base64, JSON both ways and the socket.

After warm-up calls of both (whose pixels must agree: the two do the same work), the pairs alternate
direct, api, direct, api, ..., so that drift of the machine hits both alike. Reported: the median
seconds of each, the overhead as median(api) / median(direct) - 1, and the median of the pairs' own
ratios with a 95 % bootstrap interval over the pairs. The issue's target: an overhead of at most 10 %.

    OMP_NUM_THREADS=1 python benchmarks/api_overhead.py                     # 30 pairs, wall time (quiet machine)
    OMP_NUM_THREADS=1 python benchmarks/api_overhead.py --clock process     # CPU time of the whole process
    OMP_NUM_THREADS=1 python benchmarks/api_overhead.py --pairs 3 --out /tmp/overhead.json   # a smoke run

With `--clock process` the seconds are the CPU time of the whole process, the server's thread
included, which is the fair clock on a busy machine with OMP_NUM_THREADS=1 (see harness.timed); the
idle time of the client waiting on its socket is then left out. Results go to
docs/results/api-overhead.json and a table beside it (.md).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import sys
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.harness and the checkout's ldm_pipeline

from benchmarks.harness import CLOCKS  # noqa: E402

PROMPT = "a red circle in the top left and a large blue square in the bottom right"
OUT = ROOT / "docs" / "results" / "api-overhead.json"
TARGET = 0.10  # the issue's: at most 10 % over a direct call at 64x64


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(pipe):
    """The API alone over `pipe` (its own Runner, no page) on a free local port, served on a daemon thread.

    Returns (url, server); set `server.should_exit = True` to stop it.
    """
    from ldm_pipeline.apps.api import build_api
    from ldm_pipeline.apps.api_serve import serve_in_thread
    from ldm_pipeline.apps.api_config import ApiConfig
    from ldm_pipeline.apps.runner import Runner

    app = build_api(Runner(pipe), ApiConfig(load_model=lambda: pipe, model_name="bundled"))
    port = free_port()
    return f"http://127.0.0.1:{port}", serve_in_thread(app, port)


def api_call(session, url: str, size: int):
    """POST txt2img and open its images: what a client holds at the end (PIL images), as `direct` gives."""
    def call(seed: int) -> list[PIL.Image.Image]:
        answer = session.post(f"{url}/sdapi/v1/txt2img", json=dict(prompt=PROMPT, seed=seed, width=size, height=size))
        answer.raise_for_status()
        return [PIL.Image.open(io.BytesIO(base64.b64decode(text))) for text in answer.json()["images"]]
    return call


def direct_call(pipe, size: int):
    return lambda seed: pipe(PROMPT, seed=seed, width=size, height=size, progress=False).images


def bootstrap(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95 % interval of the median of `values` (percentile bootstrap)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def measure(pairs: int, warmup: int, size: int, clock: str) -> dict:
    import requests
    import torch

    from ldm_pipeline import LatentDiffusionPipeline

    torch.set_grad_enabled(False)
    pipe = LatentDiffusionPipeline.from_pretrained()
    url, server = start_server(pipe)
    runs = {"direct": direct_call(pipe, size)}
    try:
        with requests.Session() as session:
            runs["api"] = api_call(session, url, size)
            for i in range(warmup):  # also the check that both draw the same pixels
                shown = {key: np.asarray(run(i)[0].convert("RGB"), dtype=np.int16) for key, run in runs.items()}
                if not np.array_equal(shown["direct"], shown["api"]):
                    raise RuntimeError(f"seed {i}: the API's pixels differ from the direct call's; not comparing")
            now = CLOCKS[clock]
            times = {key: [] for key in runs}
            for pair in range(pairs):
                for key, run in runs.items():
                    start = now()
                    run(1000 + pair)
                    times[key].append(now() - start)
                print(f"pair {pair + 1}/{pairs}: direct {times['direct'][-1] * 1e3:.1f} ms, "
                      f"api {times['api'][-1] * 1e3:.1f} ms", flush=True)
    finally:
        server.should_exit = True
    return summary(times, dict(model="bundled", size=size, steps=int(pipe.defaults["num_inference_steps"]),
                               guidance_scale=pipe.defaults["guidance_scale"], pairs=pairs, warmup=warmup,
                               clock=clock, threads=torch.get_num_threads(),
                               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch=torch.__version__))


def summary(times: dict, settings: dict) -> dict:
    ratios = [a / d - 1 for a, d in zip(times["api"], times["direct"])]
    median = {key: statistics.median(values) for key, values in times.items()}

    def quartiles(values):
        q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return [round(q[0], 5), round(q[2], 5)]

    low, high = bootstrap(ratios)
    return {**settings,
            "median_s": {key: round(value, 5) for key, value in median.items()},
            "quartiles_s": {key: quartiles(values) for key, values in times.items()},
            "overhead": round(median["api"] / median["direct"] - 1, 4),
            "paired_overhead": {"median": round(statistics.median(ratios), 4),
                                "interval95": [round(low, 4), round(high, 4)], "quartiles": quartiles(ratios)},
            "extra_ms": round((median["api"] - median["direct"]) * 1e3, 2),
            "target": TARGET, "times_s": {key: [round(v, 5) for v in values] for key, values in times.items()}}


def markdown(r: dict) -> str:
    p = r["paired_overhead"]
    return "\n".join([
        f"Bundled model, {r['size']}x{r['size']}, {r['steps']} steps, guidance {r['guidance_scale']}; {r['pairs']} "
        f"alternating pairs after {r['warmup']} warm-up pairs; clock: {r['clock']}; torch {r['torch']}, "
        f"{r['threads']} thread(s). Produced by `benchmarks/api_overhead.py`.", "",
        "| call | median ms | quartiles ms |", "|---|---:|---:|",
        *(f"| {key} | {r['median_s'][key] * 1e3:.1f} | {r['quartiles_s'][key][0] * 1e3:.1f}-"
          f"{r['quartiles_s'][key][1] * 1e3:.1f} |" for key in ("direct", "api")), "",
        f"Overhead (median api / median direct - 1): {100 * r['overhead']:.1f} % ({r['extra_ms']:.1f} ms a call); "
        f"median of the pairs' overheads {100 * p['median']:.1f} % (95 % bootstrap interval "
        f"{100 * p['interval95'][0]:.1f} to {100 * p['interval95'][1]:.1f} %). Target: at most "
        f"{100 * r['target']:.0f} %.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30, help="timed (direct, api) pairs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first (their pixels are compared)")
    parser.add_argument("--size", type=int, default=64, help="the pictures' side in pixels")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (quiet machine), or the process's CPU time, the server's thread included "
                             "(OMP_NUM_THREADS=1 on a shared machine)")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON; the table goes beside it (.md)")
    args = parser.parse_args()
    if args.pairs < 2:
        parser.error(f"--pairs: got {args.pairs}; expected 2 or more")

    result = measure(args.pairs, args.warmup, args.size, args.clock)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
