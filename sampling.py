"""The denoising loop: classifier-free guidance, truncated back-propagation (DRaFT-K), the KL
outputs of DRaFT+, DRaFT-LV, and annealed mixing of a base and a tuned model.

It knows no model family. A *denoiser* is any callable `(model_input, t) -> out` that returns the
network's raw prediction (epsilon, v or velocity) for a batch whose conditioning it already
holds: `[uncond; cond]` when guidance is on, `[cond]` when it is off. The scheduler is a diffusers
scheduler; its `step` is plain tensor code, so gradients flow through it.
"""

import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weighing = Callable[[int, int], float]

DEFAULT_WEIGHINGS = ("base", "draft", "linear", "power_2", "power_4", "step_0.6")


@dataclass
class Trajectory:
    latents: torch.Tensor  # x_0; carries the graph of the last K steps when K > 0
    kl: torch.Tensor | None  # mean over graph steps of mean((out_tuned - out_base)^2); None without a base
    graph_steps: int  # denoiser calls that kept the graph


def uses_guidance(guidance_scale: float) -> bool:
    """As the diffusers pipelines decide it: a scale of 1 or less runs the conditional branch only."""
    return guidance_scale > 1.0


def initial_latents(shape, generators, scheduler, device, dtype) -> torch.Tensor:
    """x_T exactly as the diffusers pipelines draw it (one generator per sample). Flow-matching
    schedulers start from unit noise (sigma 1) and define no initial scale."""
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    return noise * scheduler.init_noise_sigma if hasattr(scheduler, "init_noise_sigma") else noise


def guided_output(denoise: Denoiser, scheduler, x: torch.Tensor, t: torch.Tensor, guidance_scale: float,
                  checkpointed: bool = False):
    """The denoiser's prediction at x_t after classifier-free guidance (diffusers order: uncond first).

    `checkpointed` recomputes the network call in backward, and only it: schedulers such as Euler
    read their step index in `scale_model_input`, which has moved on by the time backward runs."""
    guided = uses_guidance(guidance_scale)
    model_input = scaled_model_input(scheduler, torch.cat([x, x]) if guided else x, t)
    if checkpointed:
        # Keeps only this call's input for backward, so memory no longer grows with K by a whole
        # network's activations per step.
        out = checkpoint(denoise, model_input, t, use_reentrant=False)
    else:
        out = denoise(model_input, t)
    if not guided:
        return out
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def scaled_model_input(scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's input scaling (Euler divides by sqrt(sigma^2 + 1)); flow-matching schedulers have none."""
    scale = getattr(scheduler, "scale_model_input", None)
    return scale(x, t) if scale is not None else x


def step_kwargs(scheduler, eta: float, generator) -> dict:
    """Pass eta and the generator only to schedulers that take them, as the pipelines do."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def sample(
    tuned: Denoiser,
    scheduler,
    latents: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    generator=None,
    truncation_steps: int = 0,
    base: Denoiser | None = None,
    weighing: Weighing | None = None,
    lv_samples: int = 0,
    checkpoint_denoiser: bool = False,
    schedule: dict | None = None,
) -> Trajectory:
    """Run the sampler from x_T = `latents` to x_0.

    N counts the scheduler's model calls (`len(scheduler.timesteps)` once set: `num_steps` for
    one-call-per-step schedulers). Steps i < N - K run without a graph; the last K keep it, so the
    gradient reaches the tuned weights through those K denoiser calls and through x_t between them. With `base`, the base
    prediction on the same x_t at each graph step gives the KL. With `weighing`, every step uses
    (1 - w) * base + w * tuned (annealed guidance; inference only). With `lv_samples` = n > 0 the
    whole chain runs without a graph and x_0 is re-noised n times to the last step's level and
    denoised once with the graph (DRaFT-LV); the n results are concatenated along the batch.
    `schedule` is what `scheduler.set_timesteps` takes beyond the step count (custom sigmas, the
    `mu` of dynamic shifting).
    """
    if weighing is not None and base is None:
        raise ValueError("annealed sampling needs a base denoiser")
    scheduler.set_timesteps(num_steps, device=latents.device, **(schedule or {}))
    # One entry per model call: PNDM's Runge-Kutta warm-up and second-order schedulers (Heun, DPM-2)
    # make more calls than num_steps, and K and the weighing index count calls.
    timesteps = scheduler.timesteps
    calls = len(timesteps)
    if not 0 <= truncation_steps <= calls:
        raise ValueError(f"truncation_steps must be in [0, {calls}], got {truncation_steps}")
    extra = step_kwargs(scheduler, eta, generator)
    graph_from = calls if lv_samples else calls - truncation_steps
    kl_terms: list[torch.Tensor] = []
    graph_calls = 0

    def graph_step(x, t):
        nonlocal graph_calls
        graph_calls += 1
        out = guided_output(tuned, scheduler, x, t, guidance_scale, checkpointed=checkpoint_denoiser)
        if base is not None:
            with torch.no_grad():
                out_base = guided_output(base, scheduler, x, t, guidance_scale)
            kl_terms.append((out.float() - out_base.float()).pow(2).mean())
        return scheduler.step(out, t, x, **extra, return_dict=False)[0]

    x = latents
    for i, t in enumerate(timesteps):
        if i >= graph_from:
            x = graph_step(x, t)
            continue
        with torch.no_grad():
            if weighing is None:
                out = guided_output(tuned, scheduler, x, t, guidance_scale)
            else:
                out = annealed_output(tuned, base, weighing(i, calls), scheduler, x, t, guidance_scale)
            x = scheduler.step(out, t, x, **extra, return_dict=False)[0]

    if lv_samples:
        x = _renoise_and_denoise(x, timesteps[-1], lv_samples, scheduler, generator, graph_step)

    kl = torch.stack(kl_terms).mean() if kl_terms else None
    return Trajectory(latents=x, kl=kl, graph_steps=graph_calls)


def _renoise_and_denoise(x0, t_last, copies, scheduler, generator, graph_step):
    """The scheduler's own forward process to the last step's level: flow matching's
    `scale_noise` ((1 - sigma) x0 + sigma noise), else DDPM's `add_noise`."""
    results = []
    for _ in range(copies):
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if hasattr(scheduler, "_step_index"):
            # Index-keeping schedulers (Euler, DPM, flow matching) must be pointed back at the last step.
            scheduler._step_index = len(scheduler.timesteps) - 1
        if hasattr(scheduler, "scale_noise"):
            noisy = scheduler.scale_noise(x0, t_last.reshape(1), noise)
        else:
            noisy = scheduler.add_noise(x0, noise, t_last.reshape(1))
        results.append(graph_step(noisy, t_last))
    return torch.cat(results)


def annealed_output(tuned, base, w, scheduler, x, t, guidance_scale):
    """(1 - w) * out_base + w * out_tuned; only the models with non-zero weight are run."""
    if w <= 0.0:
        return guided_output(base, scheduler, x, t, guidance_scale)
    if w >= 1.0:
        return guided_output(tuned, scheduler, x, t, guidance_scale)
    out_base = guided_output(base, scheduler, x, t, guidance_scale)
    out_tuned = guided_output(tuned, scheduler, x, t, guidance_scale)
    return (1.0 - w) * out_base + w * out_tuned


# ---------------------------------------------------------------------------------------------
# Weighings for annealed guidance: w(i, N) with i = 0 the noisiest step.

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_weighing(name: str) -> Weighing:
    """`base`, `draft`, `linear`, `power_P` (P > 0) or `step_F` (0 <= F <= 1)."""
    name = name.strip()
    if name == "base":
        return lambda i, n: 0.0
    if name == "draft":
        return lambda i, n: 1.0
    if name == "linear":
        return lambda i, n: i / n
    if match := re.fullmatch(rf"power_{_NUMBER}", name):
        power = float(match.group(1))
        if power > 0 and math.isfinite(power):
            return lambda i, n: (i / n) ** power
    if match := re.fullmatch(rf"step_{_NUMBER}", name):
        fraction = float(match.group(1))
        if 0.0 <= fraction <= 1.0:
            return lambda i, n: float(i / n >= fraction)
    raise ValueError(
        f"invalid weighing {name!r}: use base, draft, linear, power_P with P > 0 (e.g. power_2) "
        "or step_F with 0 <= F <= 1 (e.g. step_0.6)"
    )


def split_weighings(values: list[str]) -> list[str]:
    """Accept `a b c` and `a,b,c` alike; every name is validated."""
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        raise ValueError("no weighing given: use e.g. --weighing linear power_2 step_0.6")
    for name in names:
        parse_weighing(name)
    return names
