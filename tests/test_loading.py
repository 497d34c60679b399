"""Saving, loading, configs and the errors of model folders."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm_pipeline import LatentDiffusionPipeline, ModelNotFoundError
from ldm_pipeline.loading.random_components import build_random

FAST = dict(num_inference_steps=3, progress=False, output_type="np")


@pytest.fixture
def saved(pipe, tmp_path):
    return pipe.save_pretrained(tmp_path / "model")


def test_save_and_load_round_trip_gives_the_same_pixels(pipe, saved):
    assert {p.name for p in saved.iterdir()} >= {"model_index.json", "tokenizer", "text_encoder", "vae", "unet",
                                                  "scheduler"}
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "text_encoder" / "model.safetensors").is_file()
    loaded = LatentDiffusionPipeline.from_pretrained(saved)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert np.array_equal(pipe("a cat", seed=4, **FAST).images, loaded("a cat", seed=4, **FAST).images)


def test_diffusers_loads_our_folder_and_draws_the_same(pipe, saved):
    theirs = StableDiffusionPipeline.from_pretrained(saved)
    theirs.set_progress_bar_config(disable=True)
    reference = theirs("a cat", num_inference_steps=3, generator=[torch.Generator().manual_seed(4)],
                       output_type="np").images
    assert np.abs(pipe("a cat", seed=4, **FAST).images - reference).max() <= 1 / 255


def test_we_load_a_folder_diffusers_saved(components, pipe, tmp_path):
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "theirs")
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "theirs")
    assert np.array_equal(pipe("a cat", seed=1, **FAST).images, loaded("a cat", seed=1, **FAST).images)


def test_defaults_are_saved_with_the_model(pipe, tmp_path):
    pipe.defaults["guidance_scale"] = 3.0
    loaded = LatentDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    assert loaded.defaults["guidance_scale"] == 3.0
    assert loaded("a cat", seed=0, **FAST).guidance_scale == 3.0


def test_missing_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model folder '.*nowhere' does not exist"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nowhere")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"has no model_index.json"):
        LatentDiffusionPipeline.from_pretrained(tmp_path)


def test_incomplete_folder_names_the_missing_part(saved):
    shutil.rmtree(saved / "vae")
    with pytest.raises(ModelNotFoundError, match=r"is incomplete: the 'vae' subfolder is missing"):
        LatentDiffusionPipeline.from_pretrained(saved)


def test_component_of_the_wrong_kind_is_named(saved):
    index = json.loads((saved / "model_index.json").read_text())
    index["unet"] = ["diffusers", "AutoencoderKL"]
    (saved / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match=r"component 'unet' is a diffusers.AutoencoderKL; expected a "
                                                 r"UNet2DConditionModel"):
        LatentDiffusionPipeline.from_pretrained(saved)


def test_save_never_overwrites_a_folder_that_is_not_a_model(pipe, tmp_path):
    keep = tmp_path / "photos"
    keep.mkdir()
    (keep / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"`save_directory`: '.*photos' exists and is not a model folder"):
        pipe.save_pretrained(keep)
    assert (keep / "holiday.jpg").read_bytes() == b"precious"


def test_save_over_an_existing_model_replaces_it(pipe, saved):
    (saved / "unet" / "stale.txt").write_text("old")
    pipe.save_pretrained(saved)
    assert not (saved / "unet" / "stale.txt").exists()
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".model.")]


def test_unreachable_hub_gives_a_clear_error():
    code = ("from ldm_pipeline import LatentDiffusionPipeline as P\n"
            "P.from_pretrained('some-owner/some-model-that-is-not-cached')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0
    assert "cannot download 'some-owner/some-model-that-is-not-cached'" in run.stderr
    assert "HF_HUB_OFFLINE=1" in run.stderr and "local model folder" in run.stderr


@pytest.mark.parametrize("config, unet, vae, text_encoder", [
    ("sd15", 859_520_964, 83_653_863, 123_060_480),
    ("sd21", 865_910_724, 83_653_863, 340_387_840),
])
def test_configs_build_full_size_architectures(config, unet, vae, text_encoder):
    components = build_random(config, device="meta")
    count = {name: sum(p.numel() for p in components[name].parameters()) for name in ("unet", "vae", "text_encoder")}
    assert count == {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    assert components["unet"].config.cross_attention_dim == components["text_encoder"].config.hidden_size


def test_unknown_config_name():
    with pytest.raises(ValueError, match=r"`config`: no configuration 'sd99' in configs/; expected one of "
                                         r"\['sd15', 'sd21', 'sdxl', 'sdxl_refiner'\]"):
        build_random("sd99")


@pytest.mark.slow
def test_full_size_sd15_runs_a_step_with_random_weights():
    pipe = LatentDiffusionPipeline(**build_random("sd15"))
    result = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, seed=0, progress=False)
    assert result.images[0].size == (64, 64)


def test_single_file_checkpoint_loads_and_draws_the_same(pipe, tmp_path):
    from safetensors.torch import save_file
    from ldm_format import to_ldm_state_dict

    checkpoint = tmp_path / "tiny.safetensors"
    save_file(to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder), checkpoint)
    configs = pipe.save_pretrained(tmp_path / "configs")  # a diffusers folder serves as config=
    loaded = LatentDiffusionPipeline.from_single_file(checkpoint, config=str(configs), tokenizer=pipe.tokenizer)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.allclose(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours), name
    assert np.abs(pipe("a cat", seed=2, **FAST).images - loaded("a cat", seed=2, **FAST).images).max() <= 1 / 255


def test_single_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`path`: no file at .*model.ckpt."):
        LatentDiffusionPipeline.from_single_file(tmp_path / "model.ckpt")
    from safetensors.torch import save_file
    save_file({"something.else": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"is not a Stable Diffusion 1.x/2.x checkpoint"):
        LatentDiffusionPipeline.from_single_file(tmp_path / "other.safetensors")


def test_single_file_of_unknown_width_asks_for_a_config(pipe, tmp_path):
    from safetensors.torch import save_file
    from ldm_format import to_ldm_state_dict

    save_file(to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder), tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match=r"cross-attention width 32, neither SD 1.x \(768\) nor SD 2.x"):
        LatentDiffusionPipeline.from_single_file(tmp_path / "tiny.safetensors")


def _changed_copy(pipe):
    """The same pipeline with other UNet weights, so that an old and a new save draw different pixels."""
    other = LatentDiffusionPipeline(**copy.deepcopy(pipe.components))
    with torch.no_grad():
        other.unet.conv_in.weight.add_(0.5)
    return other


def _left_beside(folder):
    return sorted(p.name for p in folder.parent.iterdir())


def test_a_save_that_fails_half_way_keeps_the_old_model_and_leaves_no_temporary_folder(pipe, saved, monkeypatch):
    old_pixels = pipe("a cat", seed=4, **FAST).images
    other = _changed_copy(pipe)
    assert np.abs(other("a cat", seed=4, **FAST).images - old_pixels).max() > 0.01

    def fail_half_way(directory, *args, **kwargs):  # the VAE is written after the tokenizer and text encoder
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "diffusion_pytorch_model.safetensors").write_bytes(b"half a file")
        raise OSError("no space left on device")

    monkeypatch.setattr(other.vae, "save_pretrained", fail_half_way)
    with pytest.raises(OSError, match="no space left"):
        other.save_pretrained(saved)
    with pytest.raises(OSError, match="no space left"):
        other.save_pretrained(saved.parent / "new")
    assert _left_beside(saved) == ["model"]  # no temporary folder, and no half-written new model
    assert np.array_equal(LatentDiffusionPipeline.from_pretrained(saved)("a cat", seed=4, **FAST).images, old_pixels)


def test_a_save_whose_final_move_fails_keeps_the_old_model(pipe, saved, monkeypatch):
    old_pixels = pipe("a cat", seed=4, **FAST).images
    replace, failed = os.replace, []

    def replace_failing_once_onto_the_model(source, destination):
        if Path(destination) == saved and not failed:
            failed.append(source)
            raise OSError("the disk went away")
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_once_onto_the_model)
    with pytest.raises(OSError, match="the disk went away"):
        _changed_copy(pipe).save_pretrained(saved)
    monkeypatch.undo()
    assert failed and _left_beside(saved) == ["model"]
    assert np.array_equal(LatentDiffusionPipeline.from_pretrained(saved)("a cat", seed=4, **FAST).images, old_pixels)
    _changed_copy(pipe).save_pretrained(saved)  # and a save that works replaces it
    assert not np.array_equal(LatentDiffusionPipeline.from_pretrained(saved)("a cat", seed=4, **FAST).images,
                              old_pixels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_on_the_cpu(pipe, saved, dtype):
    reference = pipe("a cat", seed=4, **FAST).images
    tolerance = 0.01 if dtype == torch.float16 else 0.05  # bf16 keeps 8 bits of mantissa, fp16 11
    loaded = LatentDiffusionPipeline.from_pretrained(saved, torch_dtype=dtype)
    moved = LatentDiffusionPipeline.from_pretrained(saved).to("cpu", dtype)
    for half in (loaded, moved):
        assert half.device.type == "cpu"
        assert {m.dtype for m in (half.unet, half.vae, half.text_encoder)} == {dtype}
        images = half("a cat", seed=4, **FAST).images
        assert images.dtype == np.float32 and np.isfinite(images).all()
        assert np.abs(images - reference).max() < tolerance
        image_to_image = half("a cat", image=reference[0], strength=0.5, seed=4, **FAST).images
        assert image_to_image.shape == reference.shape and np.isfinite(image_to_image).all()
    assert moved.to("cpu").dtype == torch.float32  # no dtype: fp32 on the CPU again
    assert np.abs(moved("a cat", seed=4, **FAST).images - reference).max() < tolerance


@pytest.mark.parametrize("width, config", [(768, "sd15"), (1024, "sd21")])
def test_single_file_config_is_guessed_from_the_cross_attention_width(tokenizer, tmp_path, monkeypatch, width,
                                                                      config):
    from safetensors.torch import save_file

    from ldm_pipeline.loading import folders as loading, single_file

    # what decides is the width of the UNet's cross-attention keys: 768 for CLIP ViT-L (1.x), 1024 for OpenCLIP (2.x)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(320, width)}, tmp_path / "model.safetensors")
    seen = {}

    def single_file_loader(cls, path, config, **kwargs):
        seen.update(path=path, config=config, tokenizer=kwargs["tokenizer"])
        raise RuntimeError("stop: the conversion itself is tested elsewhere")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(single_file_loader))
    with pytest.raises(loading.ModelFileError, match="stop"):  # the loader's failure, wrapped naming the file
        LatentDiffusionPipeline.from_single_file(tmp_path / "model.safetensors", tokenizer=tokenizer)
    assert Path(seen["config"]) == single_file.config_dir(config) and seen["tokenizer"] is tokenizer
    assert json.loads((Path(seen["config"]) / "unet" / "config.json").read_text())["cross_attention_dim"] == width


@pytest.mark.slow
def test_full_size_sd15_single_file_loads_with_its_config_guessed(tmp_path):
    """A random SD 1.5 written as an original single-file checkpoint (fp16, 2.1 GB) and read back with no config."""
    from safetensors.torch import save_file
    from ldm_format import to_ldm_state_dict

    parts = ("unet", "vae", "text_encoder")
    components = build_random("sd15", torch_dtype=torch.float16)  # fp16 throughout: under 5 GB of memory, 20 s
    save_file(to_ldm_state_dict(*(components[name] for name in parts)), tmp_path / "sd15.safetensors")
    loaded = LatentDiffusionPipeline.from_single_file(tmp_path / "sd15.safetensors", tokenizer=components["tokenizer"],
                                                      torch_dtype=torch.float16)
    assert loaded.unet.config.cross_attention_dim == 768
    assert tuple(loaded.unet.config.block_out_channels) == (320, 640, 1280, 1280)
    for name in parts:
        ours, theirs = getattr(loaded, name).state_dict(), components[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key].reshape(ours[key].shape)), (name, key)
