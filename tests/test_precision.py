"""Precision regions of training: autocast wraps the denoiser alone; prompt encoders, the VAE and the rewards
run in the dtypes they are made for (T5's fp32 `wo`, a bf16 reward), and reward scores keep their scale in bf16."""

import math

import pytest
import torch
from transformers import CLIPModel, T5EncoderModel

import evaluation
import generation
import models
import tiny_models
import tiny_rewards
import training
import utils

CPU = torch.device("cpu")
PROMPTS = ["a red cube", "an owl at night"]  # short: the tiny CLIP tokenizers hold 16 characters
RES = 32

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- T5 past the fp16 range -----------------------------------------------------------------------

# T5's feed-forward output layer `wo` is kept in fp32 when the model loads in fp16 (T5's
# `_keep_in_fp32_modules`): the real T5-XXL's activations there exceed fp16's 65504. Scaled by this,
# the tiny T5's `wo` outputs reach about 2e5 (measured: 207,000 on the prompts below).
WO_SCALE = 1e5


@pytest.fixture(scope="module")
def sd3_with_t5_past_fp16(tmp_path_factory):
    folder = tiny_models.make_tiny_sd3(str(tmp_path_factory.mktemp("sd3_t5_fp16")))
    t5 = T5EncoderModel.from_pretrained(f"{folder}/text_encoder_3")
    for block in t5.encoder.block:
        block.layer[-1].DenseReluDense.wo.weight.data *= WO_SCALE
    t5.save_pretrained(f"{folder}/text_encoder_3")
    return folder


def t5_states_the_denoiser_sees(model: models.DiffusionModel) -> torch.Tensor:
    """The T5 part of the conditioning that reaches the transformer in a sampler call of generation.generate."""
    seen = []
    hook = model.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().float()), with_kwargs=True)
    with torch.no_grad():
        generation.generate(model, PROMPTS, [0, 1], generation.SamplerSettings(RES, 1, 1.0))
    hook.remove()
    return seen[0][:, tiny_models.TOKEN_LENGTH:]  # the CLIP tokens come first


def test_t5_encodes_outside_fp16_autocast_so_its_fp32_wo_holds(sd3_with_t5_past_fp16):
    reference = t5_states_the_denoiser_sees(models.load_model(sd3_with_t5_past_fp16, CPU))
    model = models.load_model(sd3_with_t5_past_fp16, CPU, torch.float16)
    assert model.pipe.text_encoder_3.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.float32
    model.autocast = torch.float16  # as training with --mixed-precision fp16 sets it
    ours = t5_states_the_denoiser_sees(model)
    with torch.autocast("cpu", dtype=torch.float16):  # the old training step: everything under autocast
        old = t5_states_the_denoiser_sees(model)
    scale = reference.abs().max()
    # fp16 weights and states round to about 1e-3 of the scale; fp16 `wo` outputs overflow and are clamped.
    assert (ours - reference).abs().max() / scale < 5e-3
    assert not torch.isfinite(old).all() or (old - reference).abs().max() / scale > 0.3


# ---- which parts run under autocast in a training step ---------------------------------------------


def test_a_bf16_training_step_autocasts_the_denoiser_alone(tiny_sd, tiny_clip, prompt_file, tmp_path):
    cfg = training.TrainConfig(model=tiny_sd, reward_source=[f"pickscore={tiny_clip}"], prompts=prompt_file,
                               inference_steps=3, guidance_scale=3.0, lora_rank=4, lora_alpha=8, resolution=RES,
                               batch_size=2, mixed_precision="bf16", val_every=0, device="cpu",
                               run_dir=str(tmp_path / "run"))
    trainer = training.build(cfg, utils.Dist(0, 1, 0, CPU))
    pipe = trainer.model.pipe
    parts = {"denoiser": pipe.unet, "text encoder": pipe.text_encoder, "vae decoder": pipe.vae.decoder,
             "reward": trainer.reward}
    autocast_seen = {name: set() for name in parts}
    for name, part in parts.items():
        part.register_forward_pre_hook(lambda module, args, name=name: autocast_seen[name].add(
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    record = trainer.step(0)
    assert autocast_seen == {"denoiser": {torch.bfloat16}, "text encoder": {False}, "vae decoder": {False},
                             "reward": {False}}
    assert {p.dtype for p in trainer.reward.parameters()} == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(record["loss"])) and record["grad_norm"] > 0


# ---- CLIP scores of a bf16 reward ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_with_real_logit_scale(tmp_path_factory):
    """The tiny CLIP with PickScore's logit scale, ln 100 (4.6052; bf16 holds 4.5938), and weights that bf16
    holds exactly, so that a bf16 reward and an fp32 metric differ by the arithmetic alone."""
    folder = tiny_rewards.make_tiny_clip(str(tmp_path_factory.mktemp("clip_scale_100")))
    model = CLIPModel.from_pretrained(folder)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16))
        model.logit_scale.fill_(math.log(100))
    model.save_pretrained(folder)
    return folder


def test_logged_bf16_training_reward_is_the_metrics_pickscore(tiny_sd, clip_with_real_logit_scale, prompt_file,
                                                              tmp_path):
    cfg = training.TrainConfig(model=tiny_sd, reward_source=[f"pickscore={clip_with_real_logit_scale}"],
                               prompts=prompt_file, inference_steps=3, guidance_scale=3.0, lora_rank=4, lora_alpha=8,
                               resolution=RES, batch_size=8, mixed_precision="bf16", val_every=0, device="cpu",
                               run_dir=str(tmp_path / "run"))
    dist = utils.Dist(0, 1, 0, CPU)
    trainer = training.build(cfg, dist)
    positions = training.micro_batch_positions(trainer.cfg, 0, 0, dist)
    prompts = [trainer.stream.prompt(p) for p in positions]
    with torch.no_grad():  # the images of step 0, before it changes the weights
        images, _ = trainer.rollout(prompts, [trainer.stream.noise_seed(p) for p in positions], 0)
    logged = trainer.step(0)["reward_mean"]
    setup = evaluation.MetricSetup(CPU, {"pickscore": clip_with_real_logit_scale}, dreamsim_cache="")
    metric = evaluation.METRICS["pickscore"].load(setup)(evaluation.as_saved(images), prompts).double().mean().item()
    # bf16 arithmetic (and the 8-bit rounding metrics.py scores) moves the mean of 8 scores near -15 by 0.04
    # (measured); the logit scale rounded in bf16 (exp 99 for 100) moves it by 0.19 (measured with the old formula).
    assert abs(logged - metric) < 0.1, (logged, metric)
