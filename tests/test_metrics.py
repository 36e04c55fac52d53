"""metrics.py on tiny models: the JSON and table of a real run, 1 vs 2 processes, the --images round trip
with anneal.py's output, every reward metric, the diversity arithmetic on real CLIP embeddings,
DreamSim loading up to its weights, and bad input."""

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import tyro
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

import anneal
import evaluation
import generation
import metrics
import rewards
import tiny_rewards
from conftest import ROOT
from test_anneal import write_lora_checkpoint

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
REPEATS = 2
SAMPLER = dict(inference_steps=4, guidance_scale=3.0, resolution=32, batch_size=3)
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: the connection is refused at once


def flags(**settings) -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def checkpoint(tiny_sd, tmp_path_factory):
    # B ~ N(0, 1): the tuned model's effect on the scores is large by construction, not by luck
    return write_lora_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tiny_sd, perturb=1.0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny checkpoints of every reward; hpsv2/hpsv21 load only in this process (see tiny_rewards)."""
    clip = tiny_rewards.make_tiny_clip(str(tmp_path_factory.mktemp("clip")))
    aesthetic = tiny_rewards.make_tiny_aesthetic(str(tmp_path_factory.mktemp("aesthetic")))
    hps_path, hps_arch = tiny_rewards.make_tiny_hps(str(tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"))
    imagereward, _ = tiny_rewards.make_tiny_imagereward(str(tmp_path_factory.mktemp("imagereward")))
    judge = tiny_rewards.make_tiny_qwen_vl(str(tmp_path_factory.mktemp("qwen_vl")))
    paths = {"pickscore": clip, "clip_l14": clip, "clip_h14": clip, "aesthetic": aesthetic,
             "hpsv2": hps_path, "hpsv21": hps_path, "imagereward": imagereward,
             **dict.fromkeys(rewards.VLM_QUESTIONS, judge)}
    return paths, hps_arch


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def run_metrics(args, world_size=1):
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    return subprocess.run(launcher + ["metrics.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def generated_args(checkpoint, sources, prompt_file):
    paths, _ = sources
    return ["--checkpoint", checkpoint, "--weighing", "base", "draft", "--metrics", "pickscore", "aesthetic",
            "--reward-source", f"pickscore={paths['pickscore']}", f"aesthetic={paths['aesthetic']}",
            "--prompt-set", prompt_file, "--num-repeats", str(REPEATS), *flags(**SAMPLER)]


@pytest.fixture(scope="module")
def smoke_run(generated_args, tmp_path_factory):
    """One process generating base and tuned images and scoring them: (JSON, stdout)."""
    out = tmp_path_factory.mktemp("smoke") / "results" / "metrics.json"
    result = run_metrics([*generated_args, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def per_prompt_values(results: dict, name: str) -> dict:
    return {(set_name, row["prompt_index"]): row[name] for set_name, result in results.items()
            for row in result["per_prompt"]}


def assert_same_values(ours: dict, reference: dict, atol: float):
    assert ours.keys() == reference.keys()
    worst = max(abs(ours[key] - reference[key]) for key in reference)
    assert worst <= atol, worst


def test_smoke_run_writes_resolved_config_per_prompt_values_and_statistics(smoke_run, tiny_sd, checkpoint):
    output, stdout = smoke_run
    config = output["config"]
    assert set(config) == {f.name for f in dataclasses.fields(metrics.MetricsConfig)}
    assert config["model"] == tiny_sd and config["checkpoint"] == [checkpoint]
    assert config["weighing"] == ["base", "draft"] and config["metrics"] == ["pickscore", "aesthetic"]
    assert (config["num_prompts"], config["resolution"], config["dtype"]) == (3, 32, "float32")
    assert list(output["results"]) == ["base", "draft"]
    conventions = output["statistics"]["conventions"]
    assert list(conventions) == ["pickscore", "aesthetic"] and {c["scale"] for c in conventions.values()} == {1.0}

    for set_name, result in output["results"].items():
        rows = result["per_prompt"]
        assert result["num_prompts"] == 3
        assert [(row["prompt_index"], row["prompt"], row["num_images"]) for row in rows] == [
            (i, prompt, REPEATS) for i, prompt in enumerate(PROMPTS)]
        for name in ("pickscore", "aesthetic"):
            values = [row[name] for row in rows]
            summary = result["metrics"][name]
            assert summary["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert summary["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
            half_width = 4.302653 * summary["std"] / math.sqrt(3)  # Student t, 2 degrees of freedom, 97.5%
            assert summary["ci95"] == pytest.approx([summary["mean"] - half_width, summary["mean"] + half_width])
            assert summary["raw"] == {key: summary[key] for key in ("mean", "std", "ci95")}  # scale 1
        row = f"| {set_name} | 3 | {result['metrics']['pickscore']['mean']:.4f} ± "
        assert row in stdout

    pickscores = per_prompt_values(output["results"], "pickscore")
    assert all(abs(pickscores["base", p] - pickscores["draft", p]) > 1e-2 for p in range(3))  # the LoRA matters


@pytest.mark.slow
def test_two_processes_give_the_same_numbers(smoke_run, generated_args, tmp_path):
    out = tmp_path / "two.json"
    result = run_metrics([*generated_args, "--out", str(out)], world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    two, (one, _) = json.loads(out.read_text()), smoke_run
    assert {**two["config"], "out": None} == {**one["config"], "out": None}
    # The ranks batch the images otherwise than one process does: float sums in another order may round a
    # few pixels to the other 8-bit value (up to ~2e-4 of score), far less than base vs draft (> 1e-2).
    for name in ("pickscore", "aesthetic"):
        assert_same_values(per_prompt_values(two["results"], name), per_prompt_values(one["results"], name), 1e-3)
    # Rank 0 shows its share (prompts 0 and 2: 8 images over both sets); rank 1 shows no bar.
    assert "8/8 [" in result.stderr and "/4 [" not in result.stderr


@pytest.fixture(scope="module")
def anneal_folder(checkpoint, prompt_file, tmp_path_factory):
    """anneal.py's output for the smoke run's checkpoint, prompts, seeds and sampler settings."""
    out = tmp_path_factory.mktemp("anneal")
    anneal.main(anneal.AnnealConfig(checkpoint=(checkpoint,), weighing=("base", "draft"), prompts=prompt_file,
                                    num_images=REPEATS, out=str(out), device="cpu", **SAMPLER))
    return out


def score_folder(folder, names, sources, out, **settings) -> dict:
    paths, hps_arch = sources
    cfg = metrics.MetricsConfig(images=str(folder), metrics=tuple(names), out=str(out), device="cpu",
                                reward_source=[f"{name}={paths[name]}" for name in names if name in paths], **settings)
    metrics.main(cfg, hps_arch=hps_arch)
    return json.loads(out.read_text())


def test_scoring_anneal_output_matches_generating_the_same_images(smoke_run, anneal_folder, sources, tmp_path):
    scored = score_folder(anneal_folder, ["pickscore", "aesthetic"], sources, tmp_path / "folder.json", batch_size=3)
    generated, _ = smoke_run
    assert list(scored["results"]) == ["base", "draft"]
    assert not set(metrics.GENERATION_FIELDS) & set(scored["config"])
    # The subprocess ran on one thread and this process on more: float sums in another order may round
    # a few pixels to the other 8-bit value, which moves a score by up to about 2e-4 here, far less than
    # another image does (the same prompt and seed under base and draft differ by more than 1e-2).
    for name in ("pickscore", "aesthetic"):
        ours, reference = per_prompt_values(scored["results"], name), per_prompt_values(generated["results"], name)
        assert_same_values(ours, reference, 1e-3)
    prompts = {(s, row["prompt_index"]): row["prompt"] for s, r in scored["results"].items() for row in r["per_prompt"]}
    assert prompts == {(s, p): PROMPTS[p] for s in ("base", "draft") for p in range(3)}


def folder_images(folder, prompt: int) -> torch.Tensor:
    paths = sorted(p for p in os.listdir(folder) if p.startswith(f"img_{prompt:05d}_"))
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / p).convert("RGB"))).permute(2, 0, 1)
                        for p in paths]).float() / 255


def test_every_reward_metric_is_that_reward_averaged_over_a_prompts_images(anneal_folder, sources, tmp_path):
    names = list(rewards.REWARD_NAMES)
    folder = anneal_folder / "draft"
    scored = score_folder(folder, names, sources, tmp_path / "all.json", batch_size=4)
    rows = scored["results"]["draft"]["per_prompt"]
    paths, hps_arch = sources
    for name in names:
        reward = rewards.load_reward(name, {name: paths[name]}, hps_arch=hps_arch)
        # the VLM judge as FDFO's evaluation scores (its processor resizing the 8-bit images), not as it trains
        score = reward.rewards[name].published_scores if name in rewards.VLM_QUESTIONS else reward
        scale = evaluation.METRICS[name].scale  # hpsv2 and hpsv21 are written as 100 x the reward
        for row in rows:
            images = folder_images(folder, row["prompt_index"])
            with torch.no_grad():
                expected = score(images, [row["prompt"]] * len(images)).double().mean().item()
            assert row[name] == pytest.approx(scale * expected, abs=1e-5 * scale), name
        assert scored["statistics"]["conventions"][name]["scale"] == scale


def test_hpsv2_is_written_as_100_times_the_cosine_of_raw_embeddings(anneal_folder, sources, tmp_path):
    # From open_clip's own model and transform, as HPSv2's scorer computes it, then the benchmark's x 100.
    paths, hps_arch = sources
    model, _, transform = open_clip.create_model_and_transforms(hps_arch, pretrained=paths["hpsv2"],
                                                                image_resize_mode="longest")
    tokenizer = open_clip.get_tokenizer(hps_arch)
    folder = anneal_folder / "base"
    scored = score_folder(folder, ["hpsv2"], sources, tmp_path / "hps.json", batch_size=3)
    result = scored["results"]["base"]
    expected = []
    for row in result["per_prompt"]:
        paths_of_prompt = sorted(folder.glob(f"img_{row['prompt_index']:05d}_*.png"))
        with torch.no_grad():
            image_embeddings = model.eval().encode_image(
                torch.stack([transform(Image.open(path)) for path in paths_of_prompt]), normalize=True)
            text_embeddings = model.encode_text(tokenizer([row["prompt"]]), normalize=True)
        expected.append(100 * (image_embeddings @ text_embeddings.T).mean().item())
    assert [row["hpsv2"] for row in result["per_prompt"]] == pytest.approx(expected, abs=1e-3)
    summary = result["metrics"]["hpsv2"]
    assert summary["mean"] == pytest.approx(statistics.mean(expected), abs=1e-3)
    assert summary["raw"]["mean"] == pytest.approx(summary["mean"] / 100, rel=1e-12)
    assert summary["raw"]["ci95"] == pytest.approx([bound / 100 for bound in summary["ci95"]], rel=1e-12)
    assert "100 x cosine" in scored["statistics"]["conventions"]["hpsv2"]["convention"]


def clip_image_embeddings(clip_folder: str, images: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings of the tiny CLIP through transformers' own model and processor."""
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPImageProcessor.from_pretrained(clip_folder)
    pixels = processor(images=[Image.fromarray(a) for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()],
                       return_tensors="pt").pixel_values
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).pooler_output


def test_diversity_is_the_mean_pairwise_cosine_distance_of_real_embeddings(anneal_folder, sources):
    embeddings = clip_image_embeddings(sources[0]["clip_l14"], torch.cat(
        [folder_images(anneal_folder / w, p) for w in ("base", "draft") for p in range(3)]))
    pairs = [(i, j) for i in range(len(embeddings)) for j in range(i + 1, len(embeddings))]
    by_pairs = sum(1 - F.cosine_similarity(embeddings[i], embeddings[j], dim=0).item() for i, j in pairs) / len(pairs)
    diversity = evaluation.mean_pairwise_cosine_distance(embeddings)
    assert diversity == pytest.approx(by_pairs, rel=1e-4)  # float32 sums in another order
    # For unit vectors ||a - b||^2 = 2 (1 - cos): the squared-distance form gives the same number.
    squared = torch.pdist(F.normalize(embeddings.double(), dim=-1)).pow(2).mean().item() / 2
    assert diversity == pytest.approx(squared, rel=1e-9)
    assert diversity > 1e-3
    assert evaluation.mean_pairwise_cosine_distance(embeddings[:1].repeat(3, 1)) == pytest.approx(0, abs=1e-12)
    assert evaluation.mean_pairwise_cosine_distance(embeddings * 7.0) == pytest.approx(diversity, rel=1e-6)


def fdfo_dreamsim_diversity(embeddings: torch.Tensor) -> float:
    """FDFO's per-prompt diversity (eval/calculate_metrics.py): the mean over pairs i < j of
    (emb_i - emb_j).square().sum() of the embeddings as the model returns them."""
    values = [(embeddings[i] - embeddings[j]).square().sum() for i in range(len(embeddings) - 1)
              for j in range(i + 1, len(embeddings))]
    return torch.stack(values).mean().item()


def unit_clip_embeddings(clip_folder: str, images: torch.Tensor) -> torch.Tensor:
    """Tiny-CLIP embeddings made unit vectors, as DreamSim's embed returns its own."""
    return F.normalize(clip_image_embeddings(clip_folder, images), dim=-1)


def test_diversity_per_prompt_then_averaged_over_prompts(anneal_folder, sources, tmp_path, monkeypatch):
    """A diversity metric on unit tiny-CLIP embeddings goes through the very path of dreamsim_diversity
    and comes out as FDFO computes it from the raw embeddings, with DreamSim's own 1 - cos kept as raw."""
    clip = sources[0]["clip_l14"]
    spec = evaluation.METRICS["dreamsim_diversity"]
    monkeypatch.setitem(evaluation.METRICS, "clip_diversity", dataclasses.replace(
        spec, load=lambda setup: lambda images, prompts: unit_clip_embeddings(clip, images.cpu())))
    scored = score_folder(anneal_folder, ["clip_diversity"], sources, tmp_path / "diversity.json", batch_size=3)
    for weighing in ("base", "draft"):
        result = scored["results"][weighing]
        embeddings = [unit_clip_embeddings(clip, folder_images(anneal_folder / weighing, p)) for p in range(3)]
        expected = [fdfo_dreamsim_diversity(e) for e in embeddings]
        assert [row["clip_diversity"] for row in result["per_prompt"]] == pytest.approx(expected, rel=1e-5)
        summary = result["metrics"]["clip_diversity"]
        assert summary["mean"] == pytest.approx(statistics.mean(expected), rel=1e-5)
        cosine_distances = [evaluation.mean_pairwise_cosine_distance(e) for e in embeddings]
        assert summary["raw"]["mean"] == pytest.approx(statistics.mean(cosine_distances), rel=1e-5)
    assert "2 (1 - cos)" in scored["statistics"]["conventions"]["clip_diversity"]["convention"]


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (29, 2.0452), (1000, 1.9623)])
def test_confidence_interval_uses_student_t_quantiles(df, quantile):
    assert evaluation.student_t_975(df) == pytest.approx(quantile, abs=2e-4)  # printed t tables


def test_dreamsim_loads_until_its_weights_are_needed(anneal_folder, sources, tmp_path, monkeypatch, capsys):
    dreamsim_model = pytest.importorskip("dreamsim.model")
    monkeypatch.setitem(dreamsim_model.dreamsim_weights, "ensemble", UNREACHABLE + "dreamsim_ensemble_checkpoint.zip")
    cache, out = tmp_path / "dreamsim", tmp_path / "out" / "m.json"
    cfg = metrics.MetricsConfig(images=str(anneal_folder), metrics=("dreamsim_diversity",), dreamsim_cache=str(cache),
                                out=str(out), device="cpu")
    with pytest.raises(SystemExit) as exit_info:
        metrics.main(cfg)
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(stderr) == 1 and str(cache) in stderr[0] and "--dreamsim-cache" in stderr[0], stderr
    assert not out.parent.exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(metrics.MetricsConfig, args=["--help"], description=metrics.__doc__)
    text = capsys.readouterr().out
    assert "torchrun --nproc_per_node=8 metrics.py" in text
    for field in dataclasses.fields(metrics.MetricsConfig):
        assert f"--{field.name.replace('_', '-')}" in text, field.name


@pytest.fixture(scope="module")
def bad_folders(anneal_folder, tmp_path_factory):
    """anneal.py's draft folder without its prompt files, and with one image per prompt."""
    root = tmp_path_factory.mktemp("bad_folders")
    shutil.copytree(anneal_folder / "draft", root / "no_prompts", ignore=shutil.ignore_patterns("prompt_*"))
    shutil.copytree(anneal_folder / "draft", root / "one_image", ignore=shutil.ignore_patterns("img_*_001.png"))
    return {"NO_PROMPTS": str(root / "no_prompts"), "ONE_IMAGE": str(root / "one_image")}


@pytest.mark.parametrize("settings, message", [
    (dict(metrics=("pickscore", "nope")), "unknown metric 'nope'"),
    (dict(metrics=("dreamsim_diversity",), num_repeats=1), "--num-repeats 2 or more"),
    (dict(prompt_set="EMPTY"), "holds no prompts"),
    (dict(images="NO_PROMPTS"), "no prompt_00000.txt"),
    (dict(images="ONE_IMAGE", metrics=("dreamsim_diversity",)), "folder 'one_image' has 1 of prompt 0"),
    (dict(checkpoint=None, weighing=("linear",)), "needs a tuned model"),
    (dict(images="NO_PROMPTS", weighing=("draft",)), "--weighing has no use"),
    (dict(num_prompts=4), "--num-prompts 4 exceeds the 3 prompts"),
    (dict(weighing=("power_0",)), "invalid weighing 'power_0'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(settings, message, checkpoint, prompt_file, bad_folders,
                                                         tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    replacements = {"EMPTY": str(empty), **bad_folders}
    settings = {key: replacements.get(value, value) if isinstance(value, str) else value
                for key, value in settings.items()}
    out = tmp_path / "out" / "m.json"
    base = dict(checkpoint=(checkpoint,), prompt_set=prompt_file, out=str(out), device="cpu")
    if "images" in settings:
        base.pop("checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        metrics.main(metrics.MetricsConfig(**{**base, **settings}))
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(stderr) == 1 and message in stderr[0], stderr
    assert not out.parent.exists()


def test_bad_input_on_the_command_line_has_no_traceback(tmp_path):
    out = tmp_path / "out" / "m.json"
    result = run_metrics(["--metrics", "pickscore,nope", "--out", str(out)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --metrics: unknown metric 'nope'; valid: {', '.join(evaluation.METRICS)}"]
    assert not out.parent.exists()


def test_bf16_generation_is_scored_in_fp32(checkpoint, sources, prompt_file, tmp_path):
    """bf16 CLIP would quantise the scores: the images may come from a bf16 model, their scores may not."""
    paths, _ = sources
    out = tmp_path / "bf16.json"
    args = ["--checkpoint", checkpoint, "--metrics", "pickscore", "--reward-source", f"pickscore={paths['pickscore']}",
            "--prompt-set", prompt_file, "--num-repeats", "2", "--dtype", "bfloat16", "--device", "cpu",
            "--out", str(out), *flags(**SAMPLER)]
    metrics.main(tyro.cli(metrics.MetricsConfig, args=args))
    rows = json.loads(out.read_text())["results"]["draft"]["per_prompt"]

    model, _ = generation.load_for_inference(generation.InferenceOptions(resolution=32, dtype="bfloat16"),
                                             (checkpoint,), torch.device("cpu"))
    reward = rewards.load_reward("pickscore", {"pickscore": paths["pickscore"]})  # float32
    settings = generation.SamplerSettings(32, SAMPLER["inference_steps"], SAMPLER["guidance_scale"])
    texts = dict(enumerate(PROMPTS))
    jobs = [(p, r) for p in range(3) for r in range(2)]
    with torch.no_grad():  # in metrics.py's batches of 3: bf16 sums depend on the batch
        images = torch.cat([evaluation.as_saved(generation.render_jobs(model, texts, jobs[i : i + 3], settings, seed=0,
                                                                    weighing="draft")) for i in (0, 3)])
        expected = reward(images, [texts[p] for p, _ in jobs]).view(3, 2).double().mean(1)
    assert [row["pickscore"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-5)
