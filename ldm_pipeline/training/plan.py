"""Configs -> trainers: read a stage's JSON config and run it; run a whole training plan in order.

A plan folder (such as `configs/shapes/`) holds `tokenizer.json`, `clip.json`, `vae.json`
and `unet.json`, and may hold `finetune.json`: a second UNet stage that goes on from the first
(`"init"`), run after it, whose UNet the assembled model then uses (and `finetune2.json`,
`finetune3.json`, ...: each going on from the one before); and `decoder.json`: a VAE
stage that fine-tunes the trained VAE's decoder (`"train_encoder": false`), run last; the
assembled model then decodes with it. Paths inside them that start with `{run}` are placed under
the run folder.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .loop import LoopConfig

STAGES = ("tokenizer", "clip", "vae", "unet")
SHAPES_ONLY = ("max_objects", "partial_captions", "three_objects_prob", "split", "unplaced_captions")  # stage settings of the shapes data alone
FINETUNE_STAGE = "finetune"  # optional: finetune.json (then finetune2.json, ...), UNet stages that go on in turn
DECODER_STAGE = "decoder"  # optional: decoder.json, a decoder-only VAE stage run after the UNet


def _substitute(value, run: Path):
    if isinstance(value, str) and value.startswith("{run}"):
        return str(run / value[len("{run}/"):])
    if isinstance(value, dict):
        return {k: _substitute(v, run) for k, v in value.items()}
    return value


def read_stage(config_path: str | Path, run_dir: str | Path, overrides: dict | None = None):
    """The stage's config dataclass, with `{run}` paths placed in `run_dir` and loop overrides applied."""
    from .clip import ClipConfig
    from .controlnet import ControlNetTrainConfig
    from .lcm import LcmConfig
    from .textual_inversion import TextualInversionConfig
    from .lora import LoraTrainConfig
    from .unet import UnetConfig
    from .vae import VaeConfig

    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"`config`: no file {str(path)!r}")
    # keys starting with "_" are comments
    raw = {k: v for k, v in _substitute(json.loads(path.read_text()), Path(run_dir)).items() if not k.startswith("_")}
    stage = raw.pop("stage", path.stem)
    if stage == "tokenizer":
        return stage, raw
    classes = {"clip": ClipConfig, "vae": VaeConfig, "unet": UnetConfig, "lora": LoraTrainConfig,
               "controlnet": ControlNetTrainConfig, "lcm": LcmConfig, "textual_inversion": TextualInversionConfig}
    if stage not in classes:
        raise ValueError(f"`config`: {str(path)!r} has stage {stage!r}; expected one of "
                         f"{[*STAGES, 'lora', 'controlnet', 'lcm', 'textual_inversion']}")
    overrides = dict(overrides or {})
    if "data" in overrides:  # --data: the stage's data, not a loop setting
        raw["data"] = overrides.pop("data")
        if raw["data"] != "shapes":  # settings of the shapes data it replaces
            for key in SHAPES_ONLY:
                raw.pop(key, None)
    loop = {**raw.pop("loop", {}), **overrides}
    known = {f.name for f in fields(LoopConfig)}
    unknown = set(loop) - known
    if unknown:
        raise ValueError(f"`config`: {str(path)!r} loop settings {sorted(unknown)} are unknown; "
                         f"expected some of {sorted(known)}")
    accepted = {f.name for f in fields(classes[stage])} - {"loop"}
    if set(raw) - accepted:
        raise ValueError(f"`config`: {str(path)!r} settings {sorted(set(raw) - accepted)} are unknown for stage "
                         f"{stage!r}; expected some of {sorted(accepted)}")
    return stage, classes[stage](loop=LoopConfig(**loop), **raw)


def run_stage(config_path: str | Path, run_dir: str | Path, resume: bool = False, overrides: dict | None = None,
              progress: bool = True):
    """Run one stage (tokenizer, clip, vae, unet, lora or controlnet) from its config."""
    stage, config = read_stage(config_path, run_dir, overrides)
    if stage == "tokenizer":
        return build_tokenizer(config)
    from .clip import train_clip
    from .controlnet import train_controlnet
    from .lcm import train_lcm
    from .textual_inversion import train_textual_inversion
    from .lora import train_lora
    from .unet import train_unet
    from .vae import train_vae

    trainer = {"clip": train_clip, "vae": train_vae, "unet": train_unet, "lora": train_lora,
               "controlnet": train_controlnet, "lcm": train_lcm,
               "textual_inversion": train_textual_inversion}[stage]
    return trainer(config, resume=resume, progress=progress)


def build_tokenizer(config: dict):
    """Learn the BPE vocabulary from the captions of `config["captions"]` items of the data set."""
    from .data import open_dataset
    from ..shapes.tokenizer import build_clip_tokenizer

    dataset = open_dataset(config.get("data", "shapes"), length=config["captions"], seed=config.get("seed", 0),
                           max_objects=config.get("max_objects", 2),
                           partial_captions=config.get("partial_captions", 0.0))
    texts = [dataset[i]["text"] for i in range(min(config["captions"], len(dataset)))]
    return build_clip_tokenizer(texts, config["vocab_size"], config["output_dir"],
                                config.get("model_max_length", 77))


def finetune_stages(plan: Path) -> list[str]:
    """The plan's fine-tune stages in order: `finetune`, then `finetune2`, `finetune3`, ... up to the
    first number without a file."""
    names = []
    while True:
        name = FINETUNE_STAGE + (str(len(names) + 1) if names else "")
        if not (plan / f"{name}.json").is_file():
            return names
        names.append(name)


def _check_finetune(path: Path, previous, run_dir) -> object:
    """The fine-tune stage at `path`, refused unless it goes on from `previous` (a UNet stage's config)
    with the same VAE and text tower; returns its config."""
    stage, further = read_stage(path, run_dir)
    first = Path(previous.loop.output_dir) / "model"
    if stage != "unet" or not further.init or Path(further.init) != first:
        raise ValueError(f"`config`: {str(path)!r} must be a UNet stage with \"init\": "
                         f"\"{{run}}/{first.parent.name}/model\" (it goes on from the stage before it)")
    for part in ("vae", "clip"):  # other latents or other text encodings would undo what the UNet learned
        if Path(getattr(further, part)) != Path(getattr(previous, part)):
            raise ValueError(f"`config`: {str(path)!r} has \"{part}\": {getattr(further, part)!r}, but the "
                             f"stage before it uses {getattr(previous, part)!r}; a fine-tune must use the same {part}")
    return further


def run_plan(plan_dir: str | Path, run_dir: str | Path, out: str | Path, resume: bool = False,
               progress: bool = True) -> Path:
    """All four stages in order (then the fine-tunes and `decoder.json` when the plan has them), then the
    parts assembled into one model folder at `out`."""
    from .unet import assemble

    plan = Path(plan_dir)
    decoder = plan / f"{DECODER_STAGE}.json"
    # the optional stages are checked before hours of training, not after
    if decoder.is_file():
        stage, tuned = read_stage(decoder, run_dir)
        if stage != "vae" or tuned.train_encoder:
            raise ValueError(f"`config`: {str(decoder)!r} must be a VAE stage with \"train_encoder\": false "
                             "(a decoder fine-tune keeps the latents the UNet was trained on)")
    _, unet = read_stage(plan / "unet.json", run_dir)
    finetunes = finetune_stages(plan)
    for name in finetunes:
        unet = _check_finetune(plan / f"{name}.json", unet, run_dir)
    stages = [*STAGES, *finetunes, *([DECODER_STAGE] if decoder.is_file() else [])]
    for stage in stages:
        run_stage(plan / f"{stage}.json", run_dir, resume=resume, progress=progress)
    vae = str(Path(tuned.loop.output_dir) / "model") if decoder.is_file() else unet.vae
    return assemble(unet.clip, vae, Path(unet.loop.output_dir) / "model", unet.scheduler, out,
                    defaults=unet.defaults, inference_scheduler=unet.defaults.get("scheduler", "ddim"))
