"""The demo world: the gold evaluator on rendered scenes, the committed models through the project's
loaders, and DRaFT+ end to end on them (train.py then metrics.py, as a user runs them)."""

import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

import demo_world
import evaluation
import generation
import metrics
import models
import prompts
import rewards
import train
import training
import utils
from conftest import ROOT
from utils import UsageError

DEMO = os.path.join(ROOT, "demo")
SD = os.path.join(DEMO, "sd")
CLIP = os.path.join(DEMO, "clip")
SIZE_LIMIT_MB = 30

# Short runs of the README's demo preset, and the metrics preset with 3 images per prompt.
TRAIN_STEPS = 16
EVAL_FLAGS = ["--preset", "demo", "--num-repeats", "3", "--batch-size", "18"]


def rendered(captions: list[demo_world.Caption], seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    return demo_world.to_tensor([demo_world.render(demo_world.scene_for(caption, rng)) for caption in captions])


def random_captions(count: int, seed: int = 0, mention_probability: float = 0.5) -> list[demo_world.Caption]:
    rng = random.Random(seed)
    return [demo_world.random_caption(rng, mention_probability) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Grammar, renderer and gold evaluator


def test_captions_round_trip_and_other_text_is_refused():
    for caption in random_captions(200):
        assert demo_world.parse_caption(caption.text()) == caption
    assert demo_world.parse_caption("A  Red circle on a BLUE background") == demo_world.Caption("red", "circle", "blue")
    for text in ("a purple circle on a blue background", "a red circle", "an astronaut riding a horse"):
        with pytest.raises(ValueError, match="not a demo-world caption"):
            demo_world.parse_caption(text)


def test_scenes_follow_their_captions():
    for caption in random_captions(300, seed=1, mention_probability=1.0):
        scene = demo_world.scene_for(caption, random.Random(0))
        assert demo_world.SIZE_RADII[caption.size][0] <= scene.radius <= demo_world.SIZE_RADII[caption.size][1]
        x, y = scene.centre
        assert scene.radius < min(x, y) and max(x, y) < demo_world.IMAGE_SIZE - scene.radius
        if caption.position == "at the left":
            assert x < demo_world.IMAGE_SIZE / 2 - 1
        if caption.position == "at the bottom":
            assert y > demo_world.IMAGE_SIZE / 2 + 1


def test_gold_fidelity_and_shape_of_rendered_scenes_are_right_and_wrong_colours_score_zero():
    captions = random_captions(300, seed=2)
    images = rendered(captions)
    texts = [caption.text() for caption in captions]
    assert demo_world.gold_fidelity(images, texts).mean().item() == 1.0
    assert demo_world.gold_shape(images, texts).mean().item() >= 0.97
    wrong_shape_colour = [replace(c, colour=next(x for x in demo_world.COLOURS if x not in (c.colour, c.background)))
                          for c in captions]
    swapped = [replace(c, colour=c.background, background=c.colour) for c in captions]
    for wrong in (wrong_shape_colour, swapped):
        assert demo_world.gold_fidelity(images, [caption.text() for caption in wrong]).sum().item() == 0


def test_each_shape_is_recognised_and_an_empty_image_has_no_shape():
    for shape in demo_world.SHAPES:
        captions = [replace(c, shape=shape) for c in random_captions(60, seed=3)]
        assert demo_world.gold_shape(rendered(captions), [c.text() for c in captions]).mean() >= 0.95, shape
    blank = torch.tensor(demo_world.COLOURS["blue"]).view(1, 3, 1, 1).expand(1, 3, 32, 32) / 255
    prompt = ["a red circle on a blue background"]
    assert demo_world.gold_fidelity(blank, prompt).item() == 0
    assert demo_world.gold_shape(blank, prompt).item() == 0
    assert demo_world.gold_aesthetic(blank).item() == 0


def test_gold_aesthetic_prefers_large_centred_high_contrast_shapes():
    def score(colour, background, radius, centre):
        scene = demo_world.Scene(demo_world.Caption(colour, "square", background), radius, centre)
        return demo_world.gold_aesthetic(demo_world.to_tensor([demo_world.render(scene)])).item()

    best = score("white", "black", 10, (15.5, 15.5))
    assert best > 0.75  # white on black: contrast 0.84
    assert score("white", "black", 4, (15.5, 15.5)) < 0.6 * best  # smaller
    assert score("white", "black", 10, (11, 11)) < 0.8 * best  # off centre
    assert score("yellow", "white", 10, (15.5, 15.5)) < 0.6 * best  # low contrast


def test_prompt_sets_are_base_captions_and_the_eval_set_is_held_out():
    train, held_out = prompts.load_prompts("demo"), prompts.load_prompts("demo_eval")
    base = {caption.text() for caption in demo_world.base_captions()}
    assert set(train) | set(held_out) == base and not set(train) & set(held_out)
    assert len(held_out) == 18


def test_gold_metrics_are_registered_and_refuse_prompts_outside_the_grammar():
    setup = evaluation.MetricSetup(torch.device("cpu"), {}, "")
    images = rendered(random_captions(2, seed=4))
    fidelity = evaluation.METRICS["gold_fidelity"].load(setup)
    with pytest.raises(UsageError, match="demo-world prompts"):
        fidelity(images, ["a lighthouse at sunset", "a red circle"])
    pixels = evaluation.METRICS["gold_diversity"].load(setup)(images, ["", ""])
    diversity = evaluation.METRICS["gold_diversity"].per_prompt
    assert diversity(torch.stack([pixels[0], pixels[0]])) == 0
    rms = (images[0] - images[1]).pow(2).mean().sqrt().item()
    assert diversity(pixels) == pytest.approx(rms, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The committed models


def test_committed_weights_fit_the_size_limit_and_are_safetensors():
    files = [os.path.join(folder, name) for folder, _, names in os.walk(DEMO) for name in names]
    assert sum(os.path.getsize(path) for path in files) <= SIZE_LIMIT_MB * 2**20
    weights = [path for path in files if path.endswith((".bin", ".pt", ".pth", ".safetensors"))]
    unsafe = [path for path in weights if not path.endswith(".safetensors")]
    assert [os.path.basename(path) for path in unsafe] == ["sac+logos+ava1-l14-linearMSE.pth"]  # LAION's format


@pytest.mark.parametrize("folder", [os.path.join(SD, "tokenizer"), CLIP])
def test_tokenizers_hold_one_token_per_grammar_word(folder):
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    for word in demo_world.vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word


def test_stock_pipeline_loads_the_committed_folder():
    pipe = StableDiffusionPipeline.from_pretrained(SD, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=5, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32)


def test_base_samples_reach_the_fidelity_bar():
    model = models.load_model(SD, torch.device("cpu"))
    captions = [caption.text() for caption in demo_world.base_captions()][::3]
    settings = generation.SamplerSettings(32, 20, 5.0)
    seeds = [utils.derive_seed(7, i) for i in range(len(captions))]
    with torch.no_grad():
        images, _ = generation.generate(model, captions, seeds, settings)
    assert demo_world.gold_fidelity(images, captions).mean().item() >= 0.95


def test_committed_clip_retrieves_captions_and_aesthetic_head_tracks_gold():
    score = rewards.load_reward("pickscore", sources={"pickscore": CLIP})
    captions = [caption.text() for caption in random_captions(16, seed=5, mention_probability=1.0)]
    images = rendered([demo_world.parse_caption(text) for text in captions], seed=5)
    with torch.no_grad():
        matrix = score(images.repeat_interleave(16, dim=0), captions * 16).view(16, 16)
    assert (matrix.argmax(dim=1) == torch.arange(16)).float().mean() >= 0.75

    aesthetic = rewards.load_reward("aesthetic", sources={"aesthetic": CLIP})
    images = rendered(random_captions(200, seed=6), seed=6)
    with torch.no_grad():
        learned = aesthetic(images, [""] * 200)
    gold = demo_world.gold_aesthetic(images)
    assert torch.corrcoef(torch.stack([learned, gold]))[0, 1] > 0.8


# ---------------------------------------------------------------------------------------------
# DRaFT+ end to end: train.py, then metrics.py on held-out prompts and seeds


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_demo(run_dir, kl_coeff: float) -> str:
    run_script(["train.py", "--preset", "demo", "--kl-coeff", str(kl_coeff), "--log-kl", "--steps", str(TRAIN_STEPS),
                "--save-every", str(TRAIN_STEPS), "--val-every", str(TRAIN_STEPS), "--run-dir", str(run_dir)])
    return str(run_dir)


def evaluate(run_dir: str, out) -> dict:
    checkpoint = utils.latest_checkpoint(run_dir)
    run_script(["metrics.py", "--checkpoint", checkpoint, "--weighing", "base", "draft",
                "--metrics", "aesthetic", "gold_aesthetic", "gold_fidelity", "gold_diversity", *EVAL_FLAGS,
                "--out", str(out)])
    with open(out) as f:
        results = json.load(f)["results"]
    return {name: {metric: value["mean"] for metric, value in result["metrics"].items()}
            for name, result in results.items()}


def final_kl(run_dir: str, last: int = 5) -> float:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return sum(record["kl"] for record in records[-last:]) / last  # the last ones are training steps


def test_the_demo_preset_sets_defaults_that_flags_override_and_no_preset_keeps_real_use_defaults():
    demo = utils.cli_with_presets(training.TrainConfig, train.PRESETS, "", args=["--preset", "demo", "--kl-coeff", "1"])
    assert (demo.model, demo.reward, demo.prompts, demo.resolution) == (SD, "aesthetic", "demo", 32)
    assert demo.reward_source == [f"aesthetic={CLIP}"] and demo.kl_coeff == 1.0
    assert utils.cli_with_presets(training.TrainConfig, train.PRESETS, "", args=[]) == training.TrainConfig()
    evaluation = utils.cli_with_presets(metrics.MetricsConfig, metrics.PRESETS, "", args=["--preset", "demo"])
    assert evaluation.prompt_set == "demo_eval" and "gold_fidelity" in evaluation.metrics


@pytest.fixture(scope="module")
def free_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_kl0")
    run_dir = train_demo(folder / "run", kl_coeff=0.0)
    return run_dir, evaluate(run_dir, folder / "metrics.json")


@pytest.mark.slow
def test_training_raises_learned_and_gold_aesthetic_on_held_out_prompts_and_seeds(free_run):
    run_dir, scores = free_run
    assert os.path.isfile(os.path.join(run_dir, "val", f"step-{TRAIN_STEPS:07d}.png"))
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[0].keys() == {"step", "val/gold_aesthetic", "val/gold_fidelity", "val/gold_shape",
                                 "val/gold_diversity"} and records[0]["step"] == 0  # the base model, before step 1
    rewards_logged = [record["reward_mean"] for record in records[1:]]
    assert sum(rewards_logged[-4:]) > sum(rewards_logged[:4])
    # the gold aesthetic the reward stands for rose on held-out prompts, as measured while training
    assert records[-1]["val/gold_aesthetic"] > records[0]["val/gold_aesthetic"]
    base, tuned = scores["base"], scores["draft"]
    # The head predicts 10 x gold: the base scores about 3.4 on these prompts and seeds.
    assert tuned["aesthetic"] > base["aesthetic"] + 0.5, (base, tuned)
    assert tuned["gold_aesthetic"] > base["gold_aesthetic"] + 0.04, (base, tuned)


@pytest.mark.slow
def test_a_large_kl_coeff_keeps_the_model_near_the_base(free_run, tmp_path):
    free_dir, free_scores = free_run
    held_dir = train_demo(tmp_path / "run", kl_coeff=10.0)
    held_scores = evaluate(held_dir, tmp_path / "metrics.json")
    assert final_kl(held_dir) < 0.5 * final_kl(free_dir)
    base_diversity = free_scores["base"]["gold_diversity"]
    assert held_scores["base"]["gold_diversity"] == pytest.approx(base_diversity)
    free_gap = abs(free_scores["draft"]["gold_diversity"] - base_diversity)
    held_gap = abs(held_scores["draft"]["gold_diversity"] - base_diversity)
    assert held_gap < free_gap, (base_diversity, free_scores["draft"], held_scores["draft"])
