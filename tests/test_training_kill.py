"""Training survives SIGKILL in the middle of writing a checkpoint: `--resume` goes on from the last whole one."""

import json
import os
import signal
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_pipeline.apps.cli import main
from ldm_pipeline.training import data
from ldm_pipeline.training.loop import latest_checkpoint

TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}

# The child runs `ldm train` with torch.save wrapped: torch's own serializer writes the checkpoint of step 4
# into the file, and after its first kilobyte the write stops (flushed to disk), a marker file appears, and
# the process waits to be killed. Nothing in the package is changed for the test.
CHILD = """
import os, sys, time, torch
marker, stop_at = sys.argv[1], sys.argv[2]
real_save = torch.save

class Stalling:
    def __init__(self, file):
        self.file, self.written = file, 0
    def write(self, chunk):
        self.file.write(chunk)
        self.written += len(chunk)
        if self.written > 1024:
            self.file.flush()
            os.fsync(self.file.fileno())
            open(marker, "w").close()
            time.sleep(600)
        return len(chunk)
    def flush(self):
        self.file.flush()

def save(state, file, *args, **kwargs):
    if stop_at in str(file):
        with open(file, "wb") as raw:
            return real_save(state, Stalling(raw), *args, **kwargs)
    return real_save(state, file, *args, **kwargs)

torch.save = save
torch.set_num_threads(1)
torch.manual_seed(0)
from ldm_pipeline.apps.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _config(tmp_path) -> Path:
    config = {"stage": "vae", "image_size": 32, "model": TINY_VAE, "scale_samples": 8,
              "loop": {"output_dir": "{run}/vae", "steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                       "checkpoint_every": 2, "learning_rate": 3e-3}}
    path = tmp_path / "vae.json"
    path.write_text(json.dumps(config))
    return path


def _kill_while_writing(tmp_path, config: Path, run: Path, stop_at: str) -> Path:
    """Run `ldm train` in a child process and SIGKILL it half-way through writing the checkpoint `stop_at`."""
    marker = tmp_path / "writing"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), stop_at, "train", str(config),
                              "--run-dir", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, f"the run ended before the checkpoint write:\n{child.stdout.read().decode()}"
            assert time.monotonic() < deadline, "the checkpoint write never started"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    return run / "vae"


def test_sigkill_while_writing_a_checkpoint_then_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    config = _config(tmp_path)
    output = _kill_while_writing(tmp_path, config, tmp_path / "killed", stop_at="step-0000004")
    folder = output / "checkpoints"
    partial = [p for p in folder.iterdir() if p.name != "step-0000002.pt"]
    assert len(partial) == 1 and re.fullmatch(r"\.step-0000004\.\d+\.partial\.pt", partial[0].name)  # cut short
    whole = (folder / "step-0000002.pt").stat().st_size
    assert 1024 < partial[0].stat().st_size < whole / 2  # part of a checkpoint reached the disk
    checkpoint = latest_checkpoint(output)
    assert checkpoint.name == "step-0000002.pt" and torch.load(checkpoint, weights_only=False)["step"] == 2
    steps = [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the log ran ahead of the last whole checkpoint

    ran = []
    real_indices = data.step_indices
    monkeypatch.setattr(data, "step_indices", lambda size, step, *a: ran.append(step) or real_indices(size, step, *a))
    torch.manual_seed(0)  # as the child did before building the VAE (a resumed run loads its weights anyway)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "killed"), "--resume"]) == 0
    assert ran == [2, 3, 4, 5]  # on from the last whole checkpoint; steps 0 and 1 did not run again
    steps = [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000004.pt", "step-0000006.pt"]

    ran.clear()
    torch.manual_seed(0)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "straight")]) == 0
    assert ran == [0, 1, 2, 3, 4, 5]
    final = {run: torch.load(tmp_path / run / "vae" / "checkpoints" / "step-0000006.pt", weights_only=False)
             for run in ("straight", "killed")}
    for key, value in final["straight"]["models"]["vae"].items():
        assert torch.equal(value, final["killed"]["models"]["vae"][key]), key
    exported = [load_file(tmp_path / run / "vae" / "model" / "diffusion_pytorch_model.safetensors")
                for run in ("straight", "killed")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_an_unreadable_newest_checkpoint_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """What a power cut can leave despite the rename (a named but empty or cut file): resume from the one before."""
    config = _config(tmp_path)
    ran, stop = [], {"at": 5}
    real_indices = data.step_indices

    def watched(size, step, *args):
        if step == stop["at"]:
            raise KeyboardInterrupt("stopped")
        ran.append(step)
        return real_indices(size, step, *args)

    monkeypatch.setattr(data, "step_indices", watched)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(config), "--run-dir", str(tmp_path / "cut")])
    newest = tmp_path / "cut" / "vae" / "checkpoints" / "step-0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    stop["at"], ran[:] = None, []
    with pytest.warns(UserWarning, match=r"checkpoint '.*step-0000004.pt' cannot be read .*resuming from the one "
                                         r"before it"):
        assert main(["train", str(config), "--run-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert ran == [2, 3, 4, 5]
    torch.manual_seed(0)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "straight")]) == 0
    exported = [load_file(tmp_path / run / "vae" / "model" / "diffusion_pytorch_model.safetensors")
                for run in ("straight", "cut")]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
