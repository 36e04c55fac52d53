"""SD3 / SD3.5 through every stage, on tiny SD3 pipelines saved in the real format (with T5, without
T5, with dynamic shifting): the sampler against the stock StableDiffusion3Pipeline, DRaFT+ on
velocities, LoRA export into the stock pipeline, full fine-tuning, annealing, metrics, FDFO and
RTDMD checkpoints against hand-merged references, the CPS step, family defaults and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import tyro
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

import families
import generate
import generation
import models
import sampling
import tiny_models
import tiny_rewards
import training
import utils
from conftest import ROOT
from test_anneal import write_lora_checkpoint
from test_sdxl import (assert_linear_lies_between_base_and_draft, gradients_by_checkpointing,
                       metrics_of_base_and_tuned, train_config, trained_on_a_fixed_batch, write_full_checkpoint)

PROMPTS = ["a red circle", "a blue cube"]  # short: the tiny CLIP tokenizers hold 16 characters
RES = 32
STEPS = 5
GUIDANCE = 4.0
CPU = torch.device("cpu")
# The layers FDFO (fdfo/train_loop.py) and RTDMD (configs/*/sd35m.yaml) put their LoRA on.
PEER_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                "attn.to_out.0", "attn.to_q", "attn.to_v"]
RTDMD_SIGMAS = (1.0, 0.9, 0.75, 0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd3_no_t5(tmp_path_factory):
    return tiny_models.make_tiny_sd3(str(tmp_path_factory.mktemp("sd3_no_t5")), t5=False)


@pytest.fixture(scope="module")
def tiny_sd3_dynamic(tmp_path_factory):
    return tiny_models.make_tiny_sd3(str(tmp_path_factory.mktemp("sd3_dynamic")), dynamic_shifting=True)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_rewards.make_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_sd3, tmp_path_factory):
    return write_lora_checkpoint(str(tmp_path_factory.mktemp("lora")), tiny_sd3)


def stock_pipeline(path, lora=None, transformer=None, no_t5=False, scheduler=None):
    without_t5 = dict(text_encoder_3=None, tokenizer_3=None) if no_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **without_t5)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    if transformer is not None:
        pipe.transformer = transformer
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return pipe


def stock_output(pipe, guidance=GUIDANCE, output_type="pt", seeds=(3, 4), steps=STEPS, **kwargs):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
                generator=utils.generators(list(seeds)), output_type=output_type, **kwargs).images


def our_images(model, weighing=None, guidance=GUIDANCE, seeds=(3, 4), steps=STEPS, **settings):
    with torch.no_grad():
        return generation.generate(model, PROMPTS, list(seeds),
                                   generation.SamplerSettings(RES, steps, guidance, **settings), weighing=weighing)[0]


def sample_latents(model, guidance, steps=STEPS, seeds=(3, 4), **kwargs):
    conditioning = models.encode_prompts(model, PROMPTS, sampling.uses_guidance(guidance), RES)
    gens = utils.generators(list(seeds))
    x_T = sampling.initial_latents(model.latent_shape(2, RES), gens, model.scheduler, "cpu", torch.float32)
    return sampling.sample(models.tuned_denoiser(model, conditioning), model.scheduler, x_T, num_steps=steps,
                           guidance_scale=guidance, generator=gens, **kwargs)


def perturbed_lora_model(path, rank=4, scale=0.05):
    model = models.load_model(path, CPU)
    models.attach_lora(model, rank, 2 * rank)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:  # a fresh LoRA has B = 0, so tuned would equal base
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def max_difference(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Loading, defaults and the sampler against the stock pipeline


def test_family_is_detected_and_its_defaults_filled_in(tiny_sd3, tiny_sd):
    assert models.detect_family(tiny_sd3).name == "sd3"
    model = models.load_model(tiny_sd3, CPU)
    assert model.family.name == "sd3" and isinstance(model.denoiser, SD3Transformer2DModel)
    assert type(model.scheduler) is FlowMatchEulerDiscreteScheduler and model.scheduler.config.shift == 3.0
    assert model.default_resolution() == RES  # transformer sample size 8 times the VAE's factor 4
    assert not any(p.requires_grad for part in model.pipe.components.values() if isinstance(part, torch.nn.Module)
                   for p in part.parameters())

    inference = generation.with_family_defaults(generation.InferenceOptions(), families.SD3())
    assert (inference.scheduler, inference.inference_steps, inference.guidance_scale) == ("pipeline", 40, 4.5)
    train = training.resolved(training.TrainConfig(model=tiny_sd3), families.SD3())
    assert (train.lora_rank, train.lora_alpha, train.resolution, train.inference_steps) == (32, 64.0, 512, 40)
    sd = training.resolved(training.TrainConfig(model=tiny_sd), families.SD())  # the SD defaults are those of before
    assert (sd.scheduler, sd.inference_steps, sd.guidance_scale, sd.lora_rank, sd.lora_alpha, sd.resolution) == (
        "ddim", 50, 7.5, 32, 32.0, None)
    cps = generation.with_family_defaults(generation.InferenceOptions(scheduler="cps", sigmas=RTDMD_SIGMAS), families.SD3())
    assert cps.inference_steps == 4


@pytest.mark.parametrize("fixture, guidance, text", [
    ("tiny_sd3", GUIDANCE, {}),
    ("tiny_sd3", 1.0, {}),
    ("tiny_sd3", GUIDANCE, {"max_sequence_length": 24}),
    ("tiny_sd3", GUIDANCE, {"t5": False}),
    ("tiny_sd3", GUIDANCE, {"offload": True}),
    ("tiny_sd3_no_t5", GUIDANCE, {}),
    ("tiny_sd3_dynamic", GUIDANCE, {}),
])
def test_k0_matches_the_stock_sd3_pipeline(request, fixture, guidance, text):
    path = request.getfixturevalue(fixture)
    model = models.load_model(path, CPU, text=models.TextEncoding(**text))
    no_t5 = fixture == "tiny_sd3_no_t5" or text.get("t5") is False
    assert (model.pipe.text_encoder_3 is None) == no_t5
    pipe = stock_pipeline(path, no_t5=no_t5)
    stock_kwargs = {"max_sequence_length": text["max_sequence_length"]} if "max_sequence_length" in text else {}
    with torch.no_grad():  # with the mu of dynamic shifting where the scheduler asks for it
        latents = sample_latents(model, guidance, schedule=models.schedule_kwargs(model, RES)).latents
    expected = stock_output(pipe, guidance, "latent", **stock_kwargs)
    assert latents.shape == expected.shape == (2, tiny_models.SD3_LATENT_CHANNELS, RES // 4, RES // 4)
    assert max_difference(latents, expected) <= 1e-5
    # generate() as the scripts call it, decoded with the VAE's scaling and shift factors
    assert max_difference(our_images(model, guidance=guidance), stock_output(pipe, guidance, **stock_kwargs)) <= 1e-5


def test_dynamic_shifting_moves_the_schedule_with_the_image_size(tiny_sd3_dynamic):
    model = models.load_model(tiny_sd3_dynamic, CPU)
    small, large = (models.schedule_kwargs(model, side)["mu"] for side in (RES, 4 * RES))
    assert small < large  # 16 against 256 image tokens


def test_the_empty_prompt_is_the_encoded_negative(tiny_sd3, tiny_sd3_no_t5):
    guided, no_t5 = (models.encode_prompts(models.load_model(path, CPU), PROMPTS, True, RES)
                     for path in (tiny_sd3, tiny_sd3_no_t5))
    hidden, pooled = guided["encoder_hidden_states"], guided["pooled_projections"]
    assert hidden.shape == (4, 16 + 256, tiny_models.SD3_JOINT_DIM)  # CLIP tokens, then T5's 256
    assert pooled.shape == (4, 2 * tiny_models.SD3_POOLED_DIM)
    assert torch.equal(hidden[0], hidden[1]) and hidden[0].abs().max() > 0  # "" for both prompts, not zeros
    assert not torch.equal(hidden[2], hidden[3])
    assert no_t5["encoder_hidden_states"][:, 16:].abs().max() == 0  # zeros where T5 would be
    assert hidden[:, 16:].abs().max() > 0


def test_fp32_latents_stay_fp32_under_bf16_autocast(tiny_sd3):
    model = models.load_model(tiny_sd3, CPU)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = sample_latents(model, GUIDANCE, steps=2).latents
    assert latents.dtype == torch.float32  # the flow-match step casts to the prediction's dtype


# ---------------------------------------------------------------------------------------------
# The CPS step (RTDMD's sampler)


def cps_and_euler(steps=6):
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    schedulers = models.CPSScheduler.from_config(config), FlowMatchEulerDiscreteScheduler.from_config(config)
    for scheduler in schedulers:
        scheduler.set_timesteps(steps)
    return schedulers


def test_cps_with_eta_0_is_the_flow_match_euler_step():
    cps, euler = cps_and_euler()
    assert torch.equal(cps.sigmas, euler.sigmas)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=generator)
    x_cps, x_euler = x, x
    for t in euler.timesteps:
        v = torch.randn(x.shape, generator=generator)
        x_cps = cps.step(v, t, x_cps, eta=0.0, return_dict=False)[0]
        x_euler = euler.step(v, t, x_euler, return_dict=False)[0]
    assert max_difference(x_cps, x_euler) <= 1e-5 and x_euler.abs().max() > 1


def test_cps_sigmas_are_used_as_given_where_the_parent_shifts_them_again():
    cps, euler = cps_and_euler()
    cps.set_timesteps(sigmas=list(RTDMD_SIGMAS))
    euler.set_timesteps(sigmas=list(RTDMD_SIGMAS))
    assert cps.sigmas.tolist() == pytest.approx([*RTDMD_SIGMAS, 0.0])
    assert cps.timesteps.tolist() == pytest.approx([1000.0, 900.0, 750.0, 500.0])
    assert euler.sigmas[1].item() > 0.95  # shift 3 applied to 0.9 once more


@pytest.mark.parametrize("eta", [0.5, 0.9])
def test_cps_noise_term_has_the_stated_scale(eta):
    """x_next = (1 - s') x0 + s' cos(eta pi/2) eps + s' sin(eta pi/2) noise, over 160,000 draws."""
    cps, _ = cps_and_euler(steps=4)
    sigma, sigma_next = cps.sigmas[1].item(), cps.sigmas[2].item()
    generator = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 16, 50, 50, generator=generator), torch.randn(4, 16, 50, 50, generator=generator)
    x0, eps = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + sigma_next * math.cos(eta * math.pi / 2) * eps
    cps._step_index = 1
    draws = cps.step(v, cps.timesteps[1], x, eta=eta, generator=utils.generators([5, 6, 7, 8]),
                     return_dict=False)[0] - mean
    stated = sigma_next * math.sin(eta * math.pi / 2)
    assert abs(draws.std().item() / stated - 1) < 0.01
    assert abs(draws.mean().item()) < 0.01 * stated
    correlation = torch.corrcoef(torch.stack([draws.flatten(), eps.flatten()]))[0, 1].item()
    assert abs(correlation) < 0.01  # fresh noise, not the predicted one


def test_cps_at_given_sigmas_matches_the_stock_pipeline_and_draws_noise_per_image(tiny_sd3):
    model = models.load_model(tiny_sd3, CPU, scheduler="cps")
    # eta 0: the step the stock pipeline takes with our scheduler, which it passes no eta
    stock = stock_output(stock_pipeline(tiny_sd3, scheduler=models.CPSScheduler), 1.0, steps=len(RTDMD_SIGMAS),
                         sigmas=list(RTDMD_SIGMAS))
    ours = our_images(model, guidance=1.0, steps=len(RTDMD_SIGMAS), sigmas=RTDMD_SIGMAS)
    assert max_difference(ours, stock) <= 1e-5
    noisy = our_images(model, guidance=1.0, steps=len(RTDMD_SIGMAS), sigmas=RTDMD_SIGMAS, eta=0.9)
    assert max_difference(noisy, ours) > 1e-2
    with torch.no_grad():  # the second image alone, from the same seed: the same image
        alone = generation.generate(model, PROMPTS[1:], [4], generation.SamplerSettings(
            RES, len(RTDMD_SIGMAS), 1.0, 0.9, RTDMD_SIGMAS))[0]
    assert max_difference(alone[0], noisy[1]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# DRaFT+ on velocities


def counting(denoise, log):
    def wrapped(x, t):
        out = denoise(x, t)
        log.append((x.detach().clone(), out.requires_grad))
        return out

    return wrapped


def test_graph_only_through_the_last_k_steps_and_kl_zero_for_a_fresh_lora(tiny_sd3):
    fresh = models.load_model(tiny_sd3, CPU)
    models.attach_lora(fresh, 4, 8)
    conditioning = models.encode_prompts(fresh, PROMPTS, True, RES)
    result = sampling.sample(models.tuned_denoiser(fresh, conditioning), fresh.scheduler,
                             sampling.initial_latents(fresh.latent_shape(2, RES), utils.generators([1, 2]),
                                                      fresh.scheduler, "cpu", torch.float32),
                             num_steps=STEPS, guidance_scale=GUIDANCE, truncation_steps=2,
                             base=models.base_denoiser(fresh, conditioning))
    assert result.kl.item() == 0.0

    model = perturbed_lora_model(tiny_sd3)
    calls = []
    x_T = sampling.initial_latents(model.latent_shape(2, RES), utils.generators([1, 2]), model.scheduler, "cpu",
                                   torch.float32)
    result = sampling.sample(counting(models.tuned_denoiser(model, conditioning), calls), model.scheduler, x_T,
                             num_steps=STEPS, guidance_scale=GUIDANCE, truncation_steps=2,
                             base=models.base_denoiser(model, conditioning))
    assert [grad for _, grad in calls] == [False] * (STEPS - 2) + [True] * 2
    assert result.kl.item() > 0 and result.latents.requires_grad
    result.latents.square().mean().backward()
    grads = [p.grad for p in models.trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_lv_renoises_x0_with_scale_noise_to_the_last_sigma(tiny_sd3):
    model = perturbed_lora_model(tiny_sd3)
    conditioning = models.encode_prompts(model, PROMPTS, False, RES)
    x_T = sampling.initial_latents(model.latent_shape(2, RES), utils.generators([1, 2]), model.scheduler, "cpu",
                                   torch.float32)
    with torch.no_grad():
        x0 = sampling.sample(models.tuned_denoiser(model, conditioning), model.scheduler, x_T, num_steps=STEPS,
                             guidance_scale=1.0).latents
    calls = []
    result = sampling.sample(counting(models.tuned_denoiser(model, conditioning), calls), model.scheduler, x_T,
                             num_steps=STEPS, guidance_scale=1.0, lv_samples=2, generator=utils.generators([7, 8]))
    sigma = model.scheduler.sigmas[STEPS - 1].item()
    assert 0 < sigma < 0.5
    noise = utils.generators([7, 8])
    for copy, (model_input, grad) in enumerate(calls[STEPS:]):
        expected = (1 - sigma) * x0 + sigma * randn_tensor(x0.shape, generator=noise, dtype=x0.dtype)
        assert grad and max_difference(model_input, expected) <= 1e-5, copy
    assert result.latents.shape[0] == 4 and result.latents.requires_grad


@pytest.fixture(scope="module")
def trained(tiny_sd3, tiny_clip, tmp_path_factory):
    return trained_on_a_fixed_batch(tiny_sd3, tiny_clip, tmp_path_factory.mktemp("run"))


def test_training_steps_raise_the_reward_of_a_fixed_batch(trained):
    _, before, after = trained
    assert after > before + 0.3, (before, after)


def test_saved_lora_loads_into_a_stock_sd3_pipeline_and_reproduces_our_images(trained, tiny_sd3, tmp_path):
    trainer = trained[0]
    models.save_tuned(trainer.model, str(tmp_path))
    layers = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in load_file(tmp_path / models.LORA_FILE)}
    # the joint-attention projections of both blocks, and not SD3.5's second image attention
    assert {layer.split(".attn.")[1] for layer in layers} == {t.removeprefix("attn.") for t in PEER_TARGETS}
    assert not any(".attn2." in layer for layer in layers)
    plain = stock_output(stock_pipeline(tiny_sd3))
    stock_pipe = stock_pipeline(tiny_sd3, lora=str(tmp_path))
    stock = stock_output(stock_pipe)
    assert max_difference(stock, plain) > 1e-2  # the LoRA changes the images
    trainer.model.merged_sampling = False  # through the LoRA layers, which are peft's
    layered = our_images(trainer.model)
    trainer.model.merged_sampling = True
    assert max_difference(layered, stock) <= 1e-6
    stock_pipe.fuse_lora()  # our sampler's merged weights are peft's own merge
    assert max_difference(our_images(trainer.model), stock_output(stock_pipe)) <= 1e-6

    resumed = models.load_model(tiny_sd3, CPU)
    models.attach_lora(resumed, trainer.cfg.lora_rank, trainer.cfg.lora_alpha)
    models.load_tuned_into_training(resumed, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(models.trainable_parameters(resumed),
                                                  models.trainable_parameters(trainer.model)))


@pytest.mark.parametrize("truncation", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd3, tiny_clip, tmp_path, truncation):
    (plain_trainer, plain), *others = gradients_by_checkpointing(tiny_sd3, tiny_clip, tmp_path, truncation)
    assert plain.abs().max() > 0
    for trainer, other in others:
        # each transformer block recomputed in backward: with --checkpoint-blocks, and with
        # --gradient-checkpointing unless --checkpoint-calls-only at K > 1
        cfg = trainer.cfg
        assert trainer.model.denoiser.gradient_checkpointing == (
            cfg.checkpoint_blocks or (cfg.gradient_checkpointing and (truncation == 1 or not cfg.checkpoint_calls_only)))
        assert torch.allclose(plain, other, rtol=1e-4, atol=1e-7)
    assert not plain_trainer.model.denoiser.gradient_checkpointing


def test_full_finetune_saves_a_transformer_folder(tiny_sd3, tiny_clip, tmp_path):
    cfg = train_config(tiny_sd3, tiny_clip, tmp_path, full_finetune=True, batch_size=2, lr=1e-3)
    trainer = training.build(cfg, utils.init_distributed("cpu"))
    trainer.step(0)
    folder = training.save_checkpoint(trainer, 1, export=True)
    tuned = SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer"))
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters()))
    assert not os.path.exists(os.path.join(folder, models.LORA_FILE))


@pytest.mark.slow
def test_two_processes_train_as_one_with_grad_accumulation(tiny_sd3, tiny_clip, tmp_path):
    def run(world_size, run_dir, *extra):
        launcher = [sys.executable]
        if world_size > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
        args = ["--model", tiny_sd3, "--reward-source", f"pickscore={tiny_clip}", "--prompts", "animals",
                "--inference-steps", "4", "--guidance-scale", "3.0", "--lora-rank", "4", "--lora-alpha", "8",
                "--lr", "3e-3", "--val-every", "0", "--resolution", str(RES), "--batch-size", "1", "--steps", "3",
                "--run-dir", str(run_dir), "--device", "cpu", *extra]
        result = subprocess.run(launcher + ["train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return load_file(run_dir / "checkpoints" / "step-0000003" / models.LORA_FILE)

    one = run(1, tmp_path / "one", "--grad-accum", "2")
    two = run(2, tmp_path / "two")
    assert one.keys() == two.keys() and all(key.startswith("transformer.") for key in one)
    assert max(max_difference(one[k], two[k]) for k in one) <= 1e-5
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert (config["scheduler"], config["lora_rank"]) == ("pipeline", 4)  # the resolved defaults are recorded


# ---------------------------------------------------------------------------------------------
# Annealing and metrics


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_anneal_draft_and_base_reproduce_tuned_and_base(kind, lora_checkpoint, tiny_sd3, tmp_path):
    if kind == "lora":
        checkpoint, tuned = lora_checkpoint, stock_pipeline(tiny_sd3, lora=lora_checkpoint)
    else:
        checkpoint = write_full_checkpoint(str(tmp_path), tiny_sd3)
        tuned = stock_pipeline(tiny_sd3, transformer=SD3Transformer2DModel.from_pretrained(
            os.path.join(checkpoint, "transformer")))
    model, cfg = generation.load_for_inference(generation.InferenceOptions(dtype="float32"), (checkpoint,), CPU)
    assert (cfg.model, cfg.resolution, cfg.scheduler) == (tiny_sd3, RES, "pipeline")
    images = {w: our_images(model, w) for w in ("base", "draft", "linear")}
    assert max_difference(images["base"], stock_output(stock_pipeline(tiny_sd3))) <= 1e-5
    assert max_difference(images["draft"], stock_output(tuned)) <= 1e-5
    assert_linear_lies_between_base_and_draft(images)


def test_metrics_score_base_and_tuned_sd3_images(lora_checkpoint, tiny_clip, tmp_path):
    report = metrics_of_base_and_tuned(lora_checkpoint, tiny_clip, tmp_path, "--max-sequence-length", "32")
    config = report["config"]
    assert (config["resolution"], config["guidance_scale"], config["scheduler"]) == (RES, 4.5, "pipeline")
    base, draft = (report["results"][w]["metrics"]["pickscore"]["mean"] for w in ("base", "draft"))
    assert abs(base - draft) > 1e-3  # the checkpoint is evaluated, not the base model twice


# ---------------------------------------------------------------------------------------------
# FDFO's and RTDMD's checkpoints


def peft_adapter(tiny_sd3, seed, rank=4, alpha=8.0):
    """A LoRA of the peers' layout made with peft itself, B perturbed so that it changes the images."""
    from peft import LoraConfig, get_peft_model

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    torch.manual_seed(seed)
    peft_model = get_peft_model(transformer, LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                        target_modules=PEER_TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return peft_model


def lora_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (A, B), read back from the peft model's own parameters."""
    named = dict(peft_model.named_parameters())
    layers = {name.split(".lora_A.")[0] for name in named if ".lora_A." in name}
    return {layer.removeprefix("base_model.model."): (named[f"{layer}.lora_A.default.weight"].detach(),
                                                      named[f"{layer}.lora_B.default.weight"].detach())
            for layer in layers}


def write_rtdmd_file(peft_model, path) -> str:
    """As RTDMD's trainer saves generator_ema.pt: the LoRA entries of the transformer's state dict,
    here behind DDP's `module.` prefix."""
    state = peft_model.base_model.model.state_dict()
    torch.save({f"module.{key}": value for key, value in state.items() if "lora_A" in key or "lora_B" in key}, path)
    return str(path)


def hand_merged_pipeline(tiny_sd3, adapters):
    """The reference: W + alpha / r * B @ A of every adapter added into a fresh copy of the transformer."""
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    weights = dict(transformer.named_parameters())
    with torch.no_grad():
        for factors, scale in adapters:
            for layer, (a, b) in factors.items():
                weights[f"{layer}.weight"] += scale * b @ a
    return stock_pipeline(tiny_sd3, transformer=transformer)


def inference_model(tiny_sd3, checkpoints, **options):
    cfg = generation.InferenceOptions(model=tiny_sd3, dtype="float32", **options)
    return generation.load_for_inference(cfg, tuple(checkpoints), CPU)[0]


def test_fdfo_adapter_folder_gives_the_images_of_its_merged_weights(tiny_sd3, tmp_path):
    adapter = peft_adapter(tiny_sd3, seed=1, alpha=8.0)
    adapter.save_pretrained(tmp_path / "epoch-0000100")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "epoch-0000100"))
    model = inference_model(tiny_sd3, [tmp_path / "epoch-0000100"])
    expected = stock_output(hand_merged_pipeline(tiny_sd3, [(lora_factors(adapter), 8.0 / 4)]))
    assert max_difference(expected, stock_output(stock_pipeline(tiny_sd3))) > 1e-2
    assert max_difference(our_images(model), expected) <= 1e-4
    assert max_difference(our_images(model, "base"), stock_output(stock_pipeline(tiny_sd3))) <= 1e-5


def test_two_stacked_rtdmd_state_dicts_give_the_images_of_both_merged(tiny_sd3, tmp_path):
    cold_start, rl = peft_adapter(tiny_sd3, seed=2), peft_adapter(tiny_sd3, seed=3)
    files = [write_rtdmd_file(cold_start, tmp_path / "cold_start.pt"), write_rtdmd_file(rl, tmp_path / "rl.pt")]
    assert any(".lora_A.default.weight" in key for key in torch.load(files[0], weights_only=True))
    model = inference_model(tiny_sd3, files, lora_alpha=12.0)  # not recorded in the files: the flag says it
    both = [(lora_factors(cold_start), 12.0 / 4), (lora_factors(rl), 12.0 / 4)]
    expected = stock_output(hand_merged_pipeline(tiny_sd3, both))
    first_only = stock_output(hand_merged_pipeline(tiny_sd3, both[:1]))
    assert max_difference(expected, first_only) > 1e-2  # the second adapter counts
    assert max_difference(our_images(model), expected) <= 1e-4
    assert max_difference(our_images(model, "base"), stock_output(stock_pipeline(tiny_sd3))) <= 1e-5


def test_generate_evaluates_stacked_rtdmd_loras_with_its_cps_sampler(tiny_sd3, tmp_path, capsys):
    files = [write_rtdmd_file(peft_adapter(tiny_sd3, seed=s), tmp_path / f"{s}.pt") for s in (2, 3)]
    out = tmp_path / "grid.png"
    generate.main(tyro.cli(generate.GenerateConfig, args=[
        "--model", tiny_sd3, "--checkpoint", *files, "--sampler", "cps", "--eta", "0.9",
        "--sigmas", *map(str, RTDMD_SIGMAS), "--guidance-scale", "1", "--side-by-side", "--prompt", *PROMPTS,
        "--num-images", "2", "--resolution", str(RES), "--device", "cpu", "--out", str(out)]))
    assert out.exists() and "2 prompts x 2 seeds x base, draft" in capsys.readouterr().out


def run_generate_expecting_usage_error(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(tyro.cli(generate.GenerateConfig, args=[*args, "--device", "cpu"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_an_adapter_of_another_model_is_refused_in_one_line_naming_a_key(tiny_sd3, tiny_sd, tmp_path, capsys):
    unet_lora = models.load_model(tiny_sd, CPU)
    models.attach_lora(unet_lora, 4, 4)
    state = {f"module.{k}": v for k, v in unet_lora.denoiser.state_dict().items() if "lora_" in k}
    torch.save(state, tmp_path / "sd15.pt")
    line = run_generate_expecting_usage_error(["--model", tiny_sd3, "--checkpoint", str(tmp_path / "sd15.pt")],
                                              capsys)
    assert f"{len(state)} of its {len(state)} LoRA weights have no layer here, e.g. module.down_blocks" in line, line

    wrong = torch.load(write_rtdmd_file(peft_adapter(tiny_sd3, seed=4), tmp_path / "r.pt"), weights_only=True)
    key = next(k for k in wrong if k.endswith("attn.to_q.lora_A.default.weight"))
    wrong[key] = torch.zeros(4, 7)  # an adapter of a narrower transformer
    torch.save(wrong, tmp_path / "narrow.pt")
    line = run_generate_expecting_usage_error(["--model", tiny_sd3, "--checkpoint", str(tmp_path / "narrow.pt")],
                                              capsys)
    assert "does not fit model" in line and "size mismatch" in line and "to_q.lora_A" in line, line

    torch.save({"transformer_blocks.0.attn.to_q.weight": torch.zeros(16, 16)}, tmp_path / "full.pt")
    line = run_generate_expecting_usage_error(["--model", tiny_sd3, "--checkpoint", str(tmp_path / "full.pt")],
                                              capsys)
    assert "'transformer_blocks.0.attn.to_q.weight' is not a LoRA weight" in line, line


@pytest.mark.parametrize("family, flags, message", [
    ("sd", ["--sampler", "cps"], "--sampler cps is a step for flow-matching models"),
    ("sd", ["--no-t5"], "--no-t5: this model (sd) has no T5 encoder"),
    ("sd3", ["--scheduler", "ddim"], "--scheduler ddim is for SD and SDXL"),
    ("sd3", ["--sigmas", "1.0", "0.5"], "--sigmas sets the schedule of --sampler cps"),
    ("sd3", ["--sampler", "cps", "--sigmas", "0.5", "0.9"], "--sigmas must fall strictly within (0, 1]"),
    ("sd3", ["--sampler", "cps", "--sigmas", "1.0", "0.5", "--inference-steps", "4"], "disagrees with the 2"),
    ("sd3", ["--max-sequence-length", "0"], "--max-sequence-length must be at least 1"),
    ("sd3", ["--resolution", "36"], "--resolution 36 must be a multiple of 8"),
])
def test_options_that_do_not_fit_the_family_are_one_line(family, flags, message, tiny_sd, tiny_sd3, tmp_path,
                                                         capsys):
    model = {"sd": tiny_sd, "sd3": tiny_sd3}[family]
    line = run_generate_expecting_usage_error(["--model", model, "--out", str(tmp_path / "g.png"), *flags], capsys)
    assert message in line, line
    assert not (tmp_path / "g.png").exists()


def test_a_run_dir_from_before_the_sd3_flags_still_resumes(tiny_sd, tmp_path):
    cfg = training.resolved(training.TrainConfig(model=tiny_sd, run_dir=str(tmp_path)), families.SD())
    record = training.run_record(cfg, 1)
    for newer in ("sigmas", "max_sequence_length", "no_t5", "offload_text_encoders"):
        del record[newer]
    utils.save_json(str(tmp_path / "config.json"), record)
    assert training.check_same_run(cfg, 1) == cfg
    with pytest.raises(utils.UsageError, match="holds a run with no_t5=False, not True"):
        training.check_same_run(training.replace(cfg, no_t5=True), 1)


def test_a_dora_adapter_folder_is_refused_in_one_line(tiny_sd3, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    get_peft_model(transformer, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=PEER_TARGETS)
                   ).save_pretrained(tmp_path / "dora")
    out = tmp_path / "grid.png"
    line = run_generate_expecting_usage_error(["--model", tiny_sd3, "--checkpoint", str(tmp_path / "dora"),
                                               "--out", str(out)], capsys)
    assert "use_dora: DoRA adapters are not supported" in line and str(tmp_path / "dora") in line, line
    assert not out.exists()
