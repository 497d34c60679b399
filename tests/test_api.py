"""AUTOMATIC1111's HTTP API (`ldm serve --api`, `ldm_pipeline.apps.api`): the pipeline's pixels through
/sdapi/v1, masks, recipes in the PNGs, model folders, LoRAs and ControlNets by name, credentials, limits,
progress with previews, the webuiapi client against a live server, and schemathesis from the OpenAPI schema."""

import base64
import concurrent.futures
import copy
import io
import json
import os
import socket
import threading
import time

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ldm_pipeline import LatentDiffusionPipeline, read_recipe  # noqa: E402
from ldm_pipeline.apps import cli  # noqa: E402
from ldm_pipeline.apps.api import build_api  # noqa: E402
from ldm_pipeline.apps.api_serve import make_app, serve_in_thread  # noqa: E402
from ldm_pipeline.apps.api_config import ApiConfig, Limits, parse_auth  # noqa: E402
from ldm_pipeline.apps.runner import Runner  # noqa: E402
from ldm_pipeline.masks import soft  # noqa: E402

TXT2IMG, IMG2IMG, PROGRESS = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress"
FAST = dict(steps=4, width=64, height=64)


def b64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def opened(text: str) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def direct(pipe, scheduler=None, **arguments):
    """pipe(...) with a scheduler for this call only, as the API runs it."""
    original = pipe.scheduler
    try:
        if scheduler:
            pipe.set_scheduler(scheduler)
        return pipe(progress=False, **arguments)
    finally:
        pipe.scheduler = original


@pytest.fixture(scope="module")
def shapes():
    return LatentDiffusionPipeline.from_pretrained()


@pytest.fixture(scope="module")
def client(shapes):
    return TestClient(build_api(Runner(shapes), ApiConfig(load_model=lambda: shapes)))


@pytest.fixture(scope="module")
def picture(shapes):
    return shapes("a small blue square in the center", num_inference_steps=4, seed=1, progress=False).images[0]


def test_txt2img_answers_pngs_carrying_recipes_with_a_direct_calls_pixels(shapes, client, tmp_path):
    body = dict(prompt="a red circle in the top left", negative_prompt="a blue square", seed=5, cfg_scale=3,
                sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2, n_iter=2, **FAST)
    answer = client.post(TXT2IMG, json=body)
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [5, 6, 7, 8] and info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert info["sd_model_name"] == "shapes" and "Schedule type: Karras" in info["infotexts"][0]
    assert answer["parameters"]["prompt"] == body["prompt"] and answer["parameters"]["n_iter"] == 2
    paths = []
    for i, text in enumerate(answer["images"]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(base64.b64decode(text))
    drawn = [image for seed in (5, 7) for image in direct(
        shapes, "dpm++_karras", prompt=body["prompt"], negative_prompt="a blue square", seed=seed,
        num_inference_steps=4, guidance_scale=3, num_images_per_prompt=2).images]
    for path, image in zip(paths, drawn, strict=True):
        np.testing.assert_array_equal(rgb(PIL.Image.open(path)), rgb(image))
    recipe = read_recipe(paths[2])
    assert (recipe.seed, recipe.scheduler, recipe.num_inference_steps, recipe.guidance_scale) == \
        (7, "dpm++_karras", 4, 3)
    assert recipe.negative_prompt == "a blue square"


def test_txt2img_with_the_hires_fix_draws_the_pipelines_hires_pixels(shapes, client):
    body = dict(prompt="a red circle in the top left", seed=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
                hr_second_pass_steps=6, denoising_strength=0.5, **FAST)
    answer = client.post(TXT2IMG, json=body)
    assert answer.status_code == 200, answer.text
    image = opened(answer.json()["images"][0])
    assert image.size == (96, 96)
    expected = direct(shapes, prompt=body["prompt"], seed=2, num_inference_steps=4, hires_fix=True, hires_scale=1.5,
                      hires_upscaler="lanczos", hires_steps=6, hires_strength=0.5).images[0]
    np.testing.assert_array_equal(rgb(image), rgb(expected))
    info = json.loads(answer.json()["info"])["infotexts"][0]
    assert "Hires upscale: 1.5" in info and "Hires upscaler: Lanczos" in info and "Denoising strength: 0.5" in info


def test_a_request_reads_each_batchs_recipes_once(client, monkeypatch):
    """recipes() looks the model hash up at each call; the PNGs, info and its hash share one reading."""
    from ldm_pipeline.output import PipelineOutput

    calls, recipes = [], PipelineOutput.recipes
    monkeypatch.setattr(PipelineOutput, "recipes", lambda self: calls.append(self) or recipes(self))
    answer = client.post(TXT2IMG, json=dict(prompt="a red circle", seed=2, n_iter=2, **FAST))
    assert answer.status_code == 200, answer.text
    assert len(calls) == 2 and len({id(output) for output in calls}) == 2
    assert json.loads(answer.json()["info"])["sd_model_hash"]


def test_seed_minus_one_draws_a_random_seed_that_info_records(client):
    first, second = (json.loads(client.post(TXT2IMG, json=dict(prompt="a red circle", seed=-1, **FAST)).json()["info"])
                     for _ in range(2))
    assert first["seed"] != second["seed"] and 0 <= first["seed"] < 2**32


@pytest.mark.parametrize("case", ["whole picture, original", "only masked, fill", "inverted mask"])
def test_img2img_with_a_mask_keeps_the_picture_outside_it(shapes, client, picture, case):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 20:44] = 255
    mask = PIL.Image.fromarray(mask)
    body = dict(prompt="a red circle in the center", init_images=["data:image/png;base64," + b64(picture)],
                mask=b64(mask), mask_blur=2, denoising_strength=0.9, seed=3, inpainting_fill=1,
                inpaint_full_res=False, **FAST)
    expected = dict(masked_content="original", padding_mask_crop=None)
    if case == "only masked, fill":
        body.update(inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=8)
        expected = dict(masked_content="fill", padding_mask_crop=8)
    if case == "inverted mask":
        body.update(inpainting_mask_invert=1)
        mask = PIL.Image.eval(mask, lambda v: 255 - v)
    answer = client.post(IMG2IMG, json=body)
    assert answer.status_code == 200, answer.text
    drawn = opened(answer.json()["images"][0])
    same = direct(shapes, prompt=body["prompt"], image=picture, mask_image=mask, mask_blur=2, strength=0.9, seed=3,
                  num_inference_steps=4, width=64, height=64, **expected).images[0]
    np.testing.assert_array_equal(rgb(drawn), rgb(same))
    outside = soft(mask, 2) == 0
    np.testing.assert_array_equal(rgb(drawn)[outside], rgb(picture)[outside])
    assert not np.array_equal(rgb(drawn)[~outside], rgb(picture)[~outside])
    assert answer.json()["parameters"]["init_images"] is None  # not echoed unless include_init_images
    assert json.loads(answer.json()["info"])["denoising_strength"] == 0.9


def test_png_info_reads_back_the_parameters_and_the_recipe(client):
    drawn = client.post(TXT2IMG, json=dict(prompt="a green triangle", negative_prompt="red", seed=11, **FAST)).json()
    answer = client.post("/sdapi/v1/png-info", json={"image": drawn["images"][0]})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    assert answer["info"] == json.loads(drawn["info"])["infotexts"][0]
    parameters = answer["parameters"]
    assert (parameters["Prompt"], parameters["Negative prompt"], parameters["Seed"], parameters["Steps"]) == \
        ("a green triangle", "red", "11", "4")
    assert (parameters["Size-1"], parameters["Size-2"]) == ("64", "64")
    assert json.loads(answer["items"]["ldm_pipeline"])["recipes"][0]["seed"] == 11
    plain = client.post("/sdapi/v1/png-info", json={"image": b64(PIL.Image.new("RGB", (8, 8)))}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}
    assert client.post("/sdapi/v1/png-info", json={"image": "not base64!"}).status_code == 400
    assert client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"GIF89a...").decode()}).status_code == 400


def _folder_with_models(tmp_path, pipe):
    models = tmp_path / "models"
    pipe.save_pretrained(models / "tiny")
    pipe.save_pretrained(tmp_path / "outside")
    (models / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (models / "old.ckpt").write_bytes(b"a pickle")
    (models / "notes.txt").write_text("not a model")
    return models


def test_options_switch_the_model_among_those_of_the_folder(shapes, pipe, tmp_path):
    config = ApiConfig(ckpt_dir=_folder_with_models(tmp_path, pipe), load_model=lambda: shapes, model_name="shapes")
    client = TestClient(build_api(Runner(shapes), config))
    assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == ["shapes", "tiny"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny [0123456789]"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    answer = client.post(TXT2IMG, json=dict(prompt="a red circle", seed=1, steps=2)).json()
    assert opened(answer["images"][0]).size == (16, 16) and json.loads(answer["info"])["sd_model_name"] == "tiny"
    tiny = LatentDiffusionPipeline.from_pretrained(config.ckpt_dir / "tiny")
    same = tiny("a red circle", seed=1, num_inference_steps=2, progress=False).images[0]
    np.testing.assert_array_equal(rgb(opened(answer["images"][0])), rgb(same))
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes"})
    # a request may use another model, given back afterwards unless it says not to
    answer = client.post(TXT2IMG, json=dict(prompt="a red circle", seed=1, steps=2,
                                            override_settings={"sd_model_checkpoint": "tiny"})).json()
    assert opened(answer["images"][0]).size == (16, 16) and json.loads(answer["info"])["sd_model_name"] == "tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes"
    client.post(TXT2IMG, json=dict(prompt="a", steps=1, override_settings={"sd_model_checkpoint": "tiny"},
                                   override_settings_restore_afterwards=False))
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes"})
    # names resolve only inside the folder: no paths, no symlinks leading out, no pickles
    for name in ["../outside", str(tmp_path / "outside"), "/etc/passwd", "escape", "tiny/../escape", "tiny/unet",
                 "old.ckpt", "notes.txt", "nope", "", "C:\\models\\x", 5, None]:
        answer = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert answer.status_code == 400, (name, answer.text)
        if name is not None:  # None there: no override
            answer = client.post(TXT2IMG, json=dict(prompt="a", steps=1,
                                                    override_settings={"sd_model_checkpoint": name}))
            assert answer.status_code == 400, (name, answer.text)
    assert "pickle" in client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "old.ckpt"}).json()["detail"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes"
    assert client.post("/sdapi/v1/options", json={"samples_format": "jpg"}).status_code == 400
    assert client.post("/sdapi/v1/options", json=client.get("/sdapi/v1/options").json()).status_code == 200
    assert client.post(TXT2IMG, json=dict(prompt="a", **FAST)).status_code == 200  # and it goes on serving
    pickles = ApiConfig(ckpt_dir=config.ckpt_dir, allow_pickle=True)
    assert "old.ckpt" in pickles.entries("checkpoint")


def test_lora_tags_in_the_prompt_load_loras_of_the_folder_for_that_call(components, tmp_path):
    from test_lora import make_lora

    folder = tmp_path / "loras"
    make_lora(components, tmp_path / "made")
    folder.mkdir()
    (tmp_path / "made" / "pytorch_lora_weights.safetensors").rename(folder / "star.safetensors")
    (tmp_path / "elsewhere.safetensors").write_bytes((folder / "star.safetensors").read_bytes())
    (folder / "escape.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (folder / "old.pt").write_bytes(b"a pickle")
    served = LatentDiffusionPipeline(**copy.deepcopy(components))
    client = TestClient(build_api(Runner(served), ApiConfig(lora_dir=folder)))
    assert [item["name"] for item in client.get("/sdapi/v1/loras").json()] == ["star"]
    answer = client.post(TXT2IMG, json=dict(prompt="a red circle <lora:star:0.7>", seed=2, steps=4))
    assert answer.status_code == 200, answer.text
    mine = LatentDiffusionPipeline(**copy.deepcopy(components))
    mine.load_lora_weights(folder / "star.safetensors", adapter_name="star", scale=0.7)
    same = mine("a red circle", seed=2, num_inference_steps=4, progress=False).images[0]
    np.testing.assert_array_equal(rgb(opened(answer.json()["images"][0])), rgb(same))
    assert "Lora hashes: \"star: " in json.loads(answer.json()["info"])["infotexts"][0]
    assert served.loras == {}  # loaded for the call only
    for tag in ["<lora:../star:1>", "<lora:escape:1>", "<lora:old:1>", "<lora:nope:1>", "<lora:star:much>"]:
        answer = client.post(TXT2IMG, json=dict(prompt=f"a red circle {tag}", steps=1))
        assert answer.status_code == 400, (tag, answer.text)
    unloaded = client.post(TXT2IMG, json=dict(prompt="a <lora:star:1>", steps=1, disable_extra_networks=True))
    assert unloaded.status_code == 200


def test_controlnet_units_steer_with_nets_of_the_folder(components, tmp_path):
    from test_controlnet import make_net

    net = make_net(components["unet"], 1)
    net.save_pretrained(tmp_path / "nets" / "edges")
    served = LatentDiffusionPipeline(**copy.deepcopy(components))
    client = TestClient(build_api(Runner(served), ApiConfig(controlnet_dir=tmp_path / "nets")))
    assert client.get("/controlnet/model_list").json() == {"model_list": ["edges"]}
    control = PIL.Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    unit = dict(image=b64(control), model="edges [0123abcd]", weight=0.8, guidance_end=0.5, module="none")
    answer = client.post(TXT2IMG, json=dict(prompt="a red circle", seed=4, steps=4,
                                            alwayson_scripts={"ControlNet": {"args": [unit]}}))
    assert answer.status_code == 200, answer.text
    same = LatentDiffusionPipeline(**copy.deepcopy(components))(
        "a red circle", seed=4, num_inference_steps=4, progress=False, controlnet=[net], control_image=[control],
        controlnet_conditioning_scale=[0.8], control_guidance_start=[0.0], control_guidance_end=[0.5])
    np.testing.assert_array_equal(rgb(opened(answer.json()["images"][0])), rgb(same.images[0]))
    plain = client.post(TXT2IMG, json=dict(prompt="a red circle", seed=4, steps=4)).json()
    assert not np.array_equal(rgb(opened(plain["images"][0])), rgb(same.images[0]))
    canny = dict(unit, module="canny", threshold_a=50, threshold_b=150)
    assert client.post(TXT2IMG, json=dict(prompt="a", steps=1, alwayson_scripts={"controlnet": {"args": [canny]}})
                       ).status_code == 200
    for bad in [dict(model="../edges"), dict(model="nope"), dict(control_mode=1), dict(module="depth"),
                dict(image=None), dict(weight="heavy"), dict(image="not a picture")]:
        answer = client.post(TXT2IMG, json=dict(prompt="a", steps=1,
                                                alwayson_scripts={"controlnet": {"args": [dict(unit, **bad)]}}))
        assert answer.status_code == 400, (bad, answer.text)
    assert client.post(TXT2IMG, json=dict(prompt="a", steps=1, alwayson_scripts={"controlnet": {"args": "x"}})
                       ).status_code == 400


def test_credentials_are_asked_with_http_basic(shapes):
    config = ApiConfig(auth=parse_auth("alice:s3cret,bob:pa:ss"))
    client = TestClient(build_api(Runner(shapes), config))
    for auth in [None, ("alice", "wrong"), ("bob", "s3cret"), ("", ""), ("alice", "s3cret ")]:
        answer = client.get("/sdapi/v1/sd-models", auth=auth)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Basic"
    assert client.post(TXT2IMG, json={"steps": "many"}).status_code == 401  # before the body is judged
    assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/sdapi/v1/sd-models", auth=("alice", "s3cret")).status_code == 200
    assert client.get("/sdapi/v1/progress", auth=("bob", "pa:ss")).status_code == 200
    assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200
    for text in ["alice", "alice:", ":pw", "a:b,,c"]:
        with pytest.raises(ValueError, match="--api-auth"):
            parse_auth(text)


BAD = [
    (TXT2IMG, {"steps": -1}, 422), (TXT2IMG, {"steps": "many"}, 422), (TXT2IMG, {"prompt": 5}, 422),
    (TXT2IMG, {"seed": 1.5}, 422), (TXT2IMG, {"width": "wide"}, 422), (TXT2IMG, {"cfg_scale": "NaN"}, 422),
    (TXT2IMG, {"batch_size": 0}, 422), (TXT2IMG, {"override_settings": []}, 422),
    (TXT2IMG, {"steps": 100_000}, 400), (TXT2IMG, {"width": 100_000}, 400), (TXT2IMG, {"height": 30}, 400),
    (TXT2IMG, {"batch_size": 9}, 400), (TXT2IMG, {"n_iter": 1000}, 400), (TXT2IMG, {"seed": -5}, 400),
    (TXT2IMG, {"seed": 2**70}, 400), (TXT2IMG, {"sampler_name": "Euler z"}, 400),
    (TXT2IMG, {"scheduler": "exponential"}, 400), (TXT2IMG, {"sampler_name": "Euler", "scheduler": "karras"}, 400),
    (TXT2IMG, {"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, 400), (TXT2IMG, {"restore_faces": True}, 400), (TXT2IMG, {"styles": ["x"]}, 400),
    (TXT2IMG, {"override_settings": {"CLIP_stop_at_last_layers": 2}}, 400),
    (TXT2IMG, {"override_settings": {"sd_model_checkpoint": "../x"}}, 400), (TXT2IMG, {"prompt": "a" * 30_000}, 400),
    (TXT2IMG, {"prompt": "<lora:../x:1>"}, 400), (TXT2IMG, {"prompt": "<lora:/etc/passwd:1>"}, 400),
    (TXT2IMG, {"alwayson_scripts": {"controlnet": {"args": [{"model": "x", "image": "y"}]}}}, 400),
    (TXT2IMG, {"eta": -1}, 422), (TXT2IMG, {"cfg_scale": 1e308, "steps": 2}, 400),
    (IMG2IMG, {}, 400), (IMG2IMG, {"init_images": ["%%%"]}, 400), (IMG2IMG, {"init_images": [""]}, 400),
    (IMG2IMG, {"init_images": "picture"}, 422), (IMG2IMG, {"init_images": ["PIC"], "mask": "PIC8"}, 400),
    (IMG2IMG, {"init_images": ["PIC"], "mask": "BLACK"}, 400),
    (IMG2IMG, {"init_images": ["PIC"], "resize_mode": 2}, 400),
    (IMG2IMG, {"init_images": ["PIC"], "inpainting_fill": 7}, 422),
    (IMG2IMG, {"init_images": ["PIC"], "mask_blur": 10**9}, 400),
    (IMG2IMG, {"init_images": ["PIC"], "denoising_strength": 2}, 422), (IMG2IMG, {"init_images": ["HUGE"]}, 400),
]


def _with_pictures(value, pictures: dict):
    """The body with the names of `pictures` replaced by those pictures, base64."""
    if isinstance(value, str):
        return pictures.get(value, value)
    if isinstance(value, list):
        return [_with_pictures(item, pictures) for item in value]
    if isinstance(value, dict):
        return {key: _with_pictures(item, pictures) for key, item in value.items()}
    return value


@pytest.mark.parametrize("route, body, status", BAD, ids=[f"{r.rsplit('/', 1)[1]}-{json.dumps(b)[:40]}"
                                                          for r, b, _ in BAD])
def test_bad_payloads_get_a_4xx_and_the_server_goes_on(shapes, picture, route, body, status):
    runner = Runner(shapes)
    client = TestClient(build_api(runner, ApiConfig(limits=Limits(picture_mpx=0.01))))
    pictures = {"PIC": b64(picture), "PIC8": b64(PIL.Image.new("L", (8, 8), 255)),
                "BLACK": b64(PIL.Image.new("L", (64, 64))), "HUGE": b64(PIL.Image.new("RGB", (200, 200)))}
    answer = client.post(route, json={"prompt": "a red circle", **_with_pictures(body, pictures)})
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"] and runner.last_steps_run is None  # no call was made, or none finished
    assert client.post(TXT2IMG, json=dict(prompt="a red circle", **FAST)).status_code == 200


def test_bodies_past_the_limit_and_bodies_that_are_not_json(shapes):
    client = TestClient(build_api(Runner(shapes), ApiConfig(limits=Limits(body_mb=0.01))))
    big = {"prompt": "a", "init_images": ["A" * 20_000]}
    assert client.post(IMG2IMG, json=big).status_code == 413
    chunks = iter([b'{"prompt": "', b"a" * 20_000, b'"}'])  # no content-length: counted as it comes
    assert client.post(TXT2IMG, content=chunks, headers={"content-type": "application/json"}).status_code == 413
    assert client.post(TXT2IMG, content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post(TXT2IMG, json=[1, 2]).status_code == 422
    assert client.post(TXT2IMG, json=dict(prompt="a", **FAST)).status_code == 200


def _held_unet(pipe, monkeypatch, after: int):
    """The UNet waits for the returned event from its `after`-th call on, so a test can look in meanwhile."""
    release, calls, forward = threading.Event(), [], pipe.unet.forward

    def held(*args, **kwargs):
        calls.append(1)
        if len(calls) >= after:
            assert release.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", held)
    return release


def _wait_for(client, test, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.get(PROGRESS).json()
        if test(progress):
            return progress
        time.sleep(0.02)
    raise AssertionError(f"progress never came: {progress}")


def test_progress_shows_the_live_preview_and_interrupt_and_skip_stop_the_call(shapes, monkeypatch):
    client = TestClient(build_api(Runner(shapes)))
    release = _held_unet(shapes, monkeypatch, after=6)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(client.post, TXT2IMG, json=dict(prompt="a red circle", seed=1, steps=20, n_iter=3))
        progress = _wait_for(client, lambda p: p["current_image"] is not None)
        assert progress["state"]["sampling_steps"] == 20 and progress["state"]["job_count"] == 3
        assert 0 < progress["progress"] < 1 / 3 and progress["eta_relative"] > 0
        assert opened(progress["current_image"]).format == "PNG"
        assert client.get(PROGRESS, params={"skip_current_image": True}).json()["current_image"] is None
        client.post("/sdapi/v1/skip")  # the first batch stops, the second runs
        release.set()
        _wait_for(client, lambda p: p["state"]["job_no"] == 1)
        client.post("/sdapi/v1/interrupt")  # the second stops, the third never starts
        answer = job.result(timeout=120)
    assert answer.status_code == 200, answer.text
    steps_run = json.loads(answer.json()["info"])["steps_run"]
    assert len(steps_run) == 2 and all(steps < 20 for steps in steps_run) and len(answer.json()["images"]) == 2
    assert client.get(PROGRESS).json()["state"]["job_count"] == 0  # idle
    assert client.post("/sdapi/v1/interrupt").json() == {}  # nothing to stop
    assert len(client.post(TXT2IMG, json=dict(prompt="a", **FAST)).json()["images"]) == 1


def test_lists_of_samplers_schedulers_and_embeddings(client):
    samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "LCM"} <= set(samplers)
    assert [s["name"] for s in client.get("/sdapi/v1/schedulers").json()] == ["automatic", "karras"]
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}  # no --embeddings-dir
    assert client.get("/sdapi/v1/loras").json() == []
    assert client.get("/controlnet/model_list").json() == {"model_list": []}
    for name in samplers:
        answer = client.post(TXT2IMG, json=dict(prompt="a", sampler_name=name, steps=2, width=32, height=32))
        assert answer.status_code == 200, (name, answer.text)
    assert client.post(TXT2IMG, json=dict(prompt="a", sampler_name="DPM++ 2M Karras", steps=2)).status_code == 200


def test_ldm_serve_flags(model, monkeypatch, tmp_path):
    import ldm_pipeline.apps.api_serve as api

    served = {}
    monkeypatch.setattr(api, "serve", lambda pipe, **kwargs: served.update(kwargs, pipe=pipe))
    assert cli.main(["serve", "--model", str(model), "--api", "--listen", "--api-auth", "a:b", "--ckpt-dir",
                     str(model.parent), "--api-limits", "steps=10,body_mb=1.5", "--nowebui"]) == 0
    config = served["config"]
    assert served["host"] == "0.0.0.0" and served["webui"] is False and config.auth == [("a", "b")]
    assert config.limits.steps == 10 and config.limits.body_mb == 1.5 and config.model_name == "model"
    assert cli.main(["serve", "--model", str(model), "--api"]) == 0
    assert served["host"] == "127.0.0.1" and served["webui"] is True and served["config"].auth == []
    for flags in (["--api-auth", "a:b"], ["--api", "--api-limits", "steps=x"], ["--api", "--api-limits", "speed=1"],
                  ["--api", "--api-auth", "nopassword"], ["--api", "--ckpt-dir", str(tmp_path / "none")]):
        served.clear()
        assert cli.main(["serve", "--model", str(model), *flags]) == 2 and not served


def test_ldm_serve_api_as_a_command_draws_and_a_plain_kill_cleans_up(shapes, tmp_path):
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from pathlib import Path

    port, temporary = _free_port(), tmp_path / "tmp"
    temporary.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(temporary))
    server = subprocess.Popen([sys.executable, "-m", "ldm_pipeline", "serve", "--api", "--port", str(port),
                               "--api-auth", "u:p"], cwd=Path(__file__).resolve().parents[1], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
    body = json.dumps(dict(prompt="a red circle", seed=5, steps=4)).encode()
    authorized = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode(), "Content-Type": "application/json"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline
            try:
                answer = urllib.request.urlopen(urllib.request.Request(url, body, authorized), timeout=60)
                answer = json.loads(answer.read())
                break
            except urllib.error.URLError:
                time.sleep(0.5)
        same = shapes("a red circle", seed=5, num_inference_steps=4, progress=False).images[0]
        np.testing.assert_array_equal(rgb(opened(answer["images"][0])), rgb(same))
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=60)
        assert any(path.name.startswith("ldm-web-") for path in temporary.iterdir())  # the page's folders
    finally:
        server.terminate()  # a plain kill: the server stops as on Ctrl-C
        output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output[-3000:]
    assert not [path for path in temporary.iterdir() if path.name.startswith("ldm-web-")], output[-3000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live(shapes):
    """The page and the API on one uvicorn server, on a free local port, in this process."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("gradio")
    config = ApiConfig(auth=[("user", "pass")], load_model=lambda: shapes, model_name="shapes")
    app = make_app(shapes, config, webui=True)
    port = _free_port()
    server = serve_in_thread(app, port)
    yield port, app.state.ldm_api.runner
    server.should_exit = True


def test_the_webuiapi_client_against_a_live_server(shapes, live, picture):
    webuiapi = pytest.importorskip("webuiapi")
    import urllib.request

    port, runner = live
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="user", password="pass")
    kw = dict(steps=4, width=64, height=64, cfg_scale=2.5, sampler_name="Euler a")
    result = api.txt2img(prompt="a red circle in the top left", seed=3, **kw)
    assert result.info["all_seeds"] == [3] and result.image.size == (64, 64)
    mask = PIL.Image.new("L", (64, 64))
    mask.paste(255, (8, 8, 40, 40))
    inpainted = api.img2img(images=[picture], mask_image=mask, inpainting_fill=1, inpaint_full_res=False, mask_blur=2,
                            denoising_strength=0.8, prompt="a red circle", seed=4, **kw)
    outside = soft(mask, 2) == 0
    np.testing.assert_array_equal(rgb(inpainted.image)[outside], rgb(picture)[outside])
    info = api.png_info(result.image)
    assert info.parameters["Prompt"] == "a red circle in the top left" and info.parameters["Seed"] == "3"
    assert [m["title"] for m in api.get_sd_models()] == ["shapes"] and api.util_get_current_model() == "shapes"
    assert "Euler a" in api.util_get_sampler_names()
    seeds = [10, 11, 12, 13]

    def draw(seed):  # a client per thread: four requests at once, served in turn
        return webuiapi.WebUIApi(host="127.0.0.1", port=port, username="user", password="pass").txt2img(
            prompt="a small blue square", seed=seed, **kw)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(draw, seeds))
    with runner.lock:
        for seed, got in zip(seeds, results):
            same = direct(shapes, "euler_a", prompt="a small blue square", seed=seed, num_inference_steps=4,
                          guidance_scale=2.5, eta=1.0).images[0]
            np.testing.assert_array_equal(rgb(got.image), rgb(same))
    with pytest.raises(RuntimeError, match="401"):
        webuiapi.WebUIApi(host="127.0.0.1", port=port, username="user", password="nope").txt2img(prompt="a", **kw)
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
    assert "<html" in page.lower()  # the page, on the same server


# The schema is read at collection from an app whose runner gets its pipeline in the test (`_served`).
SMALL = Runner(None)
try:
    import schemathesis

    schema = schemathesis.openapi.from_asgi("/openapi.json", build_api(SMALL, ApiConfig(
        model_name="shapes", limits=Limits(size=64, steps=2, images=2, batch=2, picture_mpx=0.01, prompt=200))))
except (ImportError, AttributeError):  # schemathesis (4.x) is optional: the test is left out without it
    schema = None


@pytest.fixture
def _served(shapes):
    SMALL.pipe = shapes
    yield
    SMALL.pipe = None


if schema is not None:
    from hypothesis import HealthCheck, settings

    @schema.parametrize()
    @settings(max_examples=int(os.environ.get("LDM_SCHEMATHESIS_EXAMPLES", "6")), deadline=None,
              suppress_health_check=list(HealthCheck))
    def test_no_request_the_openapi_schema_allows_gets_a_server_error(case, _served):
        case.call_and_validate(checks=[schemathesis.checks.not_a_server_error])


def test_embeddings_of_the_folder_are_loaded_listed_and_drawn_with(tmp_path):
    import torch
    from safetensors.torch import save_file

    pipe = LatentDiffusionPipeline.from_pretrained()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(2, width)}, folder / "starry.safetensors")
    save_file({"emb_params": torch.randn(1, width + 1)}, folder / "wrong.safetensors")  # another model's width
    (folder / "notes.txt").write_text("not an embedding")
    client = TestClient(build_api(Runner(pipe), ApiConfig(embeddings_dir=folder, load_model=lambda: pipe)))
    listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"] == {"starry": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": width, "vectors": 2}}
    assert list(listed["skipped"]) == ["wrong"] and "features per vector" in listed["skipped"]["wrong"]["error"]
    answer = client.post(TXT2IMG, json=dict(prompt="a starry circle", seed=1, **FAST)).json()
    plain = client.post(TXT2IMG, json=dict(prompt="a circle", seed=1, **FAST)).json()
    assert not np.array_equal(rgb(opened(answer["images"][0])), rgb(opened(plain["images"][0])))
    assert "TI hashes" in json.loads(answer["info"])["infotexts"][0]
