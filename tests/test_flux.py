"""FLUX.1 through every stage, on tiny FluxPipelines saved in the real format (dev-shaped with the
guidance embedding, schnell-shaped without): the sampler against the stock FluxPipeline (embedded
guidance, true CFG), DRaFT+ on velocities, LoRA export into the stock pipeline, full fine-tuning and
FSDP2, annealing, metrics, 2 processes against 1, the defaults read from the checkpoint, bad input."""

import os
import subprocess
import sys

import pytest
import torch
import tyro
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

import families
import generation
import models
import sampling
import tiny_models
import tiny_rewards
import training
import utils
from conftest import run_train
from test_anneal import write_lora_checkpoint
from test_fsdp import worst_difference
from test_sd3 import counting, max_difference, run_generate_expecting_usage_error
from test_sdxl import (assert_linear_lies_between_base_and_draft, gradients_by_checkpointing,
                       metrics_of_base_and_tuned, train_config, trained_on_a_fixed_batch, write_full_checkpoint)

PROMPTS = ["a red circle", "a blue cube"]  # short: the tiny CLIP tokenizer holds 16 characters
RES = 32  # 8 x 8 latents, 16 packed image tokens
STEPS = 4
GUIDANCE = 3.5  # the embedded guidance of FLUX.1-dev
TRUE_CFG = 2.5
TOKENS = 32  # T5 tokens: the pipeline's 512 work as well, but cost time
CPU = torch.device("cpu")
# diffusers' FLUX LoRA script's and Flow-GRPO's targets, as peft names the layers they match
LORA_LAYERS = {"transformer_blocks.0.attn." + name for name in (
    "to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")} | {
    "transformer_blocks.0." + name for name in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                "ff_context.net.2")} | {
    "single_transformer_blocks.0.attn." + name for name in ("to_k", "to_q", "to_v")}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    return tiny_models.make_tiny_flux(str(tmp_path_factory.mktemp("flux_schnell")), seed=1, guidance_embeds=False)


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_flux, tmp_path_factory):
    return write_lora_checkpoint(str(tmp_path_factory.mktemp("lora")), tiny_flux)


def stock_pipeline(path, lora=None, transformer=None):
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    if transformer is not None:
        pipe.transformer = transformer
    return pipe


def stock_output(pipe, guidance=GUIDANCE, true_cfg=1.0, output_type="pt", seeds=(3, 4), steps=STEPS, **kwargs):
    negative = {"negative_prompt": "", "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
                generator=utils.generators(list(seeds)), output_type=output_type,
                max_sequence_length=kwargs.pop("max_sequence_length", TOKENS), **negative, **kwargs).images


def settings(guidance=GUIDANCE, true_cfg=1.0, steps=STEPS):
    return generation.SamplerSettings(RES, steps, guidance, true_cfg_scale=true_cfg)


def load(path, **text):
    return models.load_model(path, CPU, text=models.TextEncoding(**{"max_sequence_length": TOKENS, **text}))


def our_images(model, weighing=None, guidance=GUIDANCE, true_cfg=1.0, seeds=(3, 4)):
    with torch.no_grad():
        return generation.generate(model, PROMPTS, list(seeds), settings(guidance, true_cfg), weighing=weighing)[0]


def denoisers_and_noise(model, sampler_settings, seeds=(3, 4)):
    """The tuned and base denoisers on the conditioning the settings make, x_T, the sampler's CFG scale
    and the schedule, as generation.generate prepares them."""
    guidance = model.family.guidance(model, sampler_settings)
    conditioning = models.encode_prompts(model, PROMPTS, sampling.uses_guidance(guidance.cfg_scale), RES,
                                         guidance.embedded)
    schedule = models.schedule_kwargs(model, RES, (), sampler_settings.num_steps)
    model.scheduler.set_timesteps(sampler_settings.num_steps, **schedule)
    x_T = sampling.initial_latents(model.latent_shape(len(seeds), RES), utils.generators(list(seeds)), model.scheduler,
                                   "cpu", torch.float32)
    return (models.tuned_denoiser(model, conditioning), models.base_denoiser(model, conditioning), x_T,
            guidance.cfg_scale, schedule)


def sample(model, sampler_settings, wrap=lambda denoise: denoise, **kwargs):
    tuned, base, x_T, cfg_scale, schedule = denoisers_and_noise(model, sampler_settings)
    return sampling.sample(wrap(tuned), model.scheduler, x_T, num_steps=sampler_settings.num_steps,
                           guidance_scale=cfg_scale, schedule=schedule, base=base if kwargs.pop("kl", False) else None,
                           **kwargs)


def unpacked(pipe, packed):
    return FluxPipeline._unpack_latents(packed, RES, RES, pipe.vae_scale_factor)


def perturbed_lora_model(path, rank=4, scale=0.05):
    model = load(path)
    models.attach_lora(model, rank, 2 * rank)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:  # a fresh LoRA has B = 0, so tuned would equal base
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


# ---------------------------------------------------------------------------------------------
# Detection, defaults and the sampler against the stock pipeline


def test_family_is_detected_and_its_defaults_read_from_the_checkpoint(tiny_flux, tiny_schnell):
    dev, schnell = models.detect_family(tiny_flux), models.detect_family(tiny_schnell)
    assert dev.name == schnell.name == "flux" and dev.label == "FLUX.1"
    model = load(tiny_flux)
    assert isinstance(model.denoiser, FluxTransformer2DModel) and model.denoiser.config.guidance_embeds
    assert model.resolution_multiple() == 8 and model.latent_shape(2, RES) == (2, 16, 8, 8)
    assert not any(p.requires_grad for part in model.pipe.components.values() if isinstance(part, torch.nn.Module)
                   for p in part.parameters())

    inference = generation.with_family_defaults(generation.InferenceOptions(), dev)
    assert (inference.scheduler, inference.inference_steps, inference.guidance_scale, inference.true_cfg_scale,
            inference.max_sequence_length) == ("pipeline", 28, 3.5, 1.0, 512)
    distilled = generation.with_family_defaults(generation.InferenceOptions(), schnell)
    assert (distilled.inference_steps, distilled.guidance_scale, distilled.max_sequence_length) == (4, 0.0, 256)
    train = training.resolved(training.TrainConfig(model=tiny_flux), dev)
    assert (train.lora_rank, train.lora_alpha, train.resolution, train.inference_steps) == (64, 128.0, 512, 28)


@pytest.mark.parametrize("fixture, guidance, true_cfg, text", [
    ("tiny_flux", GUIDANCE, 1.0, {}),
    ("tiny_flux", GUIDANCE, TRUE_CFG, {}),
    ("tiny_flux", 1.0, 1.0, {"offload": True}),
    ("tiny_schnell", 0.0, 1.0, {}),
    ("tiny_schnell", 0.0, TRUE_CFG, {}),
])
def test_k0_matches_the_stock_flux_pipeline(request, fixture, guidance, true_cfg, text):
    path = request.getfixturevalue(fixture)
    model, pipe = load(path, **text), stock_pipeline(path)
    with torch.no_grad():
        latents = sample(model, settings(guidance, true_cfg)).latents
    expected = unpacked(pipe, stock_output(pipe, guidance, true_cfg, "latent"))
    assert latents.shape == expected.shape == (2, tiny_models.FLUX_LATENT_CHANNELS, RES // 4, RES // 4)
    assert max_difference(latents, expected) <= 1e-5
    # generate() as the scripts call it, decoded with the VAE's scaling and shift factors
    assert max_difference(our_images(model, guidance=guidance, true_cfg=true_cfg),
                          stock_output(pipe, guidance, true_cfg)) <= 2 / 255


def test_guidance_is_embedded_in_one_call_per_step_and_true_cfg_batches_the_empty_prompt(tiny_flux):
    model = load(tiny_flux)
    for true_cfg, batch in ((1.0, 2), (TRUE_CFG, 4)):
        calls = []
        with torch.no_grad():
            sample(model, settings(GUIDANCE, true_cfg), wrap=lambda denoise: counting(denoise, calls))
        assert [len(x) for x, _ in calls] == [batch] * STEPS
    with torch.no_grad():
        weak, strong = (sample(model, settings(g)).latents for g in (1.0, 5.0))
    assert max_difference(weak, strong) > 1e-3  # the embedding is an input the network reads


def test_max_sequence_length_sets_the_t5_tokens(tiny_flux):
    model = load(tiny_flux, max_sequence_length=24)
    conditioning = models.encode_prompts(model, PROMPTS, True, RES, GUIDANCE)
    assert conditioning["encoder_hidden_states"].shape == (4, 24, tiny_models.FLUX_T5_DIM)
    assert conditioning["pooled_projections"].shape == (4, tiny_models.TEXT_DIM)
    assert torch.equal(conditioning["encoder_hidden_states"][0], conditioning["encoder_hidden_states"][1])
    with torch.no_grad():
        ours = sample(model, settings()).latents
    pipe = stock_pipeline(tiny_flux)
    assert max_difference(ours, unpacked(pipe, stock_output(pipe, output_type="latent", max_sequence_length=24))) <= 1e-5


def test_fp32_latents_stay_fp32_under_bf16_autocast_and_backward_runs(tiny_flux):
    model = perturbed_lora_model(tiny_flux)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = sample(model, settings(), truncation_steps=1)
    assert result.latents.dtype == torch.float32  # the flow-match step casts to the prediction's dtype
    result.latents.square().mean().backward()
    grads = [p.grad for p in models.trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


# ---------------------------------------------------------------------------------------------
# DRaFT+ on velocities


def test_graph_only_through_the_last_k_steps_and_kl_zero_for_a_fresh_lora(tiny_flux):
    fresh = load(tiny_flux)
    models.attach_lora(fresh, 4, 8)
    assert sample(fresh, settings(), truncation_steps=2, kl=True).kl.item() == 0.0

    model = perturbed_lora_model(tiny_flux)
    calls = []
    result = sample(model, settings(), wrap=lambda denoise: counting(denoise, calls), truncation_steps=2, kl=True)
    assert [grad for _, grad in calls] == [False] * (STEPS - 2) + [True] * 2
    assert result.kl.item() > 0 and result.latents.requires_grad
    result.latents.square().mean().backward()
    grads = [p.grad for p in models.trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_lv_renoises_x0_with_scale_noise_to_the_last_sigma(tiny_flux):
    model = perturbed_lora_model(tiny_flux)
    with torch.no_grad():
        x0 = sample(model, settings()).latents
    calls = []
    result = sample(model, settings(), wrap=lambda denoise: counting(denoise, calls), lv_samples=2,
                    generator=utils.generators([7, 8]))
    sigma = model.scheduler.sigmas[STEPS - 1].item()
    assert 0 < sigma < 0.5
    noise = utils.generators([7, 8])
    for copy, (model_input, grad) in enumerate(calls[STEPS:]):
        expected = (1 - sigma) * x0 + sigma * randn_tensor(x0.shape, generator=noise, dtype=x0.dtype)
        assert grad and max_difference(model_input, expected) <= 1e-5, copy
    assert result.latents.shape[0] == 4 and result.latents.requires_grad


@pytest.fixture(scope="module")
def trained(tiny_flux, tiny_clip, tmp_path_factory):
    return trained_on_a_fixed_batch(tiny_flux, tiny_clip, tmp_path_factory.mktemp("run"), max_sequence_length=TOKENS)


def test_training_steps_raise_the_reward_of_a_fixed_batch(trained):
    _, before, after = trained
    assert after > before + 0.3, (before, after)


def test_saved_lora_loads_into_a_stock_flux_pipeline_and_reproduces_our_images(trained, tiny_flux, tmp_path):
    trainer = trained[0]
    models.save_tuned(trainer.model, str(tmp_path))
    layers = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in load_file(tmp_path / models.LORA_FILE)}
    assert layers == LORA_LAYERS
    plain = stock_output(stock_pipeline(tiny_flux))
    stock_pipe = stock_pipeline(tiny_flux, lora=str(tmp_path))
    stock = stock_output(stock_pipe)
    assert max_difference(stock, plain) > 1e-2  # the LoRA changes the images
    trainer.model.merged_sampling = False  # through the LoRA layers, which are peft's
    layered = our_images(trainer.model)
    trainer.model.merged_sampling = True
    assert max_difference(layered, stock) <= 1e-5
    stock_pipe.fuse_lora()  # our sampler's merged weights are peft's own merge
    assert max_difference(our_images(trainer.model), stock_output(stock_pipe)) <= 1e-5


@pytest.mark.parametrize("truncation", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_flux, tiny_clip, tmp_path, truncation):
    (plain_trainer, plain), *others = gradients_by_checkpointing(tiny_flux, tiny_clip, tmp_path, truncation)
    assert plain.abs().max() > 0
    for trainer, other in others:
        cfg = trainer.cfg  # the double- and single-stream blocks recomputed in backward
        assert trainer.model.denoiser.gradient_checkpointing == (
            cfg.checkpoint_blocks or (cfg.gradient_checkpointing and (truncation == 1 or not cfg.checkpoint_calls_only)))
        assert torch.allclose(plain, other, rtol=1e-4, atol=1e-7)
    assert not plain_trainer.model.denoiser.gradient_checkpointing


def test_full_finetune_saves_a_transformer_folder_and_fsdp_shards_both_kinds_of_block(tiny_flux, tiny_clip, tmp_path):
    cfg = train_config(tiny_flux, tiny_clip, tmp_path, full_finetune=True, batch_size=2, lr=1e-3)
    trainer = training.build(cfg, utils.init_distributed("cpu"))
    trainer.step(0)
    folder = training.save_checkpoint(trainer, 1, export=True)
    tuned = FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer"))
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters()))
    assert not os.path.exists(os.path.join(folder, models.LORA_FILE))
    units = trainer.model.family.shard_units(trainer.model.denoiser)
    assert units == [*base_blocks(trainer.model.denoiser)]


def base_blocks(transformer):
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def train_args(model, clip, run_dir, *extra):
    return ["--model", model, "--reward-source", f"pickscore={clip}", "--prompts", "animals", "--inference-steps",
            "3", "--guidance-scale", "3.0", "--max-sequence-length", str(TOKENS), "--lr", "3e-3", "--val-every",
            "0", "--resolution", str(RES), "--batch-size", "1", "--steps", "2", "--run-dir", str(run_dir),
            "--device", "cpu", *extra]


@pytest.mark.slow
def test_two_processes_train_as_one(tiny_flux, tiny_clip, tmp_path):
    lora = ["--lora-rank", "4", "--lora-alpha", "8"]
    run_train(train_args(tiny_flux, tiny_clip, tmp_path / "one", "--grad-accum", "2", *lora))
    run_train(train_args(tiny_flux, tiny_clip, tmp_path / "two", *lora), world_size=2)
    one, two = (load_file(tmp_path / run / "checkpoints" / "step-0000002" / models.LORA_FILE) for run in ("one", "two"))
    assert all(key.startswith("transformer.") for key in one)
    assert worst_difference(one, two) <= 1e-5


@pytest.mark.slow
def test_two_sharded_processes_train_the_weights_of_one(tiny_flux, tiny_clip, tmp_path):
    full = ["--full-finetune", "--lr", "1e-4"]
    run_train(train_args(tiny_flux, tiny_clip, tmp_path / "one", "--grad-accum", "2", *full))
    run_train(train_args(tiny_flux, tiny_clip, tmp_path / "two", "--fsdp", "--gradient-checkpointing", *full),
              world_size=2)
    weights = os.path.join("checkpoints", "step-0000002", "transformer", "diffusion_pytorch_model.safetensors")
    one, two = (load_file(tmp_path / run / weights) for run in ("one", "two"))
    base = load_file(os.path.join(tiny_flux, "transformer", "diffusion_pytorch_model.safetensors"))
    assert worst_difference(one, base) > 1e-5  # it trained
    assert worst_difference(one, two) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Annealing and metrics


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_anneal_draft_and_base_reproduce_tuned_and_base(kind, lora_checkpoint, tiny_flux, tmp_path):
    if kind == "lora":
        checkpoint, tuned = lora_checkpoint, stock_pipeline(tiny_flux, lora=lora_checkpoint)
    else:
        checkpoint = write_full_checkpoint(str(tmp_path), tiny_flux)
        tuned = stock_pipeline(tiny_flux, transformer=FluxTransformer2DModel.from_pretrained(
            os.path.join(checkpoint, "transformer")))
    options = generation.InferenceOptions(dtype="float32", resolution=RES, max_sequence_length=TOKENS)
    model, cfg = generation.load_for_inference(options, (checkpoint,), CPU)
    assert (cfg.model, cfg.scheduler, cfg.guidance_scale) == (tiny_flux, "pipeline", GUIDANCE)
    images = {w: our_images(model, w) for w in ("base", "draft", "linear")}
    assert max_difference(images["base"], stock_output(stock_pipeline(tiny_flux))) <= 1e-5
    assert max_difference(images["draft"], stock_output(tuned)) <= 1e-5
    assert_linear_lies_between_base_and_draft(images)


def test_metrics_score_base_and_tuned_flux_images(lora_checkpoint, tiny_clip, tmp_path):
    report = metrics_of_base_and_tuned(lora_checkpoint, tiny_clip, tmp_path, "--resolution", str(RES),
                                       "--max-sequence-length", str(TOKENS))
    config = report["config"]
    assert (config["resolution"], config["guidance_scale"], config["true_cfg_scale"]) == (RES, GUIDANCE, 1.0)
    base, draft = (report["results"][w]["metrics"]["pickscore"]["mean"] for w in ("base", "draft"))
    assert abs(base - draft) > 1e-3  # the checkpoint is evaluated, not the base model twice


# ---------------------------------------------------------------------------------------------
# Bad input


def test_a_flux_lora_on_an_sd3_model_is_refused_in_one_line(lora_checkpoint, tiny_flux, tiny_sd3, tmp_path, capsys):
    line = run_generate_expecting_usage_error(["--model", tiny_sd3, "--checkpoint", lora_checkpoint,
                                               "--out", str(tmp_path / "g.png")], capsys)
    assert f"(trained from {tiny_flux!r}) does not fit model" in line and "size mismatch" in line, line
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("fixture, flags, message", [
    ("tiny_flux", ["--no-t5"], "--no-t5: FLUX.1 cannot run without its T5 encoder"),
    ("tiny_flux", ["--max-sequence-length", "513"], "--max-sequence-length must be at most 512"),
    ("tiny_flux", ["--true-cfg-scale", "0.5"], "--true-cfg-scale must be >= 1"),
    ("tiny_flux", ["--sampler", "cps"], "--sampler cps is not supported for FLUX.1"),
    ("tiny_schnell", ["--guidance-scale", "3.5"], "has no guidance embedding"),
    ("tiny_sd3", ["--true-cfg-scale", "2"], "--true-cfg-scale is for FLUX.1's guidance-distilled models"),
])
def test_options_that_do_not_fit_the_family_are_one_line(request, fixture, flags, message, tmp_path, capsys):
    line = run_generate_expecting_usage_error(["--model", request.getfixturevalue(fixture), "--out", str(tmp_path / "g.png"), *flags], capsys)
    assert message in line, line
    assert not (tmp_path / "g.png").exists()
