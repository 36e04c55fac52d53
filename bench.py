"""Time and memory of a DRaFT+ training step, as ratios from one run (nothing here is a test).

    python bench.py                      # tiny SD, SDXL, SD3, FLUX.1 and FLUX.2 [klein] models built on the fly, CPU
    python bench.py --resolution 256 --repeats 5
    python bench.py --families SD3         # one family only
    python bench.py --compare-compile --families SD   # --compile against eager, and the compile's own time

Prints, for a tiny SD, a tiny SDXL, a tiny SD3.5, a tiny FLUX.1-dev and a tiny FLUX.2 [klein] base model:
  (a) time of one DRaFT+ step (KL on) / time of the stock diffusers pipeline sampling the same batch
      (CFG; FLUX.1-dev: embedded guidance; batch 2, decoded) at (N, K) = (50, 1), (10, 1), (10, 1) with
      gradient checkpointing, (50, 10),
      and (50, 10) with gradient checkpointing per step and per step and block, with the merged-LoRA
      no-grad path and without it;
  (b) peak memory of a K=1 step at N=50 / at N=10, and at N=10 with gradient checkpointing / without;
  (c) peak memory of a K=10 step with and without gradient checkpointing (per step, and per step with
      the denoiser's blocks too) / of a K=1 step;
and where a step's time goes, in units of one no-grad call of the UNet (SD3, FLUX.1, FLUX.2: transformer);
  (r) for the tiny SD, with trl 0.23.1 installed (requirements-test.txt has it): the reference trainer,
      trl's AlignPropTrainer, at the same configurations: its step / pipeline in the same interleaved
      rounds, ours / its step time (ours with the KL, and without it: the reference's objective), and ours /
      its peak memory growth;
then (with SD among --families) a 2-process full fine-tune of a wider tiny SD UNet through train.py with
and without --fsdp: step time and peak memory growth per rank; and the start-up of a full fine-tune of that
UNet (loading, frozen copy, reward) in a fresh process, bf16 against fp32: its peak resident set above the
imports.
With --compare-compile it prints instead, per family, N = 50 no-grad calls and a DRaFT+ step at K = 1 with
--compile (inductor) over eager, and the compile time with an empty and with a filled inductor cache.
A step's memory is the peak growth of the bytes held in tensors during a warm step (the CPU's counterpart
of torch.cuda.max_memory_allocated); the 2-process runs report train.py's own figure, the peak resident set
above the loaded models (weights, gradients and Adam state dominate there).
"""

import importlib.util
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
    resolution: int = 64  # image side; large enough that activations, not weights, dominate memory
    batch_size: int = 2  # prompts per step and per pipeline call
    repeats: int = 3  # timed repetitions per configuration (the median is reported)
    # guidance scale for both the pipeline and the training step: CFG, or FLUX.1-dev's embedded guidance
    guidance_scale: float = 7.5
    lora_rank: int = 4  # LoRA rank; the tiny models' attention is 16-32 wide, so 32 would dwarf it
    threads: int = 1  # torch CPU threads; 1 keeps timings steady when other processes share the cores
    # the tiny models to measure, in order
    families: tuple[Literal["SD", "SDXL", "SD3", "FLUX.1", "FLUX.2"], ...] = ("SD", "SDXL", "SD3", "FLUX.1", "FLUX.2")
    fsdp_resolution: int = 32  # image side of the 2-process full fine-tune with and without --fsdp
    # shipped real models (configs/real: sd15 sdxl sd35-medium sd35-large ...) to measure at their real shapes with
    # random weights (bf16 on a GPU), instead of the tiny models; a pipeline folder is measured with its own configs
    real: tuple[str, ...] = ()
    real_device: str = "auto"  # device of the real-shape bench: auto = cuda when there is one, else cpu
    real_resolution: int | None = None  # image side of the real-shape bench; default each model's (REAL_SHAPES)
    real_batch: int | None = None  # prompts per GPU of the real-shape bench; default each model's (REAL_SHAPES)
    real_steps: int | None = None  # sampler steps N of the real-shape bench; default the family's
    # the Markdown table of the real-shape bench is also appended to this file (the device run writes the docs' table)
    real_table: str | None = None
    real_table_rows_only: bool = False  # append only the rows to --real-table (an earlier model's run wrote its header)
    # reward network of the real-shape bench: a configs/real/rewards name, or a CLIPModel folder (its config is used)
    real_reward: str = "pickscore"
    # instead of the rest: the denoiser with --compile (inductor) against eager, N no-grad calls and a DRaFT+ step at
    # K = 1, and the compile itself (cold and warm cache); with --real at each model's real shape
    compare_compile: bool = False


PROMPTS = ["a red circle", "a green square"]


def make_trainer(bench: BenchConfig, model: str, clip: str, steps: int, truncation: int, checkpointing: str,
                 merged: bool = True, kl_coeff: float = 0.1, compile: bool = False):
    """`checkpointing`: "" none, "steps" --gradient-checkpointing --checkpoint-calls-only (at K = 1 the same as
    --gradient-checkpointing), "blocks" --gradient-checkpointing --checkpoint-blocks."""
    import training
    import utils

    cfg = training.TrainConfig(
        model=model, reward_source=[f"pickscore={clip}"], inference_steps=steps, truncation_steps=truncation,
        guidance_scale=bench.guidance_scale, batch_size=bench.batch_size, resolution=bench.resolution,
        lora_rank=bench.lora_rank, lora_alpha=bench.lora_rank, kl_coeff=kl_coeff,
        gradient_checkpointing=bool(checkpointing), checkpoint_blocks=checkpointing == "blocks",
        checkpoint_calls_only=checkpointing == "steps", compile=compile,
        run_dir=os.path.join(tempfile.gettempdir(), "bench-unused"), device="cpu",
    )
    trainer = training.build(cfg, utils.init_distributed("cpu"))
    trainer.model.merged_sampling = merged
    return trainer


@dataclass
class Timing:
    rounds: list[dict[str, float]]  # seconds of each named callable, per round

    def seconds(self, name: str) -> float:
        return statistics.median(r[name] for r in self.rounds)

    def ratio(self, name: str, of: str) -> str:
        """Callable `name`'s time over callable `of`'s, round by round: the median, then the range."""
        per_round = [r[name] / r[of] for r in self.rounds]
        return f"{statistics.median(per_round):.3f} [{min(per_round):.3f}-{max(per_round):.3f}]"


def interleaved(callables: dict, repeats: int) -> Timing:
    """Run the named callables in turn, `repeats` rounds, so that any load on the machine weighs on all
    alike; each round's ratios are what is compared."""
    for fn in callables.values():
        fn()  # warm-up: first calls pay for lazy initialisation
    rounds = []
    for _ in range(repeats):
        times = {}
        for name, fn in callables.items():
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        rounds.append(times)
    return Timing(rounds)


def allocated_peak_growth_mb(fn) -> float:
    """Peak of the bytes that `fn` allocates and holds at once, from the profiler's record of every
    allocation and free, kernels' own workspaces included: on the CPU what torch.cuda.max_memory_allocated
    reports on a GPU after reset_peak_memory_stats, save that memory held before `fn` and freed by it is
    not subtracted (the profiler never saw it allocated), so the figure errs high. Unlike the resident
    set, it leaves out the allocator's retained heap and one-time lazy initialisation, which are tens of
    MB here, more than the activations compared."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own start/stop notices say nothing here
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    changes = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                     if event.name() == "[memory]" and event.device_type() == DeviceType.CPU)
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def make_reference(bench: BenchConfig, model: str, clip: str, steps: int, truncation: int, checkpointing: str):
    """One step of the reference trainer, trl 0.23.1's AlignPropTrainer (DRaFT-K / AlignProp), as a callable:
    the same SD model, prompts, batch, CFG, DDIM with eta 0, fixed truncation K and reward (its
    checkpointing as ours), with trl's own LoRA (rank 4, alpha 4, on the same projections) and loss (no KL).
    trl runs every UNet call of the trajectory through torch.utils.checkpoint, whatever its config says;
    with `checkpointing` its VAE decoder is checkpointed as ours is, and with "blocks" the UNet's own blocks
    too (diffusers' enable_gradient_checkpointing, as its users can). None when trl is not installed."""
    try:
        from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline
    except ImportError:
        return None
    from accelerate import PartialState
    import itertools
    import logging
    import warnings

    import diffusers

    import rewards

    PartialState()  # trl logs through accelerate, which needs its state first
    logging.getLogger("trl").setLevel(logging.ERROR)  # "no LoRA weights found": it adds its own
    reward = rewards.load_reward("pickscore", rewards.parse_reward_sources([f"pickscore={clip}"]),
                                 gradient_checkpointing=bool(checkpointing))
    pipeline = DefaultDDPOStableDiffusionPipeline(model, use_lora=True)
    sd_pipeline = pipeline.sd_pipeline
    sd_pipeline.set_progress_bar_config(disable=True)
    # trl samples at the UNet's configured size; this sets the bench's resolution
    sd_pipeline.unet.register_to_config(sample_size=bench.resolution // sd_pipeline.vae_scale_factor)
    if checkpointing:
        sd_pipeline.vae.enable_gradient_checkpointing()
    if checkpointing == "blocks":
        sd_pipeline.unet.enable_gradient_checkpointing()
    config = AlignPropConfig(
        sample_num_steps=steps, sample_guidance_scale=bench.guidance_scale, sample_eta=0.0,
        train_batch_size=bench.batch_size, truncated_backprop_rand=False, truncated_backprop_timestep=steps - truncation,
        mixed_precision="no", log_with=None,
        project_kwargs={"project_dir": os.path.join(tempfile.gettempdir(), "bench-reference")},
    )
    prompts = itertools.cycle(PROMPTS)
    # Its own notices (deprecated trainer, fp32 casts, the pipeline's deprecated _encode_prompt) say nothing here.
    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="trl")
    warnings.filterwarnings("ignore", message=".*_encode_prompt", category=FutureWarning)
    trainer = AlignPropTrainer(config, lambda images, prompts, metadata: (reward(images, list(prompts)), {}),
                               lambda: (next(prompts), {}), pipeline)
    sd_pipeline.set_progress_bar_config(disable=True)
    return lambda: trainer.step(0, 0)  # epoch 0: it saves no checkpoint


def measure(bench: BenchConfig, model: str, clip: str, steps: int, truncation: int, checkpointing: str,
            with_reference: bool) -> tuple[Timing, dict[str, float]]:
    """Interleaved times of a training step with the merged path ("merged"), without it ("unmerged"), with
    `with_reference` and trl installed also of ours without the KL ("no KL", the reference's objective)
    and of the reference trainer's step ("reference"), and of the stock pipeline sampling the same batch
    ("pipeline"); then, the steps warm, the peak allocated memory growth of ours (merged) and the reference's."""
    import models
    from utils import generators

    config = (bench, model, clip, steps, truncation, checkpointing)
    steps_of = {"merged": make_trainer(*config), "unmerged": make_trainer(*config, merged=False)}
    reference = make_reference(*config) if with_reference else None
    if reference:
        steps_of["no KL"] = make_trainer(*config, kl_coeff=0.0)
    # The stock pipeline object, sampling with the training step's scheduler (DDIM for SD and SDXL, which
    # ships Euler; SD3's own flow-match Euler).
    pipe = models.load_model(model, torch.device("cpu"), scheduler=steps_of["merged"].cfg.scheduler).pipe
    step_counter = iter(range(10**6))

    def pipeline_call():
        pipe(prompt=PROMPTS[: bench.batch_size], num_inference_steps=steps, guidance_scale=bench.guidance_scale,
             height=bench.resolution, width=bench.resolution, output_type="pt",
             generator=generators(range(bench.batch_size)))

    callables = {name: lambda trainer=trainer: trainer.step(next(step_counter)) for name, trainer in steps_of.items()}
    if reference:
        callables["reference"] = reference
    callables["pipeline"] = pipeline_call
    timing = interleaved(callables, bench.repeats)
    memory = {"ours": allocated_peak_growth_mb(callables["merged"])}
    if reference:
        memory["reference"] = allocated_peak_growth_mb(reference)
    return timing, memory


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_parts(bench: BenchConfig, model: str, clip: str) -> tuple[float, dict[str, str]]:
    """Where a step's time goes: seconds of one no-grad call with CFG of the UNet as loaded (no LoRA
    layers), and the other parts of a step in units of that call."""
    import generation
    import models
    import sampling

    trainer = make_trainer(bench, model, clip, steps=10, truncation=1, checkpointing="")
    model_, prompts = trainer.model, PROMPTS[: bench.batch_size]
    guidance = model_.family.guidance(model_, generation.SamplerSettings.of(trainer.cfg))
    guided = sampling.uses_guidance(guidance.cfg_scale)  # FLUX.1-dev embeds its guidance instead
    conditioning = models.encode_prompts(model_, prompts, guided, bench.resolution, guidance.embedded)
    latents = torch.randn(model_.latent_shape(bench.batch_size, bench.resolution))
    model_input, t = torch.cat([latents, latents]) if guided else latents, torch.tensor(500)
    merged = models.tuned_denoiser(model_, conditioning)  # merged weights whenever there is no graph
    layered = models.make_denoiser(model_.unet, conditioning)
    base = models.base_denoiser(model_, conditioning)
    plain = models.make_denoiser(models.load_model(model, torch.device("cpu")).unet, conditioning)

    def unet_forward_backward():
        merged(model_input, t).square().mean().backward()

    def decode_reward_forward_backward():
        z = latents.clone().requires_grad_(True)
        trainer.reward(models.decode(model_, z), prompts).sum().backward()

    with torch.no_grad():  # interleaved and repeated more: they differ by little
        calls = interleaved({name: lambda fn=fn: fn(model_input, t) for name, fn in
                             (("merged", merged), ("layered", layered), ("base", base), ("plain", plain))},
                            3 * bench.repeats)
    unet_s = calls.seconds("plain")
    parts = {"UNet with LoRA merged": calls.ratio("merged", "plain"),
             "with LoRA layers": calls.ratio("layered", "plain"), "base (adapters off)": calls.ratio("base", "plain"),
             "UNet fwd+bwd": f"{median_seconds(unet_forward_backward, bench.repeats) / unet_s:.2f}",
             "decode+reward fwd+bwd": f"{median_seconds(decode_reward_forward_backward, bench.repeats) / unet_s:.2f}"}
    return unet_s, parts


# (N, K, gradient checkpointing): the configurations of the reference comparison, K=1 checkpointed as the
# reference always is (at N=10, where the recomputation weighs most), and K=10 with the denoiser's blocks
# checkpointed too
STEP_CONFIGS = [(50, 1, ""), (10, 1, ""), (10, 1, "steps"), (50, 10, ""), (50, 10, "steps"), (50, 10, "blocks")]
CHECKPOINTING_NAMES = {"": "", "steps": " checkpointed", "blocks": " checkpointed with blocks"}


def step_name(steps: int, truncation: int, checkpointing: str) -> str:
    return f"N={steps} K={truncation}" + CHECKPOINTING_NAMES[checkpointing]


def takes_reference(model: str) -> bool:
    """Whether trl's trainer takes the model: it builds StableDiffusionPipelines (SD 1.x/2.x) only."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model)["_class_name"] == "StableDiffusionPipeline"


def report(bench: BenchConfig, family: str, model: str, clip: str) -> None:
    reference_fits = takes_reference(model)
    with_reference = reference_fits and importlib.util.find_spec("trl") is not None
    print(f"tiny {family} at {bench.resolution}px, batch {bench.batch_size}, guidance {bench.guidance_scale}, "
          f"LoRA rank {bench.lora_rank}, {torch.get_num_threads()} threads; median [range] of "
          f"{bench.repeats} interleaved rounds", flush=True)
    timings, memory = {}, {}
    for config in STEP_CONFIGS:
        timings[config], memory[config] = measure(bench, model, clip, *config, with_reference)
        timing = timings[config]
        print(f"(a) {step_name(*config)}: step / pipeline = {timing.ratio('merged', 'pipeline')} merged, "
              f"{timing.ratio('unmerged', 'pipeline')} unmerged ({timing.seconds('merged'):.3f}s, "
              f"{timing.seconds('unmerged'):.3f}s / {timing.seconds('pipeline'):.3f}s)", flush=True)
    unet_s, parts = time_parts(bench, model, clip)
    print(f"parts, in no-grad UNet calls with CFG ({unet_s * 1000:.1f} ms): "
          + ", ".join(f"{name} {units}" for name, units in parts.items()), flush=True)
    growth = {config: figures["ours"] for config, figures in memory.items()}
    k1_n50, k1_n10, k1_checkpointed = growth[50, 1, ""], growth[10, 1, ""], growth[10, 1, "steps"]
    k10, k10_steps, k10_blocks = growth[50, 10, ""], growth[50, 10, "steps"], growth[50, 10, "blocks"]
    print(f"(b) peak memory growth K=1: N=50 {k1_n50:.1f} MB / N=10 {k1_n10:.1f} MB = {k1_n50 / k1_n10:.3f}; "
          f"N=10 checkpointed {k1_checkpointed:.1f} MB / N=10 = {k1_checkpointed / k1_n10:.3f}", flush=True)
    print(f"(c) peak memory growth N=50 K=10 checkpointed {k10_steps:.1f} MB / K=1 {k1_n50:.1f} MB = "
          f"{k10_steps / k1_n50:.3f}; with blocks {k10_blocks:.1f} MB = {k10_blocks / k1_n50:.3f}; "
          f"without checkpointing {k10:.1f} MB = {k10 / k1_n50:.3f}", flush=True)
    if reference_fits and not with_reference:
        print("(r) no reference: trl is not installed (pip install trl==0.23.1)", flush=True)
    if with_reference:
        report_reference(timings, memory)


def report_reference(timings: dict, memory: dict) -> None:
    """Our step (merged path) with the KL and without it beside the reference trainer's, timed in the same
    interleaved rounds."""
    print("(r) the reference, trl 0.23.1's AlignPropTrainer, on the same model (LoRA rank 4, no KL; every UNet "
          "call checkpointed, as trl always does)", flush=True)
    for config, timing in timings.items():
        ours_mb, reference_mb = memory[config]["ours"], memory[config]["reference"]
        print(f"(r) {step_name(*config)}: reference step / pipeline = {timing.ratio('reference', 'pipeline')}; "
              f"ours / reference = {timing.ratio('merged', 'reference')}, without the KL "
              f"{timing.ratio('no KL', 'reference')}; peak memory growth ours {ours_mb:.1f} MB / reference "
              f"{reference_mb:.1f} MB = {ours_mb / reference_mb:.3f}", flush=True)


# (N, K) of the --compare-compile comparison: a DRaFT+ step (with the KL) at N = 50, K = 1, and the same N
# no-grad calls sampling
COMPILE_CONFIG = (50, 1)


def our_sampling(trainer, prompts: list[str]):
    """A callable: the trainer's model sampling `prompts` at its N without a graph, as inference and the first
    N - K steps of a rollout run (merged LoRA), decoded."""
    import generation

    settings = generation.SamplerSettings.of(trainer.cfg, trainer.resolution)

    def sample():
        with torch.no_grad():
            generation.generate(trainer.model, prompts, list(range(len(prompts))), settings)

    return sample


def first_call_seconds(fn, sync=lambda: None) -> float:
    """With --compile the first call compiles its graphs: its time is the compile's and one call's."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def cold_and_warm_first_calls(callables: dict, sync=lambda: None) -> tuple[dict[str, float], dict[str, float], int]:
    """Seconds of the first call of each compiled callable, in order, with an empty inductor cache (a process's first
    compile on a new machine), then again after torch._dynamo.reset() with that cache filled (as a later run of the
    same command on the same machine finds it); and the number of graphs compiled each time."""
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read by inductor at each compile
        try:
            graphs_before = compiled_graphs()
            cold = {name: first_call_seconds(fn, sync) for name, fn in callables.items()}
            graphs = compiled_graphs() - graphs_before
            torch._dynamo.reset()
            warm = {name: first_call_seconds(fn, sync) for name, fn in callables.items()}
        finally:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            if previous is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    return cold, warm, graphs


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def report_compile(bench: BenchConfig, family: str, model: str, clip: str) -> None:
    """--compile against eager on one tiny model: N no-grad calls and a DRaFT+ step, timed in interleaved rounds,
    and the compile (first call minus a warm one), with a cold and a warm inductor cache."""
    steps, truncation = COMPILE_CONFIG
    prompts = PROMPTS[: bench.batch_size]
    torch._dynamo.reset()  # the graphs of an earlier family
    trainers = {mode: make_trainer(bench, model, clip, steps, truncation, "", compile=mode == "--compile")
                for mode in ("eager", "--compile")}
    counter = iter(range(10**6))
    callables = {}
    for mode, trainer in trainers.items():
        callables[f"sampling {mode}"] = our_sampling(trainer, prompts)
        callables[f"step {mode}"] = lambda trainer=trainer: trainer.step(next(counter))
    cold, warm, graphs = cold_and_warm_first_calls({"sampling": callables["sampling --compile"],
                                                    "step": callables["step --compile"]})
    graphs_before_rounds = compiled_graphs()
    timing = interleaved(callables, bench.repeats)
    print(f"tiny {family} at {bench.resolution}px, batch {bench.batch_size}, CFG {bench.guidance_scale}, LoRA rank "
          f"{bench.lora_rank}, N={steps} K={truncation} with the KL, {torch.get_num_threads()} threads; --compile "
          f"(inductor) against eager, median [range] of {bench.repeats} interleaved rounds", flush=True)
    for part in ("sampling", "step"):
        what = f"{steps} no-grad calls (sampling)" if part == "sampling" else "DRaFT+ step"
        print(f"compile: {what} --compile / eager = {timing.ratio(f'{part} --compile', f'{part} eager')} "
              f"({timing.seconds(f'{part} --compile'):.3f}s / {timing.seconds(f'{part} eager'):.3f}s)", flush=True)
    compile_s = {when: {part: first[part] - timing.seconds(f"{part} --compile") for part in first}
                 for when, first in (("cold", cold), ("warm", warm))}
    print(f"compile time (first call minus a warm one): sampling {compile_s['cold']['sampling']:.1f}s, then the step's "
          f"graphs {compile_s['cold']['step']:.1f}s with an empty inductor cache; {compile_s['warm']['sampling']:.1f}s "
          f"and {compile_s['warm']['step']:.1f}s with it filled; {graphs} graphs, "
          f"{compiled_graphs() - graphs_before_rounds} more compiled during the {bench.repeats} timed rounds", flush=True)


def sharded_training(bench: BenchConfig, model: str, clip: str, folder: str, fsdp: bool) -> tuple[float, float]:
    """Median seconds of steps 2-4 (the first allocates the optimizer state) and the peak
    memory growth of rank 0, of a 2-process full fine-tune through train.py, as a user runs it."""
    import json
    import subprocess

    run_dir = os.path.join(folder, "fsdp" if fsdp else "plain")
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), "--model", model, "--reward-source", f"pickscore={clip}",
               "--prompts", os.path.join(folder, "prompts.txt"), "--full-finetune", "--inference-steps", "10",
               "--resolution", str(bench.fsdp_resolution), "--batch-size", "1", "--steps", "4",
               "--save-every", "1000", "--val-every", "0", "--run-dir", run_dir, *(["--fsdp"] if fsdp else [])]
    # One thread per process, and glibc returning freed blocks at once so the resident set follows live tensors.
    env = {**os.environ, "OMP_NUM_THREADS": str(bench.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    subprocess.run(command, check=True, capture_output=True, env=env)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return (statistics.median(r["sec_per_step"] for r in records[1:]), max(r["mem_growth_mb"] for r in records))


def report_fsdp(bench: BenchConfig, model: str, clip: str, folder: str) -> None:
    """The two configurations alternate, repeated, as the timings of one run do."""
    times, growth = {True: [], False: []}, {True: [], False: []}
    for _ in range(bench.repeats):
        for fsdp in (False, True):
            seconds, mb = sharded_training(bench, model, clip, folder, fsdp)
            times[fsdp].append(seconds)
            growth[fsdp].append(mb)
    plain_s, fsdp_s = statistics.median(times[False]), statistics.median(times[True])
    plain_mb, fsdp_mb = statistics.median(growth[False]), statistics.median(growth[True])
    print(f"full fine-tune on 2 processes, {bench.fsdp_resolution}px, UNet of "
          f"{unet_parameters(model) / 1e6:.1f} M parameters: step --fsdp {fsdp_s:.3f}s / plain {plain_s:.3f}s "
          f"= {fsdp_s / plain_s:.3f}; peak memory growth per rank --fsdp {fsdp_mb:.1f} MB / plain {plain_mb:.1f} MB "
          f"= {fsdp_mb / plain_mb:.3f}", flush=True)


# The peak is the process's own high-water mark (VmHWM): getrusage's ru_maxrss survives exec, so a child of a
# large process (a long pytest worker) would report its parent's size.
STARTUP = """\
import sys
sys.path.insert(0, {root!r})
import training, utils
before = utils._proc_status_kb("VmRSS")
cfg = training.TrainConfig(model={model!r}, reward_source=["pickscore={clip}"], full_finetune=True,
                           mixed_precision={precision!r}, inference_steps=4, resolution=32, device="cpu")
training.build(cfg, utils.init_distributed("cpu"))
print((utils._proc_status_kb("VmHWM") - before) / 1024)
"""


def startup_growth_mb(model: str, clip: str, precision: str, root: str = ROOT) -> float:
    """Peak resident set of a full fine-tune's start-up (training.build: load, frozen copy, reward) above the
    imports, in MB, in a fresh process of the code of `root`: everything is on the CPU, so it is the figure
    a GPU's memory would show at start-up."""
    import subprocess

    script = STARTUP.format(root=root, model=model, clip=clip, precision=precision)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env)
    return float(result.stdout.split()[-1])


def report_startup(model: str, clip: str) -> None:
    unet_mb = unet_parameters(model) * 4 / 2**20
    fp32, bf16 = (startup_growth_mb(model, clip, precision) for precision in ("no", "bf16"))
    print(f"full fine-tune start-up, UNet of {unet_parameters(model) / 1e6:.1f} M parameters ({unet_mb:.1f} MB in "
          f"fp32): peak resident growth bf16 {bf16:.1f} MB / fp32 {fp32:.1f} MB = {bf16 / fp32:.3f}; "
          f"bf16 / fp32 UNet = {bf16 / unet_mb:.3f}", flush=True)


def unet_parameters(model: str) -> int:
    from diffusers import UNet2DConditionModel

    return sum(p.numel() for p in UNet2DConditionModel.from_pretrained(model, subfolder="unet").parameters())


# (resolution, batch per GPU) as users train each model: SD 1.5 and FLUX at 512 px, SDXL and SD3.5 at 1024 px;
# SD 1.5's batch of 4 is DRaFT+'s per-GPU batch, the larger models' 1 what fits beside them.
REAL_SHAPES = {"sd15": (512, 4), "sdxl": (1024, 1), "sd35-medium": (1024, 1), "sd35-large": (1024, 1),
               "flux1-dev": (512, 1), "flux2-klein-4b": (512, 1), "flux2-klein-9b": (512, 1)}
# (K, KL on, checkpointing as --gradient-checkpointing [--checkpoint-blocks]) of the real-shape bench
REAL_STEPS = [(1, True, "blocks"), (1, False, "blocks"), (1, True, ""), (10, True, "blocks")]


class Device:
    """Times and peak memory on the bench's device: CUDA's own peak counter, or on the CPU the profiler's."""

    def __init__(self, name: str):
        self.device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds(self, fn, repeats: int) -> float:
        """Median seconds of `repeats` calls after a warm-up call."""
        fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def peak_gib(self, fn) -> float:
        """GPU: torch.cuda.max_memory_allocated over the call, everything held included (weights too); CPU: the
        peak growth over what was held before it (weights not included)."""
        if self.device.type != "cuda":
            return allocated_peak_growth_mb(fn) / 1024
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() / 2**30


def real_trainer(bench: BenchConfig, model: str, reward_backbone: str, device: Device, workdir: str,
                 truncation: int, kl: bool, checkpointing: str, compile: bool = False):
    """A LoRA trainer (the family's rank and alpha) on the model built from its configs with random weights, as
    train.py builds it otherwise: bf16 autocast and frozen weights on a GPU."""
    import shapes
    import training
    import utils

    resolution, batch = real_shape(bench, model)
    cfg = training.TrainConfig(
        model=shapes.model_folder(model), reward_source=[], inference_steps=bench.real_steps,
        truncation_steps=truncation, batch_size=batch, resolution=resolution, kl_coeff=0.1 if kl else 0.0,
        gradient_checkpointing=bool(checkpointing), checkpoint_blocks=checkpointing == "blocks", compile=compile,
        run_dir=os.path.join(workdir, "unused"), device=device.device.type)
    return training.build(cfg, utils.init_distributed(device.device.type),
                          load_model=shapes.random_weights_loader(workdir),
                          load_reward=shapes.random_pickscore_loader(workdir, reward_backbone))


def real_shape(bench: BenchConfig, model: str) -> tuple[int, int]:
    resolution, batch = REAL_SHAPES.get(os.path.basename(os.path.normpath(model)), (None, 1))
    return bench.real_resolution or resolution, bench.real_batch or batch


def real_shape_report(bench: BenchConfig, model: str, reward_backbone: str, device: Device, workdir: str) -> list[str]:
    """Rows of the real-shape table for one model: the no-grad pipeline sampling N steps, each DRaFT+ step of
    REAL_STEPS, and the reward's forward and backward; seconds, peak memory, images/s, step / sampling."""
    import models
    from utils import generators

    rows = []
    trainer = real_trainer(bench, model, reward_backbone, device, workdir, *REAL_STEPS[0])
    cfg = trainer.cfg
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.batch_size)]
    shape = f"{cfg.resolution} px, batch {cfg.batch_size}, N={cfg.inference_steps}, guidance {cfg.guidance_scale}"
    name = os.path.basename(os.path.normpath(model))

    def sample():
        amp = trainer.model.autocast  # the stock pipeline under the autocast training's denoiser calls run under
        with torch.no_grad(), torch.autocast(device.device.type, dtype=amp, enabled=amp is not None):
            trainer.model.pipe(prompts, num_inference_steps=cfg.inference_steps, guidance_scale=cfg.guidance_scale,
                               height=cfg.resolution, width=cfg.resolution, output_type="pt",
                               generator=generators(range(cfg.batch_size), device.device))

    sampling_s = device.seconds(sample, bench.repeats)
    rows.append(f"| {name} | {shape} | pipeline sampling (no grad) | {sampling_s:.2f} | {device.peak_gib(sample):.3g} | "
                f"{cfg.batch_size / sampling_s:.2f} | 1 |")

    def reward_forward_backward():
        images = torch.rand(cfg.batch_size, 3, cfg.resolution, cfg.resolution, device=device.device, requires_grad=True)
        trainer.reward(images, prompts).sum().backward()

    for truncation, kl, checkpointing in REAL_STEPS:
        if (truncation, kl, checkpointing) != REAL_STEPS[0]:
            del trainer
            free(device)
            trainer = real_trainer(bench, model, reward_backbone, device, workdir, truncation, kl, checkpointing)
        counter = iter(range(10**6))
        step = lambda: trainer.step(next(counter))  # noqa: E731
        step_s = device.seconds(step, bench.repeats)
        label = (f"DRaFT+ step K={truncation}{' with KL' if kl else ' without KL'}"
                 + {"": "", "blocks": ", --gradient-checkpointing --checkpoint-blocks"}[checkpointing])
        rows.append(f"| {name} | {shape} | {label} | {step_s:.2f} | {device.peak_gib(step):.3g} | "
                    f"{cfg.batch_size / step_s:.2f} | {step_s / sampling_s:.3f} |")
    reward_s = device.seconds(reward_forward_backward, bench.repeats)
    rows.append(f"| {name} | {shape} | reward forward+backward | {reward_s:.3f} | "
                f"{device.peak_gib(reward_forward_backward):.3g} | | |")
    del trainer
    free(device)
    models.quiet_loading()
    return rows


def real_compile_rows(bench: BenchConfig, model: str, reward_backbone: str, device: Device, workdir: str) -> list[str]:
    """Rows of the real-shape table for --compare-compile: our N no-grad calls (merged LoRA) and a DRaFT+ step at
    K = 1 with the KL (checkpointed, the first of REAL_STEPS), eager and then with --compile, one trainer at a time
    (two of the largest models would not fit beside each other); and the compile time (first call minus a warm one,
    with an empty and with a filled inductor cache)."""
    rows = []
    name = os.path.basename(os.path.normpath(model))
    for compiled in (False, True):
        trainer = real_trainer(bench, model, reward_backbone, device, workdir, *REAL_STEPS[0], compile=compiled)
        cfg = trainer.cfg
        shape = f"{cfg.resolution} px, batch {cfg.batch_size}, N={cfg.inference_steps}, CFG {cfg.guidance_scale}"
        counter = iter(range(10**6))
        callables = {"sampling": our_sampling(trainer, [PROMPTS[i % len(PROMPTS)] for i in range(cfg.batch_size)]),
                     "step": lambda: trainer.step(next(counter))}
        if compiled:
            torch._dynamo.reset()
            cold, warm, graphs = cold_and_warm_first_calls(callables, device.sync)
        mode = "--compile" if compiled else "eager"
        seconds = {}
        for part, fn in callables.items():
            seconds[part] = device.seconds(fn, bench.repeats)
            label = ("our sampling (no grad, merged LoRA)" if part == "sampling"
                     else "DRaFT+ step K=1 with KL, --gradient-checkpointing --checkpoint-blocks")
            rows.append(f"| {name} | {shape} | {label}, {mode} | {seconds[part]:.2f} | {device.peak_gib(fn):.3g} | "
                        f"{cfg.batch_size / seconds[part]:.2f} | {seconds[part] / seconds['sampling']:.3f} |")
        if compiled:
            compile_s = {when: {part: first[part] - seconds[part] for part in first}
                         for when, first in (("empty", cold), ("filled", warm))}
            rows.append(f"| {name} | {shape} | compile time (first call minus a warm one): sampling, then the step; "
                        f"{graphs} graphs | " + "; ".join(
                            f"{times['sampling']:.1f}, {times['step']:.1f} ({when} inductor cache)"
                            for when, times in compile_s.items()) + " | | | |")
        del trainer, callables
        free(device)
    return rows


def free(device: Device) -> None:
    import gc

    gc.collect()
    if device.device.type == "cuda":
        torch.cuda.empty_cache()


REAL_TABLE_HEADER = ["| model | shape (per GPU) | what | seconds | peak memory (GiB) | images/s per GPU | / sampling |",
                     "| --- | --- | --- | ---: | ---: | ---: | ---: |"]


def report_real(bench: BenchConfig, reward_backbone: str, workdir: str) -> None:
    """The real-shape table, one model after another in the order given (the device run puts the largest
    first, so that a run cut short still reports something); each row is printed as soon as it is measured."""
    device = Device(bench.real_device)
    header = real_table_header(bench, device)
    lines = [header, "", *REAL_TABLE_HEADER]
    print("\n".join(lines), flush=True)
    if not bench.real_table_rows_only:
        write_table_lines(bench, lines)
    for model in bench.real:
        rows_of = real_compile_rows if bench.compare_compile else real_shape_report
        for row in rows_of(bench, model, reward_backbone, device, workdir):
            print(row, flush=True)
            write_table_lines(bench, [row])


def real_table_header(bench: BenchConfig, device: Device) -> str:
    import datetime

    import diffusers
    import transformers

    where = (torch.cuda.get_device_name(device.device) if device.device.type == "cuda"
             else f"CPU ({torch.get_num_threads()} threads)")
    dtype = "bf16 autocast, frozen weights bf16" if device.device.type == "cuda" else "fp32"
    return (f"Measured {datetime.date.today().isoformat()} on {where}; torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}; random weights from configs/real, "
            f"{dtype}, LoRA at the family's rank, reward {bench.real_reward}; seconds: median of {bench.repeats} after a "
            "warm-up call.")


def write_table_lines(bench: BenchConfig, lines: list[str]) -> None:
    if bench.real_table:
        with open(bench.real_table, "a") as f:
            f.write("\n".join(lines) + "\n")


def main(bench: BenchConfig) -> None:
    import models
    import tiny_flux2
    import tiny_models
    import tiny_rewards

    models.quiet_loading()
    torch.manual_seed(0)
    torch.set_num_threads(bench.threads)
    if bench.real:
        with tempfile.TemporaryDirectory() as folder:
            report_real(bench, bench.real_reward, folder)
        return
    with tempfile.TemporaryDirectory() as folder:
        clip = tiny_rewards.make_tiny_clip(os.path.join(folder, "clip"))
        factories = {"SD": tiny_models.make_tiny_sd, "SDXL": tiny_models.make_tiny_sdxl, "SD3": tiny_models.make_tiny_sd3,
                     "FLUX.1": tiny_models.make_tiny_flux, "FLUX.2": tiny_flux2.make_tiny_flux2}
        for family in bench.families:
            report_family = report_compile if bench.compare_compile else report
            report_family(bench, family, factories[family](os.path.join(folder, family.lower())), clip)
        if "SD" in bench.families and not bench.compare_compile:
            # Wide enough that weights, gradients and Adam state, not activations, dominate, as in real full
            # fine-tuning.
            wide = tiny_models.make_tiny_sd(os.path.join(folder, "wide"), block_out_channels=(128, 256))
            report_fsdp(bench, wide, clip, folder)
            report_startup(wide, clip)


if __name__ == "__main__":
    main(tyro.cli(BenchConfig, description=__doc__))
