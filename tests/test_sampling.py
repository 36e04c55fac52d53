import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline)
from diffusers.utils.torch_utils import randn_tensor

import models
import sampling
from utils import generators

PROMPTS = ["a red circle", "a blue square on green"]
RES = 32


def sample_ours(model, prompts, seeds, steps, guidance, eta, **kwargs):
    guided = sampling.uses_guidance(guidance)
    cond = models.encode_prompts(model, prompts, guided, RES)
    gens = generators(seeds)
    x_T = sampling.initial_latents(model.latent_shape(len(prompts), RES), gens, model.scheduler, "cpu", torch.float32)
    return sampling.sample(
        models.tuned_denoiser(model, cond), model.scheduler, x_T,
        num_steps=steps, guidance_scale=guidance, eta=eta, generator=gens, **kwargs,
    )


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_k0_matches_diffusers_pipeline(request, fixture, eta, guidance):
    path = request.getfixturevalue(fixture)
    model = models.load_model(path, torch.device("cpu"))
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPTS, num_inference_steps=8, guidance_scale=guidance, eta=eta, height=RES, width=RES,
        generator=generators([3, 4]), output_type="latent",
    ).images
    ours = sample_ours(model, PROMPTS, [3, 4], 8, guidance, eta).latents
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-5


def lora_model(path, rank=4, perturb=0.0):
    model = models.load_model(path, torch.device("cpu"))
    models.attach_lora(model, rank, rank)
    if perturb:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, perturb)
    return model


def counting(denoise, log):
    def wrapped(x, t):
        out = denoise(x, t)
        log.append(out.requires_grad)
        return out

    return wrapped


@pytest.mark.parametrize("truncation", [0, 1, 3])
def test_graph_only_through_last_k_steps(tiny_sd, truncation):
    model = lora_model(tiny_sd, perturb=0.01)
    cond = models.encode_prompts(model, PROMPTS, True, RES)
    calls = []
    x_T = sampling.initial_latents(model.latent_shape(2, RES), generators([1, 2]), model.scheduler, "cpu", torch.float32)
    result = sampling.sample(
        counting(models.tuned_denoiser(model, cond), calls), model.scheduler, x_T,
        num_steps=6, guidance_scale=5.0, truncation_steps=truncation,
    )
    assert calls == [False] * (6 - truncation) + [True] * truncation
    assert result.graph_steps == truncation
    assert result.latents.requires_grad == (truncation > 0)
    if truncation:
        result.latents.square().mean().backward()
        grads = [p.grad for p in models.trainable_parameters(model)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_kl_zero_for_fresh_lora_and_equal_to_hand_computation(tiny_sd):
    fresh = lora_model(tiny_sd)
    cond = models.encode_prompts(fresh, PROMPTS, True, RES)
    x_T = sampling.initial_latents(fresh.latent_shape(2, RES), generators([5, 6]), fresh.scheduler, "cpu", torch.float32)
    kwargs = dict(num_steps=5, guidance_scale=4.0, truncation_steps=2)
    result = sampling.sample(models.tuned_denoiser(fresh, cond), fresh.scheduler, x_T,
                             base=models.base_denoiser(fresh, cond), **kwargs)
    assert result.kl.item() == 0.0

    model = lora_model(tiny_sd, perturb=0.05)
    tuned, base = models.tuned_denoiser(model, cond), models.base_denoiser(model, cond)
    result = sampling.sample(tuned, model.scheduler, x_T, base=base, **kwargs)

    scheduler = model.scheduler
    scheduler.set_timesteps(5)
    x, squared_errors = x_T, []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = sampling.guided_output(tuned, scheduler, x, t, 4.0)
            if i >= 3:
                out_base = sampling.guided_output(base, scheduler, x, t, 4.0)
                squared_errors.append(((out - out_base) ** 2).mean())
            x = scheduler.step(out, t, x).prev_sample
    expected = torch.stack(squared_errors).mean()
    assert expected > 0
    assert torch.allclose(result.kl, expected, rtol=1e-5, atol=1e-9)
    assert torch.allclose(result.latents, x, atol=1e-5)


def test_lv_renoises_final_sample(tiny_sd):
    model = lora_model(tiny_sd, perturb=0.01)
    cond = models.encode_prompts(model, PROMPTS, True, RES)
    calls = []
    x_T = sampling.initial_latents(model.latent_shape(2, RES), generators([1, 2]), model.scheduler, "cpu", torch.float32)
    result = sampling.sample(
        counting(models.tuned_denoiser(model, cond), calls), model.scheduler, x_T,
        num_steps=4, guidance_scale=3.0, lv_samples=3, generator=generators([7, 8]),
        base=models.base_denoiser(model, cond),
    )
    assert calls == [False] * 4 + [True] * 3
    assert result.latents.shape[0] == 6 and result.latents.requires_grad
    copies = result.latents.detach().chunk(3)
    assert not torch.allclose(copies[0], copies[1])


def test_checkpointed_denoiser_gives_same_gradients(tiny_sd):
    grads = []
    for use_checkpoint in (False, True):
        model = lora_model(tiny_sd, perturb=0.01)
        cond = models.encode_prompts(model, PROMPTS, True, RES)
        x_T = sampling.initial_latents(model.latent_shape(2, RES), generators([1, 2]), model.scheduler, "cpu", torch.float32)
        result = sampling.sample(models.tuned_denoiser(model, cond), model.scheduler, x_T, num_steps=4,
                                 guidance_scale=3.0, truncation_steps=2, checkpoint_denoiser=use_checkpoint)
        result.latents.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in models.trainable_parameters(model)]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_ddim_leaves_latents_unclipped_unless_the_config_asks():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    # An Euler config says nothing about clipping; DDIM's own default would clip x_0 to [-1, 1].
    assert models.ddim_from(EulerDiscreteScheduler().config).config.clip_sample is False
    assert models.ddim_from(DDIMScheduler(clip_sample=True).config).config.clip_sample is True


# ---------------------------------------------------------------------------------------------
# Stateful and multi-call schedulers


def with_scheduler(model, scheduler_class, **config):
    model.pipe.scheduler = scheduler_class.from_config(model.scheduler.config, **config)
    return model


def loss_gradient(model, scheduler_class, checkpointed: bool) -> torch.Tensor:
    with_scheduler(model, scheduler_class)
    cond = models.encode_prompts(model, PROMPTS, True, RES)
    gens = generators([1, 2])
    model.scheduler.set_timesteps(4)  # Euler's initial noise scale depends on the timesteps
    x_T = sampling.initial_latents(model.latent_shape(2, RES), gens, model.scheduler, "cpu", torch.float32)
    result = sampling.sample(models.tuned_denoiser(model, cond), model.scheduler, x_T, num_steps=4,
                             guidance_scale=3.0, truncation_steps=2, checkpoint_denoiser=checkpointed)
    for param in models.trainable_parameters(model):
        param.grad = None
    result.latents.square().mean().backward()
    return torch.cat([p.grad.flatten() for p in models.trainable_parameters(model)])


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_checkpointed_gradients_equal_plain_ones_with_stateful_schedulers(tiny_sd, scheduler_class):
    """Euler reads its step index when it scales the model input: a checkpoint that recomputed that
    in backward would see the index moved on and feed the UNet the wrong input."""
    model = lora_model(tiny_sd, perturb=0.01)
    plain, checkpointed = (loss_gradient(model, scheduler_class, flag) for flag in (False, True))
    assert plain.abs().max() > 0
    assert (plain - checkpointed).norm() <= 1e-6 * plain.norm()


@pytest.mark.parametrize("scheduler_class, config, calls", [
    (PNDMScheduler, {"skip_prk_steps": False}, 15),  # SD 1.5's own: Runge-Kutta warm-up steps
    (HeunDiscreteScheduler, {}, 11),  # second order: two calls per step but the last
])
def test_truncation_and_weighing_count_the_schedulers_model_calls(tiny_sd, scheduler_class, config, calls):
    model = with_scheduler(lora_model(tiny_sd, perturb=0.01), scheduler_class, **config)
    cond = models.encode_prompts(model, PROMPTS, True, RES)
    model.scheduler.set_timesteps(6)
    x_T = sampling.initial_latents(model.latent_shape(2, RES), generators([1, 2]), model.scheduler, "cpu", torch.float32)
    graph_log = []
    result = sampling.sample(counting(models.tuned_denoiser(model, cond), graph_log), model.scheduler, x_T,
                             num_steps=6, guidance_scale=3.0, truncation_steps=1)
    assert graph_log == [False] * (calls - 1) + [True] and result.graph_steps == 1

    weights = []

    def recording_linear(i, n):
        weights.append(i / n)
        return i / n

    sampling.sample(models.tuned_denoiser(model, cond), model.scheduler, x_T, num_steps=6, guidance_scale=3.0,
                    base=models.base_denoiser(model, cond), weighing=recording_linear)
    assert len(weights) == calls and max(weights) < 1.0


def test_annealed_weight_of_step_zero_applies_at_the_noisiest_step(tiny_sd):
    model = lora_model(tiny_sd, perturb=0.01)
    cond = models.encode_prompts(model, PROMPTS, True, RES)
    x_T = sampling.initial_latents(model.latent_shape(2, RES), generators([1, 2]), model.scheduler, "cpu", torch.float32)
    seen = []

    def recording(name, denoise):
        def wrapped(x, t):
            seen.append((name, int(t)))
            return denoise(x, t)

        return wrapped

    sampling.sample(recording("tuned", models.tuned_denoiser(model, cond)), model.scheduler, x_T, num_steps=5,
                    guidance_scale=3.0, base=recording("base", models.base_denoiser(model, cond)),
                    weighing=lambda i, n: float(i == 0))
    timesteps = model.scheduler.timesteps.tolist()
    assert timesteps == sorted(timesteps, reverse=True)  # the first is the noisiest
    assert seen == [("tuned", timesteps[0])] + [("base", t) for t in timesteps[1:]]


def test_lv_renoises_to_the_last_steps_noise_level(tiny_sd):
    model = lora_model(tiny_sd, perturb=0.05)
    cond = models.encode_prompts(model, PROMPTS, True, RES)
    tuned = models.tuned_denoiser(model, cond)
    x_T = sampling.initial_latents(model.latent_shape(2, RES), generators([1, 2]), model.scheduler, "cpu", torch.float32)
    with torch.no_grad():
        result = sampling.sample(tuned, model.scheduler, x_T, num_steps=4, guidance_scale=3.0, lv_samples=2,
                                 generator=generators([7, 8]))
        x0 = sampling.sample(tuned, model.scheduler, x_T, num_steps=4, guidance_scale=3.0).latents
        scheduler = model.scheduler
        t_last = scheduler.timesteps[-1]
        gens = generators([7, 8])
        expected = []
        for _ in range(2):
            noise = randn_tensor(x0.shape, generator=gens, dtype=x0.dtype)
            x_t = scheduler.add_noise(x0, noise, t_last.reshape(1))
            out = sampling.guided_output(tuned, scheduler, x_t, t_last, 3.0)
            expected.append(scheduler.step(out, t_last, x_t).prev_sample)
    assert torch.allclose(result.latents, torch.cat(expected), atol=1e-6)


def test_merged_lora_sampling_equals_the_lora_layers_and_the_base_switch_equals_peft(tiny_sd):
    model = lora_model(tiny_sd, perturb=0.05)
    cond = models.encode_prompts(model, PROMPTS, True, RES)
    x = torch.randn(4, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        merged = models.tuned_denoiser(model, cond)(x, t)  # no graph: merged weights
        layered = models.make_denoiser(model.unet, cond)(x, t)
        base = models.base_denoiser(model, cond)(x, t)
        model.unet.disable_adapters()
        peft_base = models.make_denoiser(model.unet, cond)(x, t)
        model.unet.enable_adapters()
    assert (merged - base).abs().max() > 1e-3  # the LoRA matters
    assert torch.allclose(merged, layered, atol=1e-5)
    assert torch.equal(base, peft_base)
    assert all(p.requires_grad for p in models.trainable_parameters(model))  # the switch left them trainable
    # after the LoRA weights change, the next no-grad call merges again
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "lora_B" in name:
                param.mul_(2)
    model.lora_changed()
    with torch.no_grad():
        assert torch.allclose(models.tuned_denoiser(model, cond)(x, t), models.make_denoiser(model.unet, cond)(x, t),
                              atol=1e-5)
