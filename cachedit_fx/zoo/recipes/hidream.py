"""HiDream-I1: 4 dual-stream + 4 single-stream MoE blocks, all four text encoders (2x CLIP, T5, Llama),
tiny 2-level VAE.

CFG is batched (uncond and cond concatenated into one call), so not ``separate_cfg``. Single-stream
blocks take the concatenated image+text sequence; ``caption_projection`` is a ModuleList that is not a
block list.
"""
import torch

from ..components import clip_text_encoder, kl_vae, llama_encoder, t5_encoder
from ..tokenizers import clip_tokenizer, llama_tokenizer, t5_tokenizer
from ..family import Family

NUM_LAYERS, NUM_SINGLE_LAYERS, LLAMA_LAYERS = 4, 4, 2


def build_pipeline():
    from diffusers import (FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline,
                           HiDreamImageTransformer2DModel)

    tok, tok2, tok3, tok4 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer(), llama_tokenizer()
    torch.manual_seed(0)
    text_encoder = clip_text_encoder(tok, projection_dim=16, with_projection=True)
    text_encoder_2 = clip_text_encoder(tok2, projection_dim=16, with_projection=True)
    text_encoder_3 = t5_encoder(tok3)
    # eager attention: the pipeline asks the Llama for output_attentions, which sdpa warns about
    text_encoder_4 = llama_encoder(tok4, LLAMA_LAYERS, causal_lm=True, attn_implementation="eager")
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=NUM_LAYERS, num_single_layers=NUM_SINGLE_LAYERS,
        attention_head_dim=8, num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=32,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
        # Trap: one Llama hidden state per block, so len(llama_layers) == num_layers + num_single_layers;
        # the indices pick among the tiny Llama's layers and may repeat.
        llama_layers=[i % LLAMA_LAYERS for i in range(NUM_LAYERS + NUM_SINGLE_LAYERS)])
    vae = kl_vae(scaling_factor=0.3611, shift_factor=0.1159)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=tok, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tok2, text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tok3, text_encoder_4=text_encoder_4.eval(), tokenizer_4=tok4, transformer=transformer.eval())
    # Trap: the pipeline rescales any height/width to the area of default_sample_size * vae_scale_factor
    # squared (128 * 2 = 256 px here); 16 gives a 32x32 image.
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", height=32, width=32, guidance_scale=5.0, max_sequence_length=32,
                output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    t5_dim, llama_dim = cfg.caption_channels
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g),
        timesteps=torch.tensor([1000.0]),
        encoder_hidden_states_t5=torch.randn(1, 12, t5_dim, generator=g),
        # stacked Llama hidden states, one per Llama layer, indexed by config.llama_layers
        encoder_hidden_states_llama3=torch.randn(LLAMA_LAYERS, 1, 12, llama_dim, generator=g),
        pooled_embeds=torch.randn(1, cfg.text_emb_dim, generator=g),
        return_dict=False,
    )


FAMILY = Family(
    name="hidream", pipeline_class="HiDreamImagePipeline", transformer_class="HiDreamImageTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_arg="timesteps", timestep_max=1000.0,
)
