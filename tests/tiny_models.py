"""Tiny models of the real architectures, saved in the real on-disk formats.

Every factory writes a folder that the project's loaders open exactly as they open a real
checkpoint, so tests exercise the same code path as real use. Models are random but small
(a few hundred thousand parameters) so the whole suite runs on a 2-core CPU.
"""

import json
import os

import torch
from tokenizers.pre_tokenizers import ByteLevel

TEXT_DIM = 32
TOKEN_LENGTH = 16


def write_clip_tokenizer(folder: str, max_length: int = TOKEN_LENGTH) -> str:
    """A byte-level CLIP BPE tokenizer with no merges: every word splits into characters.

    Written as vocab.json + merges.txt + tokenizer_config.json, the files of the real SD/CLIP
    tokenizer folders, so `CLIPTokenizer.from_pretrained(folder)` loads it the same way.
    """
    os.makedirs(folder, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}, f)
    return folder


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


SDXL_TEXT_DIM_2 = 48  # the second encoder is wider, as OpenCLIP bigG is wider than CLIP L in SDXL
SDXL_POOLED_DIM = 24
SDXL_TIME_EMBED_DIM = 8


def make_tiny_sdxl(folder: str, seed: int = 0) -> str:
    """An SDXL base pipeline folder: both text encoders (the second with its projection, whose pooled
    output joins the time ids in the UNet's added condition), the text_time UNet, a VAE that asks
    for fp32 decoding, and the Euler scheduler SDXL base ships with."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    )
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
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "tokenizer")))
    # SDXL's second tokenizer pads with "!" where the first pads with <|endoftext|>.
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "tokenizer_2")), pad_token="!")
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
