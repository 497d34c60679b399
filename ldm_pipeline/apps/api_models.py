"""The HTTP API's request and response bodies (pydantic), in AUTOMATIC1111's field names.

Fields A1111 has and this server does not act on are accepted with their default values (clients
such as `webuiapi` send them all); a value that asks for what is not there (hires fix, face
restoration, tiling, styles, ...) is refused with a 400 by `api_calls.check_supported`. Fields left
None take the model's own value (steps, CFG scale, size, sampler), where A1111 has fixed defaults.
Unknown fields are ignored, as A1111 does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_NUMBER = dict(allow_inf_nan=False)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Txt2ImgRequest(_Request):
    """POST /sdapi/v1/txt2img."""

    prompt: str = Field("", description="what to draw; `<lora:NAME:WEIGHT>` loads a LoRA of the LoRA folder")
    negative_prompt: str = ""
    styles: list[str] | None = Field(None, description="not supported: must be empty")
    seed: int = Field(-1, description="image i draws from seed + i; -1: a random seed")
    subseed: int = -1
    subseed_strength: float = Field(0.0, description="not supported: must be 0", **_NUMBER)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description="'Euler a', 'DPM++ 2M', 'DDIM', ... (GET /samplers); "
                                                       "default: the model's own")
    scheduler: str | None = Field(None, description="'automatic' or 'karras' (with DPM++ 2M)")
    sampler_index: str | None = Field(None, description="the old name of sampler_name")
    batch_size: int = Field(1, ge=1, description="images drawn together")
    n_iter: int = Field(1, ge=1, description="batches drawn one after the other")
    steps: int | None = Field(None, ge=1, description="denoising steps (default: the model's)")
    cfg_scale: float | None = Field(None, ge=0, description="guidance scale (default: the model's)", **_NUMBER)
    width: int | None = Field(None, ge=1, description="pixels, a multiple of 8 (default: the model's size)")
    height: int | None = Field(None, ge=1, description="pixels, a multiple of 8 (default: the model's size)")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, ge=0, description="DDIM's eta (TCD's gamma)", **_NUMBER)
    denoising_strength: float | None = Field(None, ge=0, le=1, **_NUMBER)
    s_min_uncond: float | None = None
    s_churn: float | None = Field(None, description="not supported: must be 0")
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = Field(None, description="not supported: must be 1")
    override_settings: dict[str, Any] | None = Field(None, description="sd_model_checkpoint only")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = Field(False, description="leave `<lora:...>` tags unloaded (they are "
                                                            "still taken out of the prompt)")
    firstphase_width: int = 0
    firstphase_height: int = 0
    enable_hr: bool = Field(False, description="hires fix: draw, upscale by hr_scale (or to hr_resize_x/y), refine")
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = Field(None, description="not supported: must be empty")
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = Field(False, description="not supported: images are sent, never kept on the server")
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="`{\"controlnet\": {\"args\": [unit, ...]}}` (sd-webui-controlnet's units)")
    infotext: str | None = Field(None, description="not supported: send the fields")


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: image-to-image, and inpainting with a mask."""

    init_images: list[str] = Field(default_factory=list, description="one picture, base64 (PNG, JPEG, WebP; a "
                                                                     "data: URL prefix is allowed)")
    resize_mode: int = Field(0, description="0 only: the picture is resized to width x height")
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 picture of the init image's size: white is repainted")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = Field(None, ge=0, description="pixels; the result is pasted back through the mask "
                                                          "blurred by this much")
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3, description="what the masked area starts from: 0 fill, "
                                                            "1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="draw only the area around the mask at width x height and "
                                                     "paste it back")
    inpaint_full_res_padding: int = Field(0, ge=0, description="pixels kept around the mask's box")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: black is repainted")
    initial_noise_multiplier: float | None = Field(None, description="not supported: must be 1")
    latent_mask: str | None = Field(None, description="not supported")
    include_init_images: bool = Field(False, description="echo init_images and mask in `parameters`")
    denoising_strength: float | None = Field(0.75, ge=0, le=1, **_NUMBER)


class ImageResponse(BaseModel):
    """What txt2img and img2img answer: base64 PNGs carrying their recipes, the request, and a JSON string."""

    images: list[str] = Field(description="base64 PNGs; each carries A1111's `parameters` text and our recipe")
    parameters: dict[str, Any] = Field(description="the request as read")
    info: str = Field(description="JSON: prompt, seeds, size, sampler, model, infotexts, ...")


class PngInfoRequest(_Request):
    image: str = Field(description="base64 PNG (a data: URL prefix is allowed)")


class PngInfoResponse(BaseModel):
    info: str = Field(description="A1111's `parameters` text, or '' when the picture has none")
    items: dict[str, Any] = Field(description="the other text chunks (our recipe is under 'ldm_pipeline')")
    parameters: dict[str, Any] = Field(description="the `parameters` text read into keys: Prompt, Negative "
                                                   "prompt, Steps, Sampler, Seed, Size-1, Size-2, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1, of the request now running")
    eta_relative: float = Field(description="seconds left, estimated")
    state: ProgressState
    current_image: str | None = Field(description="the live preview of the predicted image, base64 PNG")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any] = Field(description="textual-inversion embeddings of --embeddings-dir in use")
    skipped: dict[str, Any]


class ControlNetUnit(_Request):
    """One unit of `alwayson_scripts.controlnet.args`, in sd-webui-controlnet's names."""

    enabled: bool = True
    image: str | dict[str, Any] | None = Field(None, description="base64 control picture (default with img2img: "
                                                                 "the init image)")
    input_image: str | None = Field(None, description="the old name of image")
    mask: str | None = Field(None, description="not supported")
    module: str | None = Field("none", description="'none' (the picture as it is), 'canny' or 'scribble'")
    model: str | None = Field(None, description="a name from /controlnet/model_list")
    weight: float = Field(1.0, **_NUMBER)
    guidance_start: float = Field(0.0, ge=0, le=1, **_NUMBER)
    guidance_end: float = Field(1.0, ge=0, le=1, **_NUMBER)
    control_mode: int | str = Field(0, description="0 'Balanced', or 2 'ControlNet is more important' (guess "
                                                   "mode); 1 is not supported")
    guessmode: bool | None = None
    processor_res: int = -1
    threshold_a: float = Field(-1, description="canny: the low threshold (default 100); scribble: the grey "
                                               "level (default 128)", **_NUMBER)
    threshold_b: float = Field(-1, description="canny: the high threshold (default 200)", **_NUMBER)
    resize_mode: int | str | None = None
    pixel_perfect: bool = False
    low_vram: bool = False
