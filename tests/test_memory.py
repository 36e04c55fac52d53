"""memory.py's arithmetic against measured peaks: a warm LoRA step's peak memory growth on the CPU (the
profiler's record of every allocation, bench.allocated_peak_growth_mb) and the model's prediction of it from
the same configs traced on the meta device."""

import statistics

import pytest
import torch

import bench
import memory
import models
import shapes


# Each family's tiny model (conftest.py); the FLUX.1-dev-like one encodes 512 T5 tokens, which on a model this
# small is the peak of every checkpointed step (the model predicts that no-grad peak too).
@pytest.mark.parametrize("model_fixture", ["tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux", "tiny_klein"])
@pytest.mark.parametrize("truncation, checkpointing", [(1, ""), (1, "steps"), (4, "steps"), (4, "blocks"), (4, "")])
def test_the_memory_model_predicts_a_measured_step_within_15_percent(model_fixture, truncation, checkpointing, tiny_clip,
                                                                      request):
    model = request.getfixturevalue(model_fixture)
    config = bench.BenchConfig(resolution=64, batch_size=2)
    # N = 5 sampler steps: the no-grad ones before the graph make no peak here, only time
    trainer = bench.make_trainer(config, model, tiny_clip, 5, truncation, checkpointing)
    steps = iter(range(10))
    trainer.step(next(steps))  # the optimizer state is made in the first step
    # the median of three steps: a step's figure moves by a few hundred kB now and then on this shared machine
    measured = statistics.median(bench.allocated_peak_growth_mb(lambda: trainer.step(next(steps))) for _ in range(3))
    measured *= 2**20
    mode = memory.Mode(config.resolution, config.batch_size, config.lora_rank, truncation=truncation,
                       checkpointing=checkpointing, weight_bytes=memory.FP32)
    predicted = memory.step_growth(memory.trace_step(model, tiny_clip, mode), mode)
    assert predicted == pytest.approx(measured, rel=0.15)


def test_fsdp_divides_what_is_trained_and_offloading_moves_the_text_encoders_out_of_the_peak(tiny_sd, tiny_clip):
    mode = memory.Mode(64, 1, None, checkpointing="blocks")
    parts = memory.trace_step(tiny_sd, tiny_clip, mode)
    one, eight = memory.estimate(parts, mode), memory.estimate(parts, memory.Mode(64, 1, None, 8, checkpointing="blocks"))
    assert eight.optimizer * 8 == pytest.approx(one.optimizer, rel=1e-6) and one.optimizer == parts.denoiser_parameters * 8
    lora = memory.estimate(parts, memory.Mode(64, 1, 4))
    offloaded = memory.estimate(parts, memory.Mode(64, 1, 4, offload_text=True))
    assert lora.frozen - offloaded.frozen == parts.text_parameters * memory.BF16 > 0
    assert shapes.parameter_count(torch.nn.Linear(2, 2)) == 6


def test_lora_memory_grows_with_the_rank_asked_for_not_the_rank_traced(tiny_sd, tiny_clip):
    parts = memory.trace_step(tiny_sd, tiny_clip, memory.Mode(64, 1, 4))
    model = models.load_model(tiny_sd, torch.device("meta"))
    models.attach_lora(model, 8, 8)
    at_rank_8 = sum(p.numel() for name, p in model.denoiser.named_parameters() if "lora_" in name)
    estimate = memory.estimate(parts, memory.Mode(64, 1, 8))
    assert estimate.gradients == at_rank_8 * memory.FP32 and estimate.optimizer == at_rank_8 * memory.ADAM_STATE
