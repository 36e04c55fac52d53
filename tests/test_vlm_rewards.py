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
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLImageProcessorPil

import rewards
import tiny_rewards
from conftest import ROOT
from test_rewards import (as_float, as_pil, assert_bfloat16_weights_give_float32_scores_and_gradients,
                          assert_gradients_reach_images_only, count_calls, smooth_uint8_images)

# FDFO's wording, copied here from its files rather than from rewards.py, so that a change of ours to the
# questions or the chat format fails (NVlabs/finite-difference-flow-optimization: eval/calculate_metrics.py
# VLM_QUESTIONS, eval/models.py VLM.CHAT_TEMPLATE; its resize to 504 x 504 is in fdfo/rewards.py).
FDFO_QUESTIONS = {
    "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer with Yes or No.',
    "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
    "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
}
FDFO_CHAT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
FDFO_IMAGE_SIZE = 504

# Prompts of different lengths, so that left padding is exercised.
PROMPTS = ["a red cube on a wooden table", "a dog", "an oil painting of a harbour at dawn"]

# Input sizes: the judge's own 504 (no resampling), smaller and larger, non-square both ways.
RESAMPLED_SIZES = [(64, 48), (37, 90), (512, 512)]

# Pixel tolerance in normalised units. Both sides compute (x - mean) / std in float32, the torchvision
# backend and ours with the same two operations, the PIL backend in numpy, where the uint8 route also
# multiplies by 1/255 where we divide by 255; each step rounds by at most half an ulp, and values stay
# below 4 in magnitude (|x - mean| <= 0.7, std >= 0.2 for the tiny processor), where an ulp is 2^-21, so
# a few ulp at most: 2e-6 is 4 ulp. Measured: at most 2.4e-7, one ulp. A wrong mean/std, patch order or frame
# layout is off by 1e-2 or more.
PIXEL_TOLERANCE = 2e-6
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


def fdfo_resize(images: torch.Tensor) -> torch.Tensor:
    """FDFO's training reward: float32, then 504 x 504 bilinear."""
    return F.interpolate(images.float(), size=(FDFO_IMAGE_SIZE,) * 2, mode="bilinear", align_corners=False)


def official_scores(reference, images, questions) -> torch.Tensor:
    """100 sigmoid(logit Yes - logit No) at the last position, from processor(...) and model(**inputs)."""
    model, processor = reference
    texts = [FDFO_CHAT_TEMPLATE.format(question) for question in questions]
    if images.dtype == torch.uint8:  # the processor's defaults on the images as a user has them
        inputs = processor(text=texts, images=as_pil(images), padding=True, return_tensors="pt")
    else:  # FDFO's training call on its resized float images
        inputs = processor(text=texts, images=fdfo_resize(images), padding=True, return_tensors="pt",
                           images_kwargs={"do_rescale": False, "do_resize": False})
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
    vocab = processor.tokenizer.get_vocab()
    return torch.sigmoid(logits[:, vocab["Yes"]] - logits[:, vocab["No"]]) * 100


# ---- the image path against the official processors ----------------------------------------------


@pytest.mark.parametrize("processor_class", [Qwen2VLImageProcessor, Qwen2VLImageProcessorPil])
def test_pixel_values_match_the_processor_at_the_judges_size(judge_folder, processor_class):
    # 504 px images need no resampling: the processor's defaults only rescale, normalise and lay out patches.
    processor = processor_class.from_pretrained(judge_folder)
    images = smooth_uint8_images(2, FDFO_IMAGE_SIZE, FDFO_IMAGE_SIZE, seed=10)
    expected = processor(images=as_pil(images), return_tensors="pt")
    ours = rewards.qwen_vl_pixel_values(rewards.resize_for_qwen_vl(as_float(images)), processor)
    assert expected.image_grid_thw.tolist() == [[1, 36, 36]] * 2
    assert ours.shape == expected.pixel_values.shape == (2 * 36 * 36, 3 * 2 * 14 * 14)
    assert (ours - expected.pixel_values).abs().max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("processor_class", [Qwen2VLImageProcessor, Qwen2VLImageProcessorPil])
@pytest.mark.parametrize("size", RESAMPLED_SIZES)
def test_pixel_values_match_fdfos_resize_then_the_processor(judge_folder, processor_class, size):
    processor = processor_class.from_pretrained(judge_folder)
    images = as_float(smooth_uint8_images(2, *size, seed=11))
    expected = processor(images=list(fdfo_resize(images)), do_rescale=False, do_resize=False, return_tensors="pt")
    ours = rewards.qwen_vl_pixel_values(rewards.resize_for_qwen_vl(images), processor)
    assert (ours - expected.pixel_values).abs().max() <= PIXEL_TOLERANCE


# ---- scores against the official API --------------------------------------------------------------


@pytest.mark.parametrize("name", list(FDFO_QUESTIONS))
@pytest.mark.parametrize("size", [(FDFO_IMAGE_SIZE, FDFO_IMAGE_SIZE), RESAMPLED_SIZES[0]])
def test_scores_match_processor_then_model_logits(judge_folder, reference, name, size):
    images = smooth_uint8_images(3, *size, seed=12)
    questions = [FDFO_QUESTIONS[name].format(prompt=prompt) for prompt in PROMPTS]
    # At 504 px the reference sees the uint8 images through the processor's own defaults.
    expected = official_scores(reference, images if size[0] == FDFO_IMAGE_SIZE else as_float(images), questions)
    with torch.no_grad():
        ours = load_judge(judge_folder, name)(as_float(images), PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert (ours - expected).abs().max() <= SCORE_TOLERANCE
    assert ((ours > 0) & (ours < 100)).all()


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
