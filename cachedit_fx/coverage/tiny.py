"""A tiny config for a transformer class, derived from its ``__init__`` signature: every depth becomes 2
blocks, every head count 2, every head dimension 16 (rotary axis splits rescaled to match) and every
wide feature dimension 32 (64 for feed-forward widths), so a random-weight instance builds in a
fraction of a second. ``CONFIG_FIXES`` holds the few values a rule cannot derive (a dimension tied to
another by the model's code), as data per class."""
from __future__ import annotations

import inspect
import re

import torch

DEPTH, HEADS, HEAD_DIM, WIDTH, FFN_WIDTH = 2, 2, 16, 32, 64

_DEPTH = re.compile(r"(^|_)(layers|depth|blocks|n_layers)$|^num_.*(layers|blocks)$")
_HEADS = re.compile(r"heads$")
_HEAD_DIM = re.compile(r"(head_dim|dim_head|attention_head_dim)$")
_FFN = re.compile(r"(ffn|ff|intermediate|mlp)_?(dim|size|hidden_dim)?$|intermediate_size$")
_WIDE = re.compile(r"(dim|_size|_channels|hidden_size|width)$")
_NOT_WIDE = re.compile(r"^(in_channels|out_channels|latent_channels|sample_size|patch_size|vocab_size|"
                       r"max_position_embeddings|.*_len|.*max.*|.*pos.*|.*patch.*|.*sampling_rate|.*hop_length|"
                       r"text_len.*|.*batch_size|.*num_.*|.*groups)$")
_AXES = re.compile(r"(axes_dim|axes_dims|axes_dims_rope|rope_axes_dim|rope_dim_list|axes_dim_rope|rope_dim)$")

# Values that depend on another in the model's code, which no name rule sees.
CONFIG_FIXES: dict[str, dict] = {
    "HunyuanDiT2DModel": dict(in_channels=4, patch_size=2, sample_size=8, cross_attention_dim_t5=32, text_len=8,
                              text_len_t5=8),
    "LatteTransformer3DModel": dict(in_channels=4, out_channels=8, patch_size=2, sample_size=8, caption_channels=32,
                                    cross_attention_dim=32, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    num_layers=2, video_length=2),
    "Transformer2DModel": dict(in_channels=4, out_channels=8, patch_size=2, sample_size=8, num_layers=2,
                               caption_channels=32, cross_attention_dim=32, num_embeds_ada_norm=1000,
                               norm_type="ada_norm_single", use_additional_conditions=False),
    "DreamLiteTransformer2DModel": dict(in_channels=4, out_channels=4, num_layers=2, norm_num_groups=4,
                                        cross_attention_dim=32),
    "EasyAnimateTransformer3DModel": dict(in_channels=4, out_channels=4, patch_size=2, sample_width=8,
                                          sample_height=8),
    "HiDreamImageTransformer2DModel": dict(patch_size=2, out_channels=4, in_channels=4, caption_channels=[32, 16],
                                           text_emb_dim=32, llama_layers=[0, 1], max_resolution=(8, 8)),
    "ConsisIDTransformer3DModel": dict(sample_width=8, sample_height=8, sample_frames=5, max_text_seq_length=8),
    "Kandinsky6Transformer3DModel": dict(visual_cond=False),
    "AceStepTransformer1DModel": dict(in_channels=96),  # the latent and its two context latents, stacked
    "Ideogram4Transformer2DModel": dict(mrope_section=(2, 1, 1)),
    "NucleusMoEImageTransformer2DModel": dict(out_channels=16),  # in_channels holds 2x2 patches of 16
    "MiniMaxMusic3Transformer1DModel": dict(rotary_dim=8),  # a part of the (16-wide) head
    "LuminaNextDiT2DModel": dict(num_kv_heads=2),
    "PRXTransformer2DModel": dict(axes_dim=[8, 8]),
    "OmniGenTransformer2DModel": dict(rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
                                      vocab_size=256, pad_token_id=0),
    "WanVACETransformer3DModel": dict(vace_layers=[0], vace_in_channels=48),
    # the history patch embedding and the image projection its forward calls unconditionally
    "HunyuanVideoFramepackTransformer3DModel": dict(has_clean_x_embedder=True, has_image_proj=True),
    # the noisy latent, its reference latent and a 4-channel mask in; four blocks so the one face adapter
    # (after block 0) leaves a chain of three; a 32-pixel face encoder
    "WanAnimateTransformer3DModel": dict(latent_channels=4, in_channels=12, out_channels=4, num_layers=4,
                                         inject_face_latents_blocks=4,
                                         motion_encoder_channel_sizes={str(2 ** i): 16 for i in range(2, 6)}),
    # the rotary part of a head is 6 * rope_freq_dim channels (three axes, each rotated in halves)
    "MiniMaxH3Transformer3DModel": dict(rope_freq_dim=2),
    # a prediction as wide as the input (the noisy latent, the anchor latent and its mask)
    "Kandinsky6SRTransformer3DModel": dict(in_visual_dim=8, out_visual_dim=17),
    # an injection block inside the tiny depth; a handful of gist tokens for an 8-token prompt
    "BriaFibo2Transformer2DModel": dict(injection_layer_ids=(1,), min_num_gist_tokens=4, max_num_gist_tokens=8,
                                        gist_step=4, gist_min_text_len=4, gist_max_text_len=16),
}


def _rescaled_axes(axes, old_head_dim: int, new_head_dim: int):
    """Rotary axis sizes that summed to the old head dimension, scaled to sum to the new one (even)."""
    total = sum(axes)
    if total != old_head_dim and old_head_dim:
        new_head_dim = max(2 * len(axes), round(total * new_head_dim / old_head_dim / 2) * 2)
    scaled = [max(2, int(a * new_head_dim / total) // 2 * 2) for a in axes]
    scaled[-1] += new_head_dim - sum(scaled)
    return type(axes)(scaled) if isinstance(axes, tuple) else scaled


def defaults(cls: type) -> dict:
    return {k: p.default for k, p in list(inspect.signature(cls.__init__).parameters.items())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is not inspect.Parameter.empty}


def _head_dim(base: dict) -> int | None:
    """The default per-head width: an explicit head dimension, else the model width over the heads."""
    explicit = next((v for k, v in base.items() if _HEAD_DIM.search(k) and isinstance(v, int)), None)
    if explicit:
        return explicit
    width = next((base[k] for k in ("hidden_size", "dim", "model_dim") if isinstance(base.get(k), int)), None)
    heads = next((v for k, v in base.items() if _HEADS.search(k) and isinstance(v, int) and v), None)
    return width // heads if width and heads else None


def tiny_config(cls: type) -> dict:
    """The keyword arguments of a tiny ``cls`` (only the values that change from the defaults)."""
    base = defaults(cls)
    config: dict = {}
    head_dim = _head_dim(base)
    for name, value in base.items():
        if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
            continue
        if isinstance(value, int):
            if _DEPTH.search(name) and value > DEPTH:
                config[name] = DEPTH
            elif _HEADS.search(name) and value > HEADS:
                config[name] = HEADS
            elif _HEAD_DIM.search(name) and value > HEAD_DIM:
                config[name] = HEAD_DIM
            elif _FFN.search(name) and value > FFN_WIDTH:
                config[name] = FFN_WIDTH
            elif _WIDE.search(name) and not _NOT_WIDE.match(name) and value > WIDTH:
                config[name] = WIDTH
        elif _AXES.search(name) and value and all(isinstance(a, int) for a in value):
            # Without a head count the axes define the head width (their sum).
            config[name] = _rescaled_axes(value, head_dim or sum(value), HEAD_DIM)
    # Image-to-video variants widen the latent input with conditioning channels; the text-to-video
    # variant (input as wide as the output) is the one a denoising loop over the latent drives.
    if isinstance(base.get("in_channels"), int) and isinstance(base.get("out_channels"), int) \
            and base["in_channels"] > base["out_channels"]:
        config["in_channels"] = base["out_channels"]
    config.update(CONFIG_FIXES.get(cls.__name__, {}))
    return config


def build(cls: type, seed: int = 0) -> torch.nn.Module:
    """A seeded, random-weight, eval-mode ``cls`` from :func:`tiny_config`.

    Weights a model initialises to zero (adaLN-zero gates, zero output projections) are drawn small
    and random too, as training leaves them: at zero every block is the identity, its residual zero
    and the cache's relative diff 0 / 0."""
    torch.manual_seed(seed)
    model = cls(**tiny_config(cls)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and p.is_floating_point() and not p.any():
                p.normal_(0.0, 0.02)
    return model
