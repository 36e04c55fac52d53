"""Full fine-tuning sharded with FSDP2 on 2 CPU processes (gloo): the same weights as one process,
sharded checkpoints that resume bit-exactly and on another world size, consolidated exports that stock
pipelines load, and less memory per rank."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

import generation
import models
import tiny_models
from conftest import ROOT
from utils import generators

FLAGS = ["--inference-steps", "4", "--guidance-scale", "3.0", "--lr", "1e-4", "--val-every", "0",
         "--full-finetune", "--batch-size", "1", "--steps", "4", "--save-every", "2"]
UNET_FILE = os.path.join(models.FULL_UNET_DIR, "diffusion_pytorch_model.safetensors")


def run_train(args, *, world_size=1, check=True, env=None, **popen):
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    command = launcher + ["train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                **popen)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def args_for(model, clip, prompts, run_dir, *extra):
    return ["--model", model, "--reward-source", f"pickscore={clip}", "--prompts", prompts,
            "--run-dir", str(run_dir), *FLAGS, *extra]


def unet_weights(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:07d}", UNET_FILE))


def worst_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def sharded_run(tiny_sd, tiny_clip, prompt_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    # checkpointed (K = 1: the UNet's blocks, inside FSDP2's units), against one process without it
    args = args_for(tiny_sd, tiny_clip, prompt_file, run_dir, "--fsdp", "--resolution", "32", "--gradient-checkpointing")
    run_train(args, world_size=2)
    return run_dir, args


@pytest.mark.slow
def test_two_sharded_processes_train_the_weights_of_one_process(sharded_run, tiny_sd, tiny_clip, prompt_file,
                                                                tmp_path):
    run_dir, _ = sharded_run
    single = tmp_path / "single"
    run_train(args_for(tiny_sd, tiny_clip, prompt_file, single, "--grad-accum", "2", "--resolution", "32"))
    base = load_file(os.path.join(tiny_sd, "unet", "diffusion_pytorch_model.safetensors"))
    assert worst_difference(unet_weights(single, 4), base) > 1e-5  # it trained
    assert worst_difference(unet_weights(run_dir, 4), unet_weights(single, 4)) <= 1e-5
    # Every rank wrote its shards; only the final checkpoint was exported whole.
    step2, step4 = (run_dir / "checkpoints" / f"step-{s:07d}" for s in (2, 4))
    assert sorted(os.listdir(step2 / models.SHARDED_DIR)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (step2 / models.FULL_UNET_DIR).exists() and (step4 / models.FULL_UNET_DIR).exists()


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_bit_exactly_and_on_one_process(sharded_run, tmp_path):
    run_dir, args = sharded_run
    killed = tmp_path / "killed"
    killed_args = list(args)
    killed_args[killed_args.index("--run-dir") + 1] = str(killed)
    process = run_train(killed_args, world_size=2, start_new_session=True)
    first = killed / "checkpoints" / "step-0000002"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert first.exists() and not (killed / "checkpoints" / "step-0000004").exists()
    one_process = tmp_path / "one"  # the same checkpoint, taken over by a single process
    os.makedirs(one_process / "checkpoints")
    shutil.copytree(first, one_process / "checkpoints" / first.name)
    shutil.copy(killed / "config.json", one_process / "config.json")

    run_train(killed_args, world_size=2)
    assert worst_difference(unet_weights(killed, 4), unet_weights(run_dir, 4)) == 0.0

    one_args = list(args)
    one_args[one_args.index("--run-dir") + 1] = str(one_process)
    result = run_train(one_args)
    assert "resuming from" in result.stdout and "--grad-accum 2 keeps its global batch of 2" in result.stdout
    assert worst_difference(unet_weights(one_process, 4), unet_weights(run_dir, 4)) <= 1e-5


def stock_images(pipeline_class, path, denoiser_dir, resolution):
    """The stock pipeline with the denoiser of `denoiser_dir` (a unet/ or transformer/ folder) swapped in."""
    pipe = pipeline_class.from_pretrained(path, **models.detect_family(path).load_kwargs)
    name = os.path.basename(denoiser_dir)
    setattr(pipe, name, type(getattr(pipe, name)).from_pretrained(denoiser_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red circle", "a yellow star"], num_inference_steps=4, guidance_scale=3.0, height=resolution,
                width=resolution, generator=generators([1, 2]), output_type="pt").images


def our_images(path, checkpoint, resolution):
    options = generation.InferenceOptions(model=path, scheduler="pipeline", resolution=resolution, dtype="float32")
    model, _ = generation.load_for_inference(options, (checkpoint,), torch.device("cpu"))
    with torch.no_grad():
        return generation.generate(model, ["a red circle", "a yellow star"], [1, 2],
                                   generation.SamplerSettings(resolution, 4, 3.0))[0]


@pytest.mark.slow
def test_exported_denoisers_load_into_stock_pipelines_and_reproduce_our_images(sharded_run, tiny_sd, tiny_clip,
                                                                               prompt_file, tmp_path):
    runs = [(StableDiffusionPipeline, tiny_sd, sharded_run[0] / "checkpoints" / "step-0000004", "unet")]
    for pipeline_class, make, folder in ((StableDiffusionXLPipeline, tiny_models.make_tiny_sdxl, "unet"),
                                         (StableDiffusion3Pipeline, tiny_models.make_tiny_sd3, "transformer")):
        path = make(str(tmp_path / folder / "model"))
        run_dir = tmp_path / folder / "run"
        run_train(args_for(path, tiny_clip, prompt_file, run_dir, "--fsdp", "--scheduler", "pipeline",
                           "--resolution", "32") + ["--steps", "2"], world_size=2)
        runs.append((pipeline_class, path, run_dir / "checkpoints" / "step-0000002", folder))
    for pipeline_class, path, checkpoint, folder in runs:
        plain = stock_images(pipeline_class, path, os.path.join(path, folder), 32)
        stock = stock_images(pipeline_class, path, str(checkpoint / folder), 32)
        assert (stock - plain).abs().max() > 1e-4, pipeline_class  # the trained denoiser changes the images
        ours = our_images(path, str(checkpoint), 32)
        assert (ours - stock).abs().max() <= 1e-5, pipeline_class


def peak_growth_mb(run_dir) -> float:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return max(json.loads(line)["mem_growth_mb"] for line in f)


@pytest.mark.slow
def test_sharding_lowers_the_memory_growth_per_rank(tiny_clip, prompt_file, tmp_path):
    # Wide enough (about 10 M parameters) that weights, gradients and Adam state, not activations, dominate.
    wide = tiny_models.make_tiny_sd(str(tmp_path / "wide"), block_out_channels=(128, 256))
    # glibc returns freed blocks to the OS at once, so the resident set follows live tensors
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    growth = {}
    for name, extra in (("plain", []), ("fsdp", ["--fsdp"])):
        run_dir = tmp_path / name
        run_train(args_for(wide, tiny_clip, prompt_file, run_dir, "--resolution", "16", *extra) + ["--steps", "2"],
                  world_size=2, env=env)
        growth[name] = peak_growth_mb(run_dir)
    assert growth["fsdp"] < 0.8 * growth["plain"], growth
