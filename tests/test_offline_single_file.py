"""Single-file SD 1.x/2.x checkpoints load with no network: the shipped CLIP vocabulary and configs."""

import json
import shutil
import socket

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_format import to_ldm_state_dict, to_openclip_state_dict
from ldm_pipeline import LatentDiffusionPipeline, ModelNotFoundError
from ldm_pipeline.loading.folders import check_model_dir, component_class
from ldm_pipeline.loading.single_file import bundled_clip_tokenizer, config_dir

# Published ids of OpenAI's CLIP tokenizer (the same in several independent ports' tests)
PUBLISHED = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "A PHOTO of  a Cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],
    "don't stop 42 times": [49406, 847, 713, 1691, 275, 273, 1661, 49407],
}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_shipped_clip_tokenizer_gives_the_published_ids(config, no_network):
    tokenizer = bundled_clip_tokenizer(config)
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length) == (49406, 49407, 77)
    for text, ids in PUBLISHED.items():
        if config == "sd21" and "!" in text:
            continue  # see the padding test below
        assert tokenizer(text).input_ids == ids, text


def test_sd1_pads_with_the_end_token_and_sd2_with_the_exclamation_mark():
    sd1, sd2 = bundled_clip_tokenizer("sd15"), bundled_clip_tokenizer("sd21")
    padded = dict(padding="max_length", max_length=77)
    assert sd1("a cat", **padded).input_ids == [49406, 320, 2368] + [49407] * 74
    assert sd2("a cat", **padded).input_ids == [49406, 320, 2368, 49407] + [0] * 73
    # diffusers' SD 2 tokenizer makes "!" its pad token, so a literal "!" becomes id 0 too
    assert sd2("! !! !!!").input_ids == [49406] + [0] * 6 + [49407]
    assert sd1("! !! !!!").input_ids == [49406, 256, 748, 995, 49407]


def _tiny_components(config: str) -> dict:
    """Tiny components shaped like `config` ("sd15" or "sd21"): its settings, small widths, the real vocabulary."""
    folder = config_dir(config)
    torch.manual_seed(0)
    unet_config = {**UNet2DConditionModel.load_config(folder / "unet"), "block_out_channels": [32, 64],
                   "layers_per_block": 1, "cross_attention_dim": 32, "norm_num_groups": 16,
                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    if isinstance(unet_config["attention_head_dim"], list):
        unet_config["attention_head_dim"] = [4, 8]
    vae_config = {**AutoencoderKL.load_config(folder / "vae"), "block_out_channels": [16, 16, 32, 32],
                  "norm_num_groups": 16, "layers_per_block": 1}  # four blocks: 8x downsampling, as in SD
    text_config = {**json.loads((folder / "text_encoder" / "config.json").read_text()), "hidden_size": 32,
                   "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    scheduler_cls = component_class(*check_model_dir(folder)["scheduler"])
    return dict(tokenizer=bundled_clip_tokenizer(config),
                text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)).eval(),
                vae=AutoencoderKL.from_config(vae_config).eval(),
                unet=UNet2DConditionModel.from_config(unet_config).eval(),
                scheduler=scheduler_cls.from_pretrained(folder / "scheduler"))


def _write_checkpoint(components: dict, config: str, tmp_path):
    """The components as an original single-file checkpoint, and a config folder with no vocabulary in it."""
    state = to_ldm_state_dict(components["unet"], components["vae"], components["text_encoder"])
    if config == "sd21":  # SD 2.x keeps its text encoder in OpenCLIP's layout
        state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
        state.update(to_openclip_state_dict(components["text_encoder"]))
    checkpoint = tmp_path / f"tiny-{config}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, checkpoint)
    configs = LatentDiffusionPipeline(**components).save_pretrained(tmp_path / "configs")
    shutil.rmtree(configs / "tokenizer")
    (configs / "tokenizer").mkdir()
    shutil.copy(config_dir(config) / "tokenizer" / "tokenizer_config.json", configs / "tokenizer")
    return checkpoint, configs


@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_single_file_loads_offline_with_the_shipped_vocabulary(config, tmp_path, no_network):
    components = _tiny_components(config)
    checkpoint, configs = _write_checkpoint(components, config, tmp_path)
    loaded = LatentDiffusionPipeline.from_single_file(checkpoint, config=str(configs))
    assert loaded.tokenizer("a photo of a cat").input_ids == PUBLISHED["a photo of a cat"]
    assert loaded.tokenizer.pad_token_id == (0 if config == "sd21" else 49407)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = components[name].state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours), name
    if config == "sd21":  # v-prediction, linear attention projections, 768 px by default
        assert loaded.scheduler.config.prediction_type == "v_prediction"
        assert loaded.unet.config.use_linear_projection and loaded.unet.config.upcast_attention
        assert loaded.unet.config.sample_size * loaded.vae_scale_factor == 768  # the default image size


def test_sd2_v_prediction_draws_what_diffusers_draws(tmp_path, no_network):
    checkpoint, configs = _write_checkpoint(_tiny_components("sd21"), "sd21", tmp_path)
    ours = LatentDiffusionPipeline.from_single_file(checkpoint, config=str(configs))
    theirs = StableDiffusionPipeline(**ours.components, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs("a lighthouse!", num_inference_steps=3, height=64, width=64, output_type="np",
                      generator=[torch.Generator().manual_seed(3)]).images
    drawn = ours("a lighthouse!", num_inference_steps=3, height=64, width=64, output_type="np", seed=3,
                 progress=False).images
    assert np.abs(drawn - expected).max() <= 1 / 255
    epsilon = LatentDiffusionPipeline(**{**ours.components, "scheduler": ours.scheduler.__class__.from_config(
        ours.scheduler.config, prediction_type="epsilon")})
    other = epsilon("a lighthouse!", num_inference_steps=3, height=64, width=64, output_type="np", seed=3,
                    progress=False).images
    assert np.abs(other - drawn).max() > 0.01  # the prediction type matters, so the check above could fail


def test_a_named_tokenizer_that_cannot_be_reached_is_a_clear_error(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does: no retries
    checkpoint, configs = _write_checkpoint(_tiny_components("sd15"), "sd15", tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"`tokenizer`: cannot load 'nobody/no-such-tokenizer' from the Hugging Face Hub.*offline"):
        LatentDiffusionPipeline.from_single_file(checkpoint, config=str(configs), tokenizer="nobody/no-such-tokenizer")
    for folder in (tmp_path / "missing", configs / "tokenizer"):  # the second has settings but no vocabulary
        with pytest.raises(ValueError, match=r"`tokenizer`: '.*' is neither a tokenizer folder .* nor a Hub id"):
            LatentDiffusionPipeline.from_single_file(checkpoint, config=str(configs), tokenizer=str(folder))
    bundled_clip_tokenizer("sd15").save_pretrained(tmp_path / "saved-tokenizer")
    named = LatentDiffusionPipeline.from_single_file(checkpoint, config=str(configs),
                                                     tokenizer=str(tmp_path / "saved-tokenizer"))
    assert named.tokenizer("a photo of a cat").input_ids == PUBLISHED["a photo of a cat"]
