"""--ema-decay: the moving average of the trainable weights, its update, checkpoints, resume, and the
--checkpoint consumers that load it (or the raw weights with --raw-weights)."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
import tyro
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

import generate
import generation
import models
import train
import training
import utils
from conftest import run_train
from test_train import common_args

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
DECAY = 0.9
# Tiny models gain nothing from threads, and on a shared 2-core machine threads only contend.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def checkpoint_dir(run_dir, step) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:07d}")


def raw_and_ema(run_dir, step) -> tuple[dict, dict]:
    folder = checkpoint_dir(run_dir, step)
    return (load_file(os.path.join(folder, models.LORA_FILE)),
            load_file(os.path.join(folder, models.EMA_DIR, models.LORA_FILE)))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])][:3]


def test_update_is_the_hand_computed_average_of_a_toy_parameter():
    values = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, 0.25]), torch.tensor([-1.0, 4.0, 2.0]),
              torch.tensor([0.5, 0.5, -3.0])]
    param = torch.nn.Parameter(values[0].clone())
    ema = training.new_ema([param])
    for value in values[1:]:
        param.data.copy_(value)
        training.update_ema(ema, [param], DECAY)
    n = len(values) - 1
    # ema_n = d^n p_0 + sum_k (1 - d) d^(n - k) p_k
    expected = DECAY ** n * values[0] + sum((1 - DECAY) * DECAY ** (n - k) * values[k] for k in range(1, n + 1))
    assert torch.allclose(ema[0], expected, rtol=1e-6, atol=1e-6), (ema[0], expected)
    assert not torch.allclose(ema[0], param.detach(), atol=0.1)  # an average, not the last value
    training.update_ema(ema, [param], 0.0)
    assert torch.equal(ema[0], param.detach())  # decay 0: the weights themselves, exactly


def build_trainer(tiny_sd, tiny_clip, prompt_file, tmp_path, decay: float, **flags) -> training.Trainer:
    settings = dict(model=tiny_sd, reward_source=[f"pickscore={tiny_clip}"], prompts=prompt_file, inference_steps=6,
                    guidance_scale=3.0, lora_rank=4, lora_alpha=8, lr=3e-3, resolution=32, ema_decay=decay,
                    val_prompts=1, run_dir=str(tmp_path))
    cfg = training.TrainConfig(**{**settings, **flags})
    torch.manual_seed(0)
    return training.build(cfg, utils.init_distributed("cpu"))


def weights(trainer: training.Trainer) -> list[torch.Tensor]:
    return [param.detach().clone() for param in models.trainable_parameters(trainer.model)]


def test_decay_zero_follows_the_raw_weights_exactly(tiny_sd, tiny_clip, prompt_file, tmp_path):
    trainer = build_trainer(tiny_sd, tiny_clip, prompt_file, tmp_path, 0.0)
    initial = weights(trainer)
    assert all(torch.equal(e, w) for e, w in zip(trainer.ema, initial))  # it starts at the initial weights
    for step in range(2):
        assert not trainer.step(step)["skipped"]
    now = weights(trainer)
    assert any(not torch.equal(a, b) for a, b in zip(initial, now))  # the weights moved
    assert all(torch.equal(e, w) for e, w in zip(trainer.ema, now))


def test_swapped_in_for_validation_restored_exactly_and_still_on_a_skipped_step(tiny_sd, tiny_clip, prompt_file,
                                                                                tmp_path):
    trainer = build_trainer(tiny_sd, tiny_clip, prompt_file, tmp_path, 0.5)
    trainer.step(0)
    raw, ema = weights(trainer), [e.clone() for e in trainer.ema]
    assert any(not torch.equal(a, b) for a, b in zip(raw, ema))

    seen = []
    rollout = trainer.rollout

    def recording_rollout(prompts, seeds, truncation, lv_samples=0, base_only=False):
        seen.append((base_only, weights(trainer)))
        return rollout(prompts, seeds, truncation, lv_samples, base_only)

    trainer.rollout = recording_rollout
    trainer.validation_grid(1, ["a red circle"])
    tuned = [w for base_only, w in seen if not base_only]
    assert len(tuned) == 1 and all(torch.equal(a, b) for a, b in zip(tuned[0], ema))  # the grid shows the EMA
    assert all(torch.equal(a, b) for a, b in zip(weights(trainer), raw))  # and the raw weights come back, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(trainer.ema, ema))
    assert os.path.exists(tmp_path / "val" / "step-0000001.png")

    # An absurd learning rate makes the next loss non-finite: that step is skipped and moves no average.
    trainer.cfg = replace(trainer.cfg, lr=1e30)
    trainer.rollout = rollout
    assert not trainer.step(1)["skipped"]
    ema = [e.clone() for e in trainer.ema]
    assert trainer.step(2)["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(trainer.ema, ema))


def test_full_finetune_saves_the_ema_as_a_stock_unet_folder_and_restores_it_exactly(tiny_sd, tiny_clip,
                                                                                     prompt_file, tmp_path):
    trainer = build_trainer(tiny_sd, tiny_clip, prompt_file, tmp_path, 0.5, full_finetune=True, lr=1e-3)
    trainer.step(0)
    folder = training.save_checkpoint(trainer, 1, export=False)
    stock = UNet2DConditionModel.from_pretrained(os.path.join(folder, models.EMA_DIR, models.FULL_UNET_DIR))
    names = [name for name, param in trainer.model.unet.named_parameters() if param.requires_grad]
    assert all(torch.equal(stock.state_dict()[name], e) for name, e in zip(names, trainer.ema))
    assert any(not torch.equal(e, w) for e, w in zip(trainer.ema, weights(trainer)))

    resumed = build_trainer(tiny_sd, tiny_clip, prompt_file, tmp_path, 0.5, full_finetune=True, lr=1e-3)
    assert training.restore_checkpoint(resumed, folder) == 1
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema, trainer.ema))
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(trainer)))


@pytest.fixture(scope="module")
def ema_run(tiny_sd, tiny_clip, prompt_file, tmp_path_factory):
    """4 LoRA steps at decay 0.9, a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("ema")
    run_train(common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--ema-decay", str(DECAY), "--steps", "4",
                          "--save-every", "1"), env=ONE_THREAD)
    return run_dir


def test_checkpoints_hold_the_moving_average_of_the_raw_weights(ema_run):
    previous_ema = raw_and_ema(ema_run, 1)[1]
    for step in (2, 3, 4):
        raw, ema = raw_and_ema(ema_run, step)
        assert raw.keys() == ema.keys() and all(t.dtype == torch.float32 for t in ema.values())
        for key in raw:
            expected = DECAY * previous_ema[key] + (1 - DECAY) * raw[key]
            assert torch.allclose(ema[key], expected, rtol=1e-6, atol=1e-7), key
        previous_ema = ema
    assert max((raw[k] - ema[k]).abs().max().item() for k in raw) > 1e-4


def test_resume_restores_raw_and_ema_weights_bit_for_bit(ema_run, tiny_sd, tiny_clip, prompt_file, tmp_path):
    run_dir = tmp_path / "resumed"
    args = common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--ema-decay", str(DECAY), "--save-every", "2")
    run_train(args + ["--steps", "2"], env=ONE_THREAD)
    result = run_train(args + ["--steps", "4"], env=ONE_THREAD)
    assert "resuming from" in result.stdout and "step 2)" in result.stdout
    for resumed, straight in zip(raw_and_ema(run_dir, 4), raw_and_ema(ema_run, 4)):
        assert_identical(resumed, straight)


def lora_of(denoiser, adapter_name) -> dict:
    return get_peft_model_state_dict(denoiser, adapter_name=adapter_name)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters on one pipeline, on purpose
def test_stock_diffusers_and_our_consumers_load_the_ema_unless_raw_weights(ema_run, tiny_sd):
    checkpoint = checkpoint_dir(ema_run, 4)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(os.path.join(checkpoint, models.EMA_DIR), adapter_name="ema")
    pipe.load_lora_weights(checkpoint, adapter_name="raw")
    stock_ema, stock_raw = lora_of(pipe.unet, "ema"), lora_of(pipe.unet, "raw")
    assert max((stock_ema[k] - stock_raw[k]).abs().max().item() for k in stock_ema) > 1e-4

    options = generation.InferenceOptions(resolution=32, dtype="float32")
    for raw_weights, stock in ((False, stock_ema), (True, stock_raw)):
        model, _ = generation.load_for_inference(replace(options, raw_weights=raw_weights), (checkpoint,), CPU)
        assert_identical(lora_of(model.denoiser, "tuned_0"), stock)


def test_generate_draws_the_ema_by_default_and_the_raw_weights_when_asked(ema_run, tmp_path, capfd):
    checkpoint = checkpoint_dir(ema_run, 4)
    # The same LoRA as a checkpoint without ema/: its own weights are the EMA ones.
    ema_only = tmp_path / "ema_only"
    shutil.copytree(os.path.join(checkpoint, models.EMA_DIR), ema_only)
    shutil.copy(os.path.join(checkpoint, "config.json"), ema_only)
    flags = ["--prompt", "a red circle", "--num-images", "1", "--inference-steps", "6", "--guidance-scale", "3.0",
             "--resolution", "32"]
    grids = {}
    for name, extra in (("default", [checkpoint]), ("raw", [checkpoint, "--raw-weights"]), ("ema_only", [ema_only])):
        out = tmp_path / f"{name}.png"
        args = [*flags, "--out", str(out), "--checkpoint", *map(str, extra)]
        generate.main(tyro.cli(generate.GenerateConfig, args=args))
        grids[name] = Image.open(out).convert("RGB").tobytes()
    stdout = capfd.readouterr().out
    assert stdout.count("loaded the EMA weights (ema/)") == 1  # the default run only
    assert grids["default"] == grids["ema_only"]
    assert grids["raw"] != grids["default"]


def run_train_in_process(args):
    train.main(tyro.cli(training.TrainConfig, args=args))


@pytest.mark.parametrize("flags, message", [
    (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1), e.g. 0.999, got 1.0"),
    (["--ema-decay", "-0.1"], "--ema-decay must be in [0, 1), e.g. 0.999, got -0.1"),
    (["--ema-decay", "nan"], "--ema-decay must be a finite number"),
    (["--ema-decay", "0.9", "--full-finetune", "--fsdp"], "--ema-decay is not supported with --fsdp"),
])
def test_bad_decay_is_one_line_exit_2_and_writes_nothing(flags, message, tiny_sd, tiny_clip, prompt_file, tmp_path,
                                                         capfd):
    run_dir = tmp_path / "run"
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_train_in_process(common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--steps", "1") + flags)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not run_dir.exists()


def test_turning_ema_on_for_a_run_without_it_is_refused(ema_run, tiny_sd, tiny_clip, prompt_file, tmp_path, capfd):
    run_dir = tmp_path / "plain"
    run_dir.mkdir()
    config = json.loads((ema_run / "config.json").read_text())
    utils.save_json(str(run_dir / "config.json"), {**config, "ema_decay": None, "run_dir": str(run_dir)})
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_train_in_process(common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--ema-decay", str(DECAY),
                                         "--steps", "4", "--save-every", "1"))
    assert exit_info.value.code == 2
    assert "holds a run with ema_decay=None, not 0.9" in capfd.readouterr().err
    assert sorted(os.listdir(run_dir)) == ["config.json"]
