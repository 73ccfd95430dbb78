"""Tiny, randomly initialised components that several zoo families share.

Each builder constructs exactly one model (so the families keep control of the ``torch.manual_seed``
order: call the builders in the order the weights should be drawn) and returns it in train mode, as a
bare constructor would; the families call ``.eval()`` when they hand it to the pipeline. Only the
arguments the families actually vary are parameters; everything else is the one tiny config they share.
"""
from __future__ import annotations

import torch

# The latent statistics SD3 and Flux's VAE use (and the families that borrow its VAE).
SD3_LATENT_SHIFT, SD3_LATENT_SCALE = 0.0609, 1.5035


def t5_encoder(tokenizer, d_model: int = 32, d_kv: int = 8, umt5: bool = False, **overrides):
    """A 2-layer, 4-head T5 (or UMT5) encoder over ``tokenizer``'s vocabulary (ids: pad 0, eos 1)."""
    if umt5:
        from transformers import UMT5Config as Config, UMT5EncoderModel as Model
    else:
        from transformers import T5Config as Config, T5EncoderModel as Model

    return Model(Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=d_kv, num_heads=4, num_layers=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **overrides))


def clip_text_encoder(tokenizer, hidden_size: int = 32, projection_dim: int | None = 32,
                      with_projection: bool = False):
    """A 2-layer, 4-head CLIP text encoder (``CLIPTextModelWithProjection`` with ``with_projection``).

    eos/pad ids match the in-code tokenizer: CLIP pools the hidden state at the eos token.
    ``projection_dim=None`` leaves the config default.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    model = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        **extra))


def gemma2_encoder(tokenizer, hidden_size: int = 16):
    """A 2-layer Gemma2 text model (Sana, Lumina2) with eager attention."""
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        attn_implementation="eager"))


def llama_encoder(tokenizer, num_layers: int, causal_lm: bool = False, **overrides):
    """A 16-wide, 4-head Llama (``LlamaForCausalLM`` with ``causal_lm``) over ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    model = LlamaForCausalLM if causal_lm else LlamaModel
    return model(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=num_layers,
        num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.pad_token_id, **overrides))


def kl_vae(block_out_channels=(8, 16), latent_channels: int = 4, norm_num_groups: int = 8,
           sample_size: int = 32, quant_conv: bool = True, shift_factor: float | None = None,
           scaling_factor: float | None = None):
    """A 2D ``AutoencoderKL`` with one level per entry of ``block_out_channels`` (levels - 1 downsamples),
    one layer per block. ``quant_conv=False`` drops the (post-)quant convs, as SD3/Flux do; ``None``
    factors leave the config defaults."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    extra = {} if quant_conv else {"use_quant_conv": False, "use_post_quant_conv": False}
    if shift_factor is not None:
        extra["shift_factor"] = shift_factor
    if scaling_factor is not None:
        extra["scaling_factor"] = scaling_factor
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=list(block_out_channels),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
        sample_size=sample_size, **extra)


def sd3_kl_vae(block_out_channels=(8, 16), norm_num_groups: int = 8, sample_size: int = 32):
    """The SD3/Flux-style ``kl_vae``: 4 latent channels, no quant convs, SD3's shift and scale."""
    return kl_vae(block_out_channels, latent_channels=4, norm_num_groups=norm_num_groups, sample_size=sample_size,
                  quant_conv=False, shift_factor=SD3_LATENT_SHIFT, scaling_factor=SD3_LATENT_SCALE)


def latent_image_ids(side: int) -> torch.Tensor:
    """Flux-style positional ids of a ``side x side`` packed latent: ``(side * side, 3)`` rows of
    ``(0, row, col)``."""
    grid = torch.arange(side).float()
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), grid, grid, indexing="ij"), -1)
    return img_ids.reshape(-1, 3).float()
