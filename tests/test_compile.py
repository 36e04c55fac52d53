"""--compile: the compiled denoiser gives the eager model's images, KL and gradients, through the LoRA switches
(merged no-grad calls, the base for the KL and annealing) and checkpointing, without compiling again per switch."""

import pytest
import torch
from torch._dynamo.utils import counters

import generation
import models
import training
import utils

PROMPTS = ["a red circle", "a blue square"]
SETTINGS = generation.SamplerSettings(resolution=32, num_steps=4, guidance_scale=3.0)


def trainer_of(model, tiny_clip, tmp_path, compile_backend=None, **flags):
    """A LoRA trainer (K = 2 unless `flags` say otherwise) with every weight, LoRA included, drawn from the same
    seed; the learning rate is large so that after one step the tuned model is far from the base."""
    torch.manual_seed(0)
    flags = {"truncation_steps": 2, **flags}
    cfg = training.TrainConfig(model=model, reward_source=[f"pickscore={tiny_clip}"], prompts="animals",
                               inference_steps=SETTINGS.num_steps,
                               guidance_scale=SETTINGS.guidance_scale, batch_size=len(PROMPTS),
                               resolution=SETTINGS.resolution, lora_rank=4, lora_alpha=8.0, lr=3e-2, kl_coeff=1.0,
                               run_dir=str(tmp_path / "unused"), device="cpu", **flags)
    trainer = training.build(cfg, utils.init_distributed("cpu"))
    if compile_backend:
        models.compile_denoisers(trainer.model, compile_backend)
    return trainer


def outcomes(trainer) -> dict[str, torch.Tensor]:
    """One optimizer step (the LoRA moves away from the base), then the next rollout's loss, KL and gradients, and
    the no-grad images of the base, the tuned model (merged LoRA) and their annealed mix."""
    trainer.step(0)
    images, kl = trainer.rollout(PROMPTS, [1, 2], trainer.cfg.truncation_steps)
    loss = -trainer.reward(images, PROMPTS).mean() + trainer.cfg.kl_coeff * kl
    loss.backward()
    params = models.trainable_parameters(trainer.model)
    results = {"loss": loss.detach(), "kl": kl.detach(), "gradients": torch.cat([p.grad.flatten() for p in params])}
    with torch.no_grad():
        for name, weighing in (("base", "base"), ("tuned", "draft"), ("annealed", "linear")):
            results[name] = generation.generate(trainer.model, PROMPTS, [3, 4], SETTINGS, weighing=weighing)[0]
    return results


def assert_close(eager: dict, compiled: dict, tolerance: float) -> None:
    # The check could fail: the base and the tuned model draw clearly different images.
    assert (eager["tuned"] - eager["base"]).abs().max() > 100 * tolerance
    for name, value in eager.items():
        difference = (compiled[name] - value).abs().max() / value.abs().max()
        assert difference <= tolerance, (name, difference.item())


def compiled_outcomes(model, tiny_clip, tmp_path, compile_backend=None, **flags) -> dict[str, torch.Tensor]:
    """`outcomes` of a compiled trainer, from a fresh graph cache: graphs of other tests in this process would be
    reused, or fill dynamo's cache, past whose limit it runs the eager code without a word."""
    torch._dynamo.reset()
    counters.clear()
    trainer = trainer_of(model, tiny_clip, tmp_path, compile_backend, **flags)
    results = outcomes(trainer)
    # One graph for the no-grad calls (merged and base alike: plain layers) and, for the calls with a graph (LoRA
    # layers), one for the first of the K calls and one for the next ones, whose input x_t requires grad: a switch
    # picks a graph, it does not make one.
    graphs = 1 + min(trainer.cfg.truncation_steps, 2)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    return results


@pytest.mark.slow
def test_compiled_graphs_with_checkpointing_give_the_eager_results(tiny_sd, tiny_clip, tmp_path, one_thread):
    """The graphs --compile hands to inductor, traced by dynamo and AOTAutograd but run by eager kernels
    (aot_eager, so that the test takes a minute, not ten): the LoRA switches, grad modes, the per-call checkpoint
    and the blocks' checkpoints inside it reach the right graphs, and the results are the eager ones."""
    flags = {"gradient_checkpointing": True}
    eager = outcomes(trainer_of(tiny_sd, tiny_clip, tmp_path, **flags))
    # the same kernels in the same order: equal with torch 2.14; a margin for other releases' decompositions
    assert_close(eager, compiled_outcomes(tiny_sd, tiny_clip, tmp_path, "aot_eager", **flags), 1e-6)


@pytest.mark.slow
def test_compile_flag_gives_the_eager_images_and_gradients_with_inductor(tiny_sd3, tiny_clip, tmp_path, one_thread):
    """--compile as shipped (inductor's generated kernels), through training.build; on the tiny SD3 at K = 1, whose
    two graphs inductor compiles in about 2 minutes on a CPU with an empty cache (the tiny SD's three, in several)."""
    eager = outcomes(trainer_of(tiny_sd3, tiny_clip, tmp_path, truncation_steps=1))
    # inductor's fused kernels sum in another order: at most 6e-6 off with torch 2.14 (the gradients)
    assert_close(eager, compiled_outcomes(tiny_sd3, tiny_clip, tmp_path, truncation_steps=1, compile=True), 1e-4)


def test_without_a_cxx_compiler_compile_is_refused_before_anything_compiles(tiny_sd, monkeypatch):
    from torch._inductor import config

    model = models.load_model(tiny_sd, torch.device("cpu"))
    monkeypatch.setattr(config.cpp, "cxx", ("no-such-compiler-on-this-machine",))
    with pytest.raises(utils.UsageError, match="--compile on the CPU needs a C\\+\\+ compiler"):
        models.compile_denoisers(model)
    assert model.denoiser._compiled_call_impl is None
