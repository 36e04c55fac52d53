"""SDXL through every stage, on a tiny SDXL pipeline saved in the real format: the sampler against the
stock StableDiffusionXLPipeline, fp32 decoding, training, LoRA export, annealing and metrics."""

import json
import os

import pytest
import torch
import tyro
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

import generation
import metrics
import models
import sampling
import tiny_rewards
import training
import utils
from test_anneal import write_lora_checkpoint
from test_train import rewards_before_and_after_steps

PROMPTS = ["a red circle", "a blue cube"]  # short: the tiny tokenizers hold 16 characters
RES = 32
STEPS = 5
GUIDANCE = 4.0
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sdxl_empty_negative(tiny_sdxl, tmp_path_factory):
    """The same pipeline with force_zeros_for_empty_prompt off: the negative is the encoded empty prompt."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    folder = str(tmp_path_factory.mktemp("sdxl_empty_negative"))
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_rewards.make_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_sdxl, tmp_path_factory):
    # B ~ N(0, 0.3^2) with seeded A: the tuned model's effect on the scores is large by construction, not by luck
    return write_lora_checkpoint(str(tmp_path_factory.mktemp("lora")), tiny_sdxl, perturb=0.3)


def stock_pipeline(path, scheduler, lora=None, unet=None):
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora:
        pipe.load_lora_weights(lora)
    if unet:
        pipe.unet = UNet2DConditionModel.from_pretrained(unet)
    return pipe


def stock_output(pipe, guidance, output_type, seeds=(3, 4), steps=STEPS):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
                generator=utils.generators(list(seeds)), output_type=output_type).images


def our_images(model, weighing=None, guidance=GUIDANCE, seeds=(3, 4)):
    with torch.no_grad():
        return generation.generate(model, PROMPTS, list(seeds), generation.SamplerSettings(RES, STEPS, guidance),
                                   weighing=weighing)[0]


def test_family_is_detected_from_the_folder(tiny_sdxl):
    assert models.detect_family(tiny_sdxl).name == "sdxl"
    model = models.load_model(tiny_sdxl, CPU)
    assert model.family.name == "sdxl"
    assert model.default_resolution() == RES  # UNet sample size 8 times the VAE's factor 4
    assert model.pipe.text_encoder_2 is not None
    assert not any(p.requires_grad for part in model.pipe.components.values() if isinstance(part, torch.nn.Module)
                   for p in part.parameters())


@pytest.mark.parametrize("scheduler", ["ddim", "pipeline"])
@pytest.mark.parametrize("fixture, guidance", [("tiny_sdxl", GUIDANCE), ("tiny_sdxl", 1.0),
                                               ("tiny_sdxl_empty_negative", GUIDANCE)])
def test_k0_matches_the_stock_sdxl_pipeline(request, fixture, guidance, scheduler):
    path = request.getfixturevalue(fixture)
    model = models.load_model(path, CPU, scheduler=scheduler)
    pipe = stock_pipeline(path, scheduler)
    assert type(model.scheduler) is type(pipe.scheduler)

    guided = sampling.uses_guidance(guidance)
    conditioning = models.encode_prompts(model, PROMPTS, guided, RES)
    gens = utils.generators([3, 4])
    model.scheduler.set_timesteps(STEPS)  # Euler's initial noise scale depends on the timesteps
    x_T = sampling.initial_latents(model.latent_shape(2, RES), gens, model.scheduler, "cpu", torch.float32)
    with torch.no_grad():
        latents = sampling.sample(models.tuned_denoiser(model, conditioning), model.scheduler, x_T,
                                  num_steps=STEPS, guidance_scale=guidance, generator=gens).latents
    expected = stock_output(pipe, guidance, "latent")
    assert latents.shape == expected.shape == (2, 4, RES // 4, RES // 4)
    assert (latents - expected).abs().max().item() <= 1e-5
    # generate() as the scripts call it, decoded: the same as the pipeline's own decode
    assert (our_images(model, guidance=guidance) - stock_output(pipe, guidance, "pt")).abs().max().item() <= 1e-5


def test_the_empty_prompt_negative_differs_from_the_zeroed_one(tiny_sdxl, tiny_sdxl_empty_negative):
    zeroed, encoded = (models.encode_prompts(models.load_model(path, CPU), PROMPTS, True, RES)
                       for path in (tiny_sdxl, tiny_sdxl_empty_negative))
    assert zeroed["encoder_hidden_states"][:2].abs().max() == 0
    assert zeroed["added_cond_kwargs"]["text_embeds"][:2].abs().max() == 0
    assert encoded["encoder_hidden_states"][:2].abs().max() > 0
    assert torch.equal(zeroed["encoder_hidden_states"][2:], encoded["encoder_hidden_states"][2:])
    time_ids = zeroed["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[RES, RES, 0, 0, RES, RES]] * 4  # original size, crop corner, target size


def test_fp16_weights_decode_in_fp32(tiny_sdxl):
    model = models.load_model(tiny_sdxl, CPU, torch.float16)
    assert model.unet.dtype == torch.float16 and model.pipe.vae.dtype == torch.float32
    seen = []
    model.pipe.vae.decoder.conv_out.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    latents = torch.randn(1, 4, RES // 4, RES // 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        images = models.decode(model, latents)
    assert seen == [torch.float32]
    fp32 = models.load_model(tiny_sdxl, CPU)
    fp32.pipe.vae.load_state_dict(model.pipe.vae.state_dict())  # the same fp16-rounded weights
    with torch.no_grad():
        assert torch.equal(images, models.decode(fp32, latents))


# ---------------------------------------------------------------------------------------------
# Training


def train_config(tiny_sdxl, tiny_clip, run_dir, **overrides):
    settings = dict(model=tiny_sdxl, reward_source=[f"pickscore={tiny_clip}"], prompts="animals",
                    inference_steps=6, guidance_scale=3.0, lora_rank=4, lora_alpha=8, batch_size=4, resolution=RES,
                    run_dir=str(run_dir))
    return training.TrainConfig(**{**settings, **overrides})


def trained_on_a_fixed_batch(model, tiny_clip, run_dir, **overrides):
    """A trainer after 8 steps on one fixed batch, and that batch's mean reward before and after."""
    cfg = train_config(model, tiny_clip, run_dir, **{"lr": 1e-1, "kl_coeff": 0.0, **overrides})
    torch.manual_seed(cfg.seed)  # as train.main does: the LoRA's A matrices are random
    trainer = training.build(cfg, utils.init_distributed("cpu"))
    return trainer, *rewards_before_and_after_steps(trainer)


@pytest.fixture(scope="module")
def trained(tiny_sdxl, tiny_clip, tmp_path_factory):
    return trained_on_a_fixed_batch(tiny_sdxl, tiny_clip, tmp_path_factory.mktemp("run"))


def test_training_steps_raise_the_reward_of_a_fixed_batch(trained):
    _, before, after = trained
    assert after > before + 0.3, (before, after)


def test_saved_lora_loads_into_a_stock_sdxl_pipeline_and_reproduces_our_images(trained, tiny_sdxl, tmp_path):
    trainer = trained[0]
    models.save_tuned(trainer.model, str(tmp_path))
    plain = stock_output(stock_pipeline(tiny_sdxl, "ddim"), GUIDANCE, "pt")
    stock_pipe = stock_pipeline(tiny_sdxl, "ddim", lora=str(tmp_path))
    stock = stock_output(stock_pipe, GUIDANCE, "pt")
    assert (stock - plain).abs().max() > 1e-2  # the LoRA changes the images
    trainer.model.merged_sampling = False  # through the LoRA layers, which are peft's
    layered = our_images(trainer.model)
    trainer.model.merged_sampling = True
    assert (layered - stock).abs().max() <= 1e-6
    # Our sampler runs merged weights: they are peft's own merge (fuse_lora). Merging sums in another
    # order than the layers do, which after a CFG trajectory is 4e-6 here with torch 2.14, 8e-6 with 2.9, 8e-5 with 2.5.
    stock_pipe.fuse_lora()
    assert (our_images(trainer.model) - stock_output(stock_pipe, GUIDANCE, "pt")).abs().max() <= 1e-6

    resumed = models.load_model(tiny_sdxl, CPU)
    models.attach_lora(resumed, trainer.cfg.lora_rank, trainer.cfg.lora_alpha)
    models.load_tuned_into_training(resumed, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(models.trainable_parameters(resumed),
                                                  models.trainable_parameters(trainer.model)))


def gradients_by_checkpointing(model, tiny_clip, run_dir, truncation,
                               **overrides) -> list[tuple[training.Trainer, torch.Tensor]]:
    """(trainer, gradient of KL - reward over a K = `truncation` rollout) for each combination of
    --gradient-checkpointing, --checkpoint-blocks and --checkpoint-calls-only, the plain one first."""
    results = []
    for checkpointing, blocks, calls_only in ((False, False, False), (True, False, False), (True, True, False),
                                              (False, True, False), (True, False, True)):
        cfg = train_config(model, tiny_clip, run_dir, batch_size=2, gradient_checkpointing=checkpointing,
                           checkpoint_blocks=blocks, checkpoint_calls_only=calls_only, truncation_steps=truncation,
                           **overrides)
        torch.manual_seed(0)  # the same LoRA A matrices in all
        trainer = training.build(cfg, utils.init_distributed("cpu"))
        with torch.no_grad():
            for name, param in trainer.model.denoiser.named_parameters():
                if "lora_B" in name:  # a fresh LoRA would leave the KL without a gradient
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        images, kl = trainer.rollout(PROMPTS, [1, 2], truncation=truncation)
        (kl - trainer.reward(images, PROMPTS).mean()).backward()
        results.append((trainer, torch.cat([p.grad.flatten() for p in models.trainable_parameters(trainer.model)])))
    return results


@pytest.mark.parametrize("truncation", [1, 2])  # K = 1 checkpoints the UNet's blocks, K = 2 each call
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sdxl, tiny_clip, tmp_path, truncation):
    (_, plain), *others = gradients_by_checkpointing(tiny_sdxl, tiny_clip, tmp_path, truncation)
    assert plain.abs().max() > 0
    for _, other in others:
        assert torch.allclose(plain, other, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Annealing and metrics


def write_full_checkpoint(folder: str, base_model: str) -> str:
    """A full fine-tune checkpoint as train.py writes it: the whole denoiser, perturbed, and config.json."""
    model = models.load_model(base_model, CPU)
    models.enable_full_finetune(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.denoiser.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    models.save_tuned(model, folder)
    utils.save_json(os.path.join(folder, "config.json"), {"model": base_model})
    return folder


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_anneal_draft_and_base_reproduce_tuned_and_base(kind, lora_checkpoint, tiny_sdxl, tmp_path):
    if kind == "lora":
        checkpoint, tuned = lora_checkpoint, stock_pipeline(tiny_sdxl, "pipeline", lora=lora_checkpoint)
    else:
        checkpoint = write_full_checkpoint(str(tmp_path), tiny_sdxl)
        tuned = stock_pipeline(tiny_sdxl, "pipeline", unet=os.path.join(checkpoint, models.FULL_UNET_DIR))
    model, cfg = generation.load_for_inference(generation.InferenceOptions(scheduler="pipeline", dtype="float32"),
                                               (checkpoint,), CPU)
    assert cfg.resolution == RES
    images = {w: our_images(model, w) for w in ("base", "draft", "linear")}
    assert (images["base"] - stock_output(stock_pipeline(tiny_sdxl, "pipeline"), GUIDANCE, "pt")).abs().max() <= 1e-5
    assert (images["draft"] - stock_output(tuned, GUIDANCE, "pt")).abs().max() <= 1e-5
    assert_linear_lies_between_base_and_draft(images)


def assert_linear_lies_between_base_and_draft(images: dict) -> None:
    def distance(a, b):
        return (images[a] - images[b]).norm().item()

    assert distance("base", "draft") > 0.1
    assert 0.01 * distance("base", "draft") < distance("linear", "base") < distance("base", "draft")


def metrics_of_base_and_tuned(checkpoint: str, tiny_clip: str, tmp_path, *flags: str) -> dict:
    """metrics.py's JSON report of PickScore for base and draft on PROMPTS, two images each."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "metrics.json"
    args = ["--checkpoint", checkpoint, "--weighing", "base", "draft", "--metrics", "pickscore",
            "--reward-source", f"pickscore={tiny_clip}", "--prompt-set", str(prompt_file), "--num-repeats", "2",
            "--inference-steps", "4", "--batch-size", "4", "--device", "cpu", "--out", str(out), *flags]
    metrics.main(tyro.cli(metrics.MetricsConfig, args=args))
    report = json.loads(out.read_text())
    results = report["results"]
    assert [row["prompt"] for row in results["draft"]["per_prompt"]] == PROMPTS
    return report


def test_metrics_score_base_and_tuned_sdxl_images(lora_checkpoint, tiny_clip, tmp_path):
    report = metrics_of_base_and_tuned(lora_checkpoint, tiny_clip, tmp_path, "--guidance-scale", "3.0")
    assert report["config"]["resolution"] == RES  # the model's default
    results = report["results"]
    base, draft = (results[w]["metrics"]["pickscore"]["mean"] for w in ("base", "draft"))
    assert abs(base - draft) > 0.05  # the checkpoint is evaluated, not the base model twice
