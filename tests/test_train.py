"""train.py end to end on tiny models: reward ascent, LoRA export, DDP equivalence, kill-and-resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import models
import sampling
import training
import utils
from conftest import ROOT, run_train
from utils import generators

RUN_FLAGS = ["--inference-steps", "6", "--guidance-scale", "3.0", "--lora-rank", "4", "--lora-alpha", "8",
             "--lr", "3e-3", "--val-every", "0", "--resolution", "32"]


def common_args(tiny_sd, tiny_clip, prompt_file, run_dir, *extra):
    return ["--model", tiny_sd, "--reward-source", f"pickscore={tiny_clip}", "--prompts", prompt_file,
            "--run-dir", str(run_dir), *RUN_FLAGS, *extra]


def lora_weights(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:07d}", models.LORA_FILE))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def reference_run(tiny_sd, tiny_clip, prompt_file, tmp_path_factory):
    """One process, batch 1 with 2 accumulation steps: global batch 2, 6 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    args = common_args(tiny_sd, tiny_clip, prompt_file, run_dir,
                       "--batch-size", "1", "--grad-accum", "2", "--steps", "6", "--save-every", "2")
    result = run_train(args)
    return run_dir, args, result


def test_smoke_run_writes_log_checkpoints_and_resumable_state(reference_run):
    run_dir, _, result = reference_run
    records = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward_mean", "reward_std", "kl", "grad_norm", "lr", "sec_per_step", "images_per_s", "peak_mem_mb"):
        assert all(isinstance(r[key], float) for r in records), key
    assert records[0]["kl"] == 0.0  # fresh LoRA: tuned == base
    assert records[-1]["kl"] > 0.0
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-0000002", "step-0000004", "step-0000006"]
    assert "step 6/6" in result.stdout


def logged_steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_distributed_two_processes_match_grad_accumulation_and_resume_on_one(reference_run, tiny_sd, tiny_clip,
                                                                             prompt_file, tmp_path):
    run_dir = tmp_path / "ddp"
    args = common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--batch-size", "1", "--save-every", "2")
    run_train(args + ["--steps", "4"], world_size=2)
    state = json.load(open(run_dir / "checkpoints" / "step-0000004" / "state.json"))
    assert len(state["rank_fingerprints"]) == 2
    assert state["rank_fingerprints"][0] == state["rank_fingerprints"][1]
    reference_dir = reference_run[0]
    assert_same_weights(lora_weights(run_dir, 4), lora_weights(reference_dir, 4), atol=1e-5)

    # One process takes over the 2-process run: the global batch is kept by accumulating twice.
    result = run_train(args + ["--steps", "6"])
    assert "--grad-accum 2 keeps its global batch of 2" in result.stdout
    assert_same_weights(lora_weights(run_dir, 6), lora_weights(reference_dir, 6), atol=1e-5)
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_killed_run_resumes_to_the_same_weights_and_logs_each_step_once(reference_run, tmp_path):
    _, reference_args, _ = reference_run
    run_dir = tmp_path / "killed"
    args = list(reference_args)
    args[args.index("--run-dir") + 1] = str(run_dir)
    process = run_train(args, start_new_session=True)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 300
    # Between checkpoints: step 3 is logged, its checkpoint would come at step 4.
    while process.poll() is None and time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (run_dir / "checkpoints" / "step-0000002").exists()
    assert not (run_dir / "checkpoints" / "step-0000004").exists(), "the run saved again before it could be killed"
    assert logged_steps(run_dir)[-1] >= 3

    result = run_train(args)
    assert "resuming from" in result.stdout and "step 2)" in result.stdout
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert_same_weights(lora_weights(run_dir, 6), lora_weights(reference_run[0], 6), atol=0.0)


def test_a_second_training_on_a_held_run_dir_stops_in_one_line(reference_run, tmp_path):
    _, reference_args, _ = reference_run
    args = list(reference_args)
    args[args.index("--run-dir") + 1] = str(tmp_path / "held")
    args[args.index("--steps") + 1] = "200"
    first = run_train(args, start_new_session=True)
    log = tmp_path / "held" / "log.jsonl"
    deadline = time.time() + 300
    while not log.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        second = run_train(args, check=False)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by a training (pid" in lines[0], second.stderr
    # kill -9 released the hold: the same run dir takes a training again at once
    args[args.index("--steps") + 1] = "1"
    run_train(args)


def test_saved_lora_reproduces_our_images_in_a_stock_pipeline(reference_run, tiny_sd):
    checkpoint = reference_run[0] / "checkpoints" / "step-0000006"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a yellow star"]
    plain = pipe(prompts, num_inference_steps=6, guidance_scale=3.0, height=32, width=32,
                 generator=generators([1, 2]), output_type="latent").images
    pipe.load_lora_weights(str(checkpoint))
    stock = pipe(prompts, num_inference_steps=6, guidance_scale=3.0, height=32, width=32,
                 generator=generators([1, 2]), output_type="latent").images

    model = models.load_model(tiny_sd, torch.device("cpu"))
    models.load_checkpoint_for_inference(model, str(checkpoint))
    cond = models.encode_prompts(model, prompts, True, 32)
    x_T = sampling.initial_latents(model.latent_shape(2, 32), generators([1, 2]), model.scheduler, "cpu", torch.float32)
    with torch.no_grad():
        ours = sampling.sample(models.tuned_denoiser(model, cond), model.scheduler, x_T,
                               num_steps=6, guidance_scale=3.0).latents
    assert (stock - plain).abs().max() > 1e-4  # the LoRA changes the images
    # Merged weights sum in another order than the LoRA layers: 1e-5 relative to the latents' scale (~10)
    assert (ours - stock).abs().max() <= 1e-5 * stock.abs().max()


class FixedBatch(training.PromptStream):
    """Every step sees the same prompts with the same noise, so reward ascent is measurable."""

    def prompt(self, position):
        return self.prompts[position % len(self.prompts)]

    def noise_seed(self, position):
        return 100 + position % len(self.prompts)


def rewards_before_and_after_steps(trainer: training.Trainer, steps: int = 8) -> tuple[float, float]:
    """The mean reward of one fixed batch of 4 prompts and noises, before and after `steps` steps on it alone."""
    trainer.stream = FixedBatch(trainer.stream.prompts[:4], trainer.cfg.seed)
    batch, seeds = trainer.stream.prompts, [trainer.stream.noise_seed(i) for i in range(4)]

    def fixed_batch_reward():
        with torch.no_grad():
            images, _ = trainer.rollout(batch, seeds, 0)
            return trainer.reward(images, batch).mean().item()

    before = fixed_batch_reward()
    for step in range(steps):
        trainer.step(step)
    return before, fixed_batch_reward()


def test_training_steps_raise_the_reward_of_a_fixed_batch(tiny_sd, tiny_clip, prompt_file, tmp_path):
    cfg = training.TrainConfig(model=tiny_sd, reward_source=[f"pickscore={tiny_clip}"], prompts=prompt_file,
                            inference_steps=6, guidance_scale=3.0, lora_rank=4, lora_alpha=8, lr=3e-2,
                            batch_size=4, resolution=32, kl_coeff=0.0, run_dir=str(tmp_path))
    before, after = rewards_before_and_after_steps(training.build(cfg, training.utils.init_distributed("cpu")))
    assert after > before + 0.3, (before, after)


@pytest.mark.parametrize("flags, message", [
    (["--truncation-steps", "60"], "--inference-steps"),
    (["--reward", "pickscore:abc"], "'abc'"),
    (["--reward-source", "nonsense"], "--reward-source"),
    (["--steps", "0"], "--steps"),
    (["--prompts", "no_such_set"], "no_such_set"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--reward", "pickscore,nosuchreward"], "nosuchreward"),
    (["--steps", "-3"], "--steps"),
    (["--resolution", "33"], "multiple of 2"),
    (["--prompts", "EMPTY_FILE"], "no prompts"),
    (["--prompts", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
    (["--truncation-range", "0", "3"], "--truncation-range 0 3"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--kl-coeff", "inf"], "--kl-coeff must be a finite number"),
    (["--device", "cuda"], "no CUDA device"),
    (["--full-finetune", "--fsdp", "--compile"], "--compile and --fsdp exclude each other"),
    (["--val-metrics", "nope", "--val-every", "1"], "--val-metrics: unknown metric 'nope'"),
    (["--val-metrics", "gold_diversity", "--val-metrics-repeats", "1", "--val-every", "1"], "--val-metrics-repeats 2"),
    (["--val-metrics", "pickscore", "--val-every", "1", "--val-metrics-num-prompts", "99"], "exceeds the 32 prompts"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(flags, message, tiny_sd, tiny_clip, prompt_file, tmp_path):
    run_dir = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    flags = [str(empty) if flag == "EMPTY_FILE" else flag for flag in flags]
    args = common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--steps", "1") + flags
    result = run_train(args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run_dir.exists()


def test_diverging_run_skips_bad_steps_then_stops_keeping_the_last_good_checkpoint(tiny_sd, tiny_clip, prompt_file,
                                                                                 tmp_path):
    run_dir = tmp_path / "diverge"
    # An absurd learning rate sends the LoRA weights to ~1e30 after the first update: every later
    # loss is non-finite.
    args = common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--steps", "8", "--save-every", "1",
                       "--max-bad-steps", "2") + ["--lr", "1e30"]
    result = run_train(args, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "non-finite loss or gradient" in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged") and "step-0000001" in last_line, last_line
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-0000001"]


def test_damaged_checkpoint_is_one_line_exit_2_and_writes_nothing(reference_run, tmp_path):
    _, reference_args, _ = reference_run
    run_dir = tmp_path / "damaged"
    checkpoint = run_dir / "checkpoints" / "step-0000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / models.LORA_FILE).write_bytes(b"not a safetensors file")
    args = list(reference_args)
    args[args.index("--run-dir") + 1] = str(run_dir)
    result = run_train(args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume from" in lines[0] and "step-0000002" in lines[0], result.stderr
    # .lock is the (released) hold on the run dir, not something written for the run
    assert sorted(p.name for p in run_dir.rglob("*")) == [".lock", "checkpoints", models.LORA_FILE, "step-0000002"]


def test_local_inputs_are_checked_before_the_hub_and_an_unreachable_hub_is_one_line(tiny_clip, prompt_file, tmp_path):
    # A closed port stands for a hub out of reach, as on a machine without network.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    hub_model = ["--model", "no-such-org/no-such-model", "--reward-source", f"pickscore={tiny_clip}",
                 "--run-dir", str(tmp_path / "run")]
    for extra, message in ((["--prompts", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
                           (["--prompts", prompt_file], "the Hugging Face hub is unreachable")):
        started = time.time()
        result = run_train(hub_model + extra, check=False, env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert time.time() - started < 60  # no minute of retries
    assert not (tmp_path / "run").exists()


def test_a_changed_config_is_refused_before_anything_loads(reference_run, tmp_path):
    reference_dir, reference_args, _ = reference_run
    # A run of a model that is no longer there: the config check has to come first to be the one reported.
    run_dir = tmp_path / "moved"
    run_dir.mkdir()
    config = json.loads((reference_dir / "config.json").read_text())
    utils.save_json(str(run_dir / "config.json"), {**config, "model": "/no/such/model", "run_dir": str(run_dir)})
    args = list(reference_args)
    args[args.index("--run-dir") + 1] = str(run_dir)
    args[args.index("--model") + 1] = "/no/such/model"
    args[args.index("--lr") + 1] = "1e-3"
    result = run_train(args, check=False)
    assert result.returncode == 2
    assert "holds a run with lr=0.003, not 0.001" in result.stderr.strip().splitlines()[-1], result.stderr


def unet_calls(trainer) -> int:
    calls = []
    handle = trainer.model.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        trainer.step(0)
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("kl_coeff, log_kl, calls", [(0.0, False, 6), (0.0, True, 7), (0.1, False, 7)])
def test_the_base_model_runs_only_when_the_kl_is_asked_for(tiny_sd, tiny_clip, prompt_file, tmp_path,
                                                          kl_coeff, log_kl, calls):
    cfg = training.TrainConfig(model=tiny_sd, reward_source=[f"pickscore={tiny_clip}"], prompts=prompt_file,
                               inference_steps=6, truncation_steps=1, guidance_scale=3.0, lora_rank=4,
                               resolution=32, kl_coeff=kl_coeff, log_kl=log_kl, run_dir=str(tmp_path))
    trainer = training.build(cfg, training.utils.init_distributed("cpu"))
    assert unet_calls(trainer) == calls  # N = 6 tuned calls, one base call on the graph step for the KL
    record = trainer.step(1)
    assert (record["kl"] is None) == (calls == 6)


def run_records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_bf16_autocast_truncation_range_and_warmup_end_to_end(tiny_sd, tiny_clip, prompt_file, tmp_path):
    run_dir = tmp_path / "bf16"
    run_train(common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--steps", "3", "--mixed-precision", "bf16",
                          "--truncation-range", "1", "3", "--batch-size", "1", "--grad-accum", "3",
                          "--warmup-steps", "2"))
    records = run_records(run_dir)
    assert [r["lr"] for r in records] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    # K drawn per micro-batch in [1, 3]: the logged mean is one of the averages of three draws
    assert all(1 <= r["truncation_steps"] <= 3 for r in records)
    assert len({r["truncation_steps"] for r in records}) > 1 or records[0]["truncation_steps"] != 1
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in records)


@pytest.mark.slow
def test_fp16_overflow_skips_are_calibration_not_divergence(tiny_sd, tiny_clip, prompt_file, tmp_path):
    run_dir = tmp_path / "fp16"
    # The reward runs in fp32 outside autocast, so the scaled gradient overflows in the fp16 VAE and UNet alone;
    # a large reward weight takes it past fp16's range at GradScaler's first scales, the calibration seen here.
    result = run_train(common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--steps", "3", "--save-every", "100",
                                   "--mixed-precision", "fp16", "--max-bad-steps", "1", "--lv-samples", "2",
                                   "--reward", "pickscore:1000"))
    records = run_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss_scale"] >= 1.0 for r in records)
    # GradScaler starts at 65536 and halves at each overflow while it calibrates
    assert any(r["skipped"] for r in records) and records[-1]["loss_scale"] < records[0]["loss_scale"]
    assert (run_dir / "checkpoints" / "step-0000003" / models.LORA_FILE).exists()  # the final one, always
    assert result.stdout.strip().splitlines()[-1].endswith("last checkpoint " + str(run_dir / "checkpoints" /
                                                                                   "step-0000003"))


@pytest.mark.slow
def test_full_finetune_trains_and_resumes_to_the_same_weights(tiny_sd, tiny_clip, prompt_file, tmp_path):
    def unet_weights(run_dir, step):
        folder = os.path.join(run_dir, "checkpoints", f"step-{step:07d}", models.FULL_UNET_DIR)
        return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--full-finetune", "--lr", "1e-4", "--save-every", "2")
    run_train(common_args(tiny_sd, tiny_clip, prompt_file, straight, *flags, "--steps", "3"))
    run_train(common_args(tiny_sd, tiny_clip, prompt_file, resumed, *flags, "--steps", "2"))
    result = run_train(common_args(tiny_sd, tiny_clip, prompt_file, resumed, *flags, "--steps", "3"))
    assert "resuming from" in result.stdout
    base = load_file(os.path.join(tiny_sd, "unet", "diffusion_pytorch_model.safetensors"))
    assert_same_weights(unet_weights(resumed, 3), unet_weights(straight, 3), atol=0.0)
    assert max((unet_weights(straight, 3)[k] - base[k]).abs().max().item() for k in base) > 0


def test_merged_sampling_changes_no_loss_or_weight(tiny_sd, tiny_clip, prompt_file, tmp_path):
    results = []
    for merged in (True, False):
        cfg = training.TrainConfig(model=tiny_sd, reward_source=[f"pickscore={tiny_clip}"], prompts=prompt_file,
                                   inference_steps=6, truncation_steps=2, guidance_scale=3.0, lora_rank=4,
                                   lr=3e-2, resolution=32, batch_size=2, run_dir=str(tmp_path))
        torch.manual_seed(0)
        trainer = training.build(cfg, training.utils.init_distributed("cpu"))
        trainer.model.merged_sampling = merged
        results.append([trainer.step(step)["loss"] for step in range(3)])
    assert len(set(results[0])) == 3  # the weights moved between the steps
    # (the weights themselves are not compared: Adam's normalisation turns rounding-level gradient
    # differences of near-zero gradients into steps of the learning rate's size)
    assert results[0] == pytest.approx(results[1], abs=1e-5)


def test_one_graph_call_checkpoints_the_blocks_and_more_calls_each_call():
    def choice(**flags):
        checkpointing = training.denoiser_checkpointing(training.TrainConfig(**flags))
        return checkpointing.per_call, checkpointing.blocks

    assert choice(truncation_steps=1) == (False, False)
    for one_call in (dict(truncation_steps=1), dict(truncation_steps=0, lv_samples=4),
                     dict(truncation_range=(1, 1))):
        assert choice(gradient_checkpointing=True, **one_call) == (False, True)
        assert choice(gradient_checkpointing=True, checkpoint_blocks=True, **one_call) == (False, True)
    for calls in (dict(truncation_steps=2), dict(truncation_range=(1, 3))):
        assert choice(gradient_checkpointing=True, **calls) == (True, True)
        assert choice(gradient_checkpointing=True, checkpoint_calls_only=True, **calls) == (True, False)
        assert choice(gradient_checkpointing=True, checkpoint_blocks=True, **calls) == (True, True)
        assert choice(checkpoint_blocks=True, **calls) == (False, True)


def test_k_above_one_without_checkpointing_warns_of_the_memory():
    assert training.memory_warning(training.TrainConfig(truncation_steps=1)) is None
    assert training.memory_warning(training.TrainConfig(truncation_steps=10, gradient_checkpointing=True)) is None
    for cfg in (training.TrainConfig(truncation_steps=10), training.TrainConfig(truncation_range=(1, 10))):
        assert "K up to 10 without --gradient-checkpointing" in training.memory_warning(cfg)


def test_val_metrics_are_metrics_py_values_for_the_same_prompts_seeds_and_ema_checkpoint(tiny_sd, tiny_clip,
                                                                                          prompt_file, tmp_path):
    run_dir = tmp_path / "run"
    val = ["--val-metrics", "pickscore", "gold_diversity", "--val-metrics-prompts", prompt_file,
           "--val-metrics-num-prompts", "2", "--val-metrics-repeats", "2", "--val-metrics-seed", "7"]
    # with an EMA, which both draw: training swaps it in, metrics.py loads a checkpoint's ema/ by default
    run_train(common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--steps", "2", "--save-every", "1", *val,
                          "--val-every", "1", "--ema-decay", "0.5"))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # step 0: the model before training, the base model
    assert [sorted(k for k in r if k.startswith("val/")) for r in records] == [["val/gold_diversity", "val/pickscore"]] * 3
    assert len({r["val/pickscore"] for r in records}) == 3  # measured at each step, of its weights
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "metrics.py", "--checkpoint", str(run_dir / "checkpoints" / "step-0000002"),
         "--metrics", "pickscore", "gold_diversity", "--reward-source", f"pickscore={tiny_clip}",
         "--prompt-set", prompt_file, "--num-prompts", "2", "--num-repeats", "2", "--seed", "7",
         "--inference-steps", "6", "--guidance-scale", "3.0", "--resolution", "32", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(out.read_text())["results"]["draft"]["metrics"]
    # The training model samples through its own LoRA layers and metrics.py through stock load_lora_weights:
    # float rounding that can flip an 8-bit pixel level, which moves the tiny CLIP's score by ~1e-4.
    assert records[-1]["val/pickscore"] == pytest.approx(theirs["pickscore"]["mean"], abs=1e-3)
    assert records[-1]["val/gold_diversity"] == pytest.approx(theirs["gold_diversity"]["mean"], abs=1e-4)
    curves = Image.open(run_dir / "curves.png")
    assert curves.size == (3 * 480, 2 * 320)  # reward, KL, gradient norm; the two val metrics
    assert len(curves.getcolors(1 << 16)) > 2  # drawn, not blank
