"""Build the demo world's pretrained models from scratch on the CPU (26 minutes measured on a quiet
2-core machine with the defaults: CLIP 4.5, autoencoder and UNet 20, measuring the rest).

    python build_demo_world.py                    # writes demo/sd, demo/clip and demo/quality.json
    python build_demo_world.py --stages clip      # rebuilds the CLIP and aesthetic head alone
    python build_demo_world.py --out /tmp/demo --unet-steps 200   # a quick, poorer world elsewhere

Everything is trained on scenes of demo_world.py drawn on the fly from --seed, so the same command
(with the same --threads) on the same software gives the same weights. Stages:

1. a tiny CLIP (ViT on 32x32 images, 2-layer text tower) trained contrastively on (scene, caption)
   pairs, jointly with a LAION-format aesthetic head on its normalised image embedding that regresses
   10 x the gold aesthetic (the LAION head's 0-10 range); saved as a transformers CLIPModel folder `OUT/clip` with its tokenizer,
   preprocessor config and `sac+logos+ava1-l14-linearMSE.pth`, so that both
   `--reward-source pickscore=OUT/clip` and `--reward-source aesthetic=OUT/clip` load it;
2. an AutoencoderKL (32x32 RGB <-> 4x8x8 latents), reconstruction loss plus a small KL;
3. a UNet2DConditionModel and its CLIPTextModel trained jointly on epsilon prediction, with 10% of
   captions dropped to "" so that classifier-free guidance works;
   2 and 3 are saved as a StableDiffusionPipeline folder `OUT/sd` with a DDIM scheduler.

Each stage is then measured through the project's own loaders (the CLIP's top-1 caption retrieval
within batches of 32; gold colour fidelity and shape accuracy of base samples at 20 DDIM steps) and
its figures, training time and settings go to `OUT/quality.json`.

Both tokenizers hold one token per word of the grammar (CLIP BPE files with a merge chain per word).
"""

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                          CLIPVisionConfig)

import demo_world
import generation
import models
import rewards
import utils

TOKEN_LENGTH = 16  # the longest caption is 13 tokens with its start and end tokens
TEXT_DIM = 64
QUALITY_STEPS = 20  # DDIM steps of the quality measurement
# The aesthetic head predicts this multiple of the gold aesthetic: the 0-10 range of the LAION head, so that
# train.py's KL coefficients weigh against a reward of the size they meet in real use.
AESTHETIC_SCALE = 10.0


@dataclass
class BuildConfig:
    out: str = "demo"  # folder to write sd/, clip/ and quality.json into
    seed: int = 0  # seeds weights, scenes and noise of every stage
    clip_steps: int = 2500  # optimizer steps of the CLIP and aesthetic head
    clip_batch: int = 128  # scenes per CLIP step (the contrastive loss wants many negatives)
    vae_steps: int = 500  # optimizer steps of the autoencoder
    vae_batch: int = 32  # scenes per autoencoder step
    unet_steps: int = 1600  # optimizer steps of the UNet and its text encoder
    unet_batch: int = 64  # scenes per UNet step
    caption_dropout: float = 0.1  # fraction of UNet training captions replaced by "" (for guidance)
    aesthetic_weight: float = 1.0  # weight of the head's squared error beside the contrastive loss
    quality_samples: int = 180  # base samples for the fidelity figures (two per base caption)
    guidance_scales: tuple[float, ...] = (3.0, 5.0, 7.5)  # guidance scales the fidelity is measured at
    # torch CPU threads; 2 train the UNet 1.3x faster than 1 on a quiet 2-core machine. Part of the recipe: another
    # count sums in another order, so the weights differ slightly (the quality figures do not)
    threads: int = 2
    # what to (re)build; each stage is seeded on its own, so building them apart gives the same weights
    stages: tuple[Literal["clip", "sd"], ...] = ("clip", "sd")


# ---------------------------------------------------------------------------------------------
# Data


def scene_batch(rng: random.Random, size: int, mention_probability: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """Fresh random scenes as float images [B,3,32,32] in [0,1] and their captions."""
    captions = [demo_world.random_caption(rng, mention_probability) for _ in range(size)]
    images = [demo_world.render(demo_world.scene_for(caption, rng)) for caption in captions]
    return demo_world.to_tensor(images), [caption.text() for caption in captions]


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int) -> None:
    """Linear warm-up over a tenth of the run, then cosine decay to zero: the last weights settle."""
    scale = min(1.0, (step + 1) / max(1, total // 10)) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = base_lr * scale


def report(stage: str, step: int, total: int, loss: float, start: float) -> None:
    if step % 50 == 0 or step == total - 1:
        print(f"{stage} step {step + 1}/{total} loss {loss:.4f} {time.time() - start:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per word


def write_word_tokenizer(folder: str) -> None:
    """CLIP BPE files whose merges rebuild each grammar word into a single token.

    CLIP BPE marks a word's last character with </w> and merges the lowest-ranked adjacent pair
    first; a chain that joins each word left to right, with every intermediate in the vocabulary,
    ends in the whole word. Longer words' chains rank first, so that a shorter word's merge (the
    "r i" of "right") cannot split a longer word ("triangle") before its own chain runs;
    `load_word_tokenizer` checks the result. The byte alphabet stays so any text still tokenizes.
    """
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for word in sorted(demo_world.vocabulary(), key=len, reverse=True):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            tokens.append(merged)
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        # A repeated merge would take the rank of its last occurrence and break the earlier chain.
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": TOKEN_LENGTH, "tokenizer_class": "CLIPTokenizer"}, f)


def load_word_tokenizer(folder: str):
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    split = [word for word in demo_world.vocabulary() if len(tokenizer.tokenize(word)) != 1]
    if split:
        raise RuntimeError(f"the merges do not rebuild these words into one token: {split}")
    return tokenizer


def text_config(tokenizer):
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKEN_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Stage 1: CLIP and aesthetic head


def build_clip(cfg: BuildConfig) -> str:
    folder = os.path.join(cfg.out, "clip")
    write_word_tokenizer(folder)
    tokenizer = load_word_tokenizer(folder)
    # 8x8 patches: 16 tokens per image keep the ViT cheap and still place a shape within a third
    vision = CLIPVisionConfig(image_size=demo_world.IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                              num_hidden_layers=3, num_attention_heads=4)
    config = CLIPConfig(text_config=text_config(tokenizer).to_dict(), vision_config=vision.to_dict(), projection_dim=64)
    torch.manual_seed(cfg.seed)
    model = CLIPModel(config).train()
    head = rewards.AestheticMLP(config.projection_dim).train()
    processor = CLIPImageProcessor(size={"shortest_edge": demo_world.IMAGE_SIZE},
                                   crop_size={"height": demo_world.IMAGE_SIZE, "width": demo_world.IMAGE_SIZE})
    preprocess = rewards.ClipPreprocess(processor)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    rng = random.Random(cfg.seed + 1)
    start = time.time()
    for step in range(cfg.clip_steps):
        cosine_lr(optimizer, 1e-3, step, cfg.clip_steps)
        images, captions = scene_batch(rng, cfg.clip_batch)
        target = AESTHETIC_SCALE * demo_world.gold_aesthetic(images)
        output = model(input_ids=token_ids(tokenizer, captions), pixel_values=preprocess(images), return_loss=True)
        aesthetic_error = F.mse_loss(head(output.image_embeds), target)
        loss = output.loss + cfg.aesthetic_weight * aesthetic_error
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("clip", step, cfg.clip_steps, loss.item(), start)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.save(head.state_dict(), os.path.join(folder, rewards.AESTHETIC_WEIGHTS_FILE))
    return folder


# ---------------------------------------------------------------------------------------------
# Stage 2: autoencoder


def build_vae(cfg: BuildConfig):
    torch.manual_seed(cfg.seed + 2)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                        sample_size=demo_world.IMAGE_SIZE).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    rng = random.Random(cfg.seed + 3)
    start = time.time()
    for step in range(cfg.vae_steps):
        cosine_lr(optimizer, 1e-3, step, cfg.vae_steps)
        images, _ = scene_batch(rng, cfg.vae_batch)
        pixels = images * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # A small KL keeps the latents bounded and smooth without blurring the reconstruction.
        loss = F.mse_loss(reconstruction, pixels) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("vae", step, cfg.vae_steps, loss.item(), start)
    vae.eval().requires_grad_(False)
    images, _ = scene_batch(random.Random(cfg.seed + 4), 1024)
    latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(256)])
    # SD's convention: scaled latents have unit variance, which the noise schedule assumes.
    vae.register_to_config(scaling_factor=1 / latents.std().item())
    return vae


# ---------------------------------------------------------------------------------------------
# Stage 3: UNet and text encoder


def build_unet(cfg: BuildConfig, vae, tokenizer):
    torch.manual_seed(cfg.seed + 5)
    unet = UNet2DConditionModel(
        sample_size=demo_world.IMAGE_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    ).train()
    text_encoder = CLIPTextModel(text_config(tokenizer)).train()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    rng = random.Random(cfg.seed + 6)
    noise_generator = torch.Generator().manual_seed(cfg.seed + 7)
    start = time.time()
    for step in range(cfg.unet_steps):
        cosine_lr(optimizer, 1e-3, step, cfg.unet_steps)
        images, captions = scene_batch(rng, cfg.unet_batch)
        captions = ["" if rng.random() < cfg.caption_dropout else caption for caption in captions]
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample(noise_generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=noise_generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=noise_generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(token_ids(tokenizer, captions)).last_hidden_state
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        report("unet", step, cfg.unet_steps, loss.item(), start)
    return unet.eval(), text_encoder.eval(), scheduler


def build_sd(cfg: BuildConfig) -> str:
    """Stages 2 and 3, saved as a StableDiffusionPipeline folder."""
    folder = os.path.join(cfg.out, "sd")
    tokenizer_folder = os.path.join(folder, "tokenizer")
    write_word_tokenizer(tokenizer_folder)
    tokenizer = load_word_tokenizer(tokenizer_folder)
    vae = build_vae(cfg)
    unet, text_encoder, scheduler = build_unet(cfg, vae, tokenizer)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                            ).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Stage 4: quality, through the project's loaders


@torch.no_grad()
def sample_quality(sd_folder: str, num_samples: int, guidance_scale: float, seed: int) -> dict:
    """Gold colour fidelity and shape accuracy of base samples of the base captions, 20 DDIM steps."""
    model = models.load_model(sd_folder, torch.device("cpu"))
    captions = [caption.text() for caption in demo_world.base_captions()]
    prompts = [captions[i % len(captions)] for i in range(num_samples)]
    settings = generation.SamplerSettings(demo_world.IMAGE_SIZE, QUALITY_STEPS, guidance_scale)
    fidelity, shape = [], []
    for start in range(0, num_samples, 64):
        batch = prompts[start : start + 64]
        seeds = [utils.derive_seed(seed, 9, start + i) for i in range(len(batch))]
        images, _ = generation.generate(model, batch, seeds, settings)
        fidelity.append(demo_world.gold_fidelity(images, batch))
        shape.append(demo_world.gold_shape(images, batch))
    return {"colour_fidelity": torch.cat(fidelity).mean().item(), "shape_accuracy": torch.cat(shape).mean().item()}


@torch.no_grad()
def retrieval_top1(clip_folder: str, num_batches: int, seed: int, mention_probability: float, batch: int = 32) -> float:
    """How often the CLIP score ranks an image's own caption first among the batch's captions, each
    naming size and position with `mention_probability` (a caption repeated in the batch counts as right)."""
    score = rewards.load_reward("pickscore", sources={"pickscore": clip_folder})
    rng = random.Random(seed)
    hits = 0
    for _ in range(num_batches):
        images, captions = scene_batch(rng, batch, mention_probability)
        pairs_images = images.repeat_interleave(batch, dim=0)
        scores = score(pairs_images, captions * batch).view(batch, batch)
        best = scores.argmax(dim=1).tolist()
        hits += sum(captions[b] == captions[i] for i, b in enumerate(best))
    return hits / (num_batches * batch)


# ---------------------------------------------------------------------------------------------


def measure_clip(cfg: BuildConfig, folder: str) -> dict:
    return {f"top1_in_batch_of_32_{kind}_captions": retrieval_top1(folder, 20, cfg.seed + 10, probability)
            for kind, probability in (("full", 1.0), ("base", 0.0))}


def measure_sd(cfg: BuildConfig, folder: str) -> dict:
    return {f"guidance_{scale}": sample_quality(folder, cfg.quality_samples, scale, cfg.seed)
            for scale in cfg.guidance_scales}


def main(cfg: BuildConfig) -> None:
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    report_path = os.path.join(cfg.out, "quality.json")
    summary = {}
    if os.path.exists(report_path):  # the figures of a stage built earlier stay
        with open(report_path) as f:
            summary = json.load(f)
    stages = {"clip": (build_clip, measure_clip), "sd": (build_sd, measure_sd)}
    for name in cfg.stages:
        build, measure = stages[name]
        start = time.time()
        folder = build(cfg)
        seconds = time.time() - start
        summary[name] = {"train_seconds": round(seconds), "quality": measure(cfg, folder), "built_with": asdict(cfg)}
        print(json.dumps({name: summary[name]["quality"]}, indent=2), flush=True)
    with open(report_path, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(BuildConfig, description=__doc__))
