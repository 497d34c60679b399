"""kohya's names for a model's layers, to tell which modules of a LoRA file the model took.

kohya's scripts name a module by its path with "_" for ".", under `lora_unet_`, `lora_te_` (SD's one
tower) or `lora_te1_` / `lora_te2_` (SDXL's two). For SDXL they train Stability's own UNet, whose
blocks are numbered as in the original code (`input_blocks.4.1`, `middle_block.1`, `output_blocks.2.1`)
rather than diffusers' (`down_blocks.1.attentions.0`): `sgm_path` writes a diffusers path that way,
the reverse of what diffusers' reader does with such a file. Only the spelling is ours: which file key
goes to which layer is diffusers' (`lora_state_dict`).
"""

from __future__ import annotations

import re

TEXT_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}

# a diffusers ResnetBlock2D's layers, as the original UNet names them
_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}
# layers outside the blocks
_OUTSIDE = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_IN_BLOCK = re.compile(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                       r"\.(\d+)\.(.+)")


def sgm_path(path: str, layers_per_block: int) -> str | None:
    """The original UNet's path of a diffusers UNet layer (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in` for SDXL's two layers per block); None for a path it cannot spell."""
    if path in _OUTSIDE:
        return _OUTSIDE[path]
    found = _IN_BLOCK.fullmatch(path)
    if not found:
        return None
    where, block, part, index, rest = found.groups()
    block, index, per = int(block or 0), int(index), layers_per_block + 1  # a down block's slots: layers + sampler
    slot = 0 if part == "resnets" else 1
    rest = _RESNET.get(rest, rest) if part == "resnets" else rest
    if where == "mid_block":
        return f"middle_block.{2 * index if part == 'resnets' else 1}.{rest}"
    if part == "downsamplers":
        return f"input_blocks.{(block + 1) * per}.0.{rest.replace('conv', 'op')}"
    if part == "upsamplers":
        return f"output_blocks.{block * per + layers_per_block}.2.{rest}"
    if where == "down_blocks":
        return f"input_blocks.{1 + block * per + index}.{slot}.{rest}"
    return f"output_blocks.{block * per + index}.{slot}.{rest}"


def kohya_names(kind: str, paths: list[str], layers_per_block: int) -> set[str]:
    """Every name kohya's files may give the layers `paths` of the model `kind` ("unet", "text_encoder",
    "text_encoder_2")."""
    if kind == "unet":
        spelled = {*paths, *(sgm_path(path, layers_per_block) for path in paths)} - {None}
        return {"lora_unet_" + path.replace(".", "_") for path in spelled}
    return {prefix + ("" if path.startswith("text_model") else "text_model_") + path.replace(".", "_")
            for path in paths for prefix in TEXT_PREFIXES[kind]}


def file_names(kind: str, paths: list[str], layers_per_block: int) -> set[str]:
    """The names, kohya's and diffusers', that a LoRA file may give the layers `paths` of the model `kind`."""
    diffusers = {f"{kind}.{path}" for path in paths} | {f"{kind}.{path.removeprefix('text_model.')}" for path in paths}
    return kohya_names(kind, paths, layers_per_block) | diffusers
