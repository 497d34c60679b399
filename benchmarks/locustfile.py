"""Locust users of the HTTP API (`ldm serve --api`), for `benchmarks/api_load.py`; also usable alone:

    locust -f benchmarks/locustfile.py --headless -u 4 -r 4 -t 3m --host http://127.0.0.1:7860

Each user mixes what a client of AUTOMATIC1111's API does: draws (txt2img at 64x64 with the model's
own steps; img2img of its own picture with a mask) between cheaper calls (png-info of its picture,
the model and sampler lists, progress polls). A request counts as failed unless it answers 200 with
the fields a client reads. Runs with locust only (it patches the standard library through gevent),
so it imports nothing of ldm_pipeline and nothing of torch.
"""

from __future__ import annotations

import base64
import io

import PIL.Image
from locust import HttpUser, between, task

SIZE = 64
PROMPT = "a red circle in the top left and a large blue square in the bottom right"


def _png_base64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mask() -> str:
    """White (repainted) over the bottom right quarter."""
    mask = PIL.Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 2, SIZE // 2, SIZE, SIZE))
    return _png_base64(mask)


MASK = _mask()


class ApiUser(HttpUser):
    """A client that draws now and then and looks around in between."""

    wait_time = between(0.2, 1.0)

    def on_start(self):
        self.seed = 0
        self.picture = None  # base64 PNG of its last txt2img, with the recipe's text chunks
        self.txt2img()

    def _post(self, path: str, body: dict, needs: str):
        with self.client.post(path, json=body, catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
                return None
            found = answer.json().get(needs)
            if not found:
                answer.failure(f"no {needs!r} in the answer")
                return None
            return found

    def _get(self, path: str, check):
        with self.client.get(path, name=path.partition("?")[0], catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
            elif not check(answer.json()):
                answer.failure(f"unexpected answer: {answer.text[:200]}")

    @task(4)
    def txt2img(self):
        self.seed += 1
        images = self._post("/sdapi/v1/txt2img", dict(prompt=PROMPT, seed=self.seed, width=SIZE, height=SIZE),
                            "images")
        if images:
            self.picture = images[0]

    @task(2)
    def img2img(self):
        if self.picture is None:
            return self.txt2img()
        self.seed += 1
        self._post("/sdapi/v1/img2img", dict(prompt="a green triangle in the bottom right", seed=self.seed,
                                             init_images=[self.picture], mask=MASK, mask_blur=2,
                                             denoising_strength=0.8, width=SIZE, height=SIZE), "images")

    @task(2)
    def png_info(self):
        if self.picture is not None:
            self._post("/sdapi/v1/png-info", dict(image=self.picture), "info")

    @task(1)
    def sd_models(self):
        self._get("/sdapi/v1/sd-models", lambda models: len(models) >= 1)

    @task(1)
    def samplers(self):
        self._get("/sdapi/v1/samplers", lambda samplers: any(s["name"] == "DDIM" for s in samplers))

    @task(3)
    def progress(self):
        self._get("/sdapi/v1/progress?skip_current_image=false", lambda state: "progress" in state)
