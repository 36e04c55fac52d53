"""Tiny models of the real architectures, saved in the real on-disk formats.

Every factory writes a folder that the project's loaders open exactly as they open a real
checkpoint, so tests exercise the same code path as real use. Models are random but small
(a few hundred thousand parameters) so the whole suite runs on a 2-core CPU.
"""

import json
import os

import torch

import shapes
from shapes import write_t5_tokenizer  # noqa: F401 (tests use it from here too)

TEXT_DIM = 32
TOKEN_LENGTH = 16


def write_clip_tokenizer(folder: str, max_length: int = TOKEN_LENGTH) -> str:
    return shapes.write_clip_tokenizer(folder, max_length)


def clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    settings = dict(
        vocab_size=514,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def make_tiny_sd(folder: str, prediction_type: str = "epsilon", seed: int = 0,
                 block_out_channels: tuple[int, int] = (16, 32)) -> str:
    """A Stable Diffusion 1.x/2.x pipeline folder (UNet, VAE, CLIP text encoder, DDIM); wider
    `block_out_channels` make a UNet whose weights, not activations, dominate training memory."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    )
    text_encoder = CLIPTextModel(clip_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "tokenizer")))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def vae_of_factor_4(**config):
    """An AutoencoderKL with three levels (latents a quarter of the image side), as SDXL's and SD3's
    tiny models share it; `config` sets the latent channels and the scaling of each family."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         norm_num_groups=8, sample_size=32, **config)


def clip_tokenizer_pair(folder: str):
    """The two CLIP tokenizers of SDXL and SD3: the second pads with "!" where the first pads with <|endoftext|>."""
    from transformers import CLIPTokenizer

    first = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "tokenizer")))
    second = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "tokenizer_2")), pad_token="!")
    return first, second


SDXL_TEXT_DIM_2 = 48  # the second encoder is wider, as OpenCLIP bigG is wider than CLIP L in SDXL
SDXL_POOLED_DIM = 24
SDXL_TIME_EMBED_DIM = 8


def make_tiny_sdxl(folder: str, seed: int = 0) -> str:
    """An SDXL base pipeline folder: both text encoders (the second with its projection, whose pooled
    output joins the time ids in the UNet's added condition), the text_time UNet, a VAE that asks
    for fp32 decoding, and the Euler scheduler SDXL base ships with."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_DIM + SDXL_TEXT_DIM_2,  # the two encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # six time ids (original size, crop corner, target size), each embedded, then the pooled text
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_DIM,
        norm_num_groups=8,
    )
    vae = vae_of_factor_4(latent_channels=4, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(clip_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(hidden_size=SDXL_TEXT_DIM_2, num_attention_heads=4, projection_dim=SDXL_POOLED_DIM)
    )
    # SDXL base's scheduler_config.json, keys of the DDIM/PNDM lineage included: DDIM built from it
    # must not clip x_0 to [-1, 1], which DDIM does by default.
    scheduler = EulerDiscreteScheduler.from_config(dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        sample_max_value=1.0,
        skip_prk_steps=True,
    ))
    tokenizer, tokenizer_2 = clip_tokenizer_pair(folder)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder)
    return folder


SD3_TEXT_DIM_2 = 48  # CLIP G is wider than CLIP L in SD3 as in SDXL
SD3_POOLED_DIM = 16  # each CLIP's projection; the transformer takes both, concatenated
SD3_JOINT_DIM = TEXT_DIM + SD3_TEXT_DIM_2  # T5's width: both CLIPs' hidden states are zero-padded to it
SD3_LATENT_CHANNELS = 16


def make_tiny_sd3(folder: str, seed: int = 0, t5: bool = True, dynamic_shifting: bool = False) -> str:
    """A Stable Diffusion 3.5 pipeline folder: the MMDiT transformer (joint attention, a dual-attention
    block and RMS q/k norms as in SD3.5), two CLIP text encoders with projections, a T5 encoder (or
    none, as a folder saved without text_encoder_3), a 16-channel VAE with SD3's scaling and shift
    factors, and the flow-match Euler scheduler with SD3's shift of 3 (or dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=SD3_JOINT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=2 * SD3_POOLED_DIM,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = vae_of_factor_4(latent_channels=SD3_LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609,
                          use_quant_conv=False, use_post_quant_conv=False)
    text_encoder = CLIPTextModelWithProjection(clip_text_config(projection_dim=SD3_POOLED_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(hidden_size=SD3_TEXT_DIM_2, num_attention_heads=4, projection_dim=SD3_POOLED_DIM)
    )
    text_encoder_3 = tokenizer_3 = None
    if t5:
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=56, d_model=SD3_JOINT_DIM, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0))
        tokenizer_3 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(os.path.join(folder, "tokenizer_3")))
    if dynamic_shifting:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                    max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    tokenizer, tokenizer_2 = clip_tokenizer_pair(folder)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    return folder


FLUX_LATENT_CHANNELS = 16
FLUX_T5_DIM = 32  # T5's width, the transformer's joint_attention_dim (4096 in FLUX.1)


def make_tiny_flux(folder: str, seed: int = 0, guidance_embeds: bool = True) -> str:
    """A FLUX.1 pipeline folder: the transformer with one double-stream and one single-stream block,
    RoPE over the (text, row, column) axes, and a guidance embedding as FLUX.1-dev has it (or none, as
    FLUX.1-schnell); CLIP (pooled output only) and T5 text encoders; a 16-channel VAE with FLUX's
    scaling and shift factors; and the flow-match Euler scheduler of each checkpoint: dynamic shifting
    from the image's token count for dev, a plain shift of 1 for schnell (their scheduler_config.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,  # 2x2 patches of latents, packed by the pipeline
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_T5_DIM,
        pooled_projection_dim=TEXT_DIM,  # CLIP's pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to the head dimension, as (16, 56, 56) to 128 in FLUX.1
    )
    vae = vae_of_factor_4(latent_channels=FLUX_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159,
                          use_quant_conv=False, use_post_quant_conv=False)
    text_encoder = CLIPTextModel(clip_text_config())
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=56, d_model=FLUX_T5_DIM, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0))
    shifts = (dict(use_dynamic_shifting=True, shift=3.0) if guidance_embeds
              else dict(use_dynamic_shifting=False, shift=1.0))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, **shifts)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "tokenizer"))),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5TokenizerFast.from_pretrained(write_t5_tokenizer(os.path.join(folder, "tokenizer_2"))),
    )
    pipe.save_pretrained(folder)
    return folder
