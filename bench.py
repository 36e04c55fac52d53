"""Time and memory of a DRaFT+ training step, as ratios from one run (nothing here is a test).

    python bench.py                      # tiny SD, SDXL and SD3 models built on the fly, CPU
    python bench.py --resolution 256 --repeats 5
    python bench.py --families SD3         # one family only

Prints, for a tiny SD, a tiny SDXL and a tiny SD3.5 model:
  (a) time of one DRaFT+ K=1 step (KL on) / time of the stock diffusers pipeline sampling the same
      batch (CFG, batch 2, decoded), at N=50 and N=10 sampler steps;
  (b) peak memory of a K=1 step at N=50 / at N=10;
  (c) peak memory of a K=10 step with gradient checkpointing / of a K=1 step;
and where a step's time goes, in units of one no-grad call of the UNet (SD3: transformer).
Memory is the growth of the peak resident set above the footprint after the models are loaded,
each configuration in a fresh process (on a GPU run it would be torch.cuda.max_memory_allocated).
"""

import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@dataclass
class BenchConfig:
    resolution: int = 128  # image side; large enough that activations, not weights, dominate memory
    batch_size: int = 2  # prompts per step and per pipeline call
    repeats: int = 3  # timed repetitions per configuration (the median is reported)
    guidance_scale: float = 7.5  # CFG scale for both the pipeline and the training step
    lora_rank: int = 4  # LoRA rank; the tiny models' attention is 16-32 wide, so 32 would dwarf it
    threads: int = 1  # torch CPU threads; 1 keeps timings steady when other processes share the cores
    families: tuple[Literal["SD", "SDXL", "SD3"], ...] = ("SD", "SDXL", "SD3")  # the tiny models to measure, in order


PROMPTS = ["a red circle", "a green square"]


def make_trainer(bench: BenchConfig, model: str, clip: str, steps: int, truncation: int, checkpointing: bool):
    import training
    import utils

    cfg = training.TrainConfig(
        model=model, reward_source=[f"pickscore={clip}"], inference_steps=steps, truncation_steps=truncation,
        guidance_scale=bench.guidance_scale, batch_size=bench.batch_size, resolution=bench.resolution,
        lora_rank=bench.lora_rank, lora_alpha=bench.lora_rank, kl_coeff=0.1, gradient_checkpointing=checkpointing,
        run_dir=os.path.join(tempfile.gettempdir(), "bench-unused"), device="cpu",
    )
    return training.build(cfg, utils.init_distributed("cpu"))


def interleaved_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of each callable, run alternately so that any load on the machine weighs on
    both alike and the ratio stays meaningful."""
    first(), second()  # warm-up: first calls pay for lazy initialisation
    times = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((first, second), times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def time_ratio(bench: BenchConfig, model: str, clip: str, steps: int) -> tuple[float, float]:
    import models
    from utils import generators

    trainer = make_trainer(bench, model, clip, steps, truncation=1, checkpointing=False)
    # The stock pipeline object, sampling with the training step's scheduler (DDIM for SD and SDXL, which
    # ships Euler; SD3's own flow-match Euler).
    pipe = models.load_model(model, torch.device("cpu"), scheduler=trainer.cfg.scheduler).pipe
    step_counter = iter(range(10**6))

    def pipeline_call():
        pipe(PROMPTS[: bench.batch_size], num_inference_steps=steps, guidance_scale=bench.guidance_scale,
             height=bench.resolution, width=bench.resolution, output_type="pt",
             generator=generators(range(bench.batch_size)))

    return interleaved_medians(lambda: trainer.step(next(step_counter)), pipeline_call, bench.repeats)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_parts(bench: BenchConfig, model: str, clip: str) -> tuple[float, dict[str, float]]:
    """Where a step's time goes: seconds of one no-grad call with CFG of the denoiser as loaded (no
    LoRA layers), and the other parts of a step in units of that call."""
    import models

    trainer = make_trainer(bench, model, clip, steps=10, truncation=1, checkpointing=False)
    model_, prompts = trainer.model, PROMPTS[: bench.batch_size]
    conditioning = models.encode_prompts(model_, prompts, True, bench.resolution)
    latents = torch.randn(model_.latent_shape(bench.batch_size, bench.resolution))
    model_input, t = torch.cat([latents, latents]), torch.tensor(500)
    tuned = models.tuned_denoiser(model_, conditioning)
    plain = models.make_denoiser(models.load_model(model, torch.device("cpu")).denoiser, conditioning)

    def denoiser_forward_backward():
        tuned(model_input, t).square().mean().backward()

    def decode_reward_forward_backward():
        z = latents.clone().requires_grad_(True)
        trainer.reward(models.decode(model_, z), prompts).sum().backward()

    with torch.no_grad():  # interleaved and repeated more: the two differ by little
        lora_s, plain_s = interleaved_medians(lambda: tuned(model_input, t), lambda: plain(model_input, t),
                                             3 * bench.repeats)
    parts = {"denoiser with LoRA": lora_s}
    parts["denoiser fwd+bwd"] = median_seconds(denoiser_forward_backward, bench.repeats)
    parts["decode+reward fwd+bwd"] = median_seconds(decode_reward_forward_backward, bench.repeats)
    return plain_s, {name: seconds / plain_s for name, seconds in parts.items()}


def _rss_peak_growth(bench, model, clip, steps, truncation, checkpointing, queue):
    torch.set_num_threads(bench.threads)
    trainer = make_trainer(bench, model, clip, steps, truncation, checkpointing)
    import gc

    gc.collect()
    footprint = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) so loading transients are not counted
    trainer.step(0)
    queue.put((_status_kb("VmHWM") - footprint) / 1024)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth_mb(bench, model, clip, steps, truncation, checkpointing) -> float:
    # A fixed mmap threshold makes glibc return every freed large block to the OS, so the peak
    # resident set follows live tensors instead of the allocator's retained heap.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_rss_peak_growth, args=(bench, model, clip, steps, truncation, checkpointing, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"memory measurement process failed with exit code {process.exitcode}")
    return queue.get()


def report(bench: BenchConfig, family: str, model: str, clip: str) -> None:
    print(f"tiny {family} at {bench.resolution}px, batch {bench.batch_size}, CFG {bench.guidance_scale}, "
          f"LoRA rank {bench.lora_rank}, {torch.get_num_threads()} threads", flush=True)
    for steps in (50, 10):
        step_s, pipe_s = time_ratio(bench, model, clip, steps)
        print(f"(a) N={steps}: DRaFT+ K=1 step {step_s:.3f}s / pipeline {pipe_s:.3f}s = {step_s / pipe_s:.3f}",
              flush=True)
    plain_s, parts = time_parts(bench, model, clip)
    print(f"parts, in no-grad denoiser calls with CFG ({plain_s * 1000:.1f} ms): "
          + ", ".join(f"{name} {units:.2f}" for name, units in parts.items()), flush=True)
    k1_n50 = peak_growth_mb(bench, model, clip, 50, 1, False)
    k1_n10 = peak_growth_mb(bench, model, clip, 10, 1, False)
    print(f"(b) peak memory K=1: N=50 {k1_n50:.1f} MB / N=10 {k1_n10:.1f} MB = {k1_n50 / k1_n10:.3f}", flush=True)
    k10_ckpt = peak_growth_mb(bench, model, clip, 10, 10, True)
    print(f"(c) peak memory K=10 checkpointed {k10_ckpt:.1f} MB / K=1 {k1_n10:.1f} MB = {k10_ckpt / k1_n10:.3f}",
          flush=True)


def main(bench: BenchConfig) -> None:
    import models
    import tiny_models
    import tiny_rewards

    models.quiet_loading()
    torch.manual_seed(0)
    torch.set_num_threads(bench.threads)
    with tempfile.TemporaryDirectory() as folder:
        clip = tiny_rewards.make_tiny_clip(os.path.join(folder, "clip"))
        factories = {"SD": tiny_models.make_tiny_sd, "SDXL": tiny_models.make_tiny_sdxl, "SD3": tiny_models.make_tiny_sd3}
        for family in bench.families:
            report(bench, family, factories[family](os.path.join(folder, family.lower())), clip)


if __name__ == "__main__":
    main(tyro.cli(BenchConfig, description=__doc__))
