"""generate.py on tiny models: a side-by-side grid from a real run against the base and tuned models
rendered here, the base model alone, and bad input."""

import os

import pytest
import torch
import tyro
from PIL import Image

import generate
import generation
import models
import utils
from test_anneal import (  # noqa: F401  (fixtures are used by name)
    CPU, PROMPTS, RES, STEPS, checkpoint, files_under, run_script, write_lora_checkpoint, write_other_base_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--prompt", *PROMPTS, "--num-images", "2", "--inference-steps", str(STEPS), "--guidance-scale", "3.0",
         "--resolution", str(RES), "--batch-size", "3"]


def run_main_in_process(args):
    generate.main(tyro.cli(generate.GenerateConfig, args=args))


def pixels(image):
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.int16)


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_side_by_side_grid_shows_the_base_and_the_tuned_model_on_the_same_noise(checkpoint, tiny_sd, tmp_path,
                                                                                world_size):
    out = tmp_path / "new_folder" / "grid.png"
    args = ["--checkpoint", checkpoint, "--side-by-side", "--out", str(out), *FLAGS]
    result = run_script("generate.py", args, world_size=world_size)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(tmp_path) == ["new_folder/grid.png"]
    assert "wrote" in result.stdout
    assert all(part.startswith("generate:") for part in result.stderr.replace("\r", "\n").split("\n") if part.strip())

    cfg = generate.GenerateConfig(checkpoint=(checkpoint,), inference_steps=STEPS, guidance_scale=3.0, resolution=RES,
                                  num_images=2)
    tuned_model, _ = generation.load_for_inference(generation.InferenceOptions(resolution=RES, dtype="float32"),
                                                   (checkpoint,), CPU)
    settings = generation.SamplerSettings(RES, STEPS, 3.0)
    base_model = models.load_model(tiny_sd, CPU)  # no checkpoint at all
    expected = {}
    for p, prompt in enumerate(PROMPTS):
        seeds = [utils.derive_seed(0, p, r) for r in range(2)]
        for weighing, model in (("base", base_model), ("draft", tuned_model)):
            with torch.no_grad():
                images, _ = generation.generate(model, [prompt] * 2, seeds, settings, weighing=weighing)
            for r, image in enumerate(utils.to_pil(images)):
                expected[p, r, weighing] = image
    grid = Image.open(out)
    reference = generate.assemble_grid(cfg, expected, ["base", "draft"], PROMPTS)
    assert grid.size == reference.size and grid.width % 4 == 0  # 2 seeds x (base, draft) across
    assert (pixels(grid) - pixels(reference)).abs().max() <= 1  # other batches here: one rounding step at most
    assert not torch.equal(pixels(expected[0, 0, "base"]), pixels(expected[0, 0, "draft"]))


def test_without_checkpoint_draws_the_base_model(tiny_sd, tmp_path):
    out = tmp_path / "grid.jpg"
    run_main_in_process(["--model", tiny_sd, "--out", str(out), *FLAGS])
    grid = Image.open(out)
    assert grid.format == "JPEG"
    cell = grid.width // 2
    assert grid.width == 2 * cell and grid.height > 2 * cell  # two seeds across, two prompts down


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/missing"], "is not a folder"),
        (["--checkpoint", "{other_checkpoint}", "--model", "{tiny_sd}"], "does not fit model"),
        (["--out", "{tmp}/a_file/grid.png"], "cannot create folder"),
        (["--out", "{tmp}/grid.gif"], "must end in one of .png, .jpg, .jpeg, .webp"),
        (["--checkpoint", "{checkpoint}", "--side-by-side", "--weighing", "linear"],
         "give --side-by-side or --weighing, not both"),
        (["--weighing", "draft"], "--weighing draft needs a tuned model: give --checkpoint"),
        (["--side-by-side"], "--side-by-side needs a tuned model: give --checkpoint"),
        (["--checkpoint", "{checkpoint}", "--weighing", "step_1.5"], "invalid weighing 'step_1.5'"),
        (["--max-prompts", "0"], "--max-prompts must be at least 1"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(checkpoint, tiny_sd, tmp_path, capfd, args, message):
    other_checkpoint = None
    if "{other_checkpoint}" in args:
        other = write_other_base_model(str(tmp_path / "other"), tiny_sd, block_out_channels=(8, 16))
        other_checkpoint = write_lora_checkpoint(str(tmp_path / "other_checkpoint"), other)
    (tmp_path / "a_file").write_text("not a folder")
    before = files_under(tmp_path)
    places = dict(tmp=tmp_path, tiny_sd=tiny_sd, checkpoint=checkpoint, other_checkpoint=other_checkpoint)
    args = [arg.format(**places) for arg in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out" / "grid.png")]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main_in_process(["--model", tiny_sd, *FLAGS, *args])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert files_under(tmp_path) == before
    assert not os.path.exists(tmp_path / "out")


def test_long_captions_wrap_under_their_own_image():
    image = Image.new("RGB", (160, 160), "gray")
    long_prompt = "a large red circle in the center on a blue background"
    short = utils.image_grid([[image, image]], [["a", "b"]])
    wrapped = utils.image_grid([[image, image]], [[long_prompt, "b"]])
    assert wrapped.size[0] == short.size[0] and wrapped.size[1] > short.size[1]
    # The second column's caption strip holds its own "b" alone, as with a short neighbour.
    strip = (165, 160, 320, 176)
    assert wrapped.crop(strip).tobytes() == short.crop(strip).tobytes()
