"""Write diffusers components in the original single-file Stable Diffusion (LDM) key layout.

Only for tests: it lets the single-file loader be checked on tiny offline models. The layout
is CompVis' `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`.
"""

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET[name]}.{tail}"


def unet_key(key: str, layers: int, attention_blocks: set) -> str:
    parts = key.split(".")
    for width in (1, 2):
        head = ".".join(parts[:width])
        if head in UNET_TOP:
            return f"{UNET_TOP[head]}.{'.'.join(parts[width:])}"
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.split('.', 1)[1]}"
        slot = 1 + block * (layers + 1) + index
        return f"input_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if parts[0] == "mid_block":
        index, rest = int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * index}.{_resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "upsamplers":
        where = 2 if block in attention_blocks else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{where}.conv.{rest.split('.', 1)[1]}"
    slot = block * (layers + 1) + index
    return f"output_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, num_blocks: int) -> str:
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    for old, new in (("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2")):
        key = key.replace(old, new)
    if "mid_block.attentions.0." in key:
        prefix, rest = key.split("mid_block.attentions.0.")
        name, _, tail = rest.rpartition(".")
        return f"{prefix}mid.attn_1.{VAE_ATTENTION[name]}.{tail}"
    parts = key.split(".")
    if parts[1] == "down_blocks":
        block, kind = parts[2], parts[3]
        rest = ".".join(parts[5:]) if kind == "downsamplers" else ".".join(parts[4:])
        return f"encoder.down.{block}.downsample.{rest}" if kind == "downsamplers" else f"encoder.down.{block}.block.{rest}"
    if parts[1] == "up_blocks":
        block, kind = num_blocks - 1 - int(parts[2]), parts[3]
        rest = ".".join(parts[5:]) if kind == "upsamplers" else ".".join(parts[4:])
        return f"decoder.up.{block}.upsample.{rest}" if kind == "upsamplers" else f"decoder.up.{block}.block.{rest}"
    return key


def to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    layers = unet.config.layers_per_block
    attention_blocks = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    state = {f"model.diffusion_model.{unet_key(k, layers, attention_blocks)}": v for k, v in unet.state_dict().items()}
    blocks = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        new = vae_key(key, blocks)
        if ".attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        state[f"first_stage_model.{new}"] = value
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"  # newer transformers drop the wrapper
        state[f"cond_stage_model.transformer.{key}"] = value
    return {k: v.contiguous() for k, v in state.items()}


OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


def to_openclip_state_dict(text_encoder, prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """A CLIPTextModel in SD 2.x's OpenCLIP layout (`cond_stage_model.model.*`, fused q/k/v projections); a
    CLIPTextModelWithProjection (SDXL) keeps its projection, transposed as OpenCLIP stores it."""
    state = {(k[len("text_model."):] if k.startswith("text_model.") else k): v
             for k, v in text_encoder.state_dict().items()}
    projection = state.get("text_projection.weight")
    out = {
        f"{prefix}token_embedding.weight": state["embeddings.token_embedding.weight"],
        f"{prefix}positional_embedding": state["embeddings.position_embedding.weight"],
        f"{prefix}ln_final.weight": state["final_layer_norm.weight"],
        f"{prefix}ln_final.bias": state["final_layer_norm.bias"],
        # unused by SD 2 (it reads the hidden states), present in real checkpoints
        f"{prefix}text_projection": projection.T if projection is not None else
        torch.eye(text_encoder.config.hidden_size),
    }
    for index in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{index}.", f"{prefix}transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{layer}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for ours, theirs in OPENCLIP_LAYER.items():
                out[f"{block}{theirs}.{kind}"] = state[f"{layer}{ours}.{kind}"]
    return out


def controlnet_to_ldm(net) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights in the original layout (`control_model.` keys, as
    sd-webui-controlnet ships them). The hint block's last convolution sits at index 14, so the net must
    have the usual four conditioning-embedding widths."""
    state = {}
    for key, value in net.state_dict().items():
        name, _, tail = key.rpartition(".")
        if key.startswith("controlnet_cond_embedding."):
            part = key.split(".")[1]
            index = 0 if part == "conv_in" else 14 if part == "conv_out" else 2 * (int(key.split(".")[2]) + 1)
            new = f"input_hint_block.{index}.{tail}"
        elif key.startswith("controlnet_down_blocks."):
            new = f"zero_convs.{key.split('.')[1]}.0.{tail}"
        elif key.startswith("controlnet_mid_block."):
            new = f"middle_block_out.0.{tail}"
        else:
            new = unet_key(key, net.config.layers_per_block, set())
        state[f"control_model.{new}"] = value.contiguous()
    return state


def to_sdxl_state_dict(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """SDXL components in the original (sgm) layout: the UNet's added embedding as `label_emb.0`, CLIP ViT-L at
    `conditioner.embedders.0.transformer.`, OpenCLIP at `conditioner.embedders.1.model.` (a refiner, with no
    `text_encoder`: its only tower at `conditioner.embedders.0.model.`)."""
    layers = unet.config.layers_per_block
    attention_blocks = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    state = {}
    for key, value in unet.state_dict().items():
        if key.startswith("add_embedding."):
            new = key.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2",
                                                                               "label_emb.0.2")
        else:
            new = unet_key(key, layers, attention_blocks)
        state[f"model.diffusion_model.{new}"] = value
    blocks = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        new = vae_key(key, blocks)
        state[f"first_stage_model.{new}"] = value[:, :, None, None] if ".attn_1." in new and value.ndim == 2 else value
    if text_encoder is not None:
        for key, value in text_encoder.state_dict().items():
            key = key if key.startswith("text_model.") else f"text_model.{key}"
            state[f"conditioner.embedders.0.transformer.{key}"] = value
    tower = "conditioner.embedders.1.model." if text_encoder is not None else "conditioner.embedders.0.model."
    state.update(to_openclip_state_dict(text_encoder_2, tower))
    return {k: v.contiguous() for k, v in state.items()}
