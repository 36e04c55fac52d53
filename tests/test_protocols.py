"""--protocol of generate.py, anneal.py and metrics.py: each published system's evaluation settings, checked
against the lines of its code they come from; the images equal those of the flags it stands for; flags given
beside it win, each said in a line; what cannot go with it is refused in one line."""

import inspect

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

import anneal
import generate
import generation
import metrics
import utils

PROMPTS = ["a red circle", "a blue cube"]
# What the tests override: the tiny SD3 model, in fp32, at a size a CPU samples in a moment.
TINY = ["--resolution", "32", "--dtype", "float32", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- each protocol is its system's code ------------------------------------------------------------

# FDFO, NVlabs/finite-difference-flow-optimization at 740e22f: eval/calculate_metrics.py samples every image
# it scores with models.run_pipe (line 150) on models.load_pipe (line 104).
FDFO_EVALUATION = {
    "model": "stabilityai/stable-diffusion-3.5-medium",  # eval/models.py:47 load_orig_pipe(repo=...)
    "dtype": "bfloat16",  # eval/models.py:47 dtype=torch.bfloat16
    "resolution": 512,  # eval/calculate_metrics.py:54-55 width 512, height 512
    "inference_steps": 40,  # eval/calculate_metrics.py:56 num_inference_steps 40
    "guidance_scale": 1.0,  # eval/calculate_metrics.py:57 guidance_scale 1.0
    # eval/models.py:48 a stock StableDiffusion3Pipeline, whose own scheduler samples (line 90 calls the pipeline)
    "scheduler": "pipeline",
}


def test_fdfo_protocol_is_fdfos_evaluation():
    settings = generation.PROTOCOLS["fdfo"]
    assert {key: settings[key] for key in FDFO_EVALUATION} == FDFO_EVALUATION
    # eval/models.py:90-92 passes no max_sequence_length: the pipeline's default (fdfo/train_loop.py:144 trains
    # with 128, which its evaluation does not use)
    default = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["max_sequence_length"].default
    assert settings["max_sequence_length"] == default == 256
    assert set(settings) == {*FDFO_EVALUATION, "max_sequence_length"}


# RTDMD, Harahan/RTDMD at 6c3cb03: inference.py runs rtdmd/inference.py's RTDMDInference on
# configs/inference/sd35m.yaml.
RTDMD_EVALUATION = {
    "model": "stabilityai/stable-diffusion-3.5-medium",  # configs/inference/sd35m.yaml:1 pretrained_path
    "dtype": "bfloat16",  # sd35m.yaml:3 dtype "bf16"
    "resolution": 1024,  # sd35m.yaml:4 image_resolution 1024
    "lora_alpha": 64.0,  # sd35m.yaml:12 lora_alpha 64
    "scheduler": "cps",  # sd35m.yaml:6 mode "distilled": rtdmd/inference.py:509-514, the CPS scheduler
    "eta": 0.9,  # sd35m.yaml:16 cps_eta 0.9
    "guidance_scale": 1.0,  # sd35m.yaml:18 guidance_scale 1.0
    "max_sequence_length": 128,  # rtdmd/models/sd35.py:259 encode_prompt_t5(max_length=128), called at line 322
}
RTDMD_STEPS = [1000, 750, 500, 250]  # sd35m.yaml:15 denoising_step_list
SD35_SHIFT = 3.0  # SD3.5 Medium's scheduler config; rtdmd/models/sd35.py:145 has the same default


def rtdmd_sigmas(steps, num_train_timesteps=1000, shift=SD35_SHIFT):
    """rtdmd/models/sd35.py:161-166, compute_sigmas_sd35, called by rtdmd/inference.py:596."""
    sigmas = []
    for step in steps:
        raw = step / num_train_timesteps
        sigmas.append(round(shift * raw / (1 + (shift - 1) * raw), 6))
    return sigmas


def test_rtdmd_protocol_is_rtdmds_inference_config():
    settings = generation.PROTOCOLS["rtdmd"]
    assert {key: settings[key] for key in RTDMD_EVALUATION} == RTDMD_EVALUATION
    assert list(settings["sigmas"]) == rtdmd_sigmas(RTDMD_STEPS)
    assert set(settings) == {*RTDMD_EVALUATION, "sigmas"}


def test_protocol_choices_are_defined_once():
    for config_class in (generate.GenerateConfig, anneal.AnnealConfig, metrics.MetricsConfig):
        assert issubclass(config_class, generation.ProtocolOption)
    assert generation.ProtocolOption.__dataclass_fields__["protocol"].type.__args__ == ("none", *generation.PROTOCOLS)


# ---- the same images as the flags it stands for, and the flags beside it ---------------------------


def run_generate(args, capsys):
    cfg = utils.cli_with_presets(generate.GenerateConfig, generate.PRESETS, "", args=args,
                                 protocols=generation.PROTOCOLS)
    generate.main(cfg)
    return capsys.readouterr().out


def grid_pixels(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.tensor(list(image.convert("RGB").getdata()))


@pytest.mark.parametrize("protocol, flags", [
    ("rtdmd", ["--sampler", "cps", "--eta", "0.9", "--sigmas", "1.0", "0.9", "0.75", "0.5", "--guidance-scale", "1",
               "--max-sequence-length", "128"]),
    ("fdfo", ["--inference-steps", "40", "--guidance-scale", "1", "--max-sequence-length", "256"]),
])
def test_a_protocol_draws_the_images_of_its_flags_and_names_what_overrides_it(tiny_sd3, tmp_path, capsys, protocol,
                                                                              flags):
    common = ["--model", tiny_sd3, "--prompt", *PROMPTS, "--num-images", "1", *TINY]
    out = run_generate([*common, "--protocol", protocol, "--out", str(tmp_path / "protocol.png")], capsys)
    run_generate([*common, *flags, "--out", str(tmp_path / "flags.png")], capsys)
    assert torch.equal(grid_pixels(tmp_path / "protocol.png"), grid_pixels(tmp_path / "flags.png"))
    lines = out.splitlines()
    assert lines[0] == f"--protocol {protocol}: {generation.protocol_settings(protocol)}"
    assert lines[1:4] == [
        f"note: --model {tiny_sd3} given, over --protocol {protocol}'s stabilityai/stable-diffusion-3.5-medium",
        f"note: --resolution 32 given, over --protocol {protocol}'s {generation.PROTOCOLS[protocol]['resolution']}",
        f"note: --dtype float32 given, over --protocol {protocol}'s bfloat16"]


# ---- what cannot go with a protocol ---------------------------------------------------------------


def expect_usage_error(main, config_class, presets, args, capsys) -> str:
    cfg = utils.cli_with_presets(config_class, presets, "", args=args, protocols=generation.PROTOCOLS)
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_a_flag_that_contradicts_the_protocol_is_refused_naming_it(tiny_sd3, tmp_path, capsys):
    out = tmp_path / "g.png"
    line = expect_usage_error(generate.main, generate.GenerateConfig, generate.PRESETS,
                              ["--model", tiny_sd3, "--protocol", "rtdmd", "--sampler", "pipeline", *TINY,
                               "--out", str(out)], capsys)
    assert "--sigmas sets the schedule of --sampler cps" in line and "--protocol rtdmd sets" in line, line
    line = expect_usage_error(generate.main, generate.GenerateConfig, generate.PRESETS,
                              ["--protocol", "rtdmd", "--preset", "demo", "--out", str(out)], capsys)
    assert line == "error: --protocol rtdmd and --preset demo both set the sampler; give one"
    assert not out.exists()


def test_metrics_of_existing_images_refuse_a_protocol(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "img_00000_000.png")
    (folder / "prompt_00000.txt").write_text("a dog\n")
    out = tmp_path / "out" / "m.json"
    line = expect_usage_error(metrics.main, metrics.MetricsConfig, metrics.PRESETS,
                              ["--images", str(folder), "--protocol", "fdfo", "--metrics", "gold_diversity",
                               "--out", str(out), "--device", "cpu"], capsys)
    assert "--images scores existing images, so --protocol fdfo" in line, line
    assert not out.parent.exists()


def test_a_checkpoint_of_another_base_model_is_refused_with_the_protocols_model(tiny_sd3, tmp_path, capsys):
    checkpoint = tmp_path / "step-0000010"
    checkpoint.mkdir()
    utils.save_json(str(checkpoint / "config.json"), {"model": tiny_sd3})  # as training records its base model
    out = tmp_path / "g.png"
    line = expect_usage_error(generate.main, generate.GenerateConfig, generate.PRESETS,
                              ["--protocol", "fdfo", "--checkpoint", str(checkpoint), *TINY, "--out", str(out)], capsys)
    assert line == (f"error: checkpoint {str(checkpoint)!r} was trained from {tiny_sd3!r}, not --protocol fdfo's "
                    f"'stabilityai/stable-diffusion-3.5-medium'; give --model {tiny_sd3} to sample it with the "
                    "protocol's other settings")
    assert not out.exists()
