"""LoRA training on the shared loop, on tiny components; the star shape it is demonstrated with."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.apps.cli import main
from ldm_pipeline.evaluation.judge import judge
from ldm_pipeline.training.loop import latest_checkpoint
from ldm_pipeline.training.plan import read_stage, run_stage
from ldm_pipeline.shapes import ShapesDataset, caption, eval_scenes, new_shape_scenes, parse_caption, render, write_image_folder


@pytest.fixture
def stars(tmp_path):
    folder = tmp_path / "stars"
    write_image_folder(new_shape_scenes("star", 24, seed=0), folder)
    return folder


def config(tmp_path, model, **changes):
    settings = {"stage": "lora", "model": str(model), "rank": 4, "alpha": 8, "text_encoder": True,
                "image_size": 16, "loop": {"output_dir": "{run}/lora", "steps": 6, "batch_size": 4,
                                           "learning_rate": 0.01, "warmup_steps": 1, "checkpoint_every": 3,
                                           "log_every": 1}}
    settings.update(changes)
    path = tmp_path / "lora.json"
    path.write_text(json.dumps(settings))
    return path


def test_a_trained_lora_loads_changes_the_pictures_and_leaves_the_base_alone(tmp_path, model, stars):
    base = LatentDiffusionPipeline.from_pretrained(model)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    kw = dict(num_inference_steps=3, height=16, width=16, output_type="np", progress=False, seed=0)
    plain = base("a red star in the top left", **kw).images

    assert main(["train", str(config(tmp_path, model)), "--data", str(stars), "--run-dir", str(tmp_path / "run")]) == 0
    folder = tmp_path / "run" / "lora" / "lora"
    state = load_file(folder / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in state) and any(k.startswith("text_encoder.") for k in state)
    assert all("lora" in k for k in state)  # adapters only, not the base weights
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "lora" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and (tmp_path / "run" / "lora" / "loss.png").is_file()

    base.load_lora_weights(folder)
    assert np.abs(base("a red star in the top left", **kw).images - plain).max() > 1e-3
    # the base model's files are untouched, and unloading gives its pixels back
    reloaded = LatentDiffusionPipeline.from_pretrained(model)
    assert all(torch.equal(before[k], v) for k, v in reloaded.unet.state_dict().items())
    np.testing.assert_allclose(base.unload_lora_weights()("a red star in the top left", **kw).images, plain,
                               atol=1e-6)


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path, model, stars):
    path = config(tmp_path, model, text_encoder=False)
    run_stage(path, tmp_path / "whole", overrides={"data": str(stars)}, progress=False)
    run_stage(path, tmp_path / "split", overrides={"data": str(stars)}, progress=False)
    latest_checkpoint(tmp_path / "split" / "lora").unlink()  # as if stopped after step 3's checkpoint
    (tmp_path / "split" / "lora" / "lora" / "pytorch_lora_weights.safetensors").unlink()
    checkpoint = torch.load(latest_checkpoint(tmp_path / "split" / "lora"), weights_only=False)
    assert checkpoint["step"] == 3 and all("lora" in k for k in checkpoint["models"]["unet"])
    run_stage(path, tmp_path / "split", resume=True, overrides={"data": str(stars)}, progress=False)
    whole = load_file(tmp_path / "whole" / "lora" / "lora" / "pytorch_lora_weights.safetensors")
    split = load_file(tmp_path / "split" / "lora" / "lora" / "pytorch_lora_weights.safetensors")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


@pytest.mark.parametrize("changes, message", [
    ({}, "data.*--data FOLDER"),
    ({"data": "x", "rank": 0}, "rank.*0"),
    ({"data": "x", "unet_targets": []}, "unet_targets"),
    ({"data": "x", "surprise": 1}, r"\['surprise'\] are unknown"),
])
def test_bad_lora_configs_are_named(tmp_path, model, changes, message):
    with pytest.raises(ValueError, match=message):
        read_stage(config(tmp_path, model, **changes), tmp_path / "run")


def test_the_star_is_drawn_captioned_and_judged(tmp_path):
    scenes = new_shape_scenes("star", 60, seed=3)
    assert all(scene.objects[0].shape == "star" for scene in scenes)
    assert any(len(scene.objects) == 2 for scene in scenes)
    for scene in scenes:
        assert parse_caption(caption(scene))[0].shape == "star"
        assert judge(render(scene), caption(scene)).correct, caption(scene)
    # a star is not read as a circle, nor a circle as a star
    circle = eval_scenes("seen", 40, 0)
    assert all(judge(render(s), caption(s)).correct for s in circle)
    star = scenes[0]
    as_circle = caption(star).replace("star", "circle")
    assert not judge(render(star), as_circle).shape


def test_the_bundled_training_data_does_not_change():
    # the star is an extra shape: the recipe's data set never draws it
    dataset = ShapesDataset(300, seed=0)
    assert all(obj.shape != "star" for i in range(300) for obj in dataset.scene(i).objects)


def test_shapes_data_command(tmp_path):
    assert main(["shapes-data", "star", "--n", "5", "--mix", "3", "--out", str(tmp_path / "d")]) == 0
    lines = (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 8 and sum("star" in line for line in lines) == 5
    assert main(["shapes-data", "hexagon", "--out", str(tmp_path / "e")]) == 2


def test_only_the_adapters_change_in_memory_too(tmp_path, model, stars, loaded_pipelines):
    loaded = loaded_pipelines
    run_stage(config(tmp_path, model), tmp_path / "run", overrides={"data": str(stars)}, progress=False)
    fresh = LatentDiffusionPipeline.from_pretrained(model)
    for name in ("unet", "text_encoder", "vae"):
        before = getattr(fresh, name).state_dict()
        adapters = 0
        for key, value in getattr(loaded[0], name).state_dict().items():
            if "lora_" in key:
                adapters += "lora_B" in key and bool(value.abs().sum() > 0)  # B starts at zero: these trained
                continue
            assert torch.equal(value, before[key.replace(".base_layer", "")]), (name, key)
        assert adapters > 0 or name == "vae", name


@pytest.mark.parametrize("changes, message", [
    ({"unet_targets": ["to_q", "to_kk"]}, r"`unet_targets`: \['to_kk'\] name no"),
    ({"text_targets": ["q_proj", "qproj"]}, r"`text_targets`: \['qproj'\] name no"),
    ({"text_encoder": "no"}, "`text_encoder`: got 'no'; expected true or false"),
    ({"caption_dropout": "0.1"}, r"`caption_dropout`: got '0.1'"),
    ({"alpha": True}, "`alpha`: got True"),
    ({"loop": {"output_dir": "{run}/lora", "learning_rate": -1}}, "`learning_rate`: got -1"),
])
def test_misspelt_and_mistyped_settings_are_named_before_training(tmp_path, model, stars, capsys, changes, message):
    assert main(["train", str(config(tmp_path, model, **changes)), "--data", str(stars),
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "lora" / "checkpoints").exists()


def test_resuming_with_another_config_is_refused_and_keeps_the_checkpoint(tmp_path, model, stars, capsys):
    def ldm_train(*flags, **changes):
        return main(["train", str(config(tmp_path, model, **{"text_encoder": False, **changes})), "--data", str(stars),
                     "--run-dir", str(tmp_path / "run"), *flags])

    assert ldm_train("--steps", "3") == 0
    checkpoint = latest_checkpoint(tmp_path / "run" / "lora")
    written = checkpoint.read_bytes()
    for changes in ({"text_encoder": True}, {"rank": 2}, {"unet_targets": ["to_q", "to_k"]}):
        assert ldm_train("--resume", **changes) == 2
        assert f"`resume`: checkpoint {str(checkpoint)!r}" in capsys.readouterr().err
    assert checkpoint.read_bytes() == written
    assert ldm_train("--resume") == 0  # the same config goes on


def test_shapes_data_never_writes_into_a_folder_with_files(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "00000.png").write_text("the user's file")
    assert main(["shapes-data", "star", "--n", "2", "--mix", "0", "--out", str(tmp_path / "mine")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "00000.png").read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left
    (tmp_path / "empty").mkdir()
    assert main(["shapes-data", "star", "--n", "2", "--mix", "0", "--out", str(tmp_path / "empty")]) == 0
    assert len((tmp_path / "empty" / "metadata.jsonl").read_text().splitlines()) == 2


def test_a_failed_lora_write_keeps_the_previous_lora(tmp_path, model, stars, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from ldm_pipeline.training import lora

    path = config(tmp_path, model, text_encoder=False)
    folder = run_stage(path, tmp_path / "run", overrides={"data": str(stars)}, progress=False)
    written = (folder / "pytorch_lora_weights.safetensors").read_bytes()

    def cut_off(save_directory, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "pytorch_lora_weights.safetensors").write_bytes(written[:100])
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", cut_off)
    with pytest.raises(OSError, match="disk full"):
        lora.save_lora(LatentDiffusionPipeline.from_pretrained(model).unet, None, folder)
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == written


def test_a_lora_of_attention_convolutions_and_feed_forwards_loads_whole(tmp_path, model, stars, recwarn):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.0.proj"]
    run_stage(config(tmp_path, model, unet_targets=targets), tmp_path / "run", overrides={"data": str(stars)},
              progress=False)
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(tmp_path / "run" / "lora" / "lora", adapter_name="all")
    assert not [w for w in recwarn if "not used" in str(w.message)]
    from ldm_pipeline.adapters.lora import adapted_modules, file_modules

    state = load_file(tmp_path / "run" / "lora" / "lora" / "pytorch_lora_weights.safetensors")
    loaded = adapted_modules(pipe, "all")
    assert len(loaded["unet"]) + len(loaded["text_encoder"]) == len(file_modules(state))
    assert any(name.endswith("attn1.to_q") for name in loaded["unet"])
    assert any(name.endswith("resnets.0.conv1") for name in loaded["unet"])
