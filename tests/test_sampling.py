import pytest
import torch
from diffusers import StableDiffusionPipeline

import models
import sampling
from utils import generators

PROMPTS = ["a red circle", "a blue square on green"]
RES = 32


def sample_ours(model, prompts, seeds, steps, guidance, eta, **kwargs):
    guided = sampling.uses_guidance(guidance)
    cond = models.encode_prompts(model, prompts, guided)
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
