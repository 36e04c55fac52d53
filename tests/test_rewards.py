"""Reward models: preprocessing and scores against the official APIs, gradients, spec parsing, errors.

Every reward is a tiny random model of the real architecture, written in the real on-disk format by
tests/tiny_rewards.py and opened through `rewards.load_reward`, the path real checkpoints take.
"""

import json
import os
import shutil
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)
sys.path.insert(0, REPO_DIR)

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel, CLIPProcessor  # noqa: E402

import rewards  # noqa: E402
import tiny_rewards  # noqa: E402
from utils import UsageError  # noqa: E402

# Long enough to be truncated by the tiny 16-token tokenizer, and short enough to be padded.
PROMPTS = ["a red cube on a wooden table", "a dog", "an oil painting of a harbour at dawn"]

# Image sizes: the model's own input size (no resampling), down- and up-scaling, both orientations,
# 40x59 (resized to 32x47: the processor's floor-division crop offset differs from round()), and
# 24x37 / 37x24 (odd vertical / horizontal padding in the HPS transform).
RESAMPLED_SIZES = [(40, 59), (59, 40), (64, 48), (24, 24), (24, 37), (37, 24), (33, 64), (200, 300)]

# Pixel tolerance, in [0, 1] units, between our float pipeline and the processors given the uint8
# image. PIL (and the torchvision uint8 kernels behind CLIPImageProcessor) resample in two separable
# passes and round to uint8 after each: <= 0.5/255 from the first pass, carried through the second
# pass's bicubic weights (sum of |w| <= 1.25 for PIL's a = -0.5 kernel), plus <= 0.5/255 from the
# second, so <= 1.125/255; measured max 1.05/255, mean 0.3/255 (rounding errors average out). Images
# are smooth, as decoded images are, so PIL's clipping of bicubic overshoot to [0, 255], which our
# float pipeline does not do, stays inactive. A one-pixel crop or pad shift, torch's a = -0.75 kernel
# (antialias=False), or bilinear resampling each fail these bounds (checked by mutating rewards.py).
PIXEL_MAX_TOLERANCE = 1.25 / 255
PIXEL_MEAN_TOLERANCE = 0.5 / 255

# Score tolerances, in cosine units (scores divided by logit_scale.exp() where there is one).
# At the model's input size no resampling happens, the processors only rescale and normalise, and the
# two paths differ by float32 rounding alone.
EXACT_COSINE_TOLERANCE = 1e-5
# With resampling, the pixel differences above move a tiny random model's cosine by at most 4e-4
# (measured); 1e-3 leaves headroom. This end-to-end check catches a wrong crop, normalisation or
# embedding; the pixel test above is what pins the resampling itself.
RESAMPLED_COSINE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_rewards.make_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    return tiny_rewards.make_tiny_hps(str(tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"))


@pytest.fixture(scope="module")
def aesthetic_folder(tmp_path_factory):
    return tiny_rewards.make_tiny_aesthetic(str(tmp_path_factory.mktemp("aesthetic")), seed=1)


@pytest.fixture(scope="module")
def imagereward(tmp_path_factory):
    """(folder, (vit, text encoder, mlp, tokenizer) the checkpoint was written from)."""
    return tiny_rewards.make_tiny_imagereward(str(tmp_path_factory.mktemp("imagereward")), seed=2)


@pytest.fixture(scope="module")
def load_tiny(clip_folder, hps_checkpoint, aesthetic_folder, imagereward):
    """load_reward with every reward pointed at its tiny checkpoint."""
    hps_path, hps_arch = hps_checkpoint
    sources = {
        "pickscore": clip_folder,
        "clip_l14": clip_folder,
        "clip_h14": clip_folder,
        "hpsv2": hps_path,
        "hpsv21": hps_path,
        "aesthetic": aesthetic_folder,
        "imagereward": imagereward[0],
    }

    loaded = {}

    def load(spec, **options):
        # Loading is cheap but building open_clip's tokenizer is not: share modules loaded with
        # default options (tests do not modify them); load afresh when options are given.
        if options:
            return rewards.load_reward(spec, sources=sources, hps_arch=hps_arch, **options)
        if spec not in loaded:
            loaded[spec] = rewards.load_reward(spec, sources=sources, hps_arch=hps_arch)
        return loaded[spec]

    return load


@pytest.fixture(scope="module")
def clip_reference(clip_folder):
    """The tiny CLIP through transformers' own API: (CLIPModel, CLIPProcessor)."""
    return CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)


@pytest.fixture(scope="module")
def hps_reference(hps_checkpoint):
    """The tiny HPS model through open_clip's own API: (model, validation transform, tokenizer)."""
    path, arch = hps_checkpoint
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=path, image_resize_mode="longest")
    return model.eval(), transform, open_clip.get_tokenizer(arch)


def smooth_uint8_images(batch, height, width, seed=0):
    """Random smooth images (bilinear upsampling of 5x5 noise), as uint8 [B, 3, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 5, 5, generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    return (smooth * 255).round().to(torch.uint8)


def as_pil(images_uint8):
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images_uint8]


def as_float(images_uint8):
    return images_uint8.float() / 255


def assert_pixels_close(ours, reference, std):
    """Compare normalised images in [0, 1] pixel units (undoing the division by std)."""
    assert ours.shape == reference.shape
    difference = ((ours - reference) * torch.tensor(std).view(1, 3, 1, 1)).abs()
    assert difference.max() <= PIXEL_MAX_TOLERANCE, f"max pixel difference {difference.max() * 255:.2f}/255"
    assert difference.mean() <= PIXEL_MEAN_TOLERANCE, f"mean pixel difference {difference.mean() * 255:.2f}/255"


# ---- preprocessing against the official transforms ----------------------------------------------


@pytest.mark.parametrize("processor_class", [CLIPImageProcessor, CLIPImageProcessorPil])
@pytest.mark.parametrize("size", [(32, 32), *RESAMPLED_SIZES])
def test_clip_preprocessing_matches_clip_image_processor(load_tiny, clip_folder, processor_class, size):
    processor = processor_class.from_pretrained(clip_folder)
    images = smooth_uint8_images(3, *size)
    reference = processor(images=as_pil(images), return_tensors="pt").pixel_values
    ours = load_tiny("pickscore").rewards["pickscore"].preprocess(as_float(images))
    assert_pixels_close(ours, reference, processor.image_std)


@pytest.mark.parametrize("size", [(32, 32), *RESAMPLED_SIZES])
def test_hps_preprocessing_matches_open_clip_transform(load_tiny, hps_reference, size):
    _, transform, _ = hps_reference
    images = smooth_uint8_images(3, *size)
    reference = torch.stack([transform(image) for image in as_pil(images)])
    hps = load_tiny("hpsv2").rewards["hpsv2"]
    ours = rewards.hps_preprocess(as_float(images), hps.size, hps.mean, hps.std)
    assert_pixels_close(ours, reference, hps.std)


def imagereward_transform(size):
    """The ImageReward package's transform, as its ImageReward.py writes it."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda image: image.convert("RGB"), ToTensor(),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


@pytest.mark.parametrize("size", [(32, 32), *RESAMPLED_SIZES])
def test_imagereward_preprocessing_matches_the_packages_transform(load_tiny, size):
    # (40, 59) resizes to 32x47: torchvision centres that crop at round(7.5) = 8, CLIPImageProcessor at 7.
    images = smooth_uint8_images(3, *size)
    reference = torch.stack([imagereward_transform(tiny_rewards.IMAGE_SIZE)(image) for image in as_pil(images)])
    ours = rewards.clip_preprocess(as_float(images), tiny_rewards.IMAGE_SIZE, (tiny_rewards.IMAGE_SIZE,) * 2,
                                   rewards.CLIP_MEAN, rewards.CLIP_STD, crop_offset=rewards.round_half)
    assert_pixels_close(ours, reference, rewards.CLIP_STD)


# ---- scores against the official APIs -------------------------------------------------------------

SCORE_CASES = [((32, 32), EXACT_COSINE_TOLERANCE), ((40, 59), RESAMPLED_COSINE_TOLERANCE),
               ((200, 300), RESAMPLED_COSINE_TOLERANCE)]


@pytest.mark.parametrize("name", ["pickscore", "clip_l14"])
@pytest.mark.parametrize("size,tolerance", SCORE_CASES)
def test_clip_score_matches_transformers_reference(load_tiny, clip_reference, name, size, tolerance):
    # As PickScore's model card computes it: processor, get_*_features, logit_scale.exp() * cosine.
    model, processor = clip_reference
    images = smooth_uint8_images(3, *size, seed=1)
    with torch.no_grad():
        image_inputs = processor(images=as_pil(images), return_tensors="pt")
        text_inputs = processor(text=PROMPTS, padding=True, truncation=True, return_tensors="pt")
        image_embeddings = F.normalize(model.get_image_features(**image_inputs).pooler_output, dim=-1)
        text_embeddings = F.normalize(model.get_text_features(**text_inputs).pooler_output, dim=-1)
        logit_scale = model.logit_scale.exp()
        reference = logit_scale * (image_embeddings * text_embeddings).sum(-1)
        ours = load_tiny(name)(as_float(images), PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert torch.allclose(ours / logit_scale, reference / logit_scale, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", ["hpsv2", "hpsv21"])
@pytest.mark.parametrize("size,tolerance", SCORE_CASES)
def test_hps_score_matches_open_clip_reference(load_tiny, hps_reference, name, size, tolerance):
    # As HPSv2's scorer computes it: its model, its validation transform, normalised features' dot product.
    model, transform, tokenizer = hps_reference
    images = smooth_uint8_images(3, *size, seed=2)
    with torch.no_grad():
        image_embeddings = model.encode_image(torch.stack([transform(i) for i in as_pil(images)]), normalize=True)
        text_embeddings = model.encode_text(tokenizer(PROMPTS), normalize=True)
        reference = (image_embeddings * text_embeddings).sum(-1)
        ours = load_tiny(name)(as_float(images), PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert torch.allclose(ours, reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("size,tolerance", SCORE_CASES)
def test_aesthetic_score_matches_laion_reference(load_tiny, aesthetic_folder, size, tolerance):
    # As LAION's predictor computes it: CLIP image features, L2-normalised, through the MLP.
    model = CLIPModel.from_pretrained(aesthetic_folder).eval()
    processor = CLIPProcessor.from_pretrained(aesthetic_folder)
    weights = os.path.join(aesthetic_folder, tiny_rewards.AESTHETIC_WEIGHTS_FILE)
    mlp = tiny_rewards.LaionAestheticMLP(tiny_rewards.PROJECTION_DIM)
    mlp.load_state_dict(torch.load(weights, weights_only=True))
    images = smooth_uint8_images(3, *size, seed=3)
    with torch.no_grad():
        features = model.get_image_features(**processor(images=as_pil(images), return_tensors="pt")).pooler_output
        reference = mlp.eval()(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)
        ours = load_tiny("aesthetic")(as_float(images), PROMPTS)
    # The tiny head's outputs are a few hundredths wide, so compare relative to their spread.
    assert torch.allclose(ours, reference, rtol=0, atol=tolerance * reference.abs().max().item())
    assert not torch.equal(ours, ours.flip(0)), "scores should differ between images"


def test_imagereward_checkpoint_has_the_packages_layout(imagereward):
    # The writer names weights after timm's ViT and transformers' BLIP text model; the keys must be those
    # the package's own modules define, or a real ImageReward.pt would not load the same way.
    state_dict = torch.load(os.path.join(imagereward[0], rewards.IMAGEREWARD_FILE), weights_only=True)
    assert set(state_dict) == tiny_rewards.imagereward_checkpoint_keys()


# In ImageReward score units (roughly unit spread on real images; the tiny model's scores lie within 1e-3
# of 0.066). Without resampling both paths run the same modules on the same pixels up to a float32 ulp:
# measured 4.5e-8. With resampling the pixel differences pinned by the preprocessing test above move the
# tiny model's score by up to 1e-5 (measured), a tenth of what another image does.
IMAGEREWARD_CASES = [((32, 32), 1e-6), ((40, 59), 3e-5), ((200, 300), 3e-5)]


@pytest.mark.parametrize("size,tolerance", IMAGEREWARD_CASES)
def test_imagereward_score_matches_the_packages_formula(load_tiny, imagereward, size, tolerance):
    # As ImageReward.score computes it, image by image: its transform, its tokenizer call, the ViT's tokens
    # as cross-attention input, the [CLS] state through the MLP, then its normalisation.
    _, (vit, text_encoder, mlp, tokenizer) = imagereward
    images = smooth_uint8_images(3, *size, seed=8)
    transform = imagereward_transform(tiny_rewards.IMAGE_SIZE)
    reference = []
    with torch.no_grad():
        for image, prompt in zip(as_pil(images), PROMPTS):
            tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = vit.forward_features(transform(image).unsqueeze(0))
            text_output = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                       encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long))
            reward = mlp(text_output.last_hidden_state[:, 0, :].float())
            reference.append(((reward - 0.16717362830052426) / 1.0333394966054072).item())
        ours = load_tiny("imagereward")(as_float(images), PROMPTS)
    reference = torch.tensor(reference)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert (ours - reference).abs().max() <= tolerance
    assert (reference - reference.mean()).abs().max() > 3 * tolerance, "scores should differ between images"


# ---- gradients, freezing, combinations, dtype -----------------------------------------------------


@pytest.mark.parametrize("spec", ["pickscore", "hpsv2", "aesthetic", "imagereward",
                                  "pickscore:1.0,hpsv21:2.0,aesthetic:0.05,imagereward:0.5"])
def test_gradients_reach_images_but_not_reward_parameters(load_tiny, spec):
    assert_gradients_reach_images_only(load_tiny(spec))


def assert_gradients_reach_images_only(reward):
    images = as_float(smooth_uint8_images(2, 48, 40, seed=4)).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())


def test_reward_stays_frozen_in_eval_mode(load_tiny):
    reward = load_tiny("pickscore,hpsv2,aesthetic")
    reward.train()
    assert not any(module.training for module in reward.modules())
    assert reward.names == [("pickscore", 1.0), ("hpsv2", 1.0), ("aesthetic", 1.0)]


def test_combination_is_weighted_sum_of_per_reward_scores(load_tiny):
    reward = load_tiny("pickscore:0.5,hpsv2:2.0,aesthetic:-3")
    images = as_float(smooth_uint8_images(2, 32, 32, seed=5))
    with torch.no_grad():
        each = rewards.per_reward_scores(reward, images, PROMPTS[:2])
        total = reward(images, PROMPTS[:2])
    assert set(each) == {"pickscore", "hpsv2", "aesthetic"}
    expected = 0.5 * each["pickscore"] + 2.0 * each["hpsv2"] - 3 * each["aesthetic"]
    assert torch.allclose(total, expected, atol=1e-6)


def count_calls(module):
    """A list that grows by one per run of module.forward (forward hooks miss checkpoint recomputes in
    transformers models, so the forward itself is wrapped)."""
    calls = []
    forward = module.forward

    def counted_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted_forward
    return calls


def first_vision_layer(name: str, reward):
    if name == "pickscore":
        return reward.model.vision_model.encoder.layers[0]
    if name == "imagereward":
        return reward.visual.blocks[0]
    return reward.model.visual.transformer.resblocks[0]


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "imagereward"])
def test_gradient_checkpointing_recomputes_vision_layers_and_keeps_gradients(load_tiny, name):
    gradients, calls_per_step = [], []
    for checkpointing in (False, True):
        reward = load_tiny(name, gradient_checkpointing=checkpointing)
        first_layer = first_vision_layer(name, reward.rewards[name])
        calls = count_calls(first_layer.mlp)
        images = as_float(smooth_uint8_images(2, 40, 40, seed=6)).requires_grad_(True)
        reward(images, PROMPTS[:2]).sum().backward()
        gradients.append(images.grad)
        calls_per_step.append(len(calls))
    assert calls_per_step == [1, 2], "with checkpointing the layer must run again in backward"
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "aesthetic", "imagereward"])
def test_model_dtype_follows_argument_and_scores_stay_float32(load_tiny, name):
    assert_bfloat16_weights_give_float32_scores_and_gradients(load_tiny(name, dtype=torch.bfloat16))


def assert_bfloat16_weights_give_float32_scores_and_gradients(reward):
    assert {p.dtype for p in reward.parameters()} == {torch.bfloat16}
    images = as_float(smooth_uint8_images(2, 32, 32, seed=7)).requires_grad_(True)
    scores = reward(images, PROMPTS[:2])
    scores.sum().backward()
    assert scores.dtype == torch.float32
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


# ---- spec parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("pickscore", [("pickscore", 1.0)]),
        ("pickscore:1.0,aesthetic:0.05", [("pickscore", 1.0), ("aesthetic", 0.05)]),
        (" hpsv21 : 2 , clip_h14 ", [("hpsv21", 2.0), ("clip_h14", 1.0)]),
        ("aesthetic:-1e-2", [("aesthetic", -0.01)]),
    ],
)
def test_parse_reward_spec_reads_names_and_weights(spec, expected):
    assert rewards.parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,must_mention",
    [
        ("pickscore:abc", ["'abc'", "pickscore", "number"]),
        ("pickscore:nan", ["'nan'", "finite"]),
        ("", ["empty", *rewards.REWARD_NAMES]),
        ("  ", ["empty"]),
        ("pickscor", ["'pickscor'", *rewards.REWARD_NAMES]),
        ("pickscore,", ["''", *rewards.REWARD_NAMES]),
        ("pickscore:1,pickscore:2", ["'pickscore'", "twice"]),
    ],
)
def test_parse_reward_spec_rejects_bad_specs_in_one_line(spec, must_mention):
    with pytest.raises(UsageError) as error:
        rewards.parse_reward_spec(spec)
    message = str(error.value)
    assert "\n" not in message
    for text in must_mention:
        assert text in message


def test_parse_reward_sources():
    assert rewards.parse_reward_sources(["pickscore=/m/ps", "hpsv2=/m/hps=1.pt"]) == {
        "pickscore": "/m/ps",
        "hpsv2": "/m/hps=1.pt",
    }
    for bad in ["pickscore", "nope=/x", "pickscore="]:
        with pytest.raises(UsageError, match="--reward-source"):
            rewards.parse_reward_sources([bad])


# ---- loading failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pickscore", "clip_h14", "hpsv2", "aesthetic", "imagereward", "vlm_alignment"])
def test_missing_local_path_is_a_one_line_usage_error(tmp_path, name):
    missing = str(tmp_path / "not-here")
    with pytest.raises(UsageError) as error:
        rewards.load_reward(name, sources={name: missing})
    message = str(error.value)
    assert "\n" not in message
    assert f"'{name}'" in message and missing in message and f"--reward-source {name}=" in message


def test_aesthetic_folder_without_head_weights_is_a_usage_error(clip_folder):
    with pytest.raises(UsageError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*--reward-source aesthetic="):
        rewards.load_reward("aesthetic", sources={"aesthetic": clip_folder})


def test_imagereward_folder_without_its_files_is_a_usage_error(tmp_path, clip_folder):
    with pytest.raises(UsageError, match=r"ImageReward\.pt.*--reward-source imagereward="):
        rewards.load_reward("imagereward", sources={"imagereward": clip_folder})


def test_imagereward_checkpoint_lacking_a_weight_is_a_usage_error(tmp_path, imagereward):
    folder = tmp_path / "damaged"
    shutil.copytree(imagereward[0], folder)
    state_dict = torch.load(folder / rewards.IMAGEREWARD_FILE, weights_only=True)
    del state_dict["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state_dict, folder / rewards.IMAGEREWARD_FILE)
    with pytest.raises(UsageError, match=r"crossattention\.self\.key\.weight.*--reward-source imagereward="):
        rewards.load_reward("imagereward", sources={"imagereward": str(folder)})


def test_unknown_reward_source_name_is_a_usage_error(clip_folder):
    with pytest.raises(UsageError, match="'pickscor'.*pickscore"):
        rewards.load_reward("pickscore", sources={"pickscor": clip_folder})


def test_default_sources_offline_and_uncached_fail_in_one_line_naming_the_model(tmp_path):
    # A fresh process with an empty cache and the hub switched off: the situation of a machine
    # without the checkpoints, seen exactly as the scripts see it.
    script = (
        "import rewards, utils\n"
        "for name in ['pickscore', 'hpsv2', 'aesthetic', 'imagereward', 'vlm_quality']:\n"
        "    try:\n"
        "        rewards.load_reward(name)\n"
        "    except utils.UsageError as error:\n"
        "        print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5, result.stdout
    for line, name in zip(lines, ["pickscore", "hpsv2", "aesthetic", "imagereward", "vlm_quality"]):
        assert rewards.DEFAULT_SOURCES[name] in line
        assert f"--reward-source {name}=" in line


# ---- CLIP folders as save_pretrained writes them ---------------------------------------------------


def resaved_clip(clip_folder, folder) -> str:
    """The tiny CLIP saved again by today's transformers: model, then CLIPProcessor.save_pretrained."""
    CLIPModel.from_pretrained(clip_folder).save_pretrained(folder)
    CLIPProcessor.from_pretrained(clip_folder).save_pretrained(folder)
    return str(folder)


def test_clip_folder_saved_by_todays_processor_scores_with_its_own_processor(load_tiny, clip_folder, tmp_path):
    folder = resaved_clip(clip_folder, tmp_path / "resaved")
    # transformers 5 writes the image processor into processor_config.json, the tokenizer as tokenizer.json
    assert not os.path.exists(os.path.join(folder, "preprocessor_config.json"))
    assert {"processor_config.json", "tokenizer.json"} <= set(os.listdir(folder))
    reward = rewards.load_reward("pickscore", sources={"pickscore": folder})
    assert reward.rewards["pickscore"].preprocess.mean == tuple(tiny_rewards.TINY_IMAGE_MEAN)
    images = as_float(smooth_uint8_images(3, 40, 59, seed=20))
    with torch.no_grad():
        assert torch.equal(reward(images, PROMPTS), load_tiny("pickscore")(images, PROMPTS))


def test_clip_tokenizer_without_model_max_length_takes_the_models_positions(load_tiny, clip_folder, tmp_path):
    folder = tmp_path / "no-max-length"
    shutil.copytree(clip_folder, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["model_max_length"]
    config_file.write_text(json.dumps(config))
    reward = rewards.load_reward("clip_l14", sources={"clip_l14": str(folder)})
    assert reward.rewards["clip_l14"].tokenizer.model_max_length > 10**20  # transformers' "no limit"
    images = as_float(smooth_uint8_images(3, 32, 32, seed=21))
    with torch.no_grad():
        assert torch.equal(reward(images, PROMPTS), load_tiny("clip_l14")(images, PROMPTS))


def scored_image_folder(folder) -> str:
    """A folder of one image and its prompt, as anneal.py writes them, for metrics.py --images."""
    folder.mkdir()
    Image.fromarray(smooth_uint8_images(1, 32, 32)[0].permute(1, 2, 0).numpy()).save(folder / "img_00000_000.png")
    (folder / "prompt_00000.txt").write_text("a dog\n")
    return str(folder)


@pytest.mark.parametrize("kept,missing", [("tokenizer", "image-processor config"),
                                          ("model", "tokenizer nor image-processor config")])
def test_clip_folder_without_its_processor_is_refused_in_one_line(clip_folder, tmp_path, kept, missing):
    # metrics.py offline, with an empty cache: the hub's processor cannot stand in.
    folder = tmp_path / "clip"
    folder.mkdir()
    keep = {"model": ["config.json", "model.safetensors"],
            "tokenizer": ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"]}
    for name in keep[kept]:
        shutil.copy(os.path.join(clip_folder, name), folder)
    out = tmp_path / "out" / "m.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "metrics.py", "--images", scored_image_folder(tmp_path / "images"),
                             "--metrics", "pickscore", "--reward-source", f"pickscore={folder}", "--out", str(out),
                             "--device", "cpu"], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert str(folder) in lines[0] and f"holds no {missing}" in lines[0]
    assert not out.parent.exists()
