"""Textual inversion training: only the new token's embedding learns; the result loads as an embedding."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.shapes import new_shape_scenes, write_image_folder
from ldm_pipeline.training.plan import read_stage, run_stage


def test_a_few_steps_teach_a_token_and_change_nothing_else(model, tmp_path):
    write_image_folder(new_shape_scenes("star", 12, seed=0), tmp_path / "stars")
    config = {"stage": "textual_inversion", "model": str(model), "token": "<star>", "placeholder": "star",
              "initializer": "red", "loop": {"output_dir": "{run}/ti", "steps": 3, "batch_size": 4,
                                            "learning_rate": 0.05, "warmup_steps": 0, "checkpoint_every": 2}}
    path = tmp_path / "ti.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`data`: textual inversion trains on a captioned image folder"):
        read_stage(path, tmp_path / "run")
    out = run_stage(path, tmp_path / "run", overrides={"data": str(tmp_path / "stars")}, progress=False)
    learned = load_file(out / "learned_embeds.safetensors")
    assert list(learned) == ["<star>"] and json.loads((out / "training.json").read_text())["token"] == "<star>"
    base = LatentDiffusionPipeline.from_pretrained(str(model))
    start = base.text_encoder.get_input_embeddings().weight[base.tokenizer("red", add_special_tokens=False).input_ids[0]]
    assert not torch.allclose(learned["<star>"], start)  # it moved away from its initializer
    pipe = LatentDiffusionPipeline.from_pretrained(str(model)).load_textual_inversion(out)
    assert pipe.embeddings["<star>"]["vectors"] == 1
    rows = base.text_encoder.get_input_embeddings().weight.shape[0]
    trained = torch.load(tmp_path / "run" / "ti" / "checkpoints" / "step-0000003.pt", weights_only=True)
    table = trained["models"]["text_encoder"]["embeddings.token_embedding.weight"]
    assert table.shape[0] == rows + 1 and torch.equal(table[rows], learned["<star>"])
    assert torch.equal(table[:rows], base.text_encoder.get_input_embeddings().weight)  # every other word as it was
    image = pipe("a <star> in the top left", seed=0, num_inference_steps=2, progress=False).images[0]
    assert image.size == (16, 16)
