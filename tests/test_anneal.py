"""anneal.py on tiny models: the weighings, the annealed images against the stock diffusers pipeline,
the output folder of a real run, 1 vs 2 processes, and bad input."""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import tyro
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

import anneal
import demo_world
import evaluation
import generation
import models
import plots
import sampling
import tiny_rewards
import utils
from conftest import ROOT

PROMPTS = ["a red circle", "a blue square"]
RES = 32
STEPS = 4
CPU = torch.device("cpu")
RUN_FLAGS = ["--prompt", *PROMPTS, "--num-images", "2", "--inference-steps", str(STEPS), "--guidance-scale", "3.0",
             "--resolution", str(RES), "--batch-size", "3", "--weighing", "base,draft", "linear"]


def write_lora_checkpoint(folder: str, base_model: str, perturb: float = 0.1) -> str:
    """A checkpoint as train.py writes it: the LoRA weights and config.json naming the base model."""
    model = models.load_model(base_model, CPU)
    torch.manual_seed(0)  # the A matrices: from the global generator, whose state depends on the tests run before
    models.attach_lora(model, rank=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "lora_B" in name:  # a fresh LoRA has B = 0, so tuned would equal base
                param.copy_(torch.randn(param.shape, generator=generator) * perturb)
    os.makedirs(folder, exist_ok=True)
    models.save_tuned(model, folder)
    utils.save_json(os.path.join(folder, "config.json"), {"model": base_model})
    return folder


def write_other_base_model(folder: str, tiny_sd: str, **unet_changes) -> str:
    """The tiny pipeline with a UNet of another architecture: a base model our checkpoint cannot fit."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel(**{**config, **unet_changes})
    pipe.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_sd, tmp_path_factory):
    return write_lora_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tiny_sd)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_rewards.make_tiny_clip(str(tmp_path_factory.mktemp("clip")))


def run_script(script, args, world_size=1):
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    return subprocess.run(launcher + [script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # as torchrun sets it, for the same reason


def run_main_in_process(args):
    """anneal.py's main exactly as the command line calls it, minus the interpreter start."""
    with pytest.raises(SystemExit) as exit_info:
        anneal.main(tyro.cli(anneal.AnnealConfig, args=args))
    return exit_info.value.code


# ---------------------------------------------------------------------------------------------
# Weighings


@pytest.mark.parametrize(
    "name, expected",
    [
        ("base", {0: 0.0, 5: 0.0, 9: 0.0}),
        ("draft", {0: 1.0, 5: 1.0, 9: 1.0}),
        ("linear", {0: 0.0, 5: 0.5, 9: 0.9}),
        ("power_2", {0: 0.0, 5: 0.25, 9: 0.81}),
        ("power_0.5", {0: 0.0, 4: math.sqrt(0.4), 9: math.sqrt(0.9)}),
        ("step_0.6", {0: 0.0, 5: 0.0, 6: 1.0, 9: 1.0}),
        ("step_0", {0: 1.0, 9: 1.0}),
        ("step_1", {0: 0.0, 9: 0.0}),
    ],
)
def test_weighing_values_at_chosen_steps(name, expected):
    weighing = sampling.parse_weighing(name)
    for i, w in expected.items():
        assert weighing(i, 10) == pytest.approx(w, abs=1e-12), (name, i)


@pytest.mark.parametrize("bad", ["power_x", "step_", "step_1.5", "linear2", "", "power_0", "power_-1", "draft_0.5"])
def test_bad_weighings_are_rejected_with_the_valid_forms(bad):
    with pytest.raises(ValueError, match=r"invalid weighing .*use base, draft, linear, power_P .* step_F"):
        sampling.parse_weighing(bad)


def test_weighing_lists_accept_spaces_and_commas_and_reject_nothing():
    assert sampling.split_weighings(["base,draft", "linear", " power_2 , step_0.6"]) == [
        "base", "draft", "linear", "power_2", "step_0.6"]
    for empty in ([], [""], [" , "]):
        with pytest.raises(ValueError, match="no weighing given"):
            sampling.split_weighings(empty)


# ---------------------------------------------------------------------------------------------
# Annealed images


def stock_pipeline_images(tiny_sd, lora_checkpoint=None):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora_checkpoint:
        pipe.load_lora_weights(lora_checkpoint)
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, height=RES, width=RES,
                generator=utils.generators([11, 12]), output_type="pt").images


def test_draft_and_base_reproduce_their_models_and_linear_lies_between(tiny_sd, checkpoint):
    model, _ = generation.load_for_inference(generation.InferenceOptions(resolution=RES, dtype="float32"),
                                             (checkpoint,), CPU)
    settings = generation.SamplerSettings(RES, STEPS, 3.0)

    def render(model, weighing):
        with torch.no_grad():
            return generation.generate(model, PROMPTS, [11, 12], settings, weighing=weighing)[0]

    images = {w: render(model, w) for w in ("base", "draft", "linear")}
    base_model = models.load_model(tiny_sd, CPU)  # no checkpoint at all: the base model's own sampler output
    assert torch.equal(images["base"], render(base_model, "base"))
    assert (images["base"] - stock_pipeline_images(tiny_sd)).abs().max() <= 1e-5
    assert (images["draft"] - stock_pipeline_images(tiny_sd, checkpoint)).abs().max() <= 1e-5

    def distance(a, b):
        return (images[a] - images[b]).norm().item()

    assert distance("base", "draft") > 0.1
    assert 0.01 * distance("base", "draft") < distance("linear", "base") < distance("base", "draft")
    assert 0.01 * distance("base", "draft") < distance("linear", "draft") < distance("base", "draft")


def test_diversity_is_the_mean_pairwise_rms_pixel_difference():
    black, white, grey = (Image.new("RGB", (32, 32), colour) for colour in ("black", "white", (51, 51, 51)))
    assert anneal.diversity([black, black]) == 0.0
    assert anneal.diversity([black, white]) == pytest.approx(1.0)
    assert anneal.diversity([black, white, grey]) == pytest.approx((1.0 + 0.2 + 0.8) / 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Other base models


@pytest.mark.parametrize(
    "kind, unet_changes, expected",
    [
        ("lora", {"block_out_channels": (8, 16)}, "size mismatch"),
        ("lora", {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                  "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}, "LoRA weights have no layer here"),
        ("full", {"block_out_channels": (8, 16)}, "its UNet differs in block_out_channels"),
    ],
)
def test_checkpoint_of_another_base_model_is_refused_in_one_line(tiny_sd, tmp_path, capfd, kind, unet_changes,
                                                                 expected):
    other = write_other_base_model(str(tmp_path / "other"), tiny_sd, **unet_changes)
    folder = str(tmp_path / "ckpt")
    if kind == "lora":
        write_lora_checkpoint(folder, other)
    else:
        UNet2DConditionModel.from_pretrained(other, subfolder="unet").save_pretrained(os.path.join(folder, "unet"))
        utils.save_json(os.path.join(folder, "config.json"), {"model": other})
    model = models.load_model(tiny_sd, CPU)
    capfd.readouterr()
    pattern = re.escape(f"trained from '{other}') does not fit model '{tiny_sd}': ") + f".*{expected}"
    with pytest.raises(utils.UsageError, match=pattern):
        models.load_checkpoint_for_inference(model, folder)
    assert capfd.readouterr().err == ""  # diffusers' own multi-line report is silenced


# ---------------------------------------------------------------------------------------------
# A real run


@pytest.fixture(scope="module")
def single_run(checkpoint, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("anneal") / "out"
    args = ["--checkpoint", checkpoint, "--score", "pickscore", "--reward-source", f"pickscore={tiny_clip}",
            "--out", str(out), *RUN_FLAGS]
    result = run_script("anneal.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, args, result


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def test_output_layout_scores_and_tradeoff(single_run):
    out, _, result = single_run
    weighings = ["base", "draft", "linear"]
    expected = [f"{w}/img_{p:05d}_{r:03d}.png" for w in weighings for p in range(2) for r in range(2)]
    expected += [f"{w}/prompt_{p:05d}.txt" for w in weighings for p in range(2)]
    expected += ["grids/grid_00000.png", "grids/grid_00001.png", "scores.jsonl", "tradeoff.json", "tradeoff.md",
                 "tradeoff_pickscore.png"]
    assert files_under(out) == sorted(expected)
    assert (out / "linear" / "prompt_00001.txt").read_text() == PROMPTS[1] + "\n"
    assert Image.open(out / "base" / "img_00000_000.png").size == (RES, RES)

    def pixels(weighing, p=0, r=0):
        return torch.tensor(list(Image.open(out / weighing / f"img_{p:05d}_{r:03d}.png").getdata()), dtype=torch.float)

    assert not torch.equal(pixels("base"), pixels("draft"))  # the checkpoint matters
    assert not torch.equal(pixels("draft", r=0), pixels("draft", r=1))  # repeats get their own noise

    grid = Image.open(out / "grids" / "grid_00000.png")
    cell = grid.width // 3
    assert grid.width == 3 * cell and grid.height > 2 * cell  # three weighings across, two repeats down

    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {rec["weighing"] for rec in records} == set(weighings)
    summary = json.loads((out / "tradeoff.json").read_text())
    assert [row["weighing"] for row in summary["weighings"]] == weighings
    for row in summary["weighings"]:
        mine = [rec["pickscore"] for rec in records if rec["weighing"] == row["weighing"]]
        assert row["pickscore"] == pytest.approx(sum(mine) / len(mine))
        assert 0 < row["diversity"] < 1
    table = (out / "tradeoff.md").read_text().splitlines()
    assert len(table) == 2 + 3 and all(w in line for w, line in zip(weighings, table[2:]))
    assert table[0] in result.stdout
    assert Image.open(out / "tradeoff_pickscore.png").size == (720, 520)
    # stderr holds the progress bar and nothing else (no library warnings or loading bars)
    assert all(part.startswith("anneal:") for part in result.stderr.replace("\r", "\n").split("\n") if part.strip())


@pytest.mark.slow
def test_same_images_and_scores_from_one_and_two_processes(single_run, tmp_path):
    out, args, _ = single_run
    out2 = tmp_path / "out2"
    args = list(args)
    args[args.index("--out") + 1] = str(out2)
    result = run_script("anneal.py", args, world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(out2) == files_under(out)
    for name in files_under(out):
        if "/img_" in name:
            one = torch.tensor(list(Image.open(out / name).getdata()), dtype=torch.int16)
            two = torch.tensor(list(Image.open(out2 / name).getdata()), dtype=torch.int16)
            # the batches differ between world sizes: one rounding step at most
            assert (one - two).abs().max() <= 1, name
    for one, two in zip(*((folder / "scores.jsonl").read_text().splitlines() for folder in (out, out2))):
        one, two = json.loads(one), json.loads(two)
        assert one == {**two, "pickscore": pytest.approx(two["pickscore"], abs=1e-4)}
    rows = [json.loads((folder / "tradeoff.json").read_text())["weighings"] for folder in (out, out2)]
    for row_one, row_two in zip(*rows):
        assert row_one == pytest.approx(row_two, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written


def test_checkpoint_of_another_base_model_ends_the_script_in_one_line(checkpoint, tiny_sd, tmp_path):
    other = write_other_base_model(str(tmp_path / "other"), tiny_sd, block_out_channels=(8, 16))
    out = tmp_path / "out"
    result = run_script("anneal.py", ["--checkpoint", checkpoint, "--model", other, "--out", str(out), *RUN_FLAGS])
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: checkpoint '{checkpoint}'") and result.stderr.count("\n") == 1
    assert "does not fit model" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/missing"], "is not a folder"),
        (["--checkpoint", "{tmp}"], "does not record its base model; name it with --model"),
        (["--checkpoint", "{tmp}/weightless"], "has neither pytorch_lora_weights.safetensors nor a unet/ folder"),
        (["--checkpoint"], "--checkpoint needs at least one checkpoint"),
        (["--weighing", "power_x"], "invalid weighing 'power_x'"),
        (["--weighing", ""], "no weighing given"),
        (["--score", "pickscore", "--num-images", "1"], "--num-images 2 or more"),
        (["--score", "beauty"], "--score 'beauty'"),
        (["--score", "gold_diversity"], "--score 'gold_diversity'"),
        (["--compare", "nowhere.json"], "--compare draws other results"),
        (["--reward-source", "pickscore"], "bad --reward-source 'pickscore'"),
        (["--num-images", "0"], "--num-images must be at least 1"),
        (["--resolution", "33"], "--resolution 33 must be a multiple of 2"),
        (["--prompts", "no_such_set"], "prompt set 'no_such_set' is neither a file nor a bundled set"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(checkpoint, tiny_sd, tmp_path, capfd, args, message):
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    utils.save_json(str(weightless / "config.json"), {"model": tiny_sd})
    args = [arg.format(tmp=tmp_path) for arg in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", checkpoint, *args]
    out = tmp_path / "out"
    code = run_main_in_process(["--max-prompts", "1", "--num-images", "2", "--inference-steps", "2",
                                "--out", str(out), *args])
    err = capfd.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_unwritable_output_folder_exits_2_with_one_line(checkpoint, tmp_path, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = run_main_in_process(["--checkpoint", checkpoint, "--prompt", "a cat", "--num-images", "1",
                                "--inference-steps", "2", "--resolution", str(RES), "--out", str(blocker / "out")])
    err = capfd.readouterr().err
    assert code == 2
    assert err.startswith(f"error: cannot create folder '{blocker / 'out'}'") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["a_file"]


def test_each_rank_grids_and_measures_its_own_prompts_from_its_own_images(single_run, checkpoint, tiny_clip, tmp_path):
    """Nodes need not share a filesystem: each rank's out folder stands for one node's disk, and
    together the two reproduce the one-process figures."""
    out, args, _ = single_run
    cfg = tyro.cli(anneal.AnnealConfig, args=args)
    model, cfg = generation.load_for_inference(cfg, cfg.checkpoint, CPU)
    scorers = evaluation.load_metrics(["pickscore"], evaluation.MetricSetup(CPU, {"pickscore": tiny_clip}, ""),
                                      utils.Dist(0, 1, 0, CPU))
    weighings, all_prompts = anneal.weighing_names(cfg), anneal.chosen_prompts(cfg)
    records, diversities = [], {}
    for rank in (0, 1):
        node = replace(cfg, out=str(tmp_path / f"node{rank}"))
        mine, measured = anneal.render_and_score_share(node, model, scorers, weighings, all_prompts,
                                                       utils.Dist(rank, 2, rank, CPU))
        records += mine
        diversities.update(measured)
        prompts_here = {rec["prompt_index"] for rec in mine}
        assert files_under(tmp_path / f"node{rank}" / "grids") == [f"grid_{p:05d}.png" for p in sorted(prompts_here)]
    assert len(records) == 12 and len(diversities) == len(weighings) * len(all_prompts)
    rows = anneal.summarize(cfg, weighings, records, diversities, len(all_prompts))
    expected = json.loads((out / "tradeoff.json").read_text())["weighings"]
    for row, reference in zip(rows, expected):
        assert row == pytest.approx(reference, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The demo world


def test_demo_preset_scores_as_metrics_does_and_overlays_compared_results(tmp_path):
    """anneal.py --preset demo end to end: its scores and diversity are metrics.py's on the same images,
    and --compare draws a metrics.py JSON's points on the trade-off plots."""
    checkpoint = write_lora_checkpoint(str(tmp_path / "ckpt"), demo_world.DEMO_SD, perturb=0.3)
    small = ["--checkpoint", checkpoint, "--max-prompts", "2", "--num-images", "2", "--inference-steps", "4",
             "--weighing", "base", "draft", "step_0.5"]
    out = tmp_path / "anneal"
    result = run_script("anneal.py", ["--preset", "demo", *small, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "tradeoff.json").read_text())
    assert summary["seed"] == 1000 and summary["guidance_scale"] == 5.0  # metrics.py --preset demo's noise and CFG
    result = run_script("metrics.py", ["--preset", "demo", "--images", str(out), "--out", str(tmp_path / "m.json")])
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((tmp_path / "m.json").read_text())["results"]
    names = ("aesthetic", "gold_aesthetic", "gold_fidelity", "gold_shape")
    for row in summary["weighings"]:
        theirs = measured[row["weighing"]]["metrics"]
        for name in names:  # the mean over images equals the mean over prompts: each prompt has 2 images
            assert row[name] == pytest.approx(theirs[name]["mean"], abs=1e-5), name
        assert row["diversity"] == pytest.approx(theirs["gold_diversity"]["mean"], abs=1e-6)
    assert summary["weighings"][0]["diversity"] != summary["weighings"][1]["diversity"]  # the LoRA changes images

    alone = Image.open(out / "tradeoff_gold_aesthetic.png")
    compared = tmp_path / "compared"
    result = run_script("anneal.py", ["--preset", "demo", *small, "--out", str(compared),
                                      "--compare", str(tmp_path / "m.json")])
    assert result.returncode == 0, result.stderr[-3000:]
    overlay = Image.open(compared / "tradeoff_gold_aesthetic.png")
    assert overlay.size == alone.size
    # the same points of this run, plus the compared ones in the second colour, and a legend naming them
    second_colour = plots.COLOURS[1]
    assert second_colour not in {colour for _, colour in alone.getcolors(1 << 16)}
    assert second_colour in {colour for _, colour in overlay.getcolors(1 << 16)}


def test_compare_refuses_results_without_the_plotted_metrics(checkpoint, tmp_path, capfd):
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"results": {"draft": {"metrics": {"pickscore": {"mean": 1.0}}}}}))
    code = run_main_in_process(["--checkpoint", checkpoint, "--score", "pickscore", "--compare", str(foreign),
                                "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 2 and "has no gold_diversity" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
