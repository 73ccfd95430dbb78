"""AuraFlow: 3 joint (MMDiT) + 3 single-stream DiT blocks, UMT5 text encoder, tiny 3-level VAE.

Block contract: the single blocks take the concatenated text+image sequence (one stream), unlike Flux.
"""
import torch

from ..components import kl_vae, t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family


def build_pipeline():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok, umt5=True)
    # caption_projection_dim must equal the inner width (heads * head_dim); the 16x16 latent in patches
    # of 2 is an 8x8 grid, cut from the centre of the learned sqrt(pos_embed_max_size)^2 table.
    transformer = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=3, num_single_dit_layers=3,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        out_channels=4, pos_embed_max_size=256)
    # Random AdaLN gates come out ~0.03, and AuraFlow's joint blocks gate attention twice (through the
    # FF), so the prompt would barely reach the image (1e-4). Gates ~0.6 act like a trained model's.
    for name, module in transformer.named_modules():
        if name.endswith(("norm1", "norm1_context")):
            module.linear.weight.data.mul_(20)
    vae = kl_vae((8, 8, 16), sample_size=64)
    pipe = AuraFlowPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                            transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", height=64, width=64, guidance_scale=3.5,
                max_sequence_length=32, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 12, cfg.joint_attention_dim, generator=g),
        timestep=torch.tensor([1.0]),
        return_dict=False,
    )


FAMILY = Family(
    name="auraflow", pipeline_class="AuraFlowPipeline", transformer_class="AuraFlowTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1.0,
    notes="CFG batched into one call; the pipeline feeds t / 1000 to the transformer.",
)
