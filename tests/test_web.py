"""The web page (`ldm serve`, `ldm_pipeline.web.build_app`): a live local server called through
gradio_client, concurrently, and driven in a real headless Chromium."""

import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from ldm_pipeline import LatentDiffusionPipeline, read_recipe  # noqa: E402
from ldm_pipeline.web import build_app  # noqa: E402

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


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False, download_files=False)


def _pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _file(item) -> Path:
    """A gallery item from gradio_client: a local path once downloaded."""
    image = item["image"] if isinstance(item, dict) else item
    if isinstance(image, dict):
        image = image.get("path") or image.get("url")
    return Path(image)


def _download(client, item, tmp_path) -> Path:
    return Path(gradio_client.utils.download_file(item, str(tmp_path))) if False else _file(item)


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


def test_bad_input_is_an_error_message_and_the_server_goes_on(server, tmp_path):
    client = gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path))
    with pytest.raises(Exception, match="height"):
        client.predict("a red circle", height=65, steps=STEPS, api_name="/generate")
    with pytest.raises(Exception, match="prompt"):
        client.predict("  ", steps=STEPS, api_name="/generate")
    gallery, _ = client.predict("a red circle", steps=STEPS, seed=1, api_name="/generate")
    assert len(gallery) == 1


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


def test_import_ldm_pipeline_does_not_import_gradio():
    code = "import sys, ldm_pipeline, ldm_pipeline.cli; assert 'gradio' not in sys.modules, 'gradio imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ldm_serve_starts_and_draws(pipe, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "ldm_pipeline.cli", "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        client = None
        deadline = time.monotonic() + 90
        while client is None:
            assert server.poll() is None, server.stdout.read()
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                              download_files=str(tmp_path))
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        gallery, seed_used = client.predict("a red circle", steps=STEPS, seed=5, api_name="/generate")
        expected = pipe("a red circle", num_inference_steps=STEPS, seed=5, progress=False).images[0]
        np.testing.assert_array_equal(_pixels(_file(gallery[0])), np.asarray(expected))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_ldm_serve_bad_port_is_an_error(capsys):
    from ldm_pipeline.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
