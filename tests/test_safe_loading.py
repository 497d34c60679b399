"""Safe loading: a corrupt, truncated or mismatched model file gets one ModelFileError naming it, and pickled
weights are refused unless allow_pickle=True, which then reads them with torch.load(weights_only=True)."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_pipeline import LatentDiffusionPipeline, ModelFileError, ModelNotFoundError

FAST = dict(num_inference_steps=2, progress=False, output_type="np")
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(_session_components, tmp_path_factory):
    return LatentDiffusionPipeline(**_session_components).save_pretrained(tmp_path_factory.mktemp("good") / "model")


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def edit_json(file, change):
    config = json.loads(file.read_text())
    change(config)
    file.write_text(json.dumps(config))


def edit_weights(file, change):
    weights = load_file(file)
    change(weights)
    save_file(weights, file)


# (what to break, the file the error must name, what it must say)
BROKEN = {
    "truncated unet weights": (lambda d: truncate(d / UNET_WEIGHTS), UNET_WEIGHTS,
                               r"is not a readable safetensors file .*incomplete metadata.*corrupt or truncated"),
    "truncated text encoder": (lambda d: truncate(d / "text_encoder/model.safetensors"),
                               "text_encoder/model.safetensors", r"is not a readable safetensors file"),
    "garbage vae weights": (lambda d: (d / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100),
                            "vae/diffusion_pytorch_model.safetensors", r"\(100 bytes; "),
    "empty unet weights": (lambda d: (d / UNET_WEIGHTS).write_bytes(b""), UNET_WEIGHTS, r"\(0 bytes; "),
    "bad JSON unet config": (lambda d: (d / "unet/config.json").write_text("{not json"), "unet/config.json",
                             r"is not valid JSON"),
    "bad JSON model index": (lambda d: (d / "model_index.json").write_text("{"), "model_index.json",
                             r"is not valid JSON"),
    "model index a list": (lambda d: (d / "model_index.json").write_text("[1, 2]"), "model_index.json",
                           r"holds a JSON list; expected an object"),
    "model index entry": (lambda d: edit_json(d / "model_index.json", lambda c: c.update(unet="UNet")),
                          "model_index.json", r"entry 'unet' is 'UNet'; expected \[library, class name\]"),
    "bad JSON scheduler": (lambda d: (d / "scheduler/scheduler_config.json").write_text("]"),
                           "scheduler/scheduler_config.json", r"is not valid JSON"),
    "config missing a key": (lambda d: edit_json(d / "unet/config.json", lambda c: c.pop("block_out_channels")),
                             "unet", r"the 'unet' component \(config.json, diffusion_pytorch_model.safetensors\) "
                                     r"does not load \(ValueError: Must provide the same number"),
    "text encoder config missing a key": (
        lambda d: edit_json(d / "text_encoder/config.json", lambda c: c.pop("hidden_size")), "text_encoder",
        r"the 'text_encoder' component .* does not load"),
    "weights of the wrong shape": (
        lambda d: edit_weights(d / UNET_WEIGHTS, lambda w: w.update({"conv_in.weight": torch.zeros(7, 4, 3, 3)})),
        "unet", r"does not load \(ValueError: .*conv_in.weight expected shape"),
    "weights missing a tensor": (lambda d: edit_weights(d / UNET_WEIGHTS, lambda w: w.pop("conv_in.weight")),
                                 "unet", r"the weights lack 1 tensor\(s\) the config's architecture has "
                                         r"\(conv_in.weight\)"),
    "config of another architecture": (
        lambda d: edit_json(d / "vae/config.json", lambda c: c.update(block_out_channels=[16, 32, 64],
                                                                      down_block_types=["DownEncoderBlock2D"] * 3,
                                                                      up_block_types=["UpDecoderBlock2D"] * 3)),
        "vae", r"the 'vae' component .* does not load"),
    "weights file missing": (lambda d: (d / UNET_WEIGHTS).unlink(), "unet", r"the 'unet' component \(config.json\) "
                                                                           r"does not load"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_folder_gets_one_error_naming_the_file(saved, tmp_path, case):
    breaks, file, message = BROKEN[case]
    folder = shutil.copytree(saved, tmp_path / "model")
    breaks(folder)
    with pytest.raises(ModelFileError, match=message) as caught:
        LatentDiffusionPipeline.from_pretrained(folder)
    assert caught.value.path == str(folder / file)
    assert str(caught.value).startswith(repr(str(folder / file)))
    assert isinstance(caught.value, ModelNotFoundError) and isinstance(caught.value, ValueError)


def test_pickled_folder_weights_need_allow_pickle(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "model")
    weights = load_file(folder / UNET_WEIGHTS)
    torch.save(weights, folder / "unet/diffusion_pytorch_model.bin")
    (folder / UNET_WEIGHTS).unlink()
    with pytest.raises(ModelFileError, match=r"diffusion_pytorch_model.bin': holds pickled weights, which can run code "
                                             r"when loaded; .* pass allow_pickle=True"):
        LatentDiffusionPipeline.from_pretrained(folder)
    loaded = LatentDiffusionPipeline.from_pretrained(folder, allow_pickle=True)
    reference = LatentDiffusionPipeline.from_pretrained(saved)
    assert np.array_equal(loaded("a cat", seed=0, **FAST).images, reference("a cat", seed=0, **FAST).images)


@pytest.fixture(scope="module")
def single_files(_session_components, saved, tmp_path_factory):
    """The tiny model as an original single-file checkpoint: safetensors, and the same weights pickled."""
    from ldm_format import to_ldm_state_dict

    pipe = LatentDiffusionPipeline(**_session_components)
    folder = tmp_path_factory.mktemp("single")
    state = {k: v.contiguous() for k, v in to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder).items()}
    save_file(state, folder / "tiny.safetensors")
    torch.save({"state_dict": state, "global_step": 7}, folder / "tiny.ckpt")
    return folder, dict(config=str(saved), tokenizer=pipe.tokenizer)


def test_ckpt_is_refused_by_default_and_loads_with_allow_pickle(single_files):
    folder, options = single_files
    with pytest.raises(ModelFileError, match=r"tiny.ckpt': is a pickled checkpoint, which can run code when loaded; "
                                             r"use its .safetensors version, or pass allow_pickle=True"):
        LatentDiffusionPipeline.from_single_file(folder / "tiny.ckpt", **options)
    pickled = LatentDiffusionPipeline.from_single_file(folder / "tiny.ckpt", allow_pickle=True, **options)
    safe = LatentDiffusionPipeline.from_single_file(folder / "tiny.safetensors", **options)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pickled, name).state_dict(), getattr(safe, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


class RunsCode:
    """A pickle that runs a command when loaded, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_allow_pickle_still_runs_no_code(single_files, tmp_path):
    folder, options = single_files
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as file:
        pickle.dump({"state_dict": {"x": RunsCode(marker)}}, file)
    with pytest.raises(ModelFileError, match=r"evil.ckpt': cannot be loaded with torch.load\(weights_only=True\) "
                                             r"\(UnpicklingError"):
        LatentDiffusionPipeline.from_single_file(evil, allow_pickle=True, **options)
    assert not marker.exists()


def test_broken_single_files(single_files, tmp_path):
    folder, options = single_files
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((folder / "tiny.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=r"truncated.safetensors': is not a readable safetensors file"):
        LatentDiffusionPipeline.from_single_file(truncated, **options)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((folder / "tiny.ckpt").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=r"cut.ckpt': cannot be loaded with torch.load\(weights_only=True\)"):
        LatentDiffusionPipeline.from_single_file(cut, allow_pickle=True, **options)
    # the tiny weights with Stable Diffusion 1.5's configs: the wrong architecture
    with pytest.raises(ModelFileError, match=r"tiny.safetensors': the checkpoint with the 'sd15' configs does not "
                                             r"load"):
        LatentDiffusionPipeline.from_single_file(folder / "tiny.safetensors", config="sd15",
                                                 tokenizer=options["tokenizer"])
    with pytest.raises(ValueError, match=r"`path`: no file at '.*nothing.safetensors'"):
        LatentDiffusionPipeline.from_single_file(tmp_path / "nothing.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is not a .safetensors file \(or, with allow_pickle=True, one of .ckpt"):
        LatentDiffusionPipeline.from_single_file(tmp_path / "model.onnx")
