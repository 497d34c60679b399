"""One training loop shared by the CLIP, VAE and UNet trainers, run through `accelerate`.

The same command runs plain on one CPU and under `accelerate launch` on several processes or
GPUs. Every step is a pure function of (seed, step, process): its batch indices and its
randomness come from the step number, so a run resumed from a checkpoint reaches the same
weights as one that never stopped. Checkpoints are written to a temporary file and renamed,
so a kill never leaves a broken one.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..files import atomic_path, leftovers


@dataclass
class LoopConfig:
    """Settings every trainer shares."""

    output_dir: str  # checkpoints, log.jsonl, loss.png and the exported model go here
    steps: int = 1000  # optimiser steps in all
    batch_size: int = 32  # global batch: split evenly over the processes
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up, then cosine decay to `final_lr_fraction`
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float | None = None  # keep an exponential moving average of the weights when set
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 0
    mixed_precision: str = "no"  # "fp16"/"bf16" on GPUs
    extra: dict = field(default_factory=dict)  # trainer-specific settings, logged with the run

    def __post_init__(self):
        # Checked here, so that `ldm train --steps 0` is an error rather than a run that trains nothing.
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}`: got {value!r}; expected an integer >= 1")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps`: got {self.warmup_steps!r}; expected an integer >= 0")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed for one step on one process, the same however often the run was stopped."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def learning_rate(config: LoopConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.final_lr_fraction
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class EMA:
    """Exponential moving average of a model's weights (with the usual warm-up of the decay)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        shadows, values = [], []
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                shadows.append(self.shadow[key])
                values.append(value.detach().float())
            else:
                self.shadow[key].copy_(value)
        # shadow * decay + value * (1 - decay), the same arithmetic as tensor by tensor, in one call each
        torch._foreach_mul_(shadows, decay)
        torch._foreach_add_(shadows, values, alpha=1 - decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def check_stage_folder(name: str, folder: str) -> None:
    """Raise a ValueError naming the setting when an earlier stage's output folder is not there.

    transformers and diffusers would raise an OSError about Hub repository ids for a missing folder.
    """
    if not folder or not Path(folder).is_dir():
        raise ValueError(f"`{name}`: got {folder!r}, which is not a folder; train the {name} stage first "
                         "(ldm train RECIPE_FOLDER runs the stages in order) or point the config at its output")


CHECKPOINT_NAMES = "step-*.pt"


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(CHECKPOINT_NAMES), key=lambda p: int(p.stem.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = _checkpoints(Path(output_dir) / "checkpoints")
    return found[-1] if found else None


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, synced to disk, then a rename.

    A kill at any moment leaves the previous checkpoint and at worst a hidden `.step-*.partial.pt`
    file, which `latest_checkpoint` does not see; the sync before the rename makes the same hold
    after a power cut, where a renamed but unwritten file could otherwise be left.
    """
    with atomic_path(path, sync=True) as temporary:
        torch.save(state, temporary)


def load_latest_checkpoint(output_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads whole, and its state; None when there is none.

    A newer one that cannot be read (damaged on disk, or cut short where the file system lost a
    write) is skipped with a warning naming it, so the run goes on from the one before.
    """
    for path in reversed(_checkpoints(Path(output_dir) / "checkpoints")):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises RuntimeError, EOFError or pickle errors for a cut file
            warnings.warn(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {error}); "
                          "resuming from the one before it", stacklevel=2)
    return None


def _trim_log(log: Path, step: int) -> None:
    """After a resume, forget what was logged past the checkpoint so the log reads as one run."""
    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        with atomic_path(log) as temporary:  # a kill while trimming keeps the whole log
            temporary.write_text("".join(line + "\n" for line in kept))


def plot_losses(log: str | Path, png: str | Path, title: str = "") -> Path:
    """Draw every logged loss against the step (log scale) into a PNG."""
    # A bare Figure needs no backend: pyplot and matplotlib.use("Agg") would switch the backend of
    # the whole process, and with it a notebook's inline plots.
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in Path(log).read_text().splitlines() if line]
    keys = sorted({k for r in records for k in r if k.startswith("loss")})
    figure = Figure(figsize=(6, 3.5), dpi=100)
    axis = figure.subplots()
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot(*zip(*points), label=key)
    axis.set_xlabel("step")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png)
    return Path(png)


LossFn = Callable[[dict, int, torch.Generator, int, int], tuple[torch.Tensor, dict]]


def _state(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if not trainable_only:
        return state
    training = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in training}


def train(config: LoopConfig, models: dict[str, torch.nn.Module], loss_fn: LossFn, resume: bool = False,
          ema_model: str | None = None, progress: bool = True, name: str = "train",
          trainable_only: bool = False, lr_scales: dict[str, float] | None = None) -> dict[str, torch.nn.Module]:
    """Optimise `models` with AdamW for `config.steps` steps.

    Args:
        models: the trainable modules by name (all their parameters are optimised).
        loss_fn: `loss_fn(models, step, generator, rank, world) -> (loss, metrics)`; it draws
            its own batch for (step, rank) and takes all randomness from `generator`.
        resume: continue from the latest checkpoint in `output_dir/checkpoints`.
        ema_model: the name of the model to keep an EMA of (with `config.ema_decay`).
        trainable_only: checkpoints keep only the parameters that train (a LoRA's, not the frozen
            base model's); resuming loads them over the base weights.
        lr_scales: a learning-rate factor by model name (default 1): that model's parameters follow the
            schedule times the factor (a discriminator that must learn faster than what it judges).

    Returns:
        The trained models, unwrapped; the EMA weights are copied into `ema_model` at the end.
    """
    # cpu=True where there is no GPU lets processes started by `accelerate launch --multi_gpu` or
    # torchrun find each other over gloo; with a GPU, accelerate places each process on its own.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    output = Path(config.output_dir)
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"`batch_size`: {config.batch_size} does not split over {accelerator.num_processes} "
                         "processes; choose a multiple")
    by_scale = {}  # one parameter group per learning-rate factor (one group, as before, without lr_scales)
    for key, model in models.items():
        trainable = [p for p in model.parameters() if p.requires_grad]
        by_scale.setdefault((lr_scales or {}).get(key, 1.0), []).extend(trainable)
    groups = [{"params": params, "lr_scale": scale} for scale, params in by_scale.items() if params]
    parameters = [p for group in groups for p in group["params"]]
    # fused: one kernel for all parameters instead of a dozen small ops per tensor (CPU and CUDA)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    ema = EMA(models[ema_model], config.ema_decay) if ema_model and config.ema_decay else None
    start = 0
    log = output / "log.jsonl"
    if accelerator.is_main_process:  # what a killed run left half-written is of no use: never read, never resumed
        for stale in leftovers(output / "checkpoints", CHECKPOINT_NAMES):
            stale.unlink(missing_ok=True)
    found = load_latest_checkpoint(output) if resume else None
    if found is not None:
        checkpoint, state = found
        if set(state["models"]) != set(models):
            raise ValueError(f"`resume`: checkpoint {str(checkpoint)!r} holds models {sorted(state['models'])}, "
                             f"this run trains {sorted(models)}; it was written with another config")
        for key, model in models.items():
            if trainable_only:  # the checkpoint holds the trained parameters alone: they must be these
                expected = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
                if {name: value.shape for name, value in state["models"][key].items()} != expected:
                    raise ValueError(f"`resume`: checkpoint {str(checkpoint)!r} holds {len(state['models'][key])} "
                                     f"trained tensors of {key!r}; this run trains {len(expected)}, or others, or "
                                     "of other shapes: it was written with another config (rank, targets)")
            model.load_state_dict(state["models"][key], strict=not trainable_only)
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow = state["ema"]
        start = state["step"]
        if accelerator.is_main_process:
            _trim_log(log, start)
    elif accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        (output / "config.json").write_text(json.dumps(asdict(config), indent=2))
    names = list(models)
    prepared = accelerator.prepare(*models.values(), optimizer)
    wrapped, optimizer = dict(zip(names, prepared[:-1])), prepared[-1]
    for model in wrapped.values():
        model.train()

    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=name,
               disable=not (progress and accelerator.is_main_process))
    began, running = time.time(), {}
    for step in bar:
        torch.manual_seed(step_seed(config.seed, step, rank))  # dropout and other global-RNG draws
        generator = torch.Generator().manual_seed(step_seed(config.seed, step, rank))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step) * group.get("lr_scale", 1.0)
        loss, metrics = loss_fn(wrapped, step, generator, rank, world)
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(wrapped[ema_model]), step)
        for key, value in {"loss": loss.item(), **metrics}.items():
            running.setdefault(key, []).append(float(value))
        done = step + 1
        if accelerator.is_main_process and (done % config.log_every == 0 or done == config.steps):
            record = {"step": done, "lr": learning_rate(config, step), "seconds": round(time.time() - began, 1),
                      "processes": world}
            record.update({k: sum(v) / len(v) for k, v in running.items()})
            with log.open("a") as file:
                file.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            running = {}
        if done % config.checkpoint_every == 0 or done == config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"step": done, "optimizer": optimizer.state_dict(),
                         "models": {k: _state(accelerator.unwrap_model(m), trainable_only) for k, m in wrapped.items()},
                         "ema": ema.shadow if ema is not None else None}
                save_checkpoint(output / "checkpoints" / f"step-{done:07d}.pt", state)
                for old in _checkpoints(output / "checkpoints")[:-config.keep_checkpoints]:
                    old.unlink()
    accelerator.wait_for_everyone()
    result = {k: accelerator.unwrap_model(m) for k, m in wrapped.items()}
    if ema is not None:
        ema.copy_to(result[ema_model])
    if accelerator.is_main_process and log.is_file() and log.read_text().strip():
        plot_losses(log, output / "loss.png", title=name)
    for model in result.values():
        model.eval()
    return result
