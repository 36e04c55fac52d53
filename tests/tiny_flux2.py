"""A tiny FLUX.2 [klein] pipeline folder in the real on-disk format: the Flux2 transformer, the
AutoencoderKLFlux2 with its latent batch-norm statistics, a Qwen3 causal LM as the text encoder with
a Qwen2-style byte-level BPE tokenizer that carries a chat template, and the klein scheduler config.

The shapes follow diffusers' own tests (tests/pipelines/flux2/test_pipeline_flux2_klein.py in
huggingface/diffusers), made a little larger where ours need it: a VAE that halves the image side
(so the 2x2 patchify has something to fold), 28 Qwen3 layers so that the pipeline's default
`text_encoder_out_layers` (9, 18, 27) exist, and more than one single-stream block for FSDP.
"""

import os

import torch

import shapes

QWEN_HIDDEN = 16
OUT_LAYERS = 3  # the pipeline stacks the hidden states of three layers: (9, 18, 27)
LATENT_CHANNELS = 4  # the VAE's; the transformer sees them patchified 2x2, 16 channels
# FLUX.2-klein-4B's scheduler_config.json (FLUX.2-dev's too): dynamic shifting, whose mu the
# pipeline computes itself (compute_empirical_mu), so base and max shift never apply.
KLEIN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                       max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, time_shift_type="exponential")


def make_tiny_flux2(folder: str, distilled: bool = False, seed: int = 0) -> str:
    """A FLUX.2 [klein] pipeline folder: the base model (real CFG), or with `distilled` the
    step-distilled one, whose model_index.json says `is_distilled` and whose pipeline then never guides."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tokenizer = Qwen2TokenizerFast.from_pretrained(shapes.write_qwen_tokenizer(os.path.join(folder, "tokenizer")))
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=OUT_LAYERS * QWEN_HIDDEN,
        timestep_guidance_channels=32,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,  # as both klein models: guidance is real CFG or none
    )
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    ))
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():  # statistics away from (0, 1), so that normalising the latents shows
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=distilled)
    pipe.save_pretrained(folder)
    return folder
