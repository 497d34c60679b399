"""A load test of the HTTP API: locust users (`benchmarks/locustfile.py`) against a server this script starts.

The server is `ldm serve --nowebui` (the API alone) with the bundled model on a free local port, in a
process of its own, as a deployment runs it; locust runs headless in another (it patches the
standard library through gevent, so it shares no process with torch). The users mix txt2img (64x64,
the model's own 4 DDIM steps), img2img with a mask, png-info, sd-models, samplers and progress; the
drawing requests wait for each other in the server's queue (`Runner`), so their latency grows with
the users. Reported per route: requests, failures (the test fails unless there are none), requests
per second and the 50th, 90th and 99th percentiles of latency, as a markdown table in
docs/results/api-load.md (locust's own JSON of the run and the server's log go to api-load/ beside it).

    OMP_NUM_THREADS=1 python benchmarks/api_load.py                        # 4 users for 3 minutes (quiet machine)
    OMP_NUM_THREADS=1 python benchmarks/api_load.py --users 8 --run-time 5m
    OMP_NUM_THREADS=1 python benchmarks/api_load.py --users 2 --run-time 15s --out /tmp/load.md   # a smoke run

Needs the `bench` extra (locust) and the `api` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
OUT = ROOT / "docs" / "results" / "api-load.md"
# run from the checkout, so that this checkout's ldm_pipeline is the one served
SERVER = "import sys; from ldm_pipeline.apps.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, model: str | None, log) -> subprocess.Popen:
    """`ldm serve --nowebui` on `port`, once it answers (the model loaded)."""
    command = [sys.executable, "-c", SERVER, "serve", "--nowebui", "--port", str(port)]
    if model is not None:
        command += ["--model", model]
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server ended with status {server.returncode} before answering; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=5) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"the server did not answer within 120 s; see {log.name}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM, which `ldm serve` takes as Ctrl-C; killed if it has not ended in 30 s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_locust(url: str, users: int, spawn_rate: float, run_time: str, prefix: Path) -> int:
    """Headless locust; its final stats go to `<prefix>.json` (requests still running at the end may finish,
    for up to 60 s, and count: the CSV files are written on a timer and miss them)."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--stop-timeout", "60",
               "--host", url, "--json-file", str(prefix)]
    return subprocess.run(command, cwd=ROOT).returncode


def percentile(times: dict[int, int], share: float) -> int:
    """The latency (ms, as locust rounds it) that `share` of the requests took at most."""
    total, seen = sum(times.values()), 0
    for latency in sorted(times):
        seen += times[latency]
        if seen >= share * total:
            return latency
    return 0


def summarise(entries: list[dict]) -> list[dict]:
    """Locust's JSON stats (one entry per route) -> a row per route and one for all, with percentiles;
    requests per second over the whole run (its first request to its last)."""
    ends = [e["last_request_timestamp"] or e["start_time"] for e in entries]
    span = max(ends, default=0) - min((e["start_time"] for e in entries), default=0)

    def row(route, group):
        times = {}
        for entry in group:
            for latency, count in entry["response_times"].items():
                times[int(float(latency))] = times.get(int(float(latency)), 0) + count
        requests = sum(e["num_requests"] for e in group)
        return dict(route=route, requests=requests, failures=sum(e["num_failures"] for e in group),
                    per_s=requests / span if span > 0 else 0.0, max_ms=max(e["max_response_time"] for e in group),
                    **{f"p{p}_ms": percentile(times, p / 100) for p in (50, 90, 99)})

    rows = [row(f"{e['method']} {e['name']}", [e]) for e in sorted(entries, key=lambda e: e["name"])]
    return rows + [row("all", entries)] if entries else rows


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [f"{settings['users']} locust users (spawn rate {settings['spawn_rate']}/s) for {settings['run_time']} "
             f"against `ldm serve --nowebui` with the {settings['model']} model (txt2img and img2img at 64x64, the "
             f"model's own steps); OMP_NUM_THREADS={settings['omp_num_threads']}. Produced by "
             "`benchmarks/api_load.py`; latencies in milliseconds.", "",
             "| route | requests | failures | requests/s | p50 ms | p90 ms | p99 ms | max ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['route']} | {r['requests']} | {r['failures']} | {r['per_s']:.2f} | {r['p50_ms']} | "
                     f"{r['p90_ms']} | {r['p99_ms']} | {r['max_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=4, help="locust users at once")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: --users)")
    parser.add_argument("--run-time", default="3m", help="how long, in locust's form: 90s, 3m, 1h30m")
    parser.add_argument("--model", default=None, help="the server's --model (default: the bundled model)")
    parser.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    parser.add_argument("--out", type=Path, default=OUT,
                        help="the markdown table; locust's CSV files and the server's log go beside it")
    args = parser.parse_args()
    if args.users < 1:
        parser.error(f"--users: got {args.users}; expected 1 or more")
    if importlib.util.find_spec("locust") is None:
        parser.error("locust is not installed; pip install 'ldm-pipeline[bench]'")

    spawn_rate = args.spawn_rate or args.users
    folder = args.out.with_suffix("")  # docs/results/api-load/: locust's JSON and the server's log
    folder.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    with open(folder / "server.log", "w") as log:
        server = start_server(port, args.model, log)
        try:
            status = run_locust(f"http://127.0.0.1:{port}", args.users, spawn_rate, args.run_time, folder / "locust")
        finally:
            stop_server(server)
    rows = summarise(json.loads((folder / "locust.json").read_text()))  # locust adds the .json
    settings = dict(users=args.users, spawn_rate=spawn_rate, run_time=args.run_time, model=args.model or "bundled",
                    omp_num_threads=os.environ.get("OMP_NUM_THREADS", "unset"))
    table = markdown(rows, settings)
    args.out.write_text(table)
    print(table)
    failures = rows[-1]["failures"] if rows else 0
    print(f"wrote {args.out} and {folder}/; failures: {failures}")
    return 1 if failures or status else 0


if __name__ == "__main__":
    sys.exit(main())
