"""The trainers on tiny configs: loss goes down, resume is exact, bad data is named, accelerate launch runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from ldm_pipeline.training import data
from ldm_pipeline.training.clip import ClipConfig, train_clip
from ldm_pipeline.training.loop import LoopConfig, latest_checkpoint, train
from ldm_pipeline.shapes import ShapesDataset
from ldm_pipeline.shapes.tokenizer import build_clip_tokenizer, train_bpe
from ldm_pipeline.training.unet import UnetConfig, train_unet
from ldm_pipeline.training.vae import VaeConfig, VaeObjective, train_vae

TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 2, "norm_num_groups": 8,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = {**TEXT, "patch_size": 8}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def _losses(output_dir):
    return [json.loads(line)["loss"] for line in (output_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory):
    captions = [ShapesDataset(400, seed=1)[i]["text"] for i in range(400)]
    return build_clip_tokenizer(captions, 700, tmp_path_factory.mktemp("tok"), model_max_length=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_tokenizer):
    """Tiny CLIP, VAE and UNet trained on the shapes set for a few dozen steps each."""
    root = tmp_path_factory.mktemp("run")
    loop = dict(batch_size=16, warmup_steps=2, log_every=5, checkpoint_every=100)
    clip = train_clip(ClipConfig(loop=LoopConfig(output_dir=str(root / "clip"), steps=30, learning_rate=2e-3, **loop),
                                 tokenizer=shapes_tokenizer.name_or_path, image_size=32, text=TEXT, vision=VISION,
                                 projection_dim=32), progress=False)
    vae = train_vae(VaeConfig(loop=LoopConfig(output_dir=str(root / "vae"), steps=40, learning_rate=3e-3, **loop),
                              image_size=32, model=TINY_VAE, scale_samples=64), progress=False)
    unet = train_unet(UnetConfig(loop=LoopConfig(output_dir=str(root / "unet"), steps=40, learning_rate=2e-3,
                                                 ema_decay=0.9, **loop),
                                 clip=str(root / "clip" / "model"), vae=str(root / "vae" / "model"), image_size=32,
                                 cache_size=128, model=TINY_UNET, scheduler=SCHEDULER), progress=False)
    return root, clip, vae, unet


def test_tokenizer_round_trip(shapes_tokenizer):
    caption = "a large purple triangle in the bottom right and an orange square in the top left"
    ids = shapes_tokenizer(caption)["input_ids"]
    assert shapes_tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert len(ids) <= 24  # whole words became single tokens
    assert shapes_tokenizer.model_max_length == 32
    with pytest.raises(ValueError, match=r"`vocab_size`: got 100; a byte-level CLIP vocabulary needs at least 514"):
        train_bpe(["a"], 100)


@pytest.mark.parametrize("stage", ["clip", "vae", "unet"])
def test_a_few_steps_lower_the_loss(trained, stage):
    root = trained[0]
    losses = _losses(root / stage)
    assert losses[-1] < losses[0] * 0.9, losses
    assert (root / stage / "loss.png").is_file()
    assert (root / stage / "model").is_dir()


def test_vae_stores_its_measured_scaling_factor(trained):
    vae = trained[2]
    pixels, _ = data.batch(ShapesDataset(64), list(range(64)), 32)
    latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    assert vae.config.scaling_factor != 0.18215
    assert 0.8 < latents.std().item() < 1.25


def test_the_trained_parts_make_a_pipeline_that_diffusers_loads(trained, tmp_path):
    from diffusers import StableDiffusionPipeline
    from ldm_pipeline import LatentDiffusionPipeline
    from ldm_pipeline.training.unet import assemble

    root = trained[0]
    folder = assemble(root / "clip" / "model", root / "vae" / "model", root / "unet" / "model", SCHEDULER,
                      tmp_path / "model", defaults={"guidance_scale": 3.0})
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    result = pipe("a red circle in the top left", num_inference_steps=3, seed=0, progress=False)
    assert result.images[0].size == (32, 32) and result.guidance_scale == 3.0
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert StableDiffusionPipeline.from_pretrained(folder).unet.config.sample_size == 16


def _vae_run(output_dir, stop_at=None, ran=None):
    """A tiny VAE run of 6 steps with a checkpoint every 2; `stop_at` interrupts it like Ctrl-C at that step,
    and `ran` collects the steps that actually ran."""
    dataset = ShapesDataset(10_000)
    config = VaeConfig(loop=LoopConfig(output_dir=str(output_dir), steps=6, batch_size=4, checkpoint_every=2,
                                       warmup_steps=1, log_every=1), image_size=32, model=TINY_VAE)

    def loss_fn(models, step, generator, rank, world):
        if step == stop_at:
            raise KeyboardInterrupt("stopped")
        if ran is not None:
            ran.append(step)
        pixels, _ = data.batch(dataset, data.step_indices(len(dataset), step, 4, 0, rank, world), 32)
        return models["vae"](pixels, generator)

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = VaeObjective(AutoencoderKL(sample_size=32, **TINY_VAE), config)
    return lambda resume: train(config.loop, {"vae": model}, loss_fn, resume=resume, progress=False)["vae"]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_continues_from_the_checkpoint_and_gives_the_same_weights(tmp_path):
    straight = _vae_run(tmp_path / "straight")(False)
    ran = []
    with pytest.raises(KeyboardInterrupt):
        _vae_run(tmp_path / "stopped", stop_at=3, ran=ran)(False)
    assert ran == [0, 1, 2]
    checkpoint = latest_checkpoint(tmp_path / "stopped")
    assert checkpoint.name == "step-0000002.pt" and torch.load(checkpoint, weights_only=False)["step"] == 2
    ran.clear()
    resumed = _vae_run(tmp_path / "stopped", ran=ran)(True)
    assert ran == [2, 3, 4, 5]  # training went on at the checkpoint's step; steps 0 and 1 did not run again
    _assert_same_weights(straight.state_dict(), resumed.state_dict())
    steps = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_ldm_train_resume_of_a_unet_stage_with_ema_ends_as_an_uninterrupted_run(trained, tmp_path, monkeypatch):
    from ldm_pipeline.apps.cli import main
    from ldm_pipeline.training import unet as unet_stage

    root = trained[0]
    config = {"stage": "unet", "clip": str(root / "clip" / "model"), "vae": str(root / "vae" / "model"),
              "image_size": 32, "cache_size": 64, "model": TINY_UNET, "scheduler": SCHEDULER,
              "loop": {"output_dir": "{run}/unet", "steps": 6, "batch_size": 8, "learning_rate": 2e-3,
                       "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "ema_decay": 0.9}}
    (tmp_path / "unet.json").write_text(json.dumps(config))
    # The stage's own loss, watched: it records each step that runs and can stop the run at a step (Ctrl-C).
    ran, stop = [], {"at": None}
    real_train = unet_stage.train

    def watched_train(loop_config, models, loss_fn, **kwargs):
        def watched(models, step, generator, rank, world):
            if step == stop["at"]:
                raise KeyboardInterrupt("stopped")
            ran.append(step)
            return loss_fn(models, step, generator, rank, world)
        return real_train(loop_config, models, watched, **kwargs)

    monkeypatch.setattr(unet_stage, "train", watched_train)

    def ldm_train(run, *flags):
        # The UNet's initial weights come from torch's global generator, which every fresh `ldm`
        # process starts in the same state; in one process, put it back in a fixed state for each run.
        torch.manual_seed(0)
        return main(["train", str(tmp_path / "unet.json"), "--run-dir", str(tmp_path / run), *flags])

    assert ldm_train("straight") == 0
    stop["at"], ran[:] = 3, []
    with pytest.raises(KeyboardInterrupt):
        ldm_train("stopped")
    assert ran == [0, 1, 2]
    stop["at"], ran[:] = None, []
    assert ldm_train("stopped", "--resume") == 0
    assert ran == [2, 3, 4, 5]

    def final(run):
        state = torch.load(tmp_path / run / "unet" / "checkpoints" / "step-0000006.pt", weights_only=False)
        return state["models"]["unet"], state["ema"]

    (weights, ema), (resumed_weights, resumed_ema) = final("straight"), final("stopped")
    _assert_same_weights(weights, resumed_weights)
    _assert_same_weights(ema, resumed_ema)
    assert any(not torch.equal(weights[k].float(), ema[k]) for k in weights)  # the EMA is not the weights
    from safetensors.torch import load_file

    exported = [load_file(tmp_path / run / "unet" / "model" / "diffusion_pytorch_model.safetensors")
                for run in ("straight", "stopped")]
    _assert_same_weights(*exported)  # the exported model is the EMA
    assert all(torch.equal(exported[0][k], ema[k]) for k in exported[0])


def test_checkpoints_are_pruned_to_the_newest_two(tmp_path):
    _vae_run(tmp_path / "run")(False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000004.pt", "step-0000006.pt"]  # keep_checkpoints=2


def test_a_checkpoint_write_that_fails_half_way_leaves_the_previous_one(tmp_path, monkeypatch):
    real_save = torch.save

    def save_half(state, file, *args, **kwargs):
        if "0000004" in str(file):  # the second checkpoint: some bytes reach the disk, then the write dies
            Path(file).write_bytes(b"half a checkpoint")
            raise OSError("no space left on device")
        return real_save(state, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="no space left"):
        _vae_run(tmp_path / "run")(False)
    monkeypatch.undo()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "step-0000002.pt" and torch.load(checkpoint, weights_only=False)["step"] == 2
    ran = []
    resumed = _vae_run(tmp_path / "run", ran=ran)(True)
    assert ran == [2, 3, 4, 5]
    _assert_same_weights(_vae_run(tmp_path / "straight")(False).state_dict(), resumed.state_dict())


def _folder(tmp_path, lines, images=("a.png",)):
    for name in images:
        PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_image_folder_reads_metadata(tmp_path):
    folder = _folder(tmp_path, ['{"file_name": "a.png", "text": "a red square"}'])
    dataset = data.open_dataset(str(folder))
    assert len(dataset) == 1 and dataset[0]["text"] == "a red square"
    assert data.batch(dataset, [0], 16)[0].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("lines, message", [
    ([], r"lists no images"),
    (['{"file_name": "a.png"}'], r"metadata.jsonl:1 has no caption"),
    (['{"file_name": "a.png", "text": "ok"}', '{"file_name": "b.png", "text": "x"}'], r":2 names image .*b.png"),
    (['not json'], r"metadata.jsonl:1 is not JSON"),
    (['{"file_name": "bad.png", "text": "x"}'], r"image '.*bad.png' .* cannot be read"),
])
def test_bad_data_is_named(tmp_path, lines, message):
    folder = _folder(tmp_path, lines)
    (tmp_path / "bad.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=message):
        data.ImageFolderDataset(folder)


def test_folder_without_metadata(tmp_path):
    with pytest.raises(ValueError, match=r"has no metadata.jsonl"):
        data.ImageFolderDataset(tmp_path)


def test_two_process_run_through_accelerate_launch(tmp_path):
    config = {"stage": "vae", "data": "shapes", "image_size": 32, "model": TINY_VAE, "scale_samples": 16,
              "loop": {"output_dir": "{run}/vae", "steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 2,
                       "checkpoint_every": 2}}
    (tmp_path / "vae.json").write_text(json.dumps(config))
    # on a CPU-only machine `--multi_gpu` starts the processes with torchrun; they meet over gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "ldm_pipeline", "train",
               str(tmp_path / "vae.json"), "--run-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "vae" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["processes"]) for r in records] == [(2, 2), (4, 2)]
    assert (tmp_path / "run" / "vae" / "model" / "diffusion_pytorch_model.safetensors").is_file()


def test_recipe_configs_are_checked(tmp_path):
    from ldm_pipeline.training.plan import read_stage

    stage, config = read_stage("configs/shapes/unet.json", tmp_path, overrides={"steps": 3})
    assert stage == "unet" and config.loop.steps == 3 and config.vae == str(tmp_path / "vae" / "model")
    (tmp_path / "bad.json").write_text(json.dumps({"stage": "vae", "colour": "red", "loop": {"output_dir": "x"}}))
    with pytest.raises(ValueError, match=r"settings \['colour'\] are unknown for stage 'vae'"):
        read_stage(tmp_path / "bad.json", tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"stage": "vae", "loop": {"output_dir": "x", "stepz": 1}}))
    with pytest.raises(ValueError, match=r"loop settings \['stepz'\] are unknown"):
        read_stage(tmp_path / "bad.json", tmp_path)
    with pytest.raises(ValueError, match=r"`config`: no file"):
        read_stage(tmp_path / "missing.json", tmp_path)
    with pytest.raises(ValueError, match=r"`batch_size`: got 0; expected an integer >= 1"):
        read_stage("configs/shapes/vae.json", tmp_path, overrides={"batch_size": 0})


def test_unet_trainer_with_and_without_the_caption_table_takes_the_same_steps(trained, tmp_path, monkeypatch):
    from ldm_pipeline.training import unet as unet_stage

    root = trained[0]

    def run(name, **settings):
        torch.manual_seed(0)  # the UNet's initial weights come from the global generator
        config = UnetConfig(loop=LoopConfig(output_dir=str(tmp_path / name), steps=3, batch_size=8, warmup_steps=1,
                                            log_every=1, checkpoint_every=100),
                            clip=str(root / "clip" / "model"), vae=str(root / "vae" / "model"), image_size=32,
                            cache_size=32, model=TINY_UNET, scheduler=SCHEDULER, **settings)
        train_unet(config, progress=False)
        return _losses(tmp_path / name)

    with_table = run("table")
    # the outline-weighted loss (tests/test_outline_weights.py) is what the stage trains on when asked
    assert run("outlines", edge_weight=4.0)[0] != pytest.approx(with_table[0], rel=1e-4)
    monkeypatch.setattr(unet_stage, "TEXT_TABLE_BYTES", 0)  # too big: captions encoded at every step
    calls = []
    real = unet_stage.encode_text
    monkeypatch.setattr(unet_stage, "encode_text", lambda *args: calls.append(1) or real(*args))
    per_step = run("per-step")
    assert len(calls) == 3  # the fallback really ran, once per step
    assert per_step == pytest.approx(with_table, rel=1e-5)


def test_a_unet_stage_can_start_from_a_trained_unet(trained, tmp_path, monkeypatch):
    import shutil

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from ldm_pipeline.training import unet as unet_stage

    root = trained[0]
    start = load_file(root / "unet" / "model" / "diffusion_pytorch_model.safetensors")
    shutil.copytree(root / "unet" / "model", tmp_path / "model" / "unet")  # a model folder's layout
    loop = dict(steps=2, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=100, ema_decay=0.9)

    def config(name, learning_rate=0.0, **settings):
        return UnetConfig(loop=LoopConfig(output_dir=str(tmp_path / name), learning_rate=learning_rate, **loop),
                          clip=str(root / "clip" / "model"), vae=str(root / "vae" / "model"), image_size=32,
                          cache_size=32, scheduler=SCHEDULER, **settings)

    # learning rate 0: the exported UNet is the one it started from, which new weights could never be
    for init in (root / "unet" / "model", tmp_path / "model"):
        tuned = train_unet(config(init.name, init=str(init)), progress=False)
        # (the EMA's arithmetic, x * d + x * (1 - d), may move a weight by a rounding error)
        assert all(torch.allclose(value, start[name], rtol=1e-6, atol=1e-8) for name, value in tuned.state_dict().items())
    moved = train_unet(config("moved", learning_rate=1e-3, init=str(tmp_path / "model")), progress=False)
    assert any(not torch.allclose(value, start[name], rtol=1e-3, atol=1e-5) for name, value in moved.state_dict().items())

    def no_encoding(*args, **kwargs):
        raise AssertionError("data encoded before the settings were checked")

    monkeypatch.setattr(unet_stage, "encode_dataset", no_encoding)
    with pytest.raises(ValueError, match=r"`model`: got settings .* with `init`"):
        train_unet(config("both", init=str(tmp_path / "model"), model=TINY_UNET), progress=False)
    with pytest.raises(ValueError, match=r"`init`: got .*nowhere.*; expected a UNet folder"):
        train_unet(config("missing", init=str(tmp_path / "nowhere")), progress=False)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=64,
                         **TINY_UNET).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"`init`: .* text contexts 64 wide; .* give 4 and 32"):
        train_unet(config("wide", init=str(tmp_path / "wide")), progress=False)


def test_a_recipe_with_finetune_json_goes_on_from_the_unet_stage(tmp_path, monkeypatch):
    from ldm_pipeline.training import plan as plan_module
    from ldm_pipeline.training import unet as unet_module

    folder = tmp_path / "recipe"
    folder.mkdir()
    for stage in plan_module.STAGES:
        (folder / f"{stage}.json").write_text((Path("configs/shapes") / f"{stage}.json").read_text())
    ran, assembled = [], {}
    monkeypatch.setattr(plan_module, "run_stage", lambda path, *a, **k: ran.append(Path(path).stem))
    monkeypatch.setattr(unet_module, "assemble", lambda clip, vae, unet, *a, **k: assembled.update(unet=str(unet)))

    def finetune(init, vae="{run}/vae/model"):
        (folder / "finetune.json").write_text(json.dumps({
            "stage": "unet", "init": init, "clip": "{run}/clip/model", "vae": vae,
            "loop": {"output_dir": "{run}/finetune", "steps": 10, "seed": 1}}))

    finetune("{run}/elsewhere/model")
    with pytest.raises(ValueError, match=r'finetune.json.* must be a UNet stage with "init": "\{run\}/unet/model"'):
        plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    finetune("{run}/unet/model", vae="{run}/other-vae/model")
    with pytest.raises(ValueError, match=r'finetune.json.* has "vae": .*other-vae.*; a fine-tune must use the same vae'):
        plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    assert ran == []  # refused before any stage ran
    finetune("{run}/unet/model/")  # a trailing slash names the same folder
    plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    assert ran == ["tokenizer", "clip", "vae", "unet", "finetune"]
    assert assembled["unet"] == str(tmp_path / "run" / "finetune" / "model")

    # finetune2.json goes on from finetune.json (finetune4.json, after a gap, is not read)
    second = {"stage": "unet", "init": "{run}/unet/model", "clip": "{run}/clip/model", "vae": "{run}/vae/model",
              "loop": {"output_dir": "{run}/finetune2", "steps": 10, "seed": 2}}
    (folder / "finetune2.json").write_text(json.dumps(second))
    (folder / "finetune4.json").write_text(json.dumps({**second, "init": "{run}/nowhere"}))
    ran.clear()
    with pytest.raises(ValueError, match=r'finetune2.json.* must be a UNet stage with "init": "\{run\}/finetune/model"'):
        plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    (folder / "finetune2.json").write_text(json.dumps({**second, "init": "{run}/finetune/model"}))
    plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    assert ran == ["tokenizer", "clip", "vae", "unet", "finetune", "finetune2"]
    assert assembled["unet"] == str(tmp_path / "run" / "finetune2" / "model")
