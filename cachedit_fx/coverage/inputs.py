"""Real-shaped call arguments for a tiny transformer, from its forward's parameter names and its config.

Most diffusers transformers share a vocabulary of argument names (``hidden_states``,
``encoder_hidden_states``, ``pooled_projections``, ``img_ids``, ``guidance`` ...): one rule per name
builds every such argument. The latent's layout is not in the signature: :func:`candidates` yields
the layouts a denoiser's latent takes (image ``B,C,H,W``, video ``B,C,F,H,W``, packed tokens
``B,N,C``, ...), most likely first, and the matrix keeps the first the model runs on. ``INPUT_FIXES``
holds, as data per class, the arguments no shared rule builds.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..zoo.components import latent_image_ids

TEXT_LEN, SIDE, FRAMES = 8, 4, 2
TOKENS = SIDE * SIDE
_CHANNEL_KEYS = ("audio_acoustic_hidden_dim", "in_channels", "in_visual_dim", "in_dim", "latent_channels", "in_chans", "latent_dim", "io_channels",
                 "input_dim", "in_channel")
_TEXT_KEYS = ("joint_attention_dim", "text_dim", "caption_channels", "cross_attention_dim", "text_embed_dim",
              "cap_feat_dim", "context_in_dim", "in_text_dim", "text_hidden_dim", "text_emb_dim",
              "encoder_hidden_size", "cross_attention_input_dim", "text_encoder_dim", "cond_token_dim")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma")


@dataclass(frozen=True)
class Layout:
    """A latent layout: its name and shape for ``channels``."""

    name: str
    shape: Callable[[int], tuple]
    frames: int = 1
    packed: bool = False


LAYOUTS = {
    "image": Layout("image", lambda c: (1, c, 2 * SIDE, 2 * SIDE)),
    "video": Layout("video", lambda c: (1, c, FRAMES, 2 * SIDE, 2 * SIDE), FRAMES),
    "tokens": Layout("tokens", lambda c: (1, TOKENS, c), packed=True),
    "video_fchw": Layout("video_fchw", lambda c: (1, FRAMES, c, 2 * SIDE, 2 * SIDE), FRAMES),
    "sequence": Layout("sequence", lambda c: (1, c, TOKENS)),
    "video_fhwc": Layout("video_fhwc", lambda c: (FRAMES, 2 * SIDE, 2 * SIDE, c), FRAMES),
    "video_bfhwc": Layout("video_bfhwc", lambda c: (1, FRAMES, 2 * SIDE, 2 * SIDE, c), FRAMES),
    # already patchified: one (1, 2, 2) patch of every channel per token
    "patches": Layout("patches", lambda c: (1, TOKENS, c, 1, 2, 2), packed=True),
}


def config_value(config, keys, default=None):
    return next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)), default)


def channels(model) -> int:
    return config_value(model.config, _CHANNEL_KEYS, 4)


def text_dim(model) -> int:
    return config_value(model.config, _TEXT_KEYS, 32)


def forward_parameters(model) -> dict[str, inspect.Parameter]:
    params = inspect.signature(type(model).forward).parameters
    return {k: p for k, p in list(params.items())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def latent_name(model) -> str:
    return next(iter(forward_parameters(model)))


def timestep_name(model) -> str | None:
    return next((n for n in forward_parameters(model) if n in _TIMESTEP_NAMES), None)


def candidates(model) -> Iterator[Layout]:
    """The latent layouts to try, most likely first: packed tokens for models that take positional ids
    or image shapes next to the latent, video for 3-d models, image otherwise."""
    names, cls = set(forward_parameters(model)), type(model).__name__
    if names & {"img_ids", "img_shapes", "position_ids", "img_sizes"} and "input_ids" not in names:
        order = ["tokens", "image", "video"]
    elif "1D" in cls or "Audio" in cls or "Music" in cls:
        order = ["sequence", "tokens"]
    elif "3D" in cls or "Video" in cls:
        order = ["video", "video_fchw", "tokens", "video_bfhwc", "video_fhwc"]
    else:
        order = ["image", "tokens", "video"]
    yield from (LAYOUTS[n] for n in dict.fromkeys(order + list(LAYOUTS)))


def _ids(columns: int, rows: int, text: bool) -> torch.Tensor:
    if text:
        return torch.zeros(rows, columns)
    grid = latent_image_ids(SIDE)
    return torch.cat([torch.zeros(rows, columns - 3), grid], 1) if columns > 3 else grid[:, -columns:]


def _rope_columns(model) -> int:
    axes = next((getattr(model.config, k) for k in ("axes_dims_rope", "axes_dims", "axes_dim", "rope_axes_dim")
                 if isinstance(getattr(model.config, k, None), (list, tuple))), None)
    return len(axes) if axes else 3


def shared_rules(model, layout: Layout, g: torch.Generator) -> dict[str, Callable[[], object]]:
    """One builder per argument name the transformers share."""
    cfg, c, d = model.config, channels(model), text_dim(model)
    pooled = config_value(cfg, ("pooled_projection_dim", "in_text_dim2", "pooled_embed_dim"), d)
    text = lambda dim=d: torch.randn(1, TEXT_LEN, dim, generator=g)  # noqa: E731
    columns = _rope_columns(model)
    return {
        "encoder_hidden_states": text,
        "encoder_hidden_states_t5": text,
        "encoder_hidden_states_2": lambda: text(config_value(cfg, ("text_embed_2_dim",), d)),
        "encoder_hidden_states_llama3": text,
        "cap_feats": text,
        "text_bth": text,
        "pooled_projections": lambda: torch.randn(1, pooled, generator=g),
        "pooled_embeds": lambda: torch.randn(1, pooled, generator=g),
        "img_ids": lambda: _ids(columns, TOKENS, False),
        "txt_ids": lambda: _ids(columns, TEXT_LEN, True),
        "guidance": lambda: torch.tensor([3.5]) if getattr(cfg, "guidance_embeds", False) else None,
        "img_shapes": lambda: [(1, SIDE, SIDE)],
        "encoder_attention_mask": lambda: torch.ones(1, TEXT_LEN, dtype=torch.bool),
        "encoder_hidden_states_mask": lambda: torch.ones(1, TEXT_LEN, dtype=torch.bool),
        "text_embedding_mask": lambda: torch.ones(1, TEXT_LEN, dtype=torch.bool),
        "text_embedding_mask_t5": lambda: torch.ones(1, TEXT_LEN, dtype=torch.bool),
        "class_labels": lambda: torch.tensor([1]),
        # Only where the config has an image projection (image_dim None: a text-to-video variant).
        "encoder_hidden_states_image": lambda: None if "image_dim" in cfg and cfg.image_dim is None else torch.randn(
            1, 4, config_value(cfg, ("image_dim",), d), generator=g),
        "image_embeds": lambda: torch.randn(1, 4, config_value(cfg, ("image_embed_dim",), d), generator=g),
        "global_hidden_states": lambda: torch.randn(1, 1, config_value(cfg, ("global_states_input_dim", "global_cond_dim"), d),
                                                    generator=g),
        "control_hidden_states": lambda: torch.randn(
            (1, config_value(cfg, ("vace_in_channels",), c)) + layout.shape(c)[2:], generator=g),
        "encoder_attention_mask_2": lambda: torch.ones(1, TEXT_LEN, dtype=torch.bool),
        "image_meta_size": lambda: torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]),
        "style": lambda: torch.tensor([0]),
        "position_ids": lambda: torch.cat([_ids(columns, TEXT_LEN, True), _ids(columns, TOKENS, False)]),
        "mask": lambda: torch.ones(1, TEXT_LEN, dtype=torch.bool),
        # rotary positions per axis of the (patchified) latent grid and of the text
        "visual_rope_pos": lambda: [torch.arange(layout.frames), torch.arange(SIDE), torch.arange(SIDE)],
        "text_rope_pos": lambda: torch.arange(TEXT_LEN),
        "indices_latents": lambda: torch.arange(layout.frames),
        "encoder_mask": lambda: torch.ones(1, TEXT_LEN, dtype=torch.bool),
        "text_lens": lambda: torch.tensor([TEXT_LEN]),
        "original_size": lambda: torch.tensor([[16.0 * SIDE, 16.0 * SIDE]]),
        "target_size": lambda: torch.tensor([[16.0 * SIDE, 16.0 * SIDE]]),
        "crop_coords": lambda: torch.tensor([[0.0, 0.0]]),
        "return_dict": lambda: False,
        "num_frames": lambda: layout.frames,
        "height": lambda: SIDE,
        "width": lambda: SIDE,
    }


# Arguments particular to one class, as data: name -> builder(model, layout, generator).
_OMNIGEN_SEQ = TOKENS + TEXT_LEN + 1 + TOKENS  # prompt, time token, latent tokens


_FRAMEPACK_HISTORY = {"clean": 1, "history_2x": 2, "history_4x": 4}


# MiniMax H3's packed sequence: the video tokens, then the text's, then a few audio tokens.
_H3_AUDIO = 4
_H3_SPANS = {"video": (0, TOKENS), "text": (TOKENS, TOKENS + TEXT_LEN),
             "audio": (TOKENS + TEXT_LEN, TOKENS + TEXT_LEN + _H3_AUDIO)}
_H3_TAGS = {"video": 0, "text": 1, "audio": 2}


def _h3_sequence_inputs(m, layout, g) -> dict[str, Callable]:
    length = _H3_SPANS["audio"][1]
    tags = torch.cat([torch.full((b - a,), _H3_TAGS[k], dtype=torch.long) for k, (a, b) in _H3_SPANS.items()])
    positions = torch.zeros(length, 3, dtype=torch.long)
    positions[:TOKENS] = latent_image_ids(SIDE).long()
    return {"timestep_indices": torch.zeros(length, dtype=torch.long), "token_tags": tags, "position_ids": positions,
            **{f"{k}_indices": torch.arange(a, b) for k, (a, b) in _H3_SPANS.items()}}


def _ideogram_positions(m, layout, g):
    from diffusers.models.transformers.transformer_ideogram4 import IMAGE_POSITION_OFFSET

    grid = latent_image_ids(SIDE).long()
    grid[:, 0] = 0
    return (grid + IMAGE_POSITION_OFFSET).unsqueeze(0)


def _ideogram_indicator(m, layout, g):
    from diffusers.models.transformers.transformer_ideogram4 import OUTPUT_IMAGE_INDICATOR

    return torch.full((1, TOKENS), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)


def _hunyuandit_rope(m, layout, g):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    grid = 2 * SIDE // m.config.patch_size
    return get_2d_rotary_pos_embed(m.inner_dim // m.num_heads, ((0, 0), (grid, grid)), (grid, grid),
                                   output_type="pt")


def _lumina_rope(m, layout, g):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return get_2d_rotary_pos_embed_lumina(m.head_dim, 384, 384)


INPUT_FIXES: dict[str, dict[str, Callable]] = {
    # the rotary tables the pipelines compute for the latent grid
    "HunyuanDiT2DModel": {"image_rotary_emb": _hunyuandit_rope},
    # its blocks unpack cross_attention_kwargs unconditionally (None is not a mapping)
    "LuminaNextDiT2DModel": {"image_rotary_emb": _lumina_rope, "cross_attention_kwargs": lambda m, layout, g: {}},
    "AceStepTransformer1DModel": {"context_latents": lambda m, layout, g: torch.randn(
        1, TOKENS, 2 * m.config.audio_acoustic_hidden_dim, generator=g)},
    # one sequence of image tokens (the text rides in encoder_hidden_states at the same positions)
    "Ideogram4Transformer2DModel": {
        "encoder_hidden_states": lambda m, layout, g: torch.randn(1, TOKENS, m.config.llm_features_dim, generator=g),
        "position_ids": _ideogram_positions, "indicator": _ideogram_indicator,
        "segment_ids": lambda m, layout, g: torch.ones(1, TOKENS, dtype=torch.long)},
    # a timestep per latent frame
    "AnyFlowTransformer3DModel": {
        "timestep": lambda m, layout, g: torch.full((1, layout.frames), 1000.0),
        "r_timestep": lambda m, layout, g: torch.full((1, layout.frames), 500.0)},
    # the text encoder's hidden states of every layer, one per block
    "BriaFiboTransformer2DModel": {"text_encoder_layers": lambda m, layout, g: [
        torch.randn(1, TEXT_LEN, m.config.text_encoder_dim, generator=g)
        for _ in range(m.config.num_layers + m.config.num_single_layers)]},
    # a prompt whose first TOKENS ids are replaced by the tokens of one input image
    "OmniGenTransformer2DModel": {
        "input_ids": lambda m, layout, g: torch.randint(0, 10, (1, TOKENS + TEXT_LEN), generator=g),
        "input_img_latents": lambda m, layout, g: [torch.randn(layout.shape(channels(m)), generator=g)],
        "input_image_sizes": lambda m, layout, g: {0: [[0, TOKENS]]},
        "attention_mask": lambda m, layout, g: torch.ones(1, _OMNIGEN_SEQ, _OMNIGEN_SEQ),
        "position_ids": lambda m, layout, g: torch.arange(_OMNIGEN_SEQ).unsqueeze(0)},
    # the audio stream beside the video latent (held fixed: the loop drives the video)
    "LTX2VideoTransformer3DModel": {
        "audio_hidden_states": lambda m, layout, g: torch.randn(1, 9, m.config.audio_in_channels, generator=g),
        "audio_encoder_hidden_states": lambda m, layout, g: torch.randn(1, TEXT_LEN, m.config.caption_channels,
                                                                        generator=g),
        "audio_num_frames": lambda m, layout, g: 9,
        "encoder_attention_mask": lambda m, layout, g: torch.ones(1, TEXT_LEN, dtype=torch.bool)},
    # conditioning aligned with the latent's frames
    "MiniMaxMusic3Transformer1DModel": {"encoder_hidden_states": lambda m, layout, g: torch.randn(
        1, TOKENS, m.config.condition_dim, generator=g)},
    # one chunk of all latent frames, a timestep per frame
    "AnyFlowFARTransformer3DModel": {
        "chunk_partition": lambda m, layout, g: [layout.frames],
        "timestep": lambda m, layout, g: torch.full((1, layout.frames), 1000.0),
        "r_timestep": lambda m, layout, g: torch.full((1, layout.frames), 500.0)},
    # patchified tokens of one latent frame, a timestep per token, and the RoPE of that frame's absolute
    # position, as the model builds it
    "SanaWMLTX2RefinerTransformer3DModel": {
        "video_rotary_emb": lambda m, layout, g: m.build_rotary_emb_for_absolute_positions(
            1, [0], SIDE, SIDE, torch.device("cpu"), 24.0),
        "timestep": lambda m, layout, g: torch.full((1, TOKENS), 1000.0)},
    "StableAudio3DiTModel": {"global_hidden_states": lambda m, layout, g: torch.randn(
        1, m.config.global_cond_dim, generator=g)},
    # text features of every layer of the text encoder: (batch, tokens, layers, width)
    "Krea2Transformer2DModel": {"encoder_hidden_states": lambda m, layout, g: torch.randn(
        1, TEXT_LEN, m.config.num_text_layers, m.config.text_hidden_dim, generator=g)},
    # one vision slot per 2x2 target latents after the text
    "QwenImage21Transformer2DModel": {"img_mask": lambda m, layout, g: torch.arange(TEXT_LEN + TOKENS // 4)[None] >= TEXT_LEN,
                                      "img_shapes": lambda m, layout, g: [[(1, SIDE, SIDE)]]},
    # the text features as bundles: the Perceiver's first, then one per injection block
    "BriaFibo2Transformer2DModel": {"encoder_hidden_states": lambda m, layout, g: torch.randn(
        1, 1 + len(m.config.injection_layer_ids), TEXT_LEN, m.config.cap_feat_dim, generator=g)},
    # the (frames, rows, columns) of the patch grid of each image in the sequence (here the target only)
    "JoyImageEditPlusTransformer3DModel": {"shape_list": lambda m, layout, g: [[(1, SIDE, SIDE)]]},
    # the noisy latent, the anchor latent and the anchor mask side by side on the channel axis
    "Kandinsky6SRTransformer3DModel": {"hidden_states": lambda m, layout, g: torch.randn(
        layout.shape(2 * m.config.in_visual_dim + 1), generator=g)},
    # a timestep per latent frame (B, 1, T) and the prompt as (B, 1, L, D), LTX style
    "SanaWMTransformer3DModel": {
        "timestep": lambda m, layout, g: torch.full((1, 1, layout.frames), 1000.0),
        "encoder_hidden_states": lambda m, layout, g: torch.randn(1, 1, TEXT_LEN, text_dim(m), generator=g)},
    # a batch of two (a CFG batch: at one prompt the model cuts the text to its mask's sum, a data-dependent
    # length); the CLIP image features its projection reads; clean history latents at full, 2x and 4x
    # downsampling (one frame, two, four: the embedding's temporal strides) with their frame indices
    "HunyuanVideoFramepackTransformer3DModel": {
        "hidden_states": lambda m, layout, g: torch.randn((2,) + layout.shape(channels(m))[1:], generator=g),
        "timestep": lambda m, layout, g: torch.full((2,), 1000.0),
        "encoder_hidden_states": lambda m, layout, g: torch.randn(2, TEXT_LEN, text_dim(m), generator=g),
        "encoder_attention_mask": lambda m, layout, g: torch.ones(2, TEXT_LEN, dtype=torch.bool),
        "pooled_projections": lambda m, layout, g: torch.randn(2, m.config.pooled_projection_dim, generator=g),
        "image_embeds": lambda m, layout, g: torch.randn(2, 4, m.config.image_proj_dim, generator=g),
        **{f"latents_{name}": (lambda m, layout, g, f=frames: torch.randn(
            2, channels(m), f, 2 * SIDE, 2 * SIDE, generator=g)) for name, frames in _FRAMEPACK_HISTORY.items()},
        **{f"indices_latents_{name}": (lambda m, layout, g, f=frames: torch.arange(f))
           for name, frames in _FRAMEPACK_HISTORY.items()}},
    # a reference frame and two video frames (as the pipeline's T + 1 = 21, a frame count the pose latents'
    # T does not divide), the pose latents of the video frames and the face video (pixels) of those frames
    "WanAnimateTransformer3DModel": {
        "hidden_states": lambda m, layout, g: torch.randn(1, m.config.in_channels, 3, 2 * SIDE, 2 * SIDE, generator=g),
        "pose_hidden_states": lambda m, layout, g: torch.randn(
            1, m.config.latent_channels, 2, 2 * SIDE, 2 * SIDE, generator=g),
        "face_pixel_values": lambda m, layout, g: torch.randn(
            1, 3, 2, m.config.motion_encoder_size, m.config.motion_encoder_size, generator=g)},
    # patchified video tokens, audio tokens, and where each row sits in the packed sequence
    "MiniMaxH3Transformer3DModel": {
        "hidden_states": lambda m, layout, g: torch.randn(
            1, TOKENS, m.config.in_channels * math.prod(m.config.patch_size), generator=g),
        "audio_hidden_states": lambda m, layout, g: torch.randn(1, _H3_AUDIO, m.config.audio_in_channels, generator=g),
        **{name: (lambda m, layout, g, n=name: _h3_sequence_inputs(m, layout, g)[n])
           for name in ("timestep_indices", "token_tags", "position_ids", "video_indices", "audio_indices",
                        "text_indices")}},
    "GlmImageTransformer2DModel": {
        "prior_token_id": lambda m, layout, g: torch.zeros(1, TOKENS, dtype=torch.long),
        "prior_token_drop": lambda m, layout, g: torch.zeros(1, dtype=torch.bool)},
}

# Optional arguments filled only when the model needs them (their default None is a valid call).
_ONLY_IF_REQUIRED = {"encoder_hidden_states_image", "image_embeds", "global_hidden_states", "control_hidden_states",
                     "encoder_attention_mask_2", "image_meta_size", "style", "encoder_attention_mask", "encoder_hidden_states_mask", "text_embedding_mask",
                     "text_embedding_mask_t5", "class_labels", "num_frames", "height", "width",
                     "encoder_hidden_states_2", "encoder_hidden_states_t5"}


def call_inputs(model, layout: Layout, seed: int = 0, timestep: float = 1000.0, optional: bool = False) -> dict:
    """The keyword arguments of one call of ``model`` with its latent in ``layout``; with ``optional``
    every argument a rule builds, masks and size hints included (a model that checks none of its
    conditioning is None).

    Raises:
        KeyError: a required argument no rule builds (its name).
    """
    g = torch.Generator().manual_seed(seed)
    params = forward_parameters(model)
    rules = {**shared_rules(model, layout, g),
             **{k: (lambda f=f: f(model, layout, g)) for k, f in INPUT_FIXES.get(type(model).__name__, {}).items()}}
    latent, t_name = latent_name(model), timestep_name(model)
    fixes = INPUT_FIXES.get(type(model).__name__, {})
    # a latent with conditioning channels beside the noisy ones comes from its class's data
    out = {latent: rules[latent]() if latent in fixes else torch.randn(layout.shape(channels(model)), generator=g)}
    if t_name is not None:
        out[t_name] = rules[t_name]() if t_name in fixes else torch.tensor([timestep])
    for name, p in params.items():
        if name in out:
            continue
        required = p.default is inspect.Parameter.empty
        if name not in rules and "timestep" in name and required:  # a second time (mean-flow's r, a target t)
            out[name] = torch.tensor([timestep])
        elif name in rules and (required or optional or name not in _ONLY_IF_REQUIRED or name in fixes):
            value = rules[name]()
            if value is not None:
                out[name] = value
        elif required:
            raise KeyError(name)
    return out
