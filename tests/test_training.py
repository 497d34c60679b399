"""The trainers on tiny configs: loss goes down, resume is exact, bad data is named, accelerate launch runs."""

import json
import os
import shutil
import subprocess
import sys

import PIL.Image
import pytest
import torch
from transformers import CLIPTokenizer

from ldm_pipeline.training import data
from ldm_pipeline.training.clip import ClipConfig, train_clip
from ldm_pipeline.training.loop import LoopConfig, latest_checkpoint, train
from ldm_pipeline.training.shapes import ShapesDataset
from ldm_pipeline.training.tokenizer import build_clip_tokenizer, train_bpe
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


def _vae_run(output_dir, stop_at=None):
    dataset = ShapesDataset(10_000)
    config = VaeConfig(loop=LoopConfig(output_dir=str(output_dir), steps=6, batch_size=4, checkpoint_every=2,
                                       warmup_steps=1, log_every=1), image_size=32, model=TINY_VAE)

    def loss_fn(models, step, generator, rank, world):
        if step == stop_at:
            raise KeyboardInterrupt("stopped")
        pixels, _ = data.batch(dataset, data.step_indices(len(dataset), step, 4, 0, rank, world), 32)
        return models["vae"](pixels, generator)

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = VaeObjective(AutoencoderKL(sample_size=32, **TINY_VAE), config)
    return lambda resume: train(config.loop, {"vae": model}, loss_fn, resume=resume, progress=False)["vae"]


def test_resume_after_a_stop_gives_the_same_weights(tmp_path):
    straight = _vae_run(tmp_path / "straight")(False)
    with pytest.raises(KeyboardInterrupt):
        _vae_run(tmp_path / "stopped", stop_at=3)(False)
    assert latest_checkpoint(tmp_path / "stopped").name == "step-0000002.pt"
    resumed = _vae_run(tmp_path / "stopped")(True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_written_atomically_and_pruned(tmp_path):
    _vae_run(tmp_path / "run")(False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000004.pt", "step-0000006.pt"]  # keep_checkpoints=2, no temporary left


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
               "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "ldm_pipeline.cli", "train",
               str(tmp_path / "vae.json"), "--run-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "vae" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["processes"]) for r in records] == [(2, 2), (4, 2)]
    assert (tmp_path / "run" / "vae" / "model" / "diffusion_pytorch_model.safetensors").is_file()


def test_recipe_configs_are_checked(tmp_path):
    from ldm_pipeline.training.recipe import read_stage

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
