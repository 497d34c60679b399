"""Fine-tuning only a trained VAE's decoder (latents unchanged) and the edge-weighted loss."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from ldm_pipeline.training.loop import LoopConfig
from ldm_pipeline.training.plan import read_stage
from ldm_pipeline.training.vae import VaeConfig, edge_weights, train_vae

TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}


def test_edge_weights_are_one_on_flat_areas_and_larger_on_outlines():
    pixels = torch.zeros(1, 3, 8, 8)
    assert torch.equal(edge_weights(pixels, 5.0), torch.ones(1, 1, 8, 8))
    pixels[:, :, :, 4:] = 1.0  # a vertical edge between columns 3 and 4
    weights = edge_weights(pixels, 5.0)
    assert weights.shape == (1, 1, 8, 8)
    assert torch.allclose(weights[0, 0, :, 3], torch.full((8,), 1 + 5.0 * 3 * 0.5))
    assert torch.equal(weights[0, 0, :, :3], torch.ones(8, 3)) and torch.equal(weights[0, 0, :, 5:], torch.ones(8, 3))


def test_decoder_only_run_keeps_the_encoder_and_scaling_factor(tmp_path):
    torch.manual_seed(0)
    start = AutoencoderKL(sample_size=32, **TINY_VAE)
    start.register_to_config(scaling_factor=0.7)
    start.save_pretrained(tmp_path / "start")
    loop = LoopConfig(output_dir=str(tmp_path / "tuned"), steps=3, batch_size=4, learning_rate=1e-2, warmup_steps=1)
    tuned = train_vae(VaeConfig(loop=loop, image_size=32, init=str(tmp_path / "start"), train_encoder=False,
                                edge_weight=4.0, scale_samples=8), progress=False)
    before, after = start.state_dict(), tuned.state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (name.startswith(("encoder.", "quant_conv."))), name
    saved = AutoencoderKL.from_pretrained(tmp_path / "tuned" / "model")
    assert saved.config.scaling_factor == 0.7
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(saved.encode(pixels).latent_dist.mean, start.encode(pixels).latent_dist.mean)


def test_bad_settings_are_named(tmp_path):
    loop = LoopConfig(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`train_encoder`: false needs `init`"):
        VaeConfig(loop=loop, train_encoder=False)
    with pytest.raises(ValueError, match="`train_encoder`: got 'no'"):
        VaeConfig(loop=loop, init="x", train_encoder="no")
    with pytest.raises(ValueError, match="`edge_weight`: got -1"):
        VaeConfig(loop=loop, edge_weight=-1)
    config = tmp_path / "vae.json"
    config.write_text(json.dumps({"stage": "vae", "init": "{run}/vae/model", "train_encoder": False,
                                  "loop": {"output_dir": "{run}/decoder"}}))
    with pytest.raises(ValueError, match="`init`: got .*vae/model', which is not a folder"):
        train_vae(read_stage(config, tmp_path)[1], progress=False)


def test_a_recipe_with_decoder_json_runs_it_last_and_assembles_with_it(tmp_path, monkeypatch):
    from ldm_pipeline.training import plan as plan_module
    from ldm_pipeline.training import unet as unet_module

    source = plan_module.Path(__file__).parents[1] / "configs" / "shapes"
    folder = tmp_path / "recipe"
    folder.mkdir()
    for stage in plan_module.STAGES:
        (folder / f"{stage}.json").write_text((source / f"{stage}.json").read_text())
    ran, assembled = [], {}
    monkeypatch.setattr(plan_module, "run_stage", lambda path, *a, **k: ran.append(plan_module.Path(path).stem))
    monkeypatch.setattr(unet_module, "assemble", lambda clip, vae, *a, **k: assembled.update(vae=vae))
    plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    assert ran == ["tokenizer", "clip", "vae", "unet"] and assembled["vae"] == str(tmp_path / "run" / "vae" / "model")

    (folder / "decoder.json").write_text(json.dumps({"stage": "vae", "init": "{run}/vae/model", "train_encoder": True,
                                                     "loop": {"output_dir": "{run}/decoder"}}))
    ran.clear()
    with pytest.raises(ValueError, match='decoder.json.* must be a VAE stage with "train_encoder": false'):
        plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    assert ran == []  # refused before any stage ran
    (folder / "decoder.json").write_text(json.dumps({"stage": "vae", "init": "{run}/vae/model", "train_encoder": False,
                                                     "loop": {"output_dir": "{run}/decoder"}}))
    plan_module.run_plan(folder, tmp_path / "run", tmp_path / "out")
    assert ran == ["tokenizer", "clip", "vae", "unet", "decoder"]
    assert assembled["vae"] == str(tmp_path / "run" / "decoder" / "model")


def test_the_shipped_recipe_ends_with_a_decoder_fine_tune_on_every_pair(tmp_path, monkeypatch):
    from ldm_pipeline.training import plan as plan_module
    from ldm_pipeline.training import unet as unet_module

    source = plan_module.Path(__file__).parents[1] / "configs" / "shapes"
    ran, assembled = [], {}
    monkeypatch.setattr(plan_module, "run_stage", lambda path, *a, **k: ran.append(plan_module.Path(path).stem))
    monkeypatch.setattr(unet_module, "assemble", lambda clip, vae, unet, *a, **k: assembled.update(vae=vae, unet=unet))
    plan_module.run_plan(source, tmp_path / "run", tmp_path / "out")
    assert ran == ["tokenizer", "clip", "vae", "unet", "finetune", "finetune2", "finetune3", "decoder"]
    assert assembled["vae"] == str(tmp_path / "run" / "decoder" / "model")
    assert assembled["unet"] == tmp_path / "run" / "finetune3" / "model"
    stage, config = plan_module.read_stage(source / "decoder.json", tmp_path / "run")
    assert (stage, config.split, config.train_encoder, config.init) == ("vae", "any", False,
                                                                        str(tmp_path / "run" / "vae" / "model"))
