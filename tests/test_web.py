"""The web page (`ldm serve`, `ldm_pipeline.apps.web.build_app`): a live local server called through
gradio_client, concurrently, and driven in a real headless Chromium."""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from ldm_pipeline import LatentDiffusionPipeline, read_recipe  # noqa: E402
from ldm_pipeline.adapters.fast import lora_settings  # noqa: E402
from ldm_pipeline.apps.web import build_app, guidance_after_regions  # noqa: E402
from ldm_pipeline.apps.web_inpaint import picture_and_mask  # noqa: E402
from ldm_pipeline.conditioning.controlnet import digest  # noqa: E402
from ldm_pipeline.conditioning.preprocess import canny, scribble  # noqa: E402
from ldm_pipeline.loading.controlnet import load_controlnet  # noqa: E402
from ldm_pipeline.masks import soft  # noqa: E402
from ldm_pipeline.provenance.recipes import image_hash, mask_hash  # noqa: E402

STEPS = 4
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusionPipeline.from_pretrained()


@pytest.fixture(scope="module")
def server(pipe):
    """The app on a free local port, in this process; yields its URL."""
    demo = build_app(pipe)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()


def _launch(pipe):
    demo = build_app(pipe)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/", demo


def tiny_controlnet(unet, seed=0):
    """A ControlNet copied from the bundled model's UNet, its zero convolutions given random weights so that it
    acts. Its conditioning embedding has three widths: it brings the control picture down 4 times, as this
    model's VAE does (diffusers' default four widths fit SD's factor of 8)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96)).eval()
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.3)
    return net


@pytest.fixture(scope="module")
def controlnet_folder(pipe, tmp_path_factory):
    """The tiny ControlNet saved as a diffusers folder named "edges-net"."""
    folder = tmp_path_factory.mktemp("controlnet") / "edges-net"
    tiny_controlnet(pipe.unet).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def controlled(pipe, controlnet_folder):
    """A second app whose pipeline holds the ControlNet, loaded as `ldm serve --controlnet` loads it; yields its
    URL, the app and the pipeline."""
    with_net = LatentDiffusionPipeline(**pipe.components, defaults=pipe.defaults,
                                       controlnet=load_controlnet(controlnet_folder))
    url, demo = _launch(with_net)
    yield url, demo, with_net
    demo.close()


def _square(size=64) -> PIL.Image.Image:
    """A control picture with clear edges: a white square on black."""
    picture = PIL.Image.new("RGB", (size, size), "black")
    picture.paste((255, 255, 255), (size // 4, size // 4, size * 3 // 4, size * 3 // 4))
    return picture


def _pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _file(item) -> Path:
    """A gallery item from gradio_client: a local path once downloaded."""
    image = item["image"] if isinstance(item, dict) else item
    if isinstance(image, dict):
        image = image.get("path") or image.get("url")
    return Path(image)


def test_generate_prompt_alone_same_pixels_with_recipe(pipe, server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    gallery, seed_used = client.predict("a red circle in the top left", api_name="/generate")
    assert len(gallery) == 1 and isinstance(seed_used, (int, float)) and 0 <= seed_used < 2**64
    path = _file(gallery[0])
    assert path.suffix == ".png" and path.is_file()
    expected = pipe("a red circle in the top left", seed=int(seed_used), progress=False).images[0]
    np.testing.assert_array_equal(_pixels(path), np.asarray(expected))
    recipe = read_recipe(path)  # the downloaded bytes carry the recipe
    assert recipe.prompt == "a red circle in the top left" and recipe.seed == int(seed_used)
    with PIL.Image.open(path) as image:
        assert f"Seed: {int(seed_used)}" in image.info["parameters"]


def test_generate_keeps_a_live_preview_for_the_page(pipe, server, tmp_path):
    runner = server[1].ldm_runner
    runner.previews.clear()
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    gallery, _ = client.predict("a red circle", steps=20, seed=2, api_name="/generate")
    (session, preview), = runner.previews.items()  # the last preview, waiting for the page's next look
    final = pipe("a red circle", num_inference_steps=20, seed=2, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(final))  # previews change no pixel
    assert preview.size == final.size and np.abs(np.asarray(preview, int) - np.asarray(final)).mean() < 20
    request = type("Request", (), {"session_hash": session})()
    assert runner.latest_preview(request) is preview and session not in runner.previews  # shown once


def test_generate_named_inputs_same_pixels(pipe, server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    gallery, seed_used = client.predict(prompt="a small blue square in the center", negative_prompt="red",
                                        steps=STEPS, guidance=3.5, scheduler="euler_a", seed=7, num_images=2,
                                        api_name="/generate")
    assert seed_used == 7 and len(gallery) == 2
    pipe_euler = LatentDiffusionPipeline(**pipe.components, defaults=pipe.defaults).set_scheduler("euler_a")
    expected = pipe_euler("a small blue square in the center", negative_prompt="red", num_inference_steps=STEPS,
                          guidance_scale=3.5, seed=7, num_images_per_prompt=2, progress=False).images
    for item, picture, seed in zip(gallery, expected, (7, 8)):
        np.testing.assert_array_equal(_pixels(_file(item)), np.asarray(picture))
        recipe = read_recipe(_file(item))
        assert (recipe.seed, recipe.scheduler, recipe.num_inference_steps) == (seed, "euler_a", STEPS)
    assert pipe.scheduler.__class__.__name__ != "EulerAncestralDiscreteScheduler"  # the server's pipe is unchanged


def test_generate_composed_parts_in_regions_same_pixels(pipe, server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    prompt = "a red circle in the top left AND a blue square in the bottom right"
    gallery, _ = client.predict(prompt, steps=STEPS, guidance=1.5, seed=5, composition=True,
                                regions="0,0,0.5,0.5; 0.5,0.5,1,1", api_name="/generate")
    expected = pipe(prompt, num_inference_steps=STEPS, guidance_scale=1.5, seed=5, prompt_composition=True,
                    regions=[(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    recipe = read_recipe(_file(gallery[0]))
    assert recipe.prompt_composition and recipe.regions == [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    with pytest.raises(Exception, match="regions"):
        client.predict(prompt, steps=STEPS, composition=True, regions="0,0,0.5", api_name="/generate")
    with pytest.raises(Exception, match="regions"):  # one box for two parts: the pipeline's own message
        client.predict(prompt, steps=STEPS, composition=True, regions="all", api_name="/generate")


def test_bad_input_is_an_error_message_and_the_server_goes_on(server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    with pytest.raises(Exception, match="height"):
        client.predict("a red circle", height=65, steps=STEPS, api_name="/generate")
    with pytest.raises(Exception, match="prompt"):
        client.predict("  ", steps=STEPS, api_name="/generate")
    gallery, _ = client.predict("a red circle", steps=STEPS, seed=1, api_name="/generate")
    assert len(gallery) == 1


def test_generate_with_the_hires_fix_same_pixels_twice_the_size(pipe, server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    gallery, seed_used = client.predict("a red circle in the top left", steps=STEPS, seed=4, hires_fix=True,
                                        api_name="/generate")
    path = _file(gallery[0])
    expected = pipe("a red circle in the top left", num_inference_steps=STEPS, seed=4, hires_fix=True,
                    hires_scale=2.0, hires_upscaler="latent", hires_steps=None, hires_strength=0.7,
                    progress=False).images[0]
    assert seed_used == 4 and _pixels(path).shape == (128, 128, 3)  # twice the page's 64x64
    np.testing.assert_array_equal(_pixels(path), np.asarray(expected))
    recipe = read_recipe(path)
    assert recipe.hires_fix is True and (recipe.width, recipe.height) == (64, 64)
    assert (recipe.hires_scale, recipe.hires_upscaler, recipe.hires_steps, recipe.hires_strength) == \
        (2.0, "latent", None, 0.7)
    # every hires input, by position after the others: Lanczos, its own steps and strength
    gallery, _ = client.predict("a small blue square in the center", "", STEPS, 2.5, "model default", 64, 64, 9, 1,
                                False, "", True, 1.5, "lanczos", 6, 0.5, api_name="/generate")
    expected = pipe("a small blue square in the center", num_inference_steps=STEPS, seed=9, hires_fix=True,
                    hires_scale=1.5, hires_upscaler="lanczos", hires_steps=6, hires_strength=0.5,
                    progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    assert np.asarray(expected).shape == (96, 96, 3) and read_recipe(_file(gallery[0])).hires_steps == 6
    # hires settings without the tick change nothing
    gallery, _ = client.predict("a red circle", steps=STEPS, seed=4, hires_scale=3, hires_steps=8,
                                api_name="/generate")
    plain = pipe("a red circle", num_inference_steps=STEPS, seed=4, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(plain))
    assert read_recipe(_file(gallery[0])).hires_fix is False
    with pytest.raises(Exception, match=r"nearest is not in the list of choices: \[.latent., .lanczos.\]"):
        client.predict("a red circle", steps=STEPS, hires_fix=True, hires_upscaler="nearest", api_name="/generate")


def test_control_draws_with_the_pipelines_controlnet(pipe, controlled, tmp_path):
    url, demo, with_net = controlled
    picture = _square()
    picture.save(tmp_path / "control.png")
    control = gradio_client.handle_file(str(tmp_path / "control.png"))
    client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path / "out"))
    gallery, seed_used = client.predict(control, "none", 0.8, 0.0, 1.0, False, "a red circle", "", STEPS, 3.0,
                                        "model default", 64, 64, 6, 1, api_name="/control")
    expected = with_net("a red circle", control_image=picture, controlnet_conditioning_scale=0.8,
                        num_inference_steps=STEPS, guidance_scale=3.0, seed=6, progress=False).images[0]
    drawn = _pixels(_file(gallery[0]))
    np.testing.assert_array_equal(drawn, np.asarray(expected))
    plain = pipe("a red circle", num_inference_steps=STEPS, guidance_scale=3.0, seed=6, progress=False).images[0]
    assert np.abs(drawn.astype(int) - np.asarray(plain)).max() > 8  # the net steered it
    (unit,) = read_recipe(_file(gallery[0])).controlnets  # the recipe names the net and the picture
    assert (unit["name"], unit["digest"], unit["image_hash"]) == ("edges-net", digest(with_net.controlnet),
                                                                   image_hash(picture))
    assert (unit["scale"], unit["start"], unit["end"]) == (0.8, 0.0, 1.0)

    # Canny edges of the picture, a window of the steps, guess mode; inputs by name
    gallery, _ = client.predict(control, preprocessor="canny", control_scale=1.2, control_start=0.25,
                                control_end=0.75, guess_mode=True, prompt="a blue square", steps=STEPS, seed=2,
                                api_name="/control")
    edges = canny(picture)
    expected = with_net("a blue square", control_image=edges, controlnet_conditioning_scale=1.2,
                        control_guidance_start=0.25, control_guidance_end=0.75, guess_mode=True,
                        num_inference_steps=STEPS, seed=2, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    (unit,) = read_recipe(_file(gallery[0])).controlnets
    assert (unit["image_hash"], unit["scale"], unit["start"], unit["end"]) == (image_hash(edges), 1.2, 0.25, 0.75)

    # the other tabs draw without the net, and the pipeline keeps it
    gallery, _ = client.predict("a red circle", steps=STEPS, guidance=3.0, seed=6, api_name="/generate")
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(plain))
    assert read_recipe(_file(gallery[0])).controlnets is None and with_net.controlnet is not None
    with pytest.raises(Exception, match="control_image: upload or draw a control picture"):
        client.predict(None, prompt="a red circle", steps=STEPS, api_name="/control")


def test_control_without_a_controlnet_says_how_to_load_one(server, tmp_path):
    _square().save(tmp_path / "control.png")
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    with pytest.raises(Exception, match="controlnet: start the server with --controlnet PATH"):
        client.predict(gradio_client.handle_file(str(tmp_path / "control.png")), prompt="a red circle",
                       steps=STEPS, api_name="/control")
    gallery, _ = client.predict("a red circle", steps=STEPS, seed=1, api_name="/generate")  # and it goes on
    assert len(gallery) == 1


def test_ldm_serve_controlnet_gives_the_page_its_net(monkeypatch, controlnet_folder, capsys, tmp_path):
    from ldm_pipeline.apps import web
    from ldm_pipeline.apps.cli import main

    served = []
    monkeypatch.setattr(web, "serve", lambda pipe, **launch: served.append(pipe))
    assert main(["serve", "--controlnet", str(controlnet_folder)]) == 0
    (pipe,) = served
    assert pipe.controlnet.ldm_name == "edges-net"
    assert digest(pipe.controlnet) == digest(load_controlnet(controlnet_folder))
    assert main(["serve", "--controlnet", str(tmp_path / "missing-net")]) == 2
    assert "missing-net" in capsys.readouterr().err and len(served) == 1


def test_image_to_image_same_pixels(pipe, server, tmp_path):
    reference = tmp_path / "reference.png"
    pipe("a yellow triangle in the bottom right", seed=3, num_inference_steps=STEPS, progress=False).images[0].save(
        reference)
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path / "out"))
    gallery, seed_used = client.predict(gradio_client.handle_file(str(reference)), 0.6, "a green circle", "", STEPS,
                                        5.0, "model default", 64, 64, 11, 1, api_name="/transform")
    expected = pipe("a green circle", image=str(reference), strength=0.6, num_inference_steps=STEPS,
                    guidance_scale=5.0, seed=11, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    assert read_recipe(_file(gallery[0])).strength == 0.6


def _noise(width, height, seed=0) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def _strokes(size, *boxes, alpha=153) -> PIL.Image.Image:
    """An editor layer: transparent, painted (magenta at `alpha`) in the boxes."""
    layer = PIL.Image.new("RGBA", size, (0, 0, 0, 0))
    for box in boxes:
        layer.paste((255, 0, 255, alpha), box)
    return layer


def _edited(folder: Path, picture, *layers) -> dict:
    """The image editor's value as gradio_client sends it: the picture and the painted layers."""
    folder.mkdir(exist_ok=True)
    picture.save(folder / "picture.png")
    for i, layer in enumerate(layers):
        layer.save(folder / f"layer{i}.png")
    return {"background": gradio_client.handle_file(str(folder / "picture.png")),
            "layers": [gradio_client.handle_file(str(folder / f"layer{i}.png")) for i in range(len(layers))],
            "composite": None}


def test_inpaint_repaints_the_painted_area_and_keeps_the_rest(pipe, server, tmp_path):
    picture = _noise(48, 40)  # not the page's 64x64: the whole picture is drawn at its own size
    mask = PIL.Image.new("L", picture.size, 0)
    for box in ((24, 8, 40, 20), (4, 28, 10, 34)):  # a stroke on each of two layers
        mask.paste(255, box)
    value = _edited(tmp_path / "in", picture, _strokes(picture.size, (24, 8, 40, 20)),
                    _strokes(picture.size, (4, 28, 10, 34), alpha=20))
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path / "out"))
    gallery, seed_used = client.predict(value, prompt="a green circle", steps=STEPS, seed=3, api_name="/inpaint")
    assert seed_used == 3 and len(gallery) == 1
    drawn = _pixels(_file(gallery[0]))
    expected = pipe("a green circle", image=picture, mask_image=mask, strength=0.8, mask_blur=4,
                    num_inference_steps=STEPS, seed=3, progress=False).images[0]
    np.testing.assert_array_equal(drawn, np.asarray(expected))
    outside = soft(mask, 4) == 0  # outside the painted area and its blur band: the uploaded picture exactly
    assert outside.mean() > 0.3 and np.array_equal(drawn[outside], np.asarray(picture)[outside])
    assert np.abs(drawn.astype(int) - np.asarray(picture))[np.asarray(mask) > 0].mean() > 5  # repainted
    recipe = read_recipe(_file(gallery[0]))
    assert recipe.mask_hash == mask_hash(mask) and (recipe.width, recipe.height) == (48, 40)
    assert (recipe.strength, recipe.mask_blur, recipe.masked_content, recipe.padding_mask_crop) == \
        (0.8, 4, "original", None)

    # inpaint only masked: the area around the mask drawn at the page's size and pasted back
    gallery, _ = client.predict(value, strength=0.9, mask_blur=2, masked_content="fill", only_masked=True,
                                padding=8, prompt="a green circle", steps=STEPS, seed=4, api_name="/inpaint")
    expected = pipe("a green circle", image=picture, mask_image=mask, strength=0.9, mask_blur=2,
                    masked_content="fill", padding_mask_crop=8, width=64, height=64, num_inference_steps=STEPS,
                    seed=4, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    recipe = read_recipe(_file(gallery[0]))
    assert (recipe.strength, recipe.mask_blur, recipe.masked_content, recipe.padding_mask_crop) == \
        (0.9, 2, "fill", 8)


def test_inpaint_without_a_picture_or_a_painted_pixel_is_an_error_message(server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path / "out"))
    picture = _noise(64, 64)
    with pytest.raises(Exception, match="image: upload the picture"):
        client.predict(None, prompt="a green circle", steps=STEPS, api_name="/inpaint")
    with pytest.raises(Exception, match="mask: paint the area to repaint"):
        client.predict(_edited(tmp_path / "bare", picture), prompt="a green circle", steps=STEPS,
                       api_name="/inpaint")
    with pytest.raises(Exception, match="mask: paint the area to repaint"):  # a layer with nothing painted on it
        client.predict(_edited(tmp_path / "clear", picture, _strokes(picture.size)), prompt="a green circle",
                       steps=STEPS, api_name="/inpaint")
    painted = _edited(tmp_path / "bad", picture, _strokes(picture.size, (8, 8, 16, 16)))
    with pytest.raises(Exception, match="'blank'"):
        client.predict(painted, masked_content="blank", prompt="a green circle", steps=STEPS, api_name="/inpaint")
    with pytest.raises(Exception, match="width"):  # the pipeline's own message: the crop is drawn at width x height
        client.predict(painted, only_masked=True, prompt="a green circle", steps=STEPS, width=65,
                       api_name="/inpaint")
    gallery, _ = client.predict("a red circle", steps=STEPS, seed=1, api_name="/generate")  # still serving
    assert len(gallery) == 1


def test_picture_and_mask_from_the_editor_value(tmp_path):
    picture = _noise(16, 12)
    layer = _strokes((16, 12), (2, 2, 6, 5), alpha=1)  # any alpha above 0 is painted
    layer.save(tmp_path / "layer.png")  # PIL images, numpy arrays or file paths
    got, mask = picture_and_mask({"background": picture.convert("RGBA"), "layers": [str(tmp_path / "layer.png")],
                                  "composite": None})
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(picture))
    expected = np.zeros((12, 16), np.uint8)
    expected[2:5, 2:6] = 255
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)
    # numpy values too; transparent parts of the picture are white; a layer of another size is stretched over it
    seen = np.asarray(picture.convert("RGBA")).copy()
    seen[0, 0, 3] = 0
    got, mask = picture_and_mask({"background": seen, "layers": [None, np.asarray(_strokes((32, 24), (0, 0, 4, 4)))]})
    assert tuple(np.asarray(got)[0, 0]) == (255, 255, 255) and np.asarray(mask)[:2, :2].all()
    assert np.asarray(mask).sum() == 4 * 255
    for value in (None, {"background": None, "layers": [layer]}, {"background": PIL.Image.new("RGBA", (8, 8))}):
        with pytest.raises(gr.Error, match="image: upload the picture"):  # transparent all over: nothing uploaded
            picture_and_mask(value)
    with pytest.raises(gr.Error, match="mask: paint the area to repaint"):
        picture_and_mask({"background": picture, "layers": [_strokes((16, 12))]})


def test_eight_concurrent_generate_calls(pipe, server, tmp_path):
    url = server[0]
    prompts = ["a red circle in the top left", "a small blue square in the center",
               "a yellow triangle in the bottom right", "an orange circle in the bottom left"]

    def call(i):
        client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path / f"c{i}"))
        gallery, seed_used = client.predict(prompts[i % 4], steps=STEPS, seed=100 + i, api_name="/generate")
        return i, _file(gallery[0]), seed_used

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    for i, path, seed_used in results:
        assert seed_used == 100 + i
        expected = pipe(prompts[i % 4], num_inference_steps=STEPS, seed=100 + i, progress=False).images[0]
        np.testing.assert_array_equal(_pixels(path), np.asarray(expected))
    gallery, _ = gradio_client.Client(url, verbose=False, download_files=str(tmp_path / "after")).predict(
        "a red circle", steps=STEPS, seed=0, api_name="/generate")  # still serving
    assert len(gallery) == 1


# `ldm serve` as a user starts it, with every connection beyond this machine refused and recorded
SERVE = r"""
import atexit, socket, sys
attempts = []
local = ("127.0.0.1", "::1", "localhost", "0.0.0.0")
real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
def connect(self, address):
    if isinstance(address, tuple) and address[0] not in local:
        attempts.append(address)
        raise OSError("network refused by the test")
    return real_connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    if host is not None and host not in local:
        attempts.append(host)
        raise socket.gaierror("network refused by the test")
    return real_getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
atexit.register(lambda: print("OUTSIDE CONNECTIONS", attempts, flush=True))

import ldm_pipeline, ldm_pipeline.apps.cli
print("GRADIO IMPORTED BY ldm_pipeline", "gradio" in sys.modules, flush=True)
sys.exit(ldm_pipeline.apps.cli.main(["serve", "--port", sys.argv[1]]))
"""


def test_ldm_serve_draws_offline_and_cleans_up(pipe, tmp_path):
    port = free_port()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "HF_HUB_OFFLINE"))}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(temporary))
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env, text=True)
    try:
        client = None
        deadline = time.monotonic() + 90
        while client is None:
            assert server.poll() is None, server.stdout.read()
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                              download_files=str(tmp_path / "downloads"))
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        gallery, seed_used = client.predict("a red circle", steps=STEPS, seed=5, api_name="/generate")
        expected = pipe("a red circle", num_inference_steps=STEPS, seed=5, progress=False).images[0]
        np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
        assert list(temporary.iterdir())  # uploads and images went into the server's temporary folders
    finally:
        server.terminate()  # a plain kill: the server stops as on Ctrl-C
        output = server.communicate(timeout=60)[0]
    assert "GRADIO IMPORTED BY ldm_pipeline False" in output, output[-3000:]
    assert "OUTSIDE CONNECTIONS []" in output, output[-3000:]  # Gradio's usage reports are off
    assert list(temporary.iterdir()) == []  # and its temporary folders are gone


def test_ldm_serve_bad_arguments_are_errors(capsys, tmp_path):
    from ldm_pipeline.apps.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


# -- the real page in headless Chromium ---------------------------------------------------------


def _chromium():
    """(browser, driver) executables of the system's Chromium, or (None, reason)."""
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None, ("no Chromium with chromedriver on PATH (Debian: apt-get install chromium chromium-driver; "
                      ".ci/run installs them)")
    return browser, driver


def _no_browser(reason):
    """Skip the browser tests for want of a browser, unless LDM_REQUIRE_BROWSER is set (for .ci/run, which
    installs Chromium): then they fail, so that CI cannot pass without running them."""
    if os.environ.get("LDM_REQUIRE_BROWSER", "") not in ("", "0"):
        pytest.fail(f"LDM_REQUIRE_BROWSER is set, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        _no_browser(f"selenium cannot be imported ({error})")

    executable, driver = _chromium()
    if executable is None:
        _no_browser(driver)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never look for a browser or driver online
    options = webdriver.ChromeOptions()
    options.binary_location = executable
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--lang=en-US"):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def _set(element, value):
    element.clear()
    element.send_keys(str(value))


def test_browser_generate_errors_and_image_to_image(pipe, server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, demo = server
    wait = WebDriverWait(browser, 60)
    page = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    browser.get(url)
    prompt = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))

    # text to image: type a prompt and settings, press Generate, read the gallery's images back
    prompt.send_keys("a red circle in the top left")
    _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), 10)
    _set(browser.find_element(By.CSS_SELECTOR, "#seed input"), 3)
    _set(browser.find_element(By.CSS_SELECTOR, "#num-images input"), 4)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 4)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#seed-used input").get_attribute("value") == "3")
    expected = pipe("a red circle in the top left", num_inference_steps=10, seed=3, num_images_per_prompt=4,
                    progress=False).images
    sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#gallery img")]
    for i, (source, picture) in enumerate(zip(sources, expected)):
        assert source.endswith(f"{i:03d}-seed{3 + i}.png")
        data = urllib.request.urlopen(source, timeout=30).read()  # what the page's download gives
        (tmp_path / f"{i}.png").write_bytes(data)
        np.testing.assert_array_equal(_pixels(tmp_path / f"{i}.png"), np.asarray(picture))
        recipe = read_recipe(tmp_path / f"{i}.png")
        assert (recipe.prompt, recipe.seed, recipe.num_inference_steps) == ("a red circle in the top left", 3 + i, 10)
    shot = tmp_path / "web.png"
    browser.save_screenshot(str(shot))
    assert PIL.Image.open(shot).size[0] > 0
    if os.environ.get("LDM_WEB_SCREENSHOT"):  # the README's figure: LDM_WEB_SCREENSHOT=docs/figures/web.png
        shutil.copyfile(shot, os.environ["LDM_WEB_SCREENSHOT"])

    # image to image: a file that is not an image, then a damaged PNG, each a message in the page
    tabs = browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
    next(tab for tab in tabs if tab.text == "Image to image").click()
    upload = lambda path: wait.until(  # noqa: E731
        lambda b: b.find_element(By.CSS_SELECTOR, "#reference input[type=file]")).send_keys(str(path))
    (tmp_path / "notes.txt").write_text("not a picture\n")
    upload(tmp_path / "notes.txt")
    wait.until(lambda b: "Invalid file type: notes.txt" in page())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"no image here" * 10)
    upload(tmp_path / "broken.png")
    browser.find_element(By.CSS_SELECTOR, "#transform").click()
    wait.until(lambda b: "'broken.png' is not a readable image" in page())
    # a real picture: the page goes on serving and draws what pipe(...) draws
    for clear in browser.find_elements(By.CSS_SELECTOR, "#reference button[aria-label='Clear']"):
        clear.click()
    expected[0].save(tmp_path / "reference.png")
    upload(tmp_path / "reference.png")
    _set(browser.find_element(By.CSS_SELECTOR, "#num-images input"), 1)
    browser.find_element(By.CSS_SELECTOR, "#transform").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
    source = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    (tmp_path / "img2img.png").write_bytes(urllib.request.urlopen(source, timeout=30).read())
    again = pipe("a red circle in the top left", image=tmp_path / "reference.png", strength=0.8,
                 num_inference_steps=10, seed=3, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(tmp_path / "img2img.png"), np.asarray(again))
    assert read_recipe(tmp_path / "img2img.png").strength == 0.8


def test_browser_progress_and_stop(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, demo = server
    runner = demo.ldm_runner
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    prompt = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.send_keys("a small blue square in the center")
    _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), 150)
    for size in ("#width input", "#height input"):
        _set(browser.find_element(By.CSS_SELECTOR, size), 128)
    runner.last_steps_run = None
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    # the progress bar follows the denoising steps: "denoising", then "k/150"
    wait.until(lambda b: "/150" in b.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#preview img"))  # a live preview (every 15 steps)
    assert runner.running is not None
    browser.find_element(By.CSS_SELECTOR, "#stop").click()
    wait.until(lambda b: runner.last_steps_run is not None)
    assert 1 <= runner.last_steps_run < 150  # the loop itself stopped, not only the page
    # and the next run is served in full
    _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), 4)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
    assert runner.last_steps_run == 4


def test_page_loads_during_a_long_run(server, tmp_path):
    url, demo = server
    runner = demo.ldm_runner
    client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path))
    runner.last_steps_run = None
    job = client.submit("a small blue square in the center", steps=60, width=128, height=128, seed=0,
                        api_name="/generate")
    deadline = time.monotonic() + 60
    while runner.running is None and not job.done():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page = urllib.request.urlopen(url, timeout=30).read().decode()
    config = json.loads(urllib.request.urlopen(url + "config", timeout=30).read())
    assert runner.last_steps_run is None and not job.done()  # both answered while the run went on
    assert "<html" in page.lower() and config["title"] == "ldm-pipeline"
    gallery, seed_used = job.result(timeout=120)
    assert seed_used == 0 and runner.last_steps_run == 60


def test_browser_draw_a_reference(pipe, server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ldm_pipeline.provenance.recipes import image_hash

    wait = WebDriverWait(browser, 60)
    browser.get(server[0])
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys("a red circle")
    _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), STEPS)
    _set(browser.find_element(By.CSS_SELECTOR, "#seed input"), 2)
    tab = lambda name: next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")  # noqa: E731
                            if t.text == name)
    tab("Image to image").click()
    wait.until(lambda b: tab("Draw")).click()
    canvas = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#drawing canvas"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    ActionChains(browser).move_to_element_with_offset(canvas, -40, -40).click_and_hold().move_by_offset(30, 10) \
        .move_by_offset(30, 30).move_by_offset(10, 40).release().perform()
    browser.find_element(By.CSS_SELECTOR, "#transform").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
    source = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    (tmp_path / "drawn.png").write_bytes(urllib.request.urlopen(source, timeout=30).read())
    recipe = read_recipe(tmp_path / "drawn.png")
    blank = PIL.Image.new("RGB", (256, 256), "white")
    assert (recipe.seed, recipe.strength) == (2, 0.8)
    assert recipe.image_hash is not None and recipe.image_hash != image_hash(blank)  # the strokes were drawn from


def test_browser_inpaint_a_painted_stroke(pipe, server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    page = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    browser.get(server[0])
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys("a green circle")
    _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), STEPS)
    _set(browser.find_element(By.CSS_SELECTOR, "#seed input"), 2)
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Inpaint").click()
    inpaint = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#inpaint"))
    inpaint.click()  # no picture yet
    wait.until(lambda b: "image: upload the picture" in page())
    picture = _noise(64, 64, seed=5)
    picture.save(tmp_path / "picture.png")
    browser.find_element(By.CSS_SELECTOR, "#inpaint-editor input[type=file]").send_keys(str(tmp_path / "picture.png"))
    editor = browser.find_element(By.CSS_SELECTOR, "#inpaint-editor")
    wait.until(lambda b: "Upload an image" not in editor.text)  # the picture is on the canvas
    canvas = editor.find_element(By.CSS_SELECTOR, "canvas")
    inpaint.click()  # nothing painted yet
    wait.until(lambda b: "mask: paint the area to repaint" in page())
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    # a stroke right of and below the centre of the picture (shown centred on the canvas)
    ActionChains(browser).move_to_element_with_offset(canvas, 20, 10).click_and_hold().move_by_offset(30, 10) \
        .move_by_offset(10, 30).release().perform()
    inpaint.click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
    source = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    (tmp_path / "inpainted.png").write_bytes(urllib.request.urlopen(source, timeout=30).read())
    recipe = read_recipe(tmp_path / "inpainted.png")
    assert recipe.mask_hash is not None and (recipe.seed, recipe.strength, recipe.mask_blur) == (2, 0.8, 4)
    drawn, original = _pixels(tmp_path / "inpainted.png"), np.asarray(picture)
    same = (drawn == original).all(axis=2)
    assert same[:16, :16].all()  # far from the stroke: the uploaded picture itself
    assert 0.3 < same.mean() < 1  # the stroke and its blur band were repainted, no more


def test_browser_control_tab_uploads_a_picture_and_draws(controlled, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, demo, with_net = controlled
    wait = WebDriverWait(browser, 60)
    page = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    browser.get(url)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys("a red circle")
    _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), STEPS)
    _set(browser.find_element(By.CSS_SELECTOR, "#seed input"), 4)
    tab = lambda name: next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")  # noqa: E731
                            if t.text == name)
    tab("Control").click()
    button = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#control"))
    wait.until(lambda b: "edges-net" in b.find_element(By.CSS_SELECTOR, "#control-net").text)  # the net loaded
    button.click()  # no picture yet
    wait.until(lambda b: "control_image: upload or draw a control picture" in page())

    # an uploaded picture, made into Canny edges: the view shows them, the drawing follows them
    picture = _square()
    picture.save(tmp_path / "control.png")
    browser.find_element(By.CSS_SELECTOR, "#control-picture input[type=file]").send_keys(str(tmp_path / "control.png"))
    next(label for label in browser.find_elements(By.CSS_SELECTOR, "#control-preprocessor label")
         if label.text == "canny").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#control-seen img"))
    button.click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
    source = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    (tmp_path / "controlled.png").write_bytes(urllib.request.urlopen(source, timeout=30).read())
    expected = with_net("a red circle", control_image=canny(picture), num_inference_steps=STEPS, seed=4,
                        progress=False).images[0]
    np.testing.assert_array_equal(_pixels(tmp_path / "controlled.png"), np.asarray(expected))
    (unit,) = read_recipe(tmp_path / "controlled.png").controlnets
    assert (unit["name"], unit["image_hash"], unit["scale"]) == ("edges-net", image_hash(canny(picture)), 1.0)

    # with the upload cleared, strokes drawn on the sketchpad, as a scribble
    browser.find_element(By.CSS_SELECTOR, "#control-picture button[aria-label='Remove Image']").click()
    wait.until(lambda b: "Drop Image Here" in b.find_element(By.CSS_SELECTOR, "#control-picture").text)
    next(label for label in browser.find_elements(By.CSS_SELECTOR, "#control-preprocessor label")
         if label.text == "scribble").click()
    tabs = [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Draw"]
    tabs[-1].click()  # the Control tab's (the Image to image tab's is hidden)
    canvas = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#control-drawing canvas"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    ActionChains(browser).move_to_element_with_offset(canvas, -40, -40).click_and_hold().move_by_offset(30, 10) \
        .move_by_offset(30, 30).move_by_offset(10, 40).release().perform()
    browser.find_element(By.CSS_SELECTOR, "#control").click()
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src") != source)
    source = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    (tmp_path / "scribbled.png").write_bytes(urllib.request.urlopen(source, timeout=30).read())
    (unit,) = read_recipe(tmp_path / "scribbled.png").controlnets
    blank = PIL.Image.new("RGB", (256, 256), "black")  # a scribble of nothing
    assert unit["image_hash"] not in (image_hash(blank), image_hash(scribble(picture)))  # the strokes were followed


def test_guidance_slider_follows_the_regions_box_unless_the_user_moved_it():
    assert guidance_after_regions("0,0,0.5,1; 0.5,0,1,1", 2.5, plain=2.5, for_regions=1.5) == 1.5
    assert guidance_after_regions("  ", 1.5, plain=2.5, for_regions=1.5) == 2.5  # boxes cleared
    assert guidance_after_regions("0,0,1,1", 1.5, plain=2.5, for_regions=1.5) == 1.5  # typing on
    assert guidance_after_regions("0,0,1,1", 7, plain=2.5, for_regions=1.5) == 7  # the user's value stays
    assert guidance_after_regions("", 7, plain=2.5, for_regions=1.5) == 7
    assert guidance_after_regions("0,0,1,1", 2.5, plain=2.5, for_regions=None) == 2.5  # a model without one


def test_browser_regions_move_the_guidance_slider_and_draw_with_it(pipe, server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    plain, for_regions = pipe.defaults["guidance_scale"], pipe.defaults["regions_guidance_scale"]
    assert plain != for_regions
    wait = WebDriverWait(browser, 60)
    browser.get(server[0])
    prompt = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    slider = lambda: float(browser.find_element(By.CSS_SELECTOR, "#guidance input[type=number]")  # noqa: E731
                           .get_attribute("value"))
    assert slider() == plain
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if "Composed prompts" in b.text).click()
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#composition input").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#composition input").click()
    boxes = browser.find_element(By.CSS_SELECTOR, "#regions textarea")
    boxes.send_keys("0,0,0.5,1; 0.5,0,1,1")
    wait.until(lambda b: slider() == for_regions)
    prompt.send_keys("a red circle in the top left AND a blue square in the top right")
    _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), STEPS)
    _set(browser.find_element(By.CSS_SELECTOR, "#seed input"), 5)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
    source = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    (tmp_path / "parts.png").write_bytes(urllib.request.urlopen(source, timeout=30).read())
    recipe = read_recipe(tmp_path / "parts.png")
    assert (recipe.guidance_scale, recipe.regions) == (for_regions, [[0, 0, 0.5, 1], [0.5, 0, 1, 1]])
    boxes.clear()
    boxes.send_keys(" ")  # an edit the page sees; the box holds no boxes now
    wait.until(lambda b: slider() == plain)


def test_generate_fast_draws_with_the_models_lcm_lora_for_that_call_only(pipe, server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    gallery, _ = client.predict("a red circle in the top left", steps=1, guidance=1.0, seed=3, fast=True,
                                api_name="/generate")
    assert not pipe.fast  # the server's pipeline is as it was
    recipe = read_recipe(_file(gallery[0]))
    assert recipe.fast and recipe.scheduler == "lcm" and recipe.num_inference_steps == 1
    pipe.enable_fast()
    try:
        expected = pipe("a red circle in the top left", seed=3, num_inference_steps=1, progress=False).images[0]
    finally:
        pipe.disable_fast()
    np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    gallery, _ = client.predict("a red circle in the top left", steps=STEPS, seed=3, api_name="/generate")
    assert not read_recipe(_file(gallery[0])).fast


def test_browser_fast_box_moves_the_sliders_and_back(pipe, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server[0])
    box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#fast input"))
    value = lambda name: float(browser.find_element(By.CSS_SELECTOR, f"#{name} input[type=number]")  # noqa: E731
                               .get_attribute("value"))
    plain = (pipe.defaults["num_inference_steps"], pipe.defaults["guidance_scale"])
    assert (value("steps"), value("guidance")) == plain
    fast = lora_settings(pipe.defaults["fast_lora"])  # the shipped LoRA folder's own settings
    box.click()
    wait.until(lambda b: (value("steps"), value("guidance")) == (fast["num_inference_steps"], fast["guidance_scale"]))
    box.click()
    wait.until(lambda b: (value("steps"), value("guidance")) == plain)


def test_the_page_serves_an_sdxl_model(base, tmp_path):
    """A tiny SDXL base behind the page: /generate and /transform draw its pixels, with an SDXL recipe."""
    url, demo = _launch(base)
    try:
        client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path))
        gallery, _ = client.predict("a red circle", steps=STEPS, guidance=5.0, width=16, height=24, seed=7,
                                    api_name="/generate")
        path = _file(gallery[0])
        expected = base("a red circle", num_inference_steps=STEPS, guidance_scale=5.0, width=16, height=24, seed=7,
                        progress=False).images[0]
        np.testing.assert_array_equal(_pixels(path), np.asarray(expected))
        assert read_recipe(path).original_size is None and read_recipe(path).guidance_scale == 5.0
        reference = tmp_path / "reference.png"
        PIL.Image.fromarray(np.asarray(expected)).save(reference)
        gallery, _ = client.predict(gradio_client.handle_file(str(reference)), 0.6, "a blue square", "", STEPS, 5.0,
                                    "model default", 16, 24, 8, 1, api_name="/transform")
        expected = base("a blue square", image=str(reference), strength=0.6, num_inference_steps=STEPS,
                        guidance_scale=5.0, seed=8, progress=False).images[0]
        np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    finally:
        demo.close()
