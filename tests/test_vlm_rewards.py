"""The Qwen2.5-VL judge rewards (vlm_alignment, vlm_quality, vlm_photo): our torch image path against
Qwen2VLImageProcessor, scores against the official API, gradients, one judge per process, DRaFT+ on the
demo world with the judge as reward, and a missing judge offline.

The judge is a tiny random Qwen2_5_VLForConditionalGeneration with its processor, written by
tests/tiny_rewards.py with `save_pretrained` and opened through `rewards.load_reward`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLImageProcessorPil

import evaluation
import rewards
import tiny_rewards
from conftest import ROOT
from test_rewards import (as_float, as_pil, assert_bfloat16_weights_give_float32_scores_and_gradients,
                          assert_gradients_reach_images_only, count_calls, smooth_uint8_images)

# FDFO's wording, copied here from its files rather than from rewards.py, so that a change of ours to the
# questions or the chat format fails (NVlabs/finite-difference-flow-optimization: eval/calculate_metrics.py
# VLM_QUESTIONS, eval/models.py VLM.CHAT_TEMPLATE).
FDFO_QUESTIONS = {
    "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer with Yes or No.',
    "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
    "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
}
FDFO_CHAT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
JUDGE_SIZE = 504  # a size the processor keeps: 18 x 28, its patch (14) times its merge (2)

# Prompts of different lengths, so that left padding is exercised.
PROMPTS = ["a red cube on a wooden table", "a dog", "an oil painting of a harbour at dawn"]

# Input sizes the processor resamples: smaller and larger, non-square both ways, and FDFO's 512.
RESAMPLED_SIZES = [(64, 48), (37, 90), (512, 512)]

# Pixel tolerance in normalised units. Both sides compute (x - mean) / std in float32, the torchvision
# backend and ours with the same two operations, the PIL backend in numpy, where the uint8 route also
# multiplies by 1/255 where we divide by 255; each step rounds by at most half an ulp, and values stay
# below 4 in magnitude (|x - mean| <= 0.7, std >= 0.2 for the tiny processor), where an ulp is 2^-21, so
# a few ulp at most: 2e-6 is 4 ulp. Measured: at most 2.4e-7, one ulp. A wrong mean/std, patch order or frame
# layout is off by 1e-2 or more.
PIXEL_TOLERANCE = 2e-6
# Where the processor resamples the uint8 image itself and we the float one: both run the antialiased bicubic
# kernel (a = -0.5); the processors round to uint8 as they resample (PIL after each of its two passes:
# <= 1.125/255, derived in tests/test_rewards.py), we do not. In [0, 1] units over the tiny processor's
# smallest std, 0.2, to normalised units. Measured: at most 1.09/255 with either backend. A resize to another
# size fails the shape check; a bilinear one is off by 3.3/255 at 37 x 90 (smooth images hide it elsewhere).
RESAMPLED_PIXEL_TOLERANCE = 1.25 / 255 / min(tiny_rewards.TINY_IMAGE_STD)
# Score tolerance in score points (0-100). Pixel differences of 1e-6 move the tiny judge's logits by
# about as much, and the score by at most 25x that (the slope of 100 sigmoid); 1e-4 leaves headroom.
# Measured: at most 7.6e-6, two ulp of a score near 50; the tiny judge's scores spread over about 2 points.
SCORE_TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    return tiny_rewards.make_tiny_qwen_vl(str(tmp_path_factory.mktemp("qwen_vl")))


@pytest.fixture(scope="module")
def reference(judge_folder):
    """The tiny judge through transformers' own API, as FDFO loads it: (model, processor padding left)."""
    processor = AutoProcessor.from_pretrained(judge_folder)
    processor.tokenizer.padding_side = "left"
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(judge_folder).eval(), processor


def load_judge(judge_folder, spec="vlm_alignment,vlm_quality,vlm_photo", **options):
    names = [name for name, _ in rewards.parse_reward_spec(spec)]
    return rewards.load_reward(spec, sources=dict.fromkeys(names, judge_folder), **options)


def fdfo_scores(reference, images_uint8, questions) -> torch.Tensor:
    """FDFO's evaluation, eval/models.py VLM.calc_yes_no_scores on the uint8 images of run_pipe: the processor's
    own defaults (its resize included), model(**inputs).logits at the last position, 100 sigmoid(Yes - No)."""
    model, processor = reference
    texts = [FDFO_CHAT_TEMPLATE.format(question) for question in questions]
    inputs = processor(text=texts, images=images_uint8, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
    vocab = processor.tokenizer.get_vocab()
    return torch.sigmoid(logits[:, vocab["Yes"]] - logits[:, vocab["No"]]) * 100


# ---- the image path against the official processors ----------------------------------------------


@pytest.mark.parametrize("processor_class", [Qwen2VLImageProcessor, Qwen2VLImageProcessorPil])
def test_pixel_values_match_the_processor_at_a_size_it_keeps(judge_folder, processor_class):
    # 504 px images need no resampling: the processor's defaults only rescale, normalise and lay out patches.
    processor = processor_class.from_pretrained(judge_folder)
    images = smooth_uint8_images(2, JUDGE_SIZE, JUDGE_SIZE, seed=10)
    expected = processor(images=as_pil(images), return_tensors="pt")
    ours = rewards.qwen_vl_pixel_values(rewards.resize_for_qwen_vl(as_float(images), processor), processor)
    assert expected.image_grid_thw.tolist() == [[1, 36, 36]] * 2
    assert ours.shape == expected.pixel_values.shape == (2 * 36 * 36, 3 * 2 * 14 * 14)
    assert (ours - expected.pixel_values).abs().max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("processor_class", [Qwen2VLImageProcessor, Qwen2VLImageProcessorPil])
@pytest.mark.parametrize("size", RESAMPLED_SIZES)
def test_pixel_values_match_the_processors_own_resize(judge_folder, processor_class, size):
    processor = processor_class.from_pretrained(judge_folder)
    images = smooth_uint8_images(2, *size, seed=11)
    expected = processor(images=as_pil(images), return_tensors="pt")
    ours = rewards.qwen_vl_pixel_values(rewards.resize_for_qwen_vl(as_float(images), processor), processor)
    grid = expected.image_grid_thw[0].tolist()
    assert tuple(14 * side for side in grid[1:]) == rewards.qwen_vl_size(*size, processor)
    assert ours.shape == expected.pixel_values.shape
    assert (ours - expected.pixel_values).abs().max() <= RESAMPLED_PIXEL_TOLERANCE


def test_the_reward_resizes_to_the_judges_own_size_for_each_resolution():
    # Qwen2.5-VL-7B-Instruct's preprocessor_config.json: min_pixels 3136, max_pixels 12845056.
    processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    for side, expected in ((512, 504), (1024, 1036)):
        grid = processor(images=torch.zeros(1, 3, side, side, dtype=torch.uint8), return_tensors="pt").image_grid_thw
        assert grid.tolist() == [[1, expected // 14, expected // 14]]
        resized = rewards.resize_for_qwen_vl(torch.rand(1, 3, side, side), processor)
        assert resized.shape[-2:] == (expected, expected)


# ---- scores against the official API --------------------------------------------------------------


@pytest.mark.parametrize("name", list(FDFO_QUESTIONS))
@pytest.mark.parametrize("size", [(JUDGE_SIZE, JUDGE_SIZE), *RESAMPLED_SIZES[:2]])
def test_metric_scores_are_fdfos_evaluation(judge_folder, reference, name, size):
    images = smooth_uint8_images(3, *size, seed=12)
    questions = [FDFO_QUESTIONS[name].format(prompt=prompt) for prompt in PROMPTS]
    expected = fdfo_scores(reference, images, questions)
    setup = evaluation.MetricSetup(torch.device("cpu"), {name: judge_folder}, dreamsim_cache="")
    ours = evaluation.METRICS[name].load(setup)(as_float(images), PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert (ours - expected).abs().max() <= SCORE_TOLERANCE
    assert ((ours > 0) & (ours < 100)).all()


@pytest.mark.parametrize("name", list(FDFO_QUESTIONS))
def test_reward_scores_match_the_official_api_at_a_size_the_processor_keeps(judge_folder, reference, name):
    images = smooth_uint8_images(3, JUDGE_SIZE, JUDGE_SIZE, seed=12)
    questions = [FDFO_QUESTIONS[name].format(prompt=prompt) for prompt in PROMPTS]
    with torch.no_grad():
        ours = load_judge(judge_folder, name)(as_float(images), PROMPTS)
    assert (ours - fdfo_scores(reference, images, questions)).abs().max() <= SCORE_TOLERANCE


def test_the_alignment_question_carries_the_prompt(judge_folder):
    images = as_float(smooth_uint8_images(1, 64, 64, seed=13)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        alignment = load_judge(judge_folder, "vlm_alignment")(images, ["a dog", "a cat on a wooden boat"])
        quality = load_judge(judge_folder, "vlm_quality")(images, ["a dog", "a cat on a wooden boat"])
    assert abs(alignment[0] - alignment[1]) > 1e-3
    assert abs(quality[0] - quality[1]) < 1e-4


# ---- gradients, freezing, one judge ---------------------------------------------------------------


def test_gradients_reach_images_but_not_judge_parameters(judge_folder):
    reward = load_judge(judge_folder, "vlm_alignment:1.0,vlm_photo:0.5")
    assert_gradients_reach_images_only(reward)
    reward.train()
    assert not any(module.training for module in reward.modules())


def test_vlm_rewards_share_one_judge_while_it_is_in_use(judge_folder):
    combined = load_judge(judge_folder)
    judges = {id(combined.rewards[name].judge) for name in FDFO_QUESTIONS}
    separate = load_judge(judge_folder, "vlm_quality")  # as metrics.py loads each metric
    assert len(judges) == 1 and id(separate.rewards["vlm_quality"].judge) in judges
    other_dtype = load_judge(judge_folder, "vlm_quality", dtype=torch.bfloat16)
    assert other_dtype.rewards["vlm_quality"].judge is not combined.rewards["vlm_quality"].judge


def test_gradient_checkpointing_recomputes_both_towers_and_keeps_gradients(judge_folder):
    gradients, calls_per_step = [], []
    for checkpointing in (False, True):
        judge = load_judge(judge_folder, "vlm_alignment", gradient_checkpointing=checkpointing)
        model = judge.rewards["vlm_alignment"].judge.model.model
        calls = [count_calls(model.visual.blocks[0].mlp), count_calls(model.language_model.layers[0].mlp)]
        images = as_float(smooth_uint8_images(2, 40, 40, seed=15)).requires_grad_(True)
        judge(images, PROMPTS[:2]).sum().backward()
        gradients.append(images.grad)
        calls_per_step.append([len(c) for c in calls])
    assert calls_per_step == [[1, 1], [2, 2]], "with checkpointing both towers must run again in backward"
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-5, atol=1e-9)


def test_bfloat16_judge_scores_in_float32_with_gradients(judge_folder):
    assert_bfloat16_weights_give_float32_scores_and_gradients(load_judge(judge_folder, "vlm_photo", dtype=torch.bfloat16))


# ---- DRaFT+ with the judge as reward --------------------------------------------------------------


def test_draft_plus_trains_on_the_demo_world_with_the_judge(judge_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--preset", "demo", "--reward", "vlm_alignment",
         "--reward-source", f"vlm_alignment={judge_folder}", "--steps", "3", "--batch-size", "2",
         "--inference-steps", "6", "--val-every", "0", "--save-every", "3", "--run-dir", str(run_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        assert 0 < record["reward_mean"] < 100
        assert record["grad_norm"] > 0 and torch.isfinite(torch.tensor(record["grad_norm"]))
    assert records[0]["reward_mean"] != records[-1]["reward_mean"]
    assert (run_dir / "checkpoints" / "step-0000003" / "pytorch_lora_weights.safetensors").is_file()


# ---- a judge that cannot be had offline -----------------------------------------------------------


def test_missing_judge_offline_is_one_line_naming_the_model_and_the_flag(tmp_path):
    # metrics.py on a folder of one image, in a process with an empty cache and the hub switched off.
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(smooth_uint8_images(1, 32, 32)[0].permute(1, 2, 0).numpy()).save(folder / "img_00000_000.png")
    (folder / "prompt_00000.txt").write_text("a dog\n")
    out = tmp_path / "out" / "m.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "metrics.py", "--images", str(folder), "--metrics", "vlm_photo",
                             "--out", str(out), "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, lines
    assert rewards.QWEN_VL_7B in lines[0] and "--reward-source vlm_photo=" in lines[0]
    assert not out.parent.exists()
