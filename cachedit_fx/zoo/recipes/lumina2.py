"""Lumina-Image 2.0: 4 main layers after two 4-layer refiner lists (context_refiner on the text
stream, noise_refiner on the image stream), Gemma2 text encoder, tiny 4-level VAE.

Lumina2Pipeline runs CFG as two transformer calls per step (cond, then uncond), so the family is
``separate_cfg``. It feeds ``1 - t/1000`` as the timestep: 0..1, but 0 is pure noise and 1 the image,
the reverse of the other flow-matching families.
"""
import torch

from ..components import gemma2_encoder, sd3_kl_vae
from ..tokenizers import gemma_tokenizer
from ..family import Family

TEXT_DIM, TXT = 16, 48


def build_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tok = gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = gemma2_encoder(tok, hidden_size=TEXT_DIM)
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=4, num_refiner_layers=4,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 4, 4), cap_feat_dim=TEXT_DIM)
    # The pipeline hard-codes vae_scale_factor = 8, so the VAE needs 4 levels (3 downsamples) to agree.
    vae = sd3_kl_vae((8, 8, 8, 8), norm_num_groups=4, sample_size=64)
    pipe = Lumina2Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    # The default system prompt is ~150 characters, i.e. ~150 tokens of this character-level tokenizer:
    # it would fill max_sequence_length and cut the user prompt away.
    return dict(prompt="a photo of a cat", negative_prompt="", height=64, width=64, guidance_scale=4.0,
                system_prompt="Draw:", max_sequence_length=TXT, output_type="pt")


def _text(seed, used):
    mask = torch.zeros(1, TXT, dtype=torch.long)
    mask[:, :used] = 1
    return dict(encoder_hidden_states=torch.randn(1, TXT, TEXT_DIM, generator=torch.Generator().manual_seed(seed)),
                encoder_attention_mask=mask)


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, transformer.config.in_channels, 8, 8, generator=g),  # 64x64 image latents
        timestep=torch.tensor([1.0]),
        **_text(seed + 1, used=24),
        return_dict=False,
    )


def uncond_inputs(transformer, seed=0):
    return _text(seed + 2, used=20)  # the negative prompt: system prompt + separator only, a shorter mask


FAMILY = Family(
    name="lumina2", pipeline_class="Lumina2Pipeline", transformer_class="Lumina2Transformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1.0,
    separate_cfg=True, uncond_inputs=uncond_inputs,
    notes="Timestep runs 0 (noise) -> 1 (image), reversed w.r.t. the other flow-matching families.",
)
