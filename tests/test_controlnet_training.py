"""Edge ControlNet training on the shared loop, on tiny components; the bundled edge ControlNet."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDPMScheduler
from safetensors.torch import load_file
from scipy import ndimage

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.apps.cli import main
from ldm_pipeline.loading.controlnet import load_controlnet
from ldm_pipeline.shapes import (BACKGROUND, COLOURS, ShapesDataset, parse_caption, render, unplaced_caption,
                                 write_image_folder)
from ldm_pipeline.training import controlnet as stage
from ldm_pipeline.training import data
from ldm_pipeline.training.loop import latest_checkpoint
from ldm_pipeline.training.plan import read_stage, run_stage

SHIPPED = Path(stage.__file__).parents[1] / "models" / "shapes-edges"
PROMPT = "a red circle in the top left"


def config(tmp_path, model, **changes):
    settings = {"stage": "controlnet", "model": str(model), "data": "shapes", "cache_size": 24, "image_size": 16,
                "canny_low": 10, "canny_high": 30, "conditioning_channels": [8, 16],
                "loop": {"output_dir": "{run}/controlnet", "steps": 6, "batch_size": 4, "learning_rate": 0.003,
                         "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1}}
    loop = changes.pop("loop", {})
    settings.update(changes)
    settings["loop"].update(loop)
    path = tmp_path / "controlnet.json"
    path.write_text(json.dumps(settings))
    return path


def edges_of(scene, size=16):
    return stage.edge_map(render(scene), size, 10, 30)


def test_a_new_net_adds_nothing_so_it_draws_the_plain_unets_pixels(model):
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    net = stage.initial_controlnet(pipe.unet, (8, 16), seed=0)
    outputs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    assert all(not p.any() for block in outputs for p in block.parameters())
    # the copied encoder is the UNet's
    unet = pipe.unet.state_dict()
    assert all(torch.equal(v, unet[k]) for k, v in net.state_dict().items() if k.startswith("down_blocks."))
    kw = dict(num_inference_steps=3, height=16, width=16, output_type="np", progress=False, seed=0)
    picture = edges_of(ShapesDataset(1, seed=0).scene(0))
    plain = pipe(PROMPT, **kw).images
    np.testing.assert_array_equal(pipe(PROMPT, controlnet=net, control_image=picture, **kw).images, plain)


def test_training_changes_the_net_lowers_its_loss_and_leaves_the_model_alone(tmp_path, model, loaded_pipelines):
    loaded = loaded_pipelines
    path = config(tmp_path, model, loop={"steps": 30, "batch_size": 8, "checkpoint_every": 30, "log_every": 5})
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    folder = tmp_path / "run" / "controlnet" / "model"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                         "training.json"]
    assert (tmp_path / "run" / "controlnet" / "loss.png").is_file()

    fresh = LatentDiffusionPipeline.from_pretrained(model)
    for name in ("unet", "text_encoder", "vae"):  # frozen: the same weights as on disk
        before = getattr(fresh, name).state_dict()
        assert all(torch.equal(v, before[k]) for k, v in getattr(loaded[0], name).state_dict().items()), name

    trained = ControlNetModel.from_pretrained(folder)
    initial = stage.initial_controlnet(fresh.unet, (8, 16), seed=0)
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in trained.state_dict().items())
    assert trained.controlnet_mid_block.weight.abs().sum() > 0

    # on the same batch, the trained net's loss is below the start's (the plain UNet's)
    _, settings = read_stage(path, tmp_path / "run")
    items = stage.control_data(fresh, settings, data.open_dataset("shapes", length=24), 16)
    scheduler = DDPMScheduler.from_config(fresh.scheduler.config)

    def loss(net):
        generator = torch.Generator().manual_seed(1)
        latents, context, pictures, _ = stage.control_batch(items, None, settings.loop, 0.5, 0.0, 0, generator, 0, 1)
        latents, context, pictures = latents.repeat(4, 1, 1, 1), context.repeat(4, 1, 1), pictures.repeat(4, 1, 1, 1)
        with torch.no_grad():
            return stage.controlnet_loss(net, fresh.unet, scheduler, latents, context, pictures, generator).item()

    assert loss(trained) < 0.9 * loss(initial)


def test_the_saved_net_loads_in_diffusers_and_the_pipeline_and_steers_it(tmp_path, model):
    folder = run_stage(config(tmp_path, model), tmp_path / "run", progress=False)
    ours, theirs = load_controlnet(folder), ControlNetModel.from_pretrained(folder)
    assert isinstance(ours, ControlNetModel) and ours.ldm_name == "model"
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert tuple(ours.config.conditioning_embedding_out_channels) == (8, 16)
    written = json.loads((folder / "training.json").read_text())
    assert written["model"] == str(model) and written["canny_low"] == 10 and written["image_size"] == 16

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    kw = dict(num_inference_steps=3, height=16, width=16, output_type="np", progress=False, seed=0)
    picture = edges_of(ShapesDataset(1, seed=0).scene(0))
    assert np.abs(pipe(PROMPT, controlnet=ours, control_image=picture, **kw).images
                  - pipe(PROMPT, **kw).images).max() > 1e-4

    # fp16, as the bundled net is shipped: half the size, and diffusers reads it
    half = stage.save_controlnet(ours, tmp_path / "half", dtype=torch.float16)
    weights = load_file(half / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert ControlNetModel.from_pretrained(half, torch_dtype=torch.float32).dtype == torch.float32


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, model):
    path = config(tmp_path, model)
    run_stage(path, tmp_path / "whole", progress=False)
    run_stage(path, tmp_path / "split", progress=False)
    latest_checkpoint(tmp_path / "split" / "controlnet").unlink()  # as if stopped after step 3's checkpoint
    (tmp_path / "split" / "controlnet" / "model" / "diffusion_pytorch_model.safetensors").unlink()
    checkpoint = torch.load(latest_checkpoint(tmp_path / "split" / "controlnet"), weights_only=False)
    assert checkpoint["step"] == 3 and list(checkpoint["models"]) == ["controlnet"]
    run_stage(path, tmp_path / "split", resume=True, progress=False)
    whole, split = (load_file(tmp_path / run / "controlnet" / "model" / "diffusion_pytorch_model.safetensors")
                    for run in ("whole", "split"))
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "split" / "controlnet" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_edge_maps_are_one_pixel_white_outlines_on_black_at_the_image_size():
    dataset = ShapesDataset(60, seed=4)
    for size in (64, 32, 16):
        for i in range(20):
            picture = stage.edge_map(dataset[i]["image"], size, 10, 30)
            array = np.asarray(picture)
            assert picture.mode == "RGB" and picture.size == (size, size)
            assert set(np.unique(array)) <= {0, 255} and (array == array[:, :, :1]).all()
            assert array.any()
    for i in range(60):  # at 64 pixels: one pixel wide (no 2x2 block), along each object's rim and only there
        scene = dataset.scene(i)
        image = render(scene)
        edge = np.asarray(stage.edge_map(image, 64, 10, 30))[:, :, 0] > 0
        assert not (edge[:-1, :-1] & edge[1:, :-1] & edge[:-1, 1:] & edge[1:, 1:]).any()
        pixels = np.asarray(image).astype(int)
        for obj in scene.objects:
            covered = (np.abs(pixels - COLOURS[obj.colour]).sum(axis=2) == 0)  # fully inside this object
            inside = ndimage.binary_erosion(covered, iterations=2)
            rim = ndimage.binary_dilation(covered, iterations=3) & ~inside
            assert not (edge & inside).any(), (i, obj)
            assert (edge & rim).sum() >= 4 * obj.half_size * 64, (i, obj)  # about the outline's length or more
        shapes = np.abs(pixels - BACKGROUND).sum(axis=2) > 0
        assert not (edge & ~ndimage.binary_dilation(shapes, iterations=2)).any(), i  # nothing on the background


def test_every_colour_has_an_outline_at_the_shapes_thresholds():
    from ldm_pipeline.shapes import Scene, ShapeObject

    for colour in COLOURS:
        scene = Scene((ShapeObject(colour, "square", "center", half_size=0.14),))
        assert np.asarray(stage.edge_map(render(scene), 64, 10, 30)).any(), colour
    # OpenCV's usual thresholds miss a green square on grey: the shapes config lowers them
    green = Scene((ShapeObject("green", "square", "center", half_size=0.14),))
    assert not np.asarray(stage.edge_map(render(green), 64)).any()


def test_captions_name_only_colour_and_shape_at_the_configured_rate(tmp_path, model):
    dataset = ShapesDataset(40, seed=2)
    scene = dataset.scene(0)
    text = unplaced_caption(scene)
    assert " in the " not in text and "small" not in text and "large" not in text
    assert text == " and ".join(f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape}"
                                for o in scene.objects)
    for obj, named in zip(scene.objects, text.split(" and ")):
        assert parse_caption(f"{named} in the {obj.position}")[0].colour == obj.colour

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    _, settings = read_stage(config(tmp_path, model, cache_size=40), tmp_path / "run")
    items = stage.control_data(pipe, settings, dataset, 16)
    assert items.captions == [dataset[i]["text"] for i in range(40)]
    assert items.unplaced == [unplaced_caption(dataset.scene(i)) for i in range(40)]
    embeddings, rows = items.table
    counts = []
    for step in range(100):
        generator = torch.Generator().manual_seed(step)
        _, context, pictures, unplaced = stage.control_batch(items, None, settings.loop, 0.3, 0.0, step, generator,
                                                             0, 1)
        indices = data.step_indices(40, step, 4, settings.loop.seed)
        for row, bare, index in zip(context, unplaced.tolist(), indices):
            assert torch.equal(row, embeddings[rows[40 + index] if bare else rows[index]])
        assert torch.equal(pictures[:, 0], items.edges[torch.tensor(indices)].float())
        counts.append(unplaced.float().mean().item())
    assert abs(np.mean(counts) - 0.3) < 0.06
    # the same draws encoded at each step, where the table would not fit
    generator = torch.Generator().manual_seed(7)
    expected = stage.control_batch(items, None, settings.loop, 0.3, 0.2, 7, generator, 0, 1)
    from ldm_pipeline.text.encode import encode_text

    no_table = stage.ControlData(items.means, items.stds, items.edges, items.captions, items.unplaced, None,
                                 items.scale)
    generator = torch.Generator().manual_seed(7)
    got = stage.control_batch(no_table, lambda texts: encode_text(pipe.tokenizer, pipe.text_encoder, texts),
                              settings.loop, 0.3, 0.2, 7, generator, 0, 1)
    assert torch.equal(expected[0], got[0]) and torch.allclose(expected[1], got[1], atol=1e-5)


def test_a_captioned_image_folder_trains_with_its_captions_as_written(tmp_path, model, monkeypatch):
    folder = tmp_path / "mine"
    write_image_folder([ShapesDataset(12, seed=3).scene(i) for i in range(12)], folder)
    seen = []
    real = stage.control_batch

    def watched(items, encode, loop, unplaced_chance, *args):
        seen.append(unplaced_chance)
        assert items.unplaced == items.captions  # a folder's captions are never rewritten
        return real(items, encode, loop, unplaced_chance, *args)

    monkeypatch.setattr(stage, "control_batch", watched)
    path = config(tmp_path, model, unplaced_captions=0.7)
    assert main(["train", str(path), "--data", str(folder), "--run-dir", str(tmp_path / "run")]) == 0
    assert seen == [0.0] * 6
    written = json.loads((tmp_path / "run" / "controlnet" / "model" / "training.json").read_text())
    assert written["data"] == str(folder)


@pytest.mark.parametrize("changes, message", [
    ({"conditioning_channels": [8, 16, 32]}, r"`conditioning_channels`: got \[8, 16, 32\].*needs 2 widths"),
    ({"canny_low": 30, "canny_high": 30}, "`canny_low`, `canny_high`: got 30, 30"),
    ({"unplaced_captions": 1.5}, "`unplaced_captions`: got 1.5"),
    ({"caption_dropout": "0.1"}, r"`caption_dropout`: got '0.1'"),
    ({"conditioning_channels": "wide"}, "`conditioning_channels`: got 'wide'"),
    ({"surprise": 1}, r"\['surprise'\] are unknown"),
])
def test_bad_settings_are_named_before_training(tmp_path, model, capsys, changes, message):
    assert main(["train", str(config(tmp_path, model, **changes)), "--run-dir", str(tmp_path / "run")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "controlnet" / "checkpoints").exists()


def test_the_shapes_config_trains_for_the_bundled_model(tmp_path):
    name, settings = read_stage(Path(__file__).parents[1] / "configs" / "shapes" / "controlnet.json", tmp_path)
    assert name == "controlnet" and settings.model is None and settings.data == "shapes"
    assert settings.loop.output_dir == str(tmp_path / "controlnet")
    assert 0 < settings.unplaced_captions < 1
    bundled = LatentDiffusionPipeline.from_pretrained()
    assert len(stage.embedding_widths(settings, bundled.vae_scale_factor)) == 3


def test_the_bundled_edge_controlnet_loads_and_fits_the_bundled_model():
    files = sorted(p.name for p in SHIPPED.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sum((SHIPPED / name).stat().st_size for name in files) <= 10 * 2**20
    assert all(v.dtype == torch.float16 for v in load_file(SHIPPED / "diffusion_pytorch_model.safetensors").values())
    net = ControlNetModel.from_pretrained(SHIPPED, torch_dtype=torch.float32)
    ours = load_controlnet(SHIPPED, torch_dtype=torch.float32)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in net.state_dict().items())
    pipe = LatentDiffusionPipeline.from_pretrained()
    expected = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16, 32))
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    # it steers: an outline changes the drawing
    from PIL import Image, ImageDraw

    outline = Image.new("RGB", (64, 64))
    ImageDraw.Draw(outline).ellipse((36, 36, 56, 56), outline="white")
    kw = dict(num_inference_steps=4, output_type="np", progress=False, seed=0)
    assert np.abs(pipe("an orange circle", controlnet=ours, control_image=outline, **kw).images
                  - pipe("an orange circle", **kw).images).max() > 0.05
