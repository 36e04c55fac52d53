"""dreamsim_diversity on DreamSim's real ensemble (DINO ViT-B/16, CLIP ViT-B/16, OpenCLIP ViT-B/16 and the
LoRA wrapping), built by the package's own dreamsim() from random weights written in its checkpoint formats:
our embedding path and per-prompt diversity against the package's own embed and distance."""

import contextlib
import io
import json
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import evaluation
import utils

dreamsim_package = pytest.importorskip("dreamsim")
from dreamsim.feature_extraction.vision_transformer import DINOHead, vit_base  # noqa: E402

# Three ViT-B/16 forwards at 224 px per image: about 1.4 s an image on one thread, some 25 s in all.
pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
EMBED_DIM = 768 + 512 + 512  # DINO CLS token + CLIP and OpenCLIP image projections, concatenated

# facebookresearch/dino's hub entry point builds vit_base(patch_size=16, num_classes=0) of its
# vision_transformer.py and then downloads weights; dreamsim ships that file as its own copy, so this stand-in
# builds the same module, with random weights, from a cached-repo folder where torch.hub looks first.
DINO_HUBCONF = """\
from dreamsim.feature_extraction.vision_transformer import vit_base

dependencies = ["torch"]


def dino_vitb16(pretrained=True, **kwargs):
    return vit_base(patch_size=16, num_classes=0, **kwargs)
"""
# The LoRA of DreamSim's ensemble training (configs/train_ensemble_model_lora.yaml, training/train.py of
# ssundaram21/dreamsim). With pretrained=False the adapter stays at its init, whose update is zero.
ENSEMBLE_LORA = dict(r=16, lora_alpha=8, lora_dropout=0.3, bias="none", target_modules=["qkv"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core machine threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_random_dreamsim_cache(cache: str) -> None:
    """Every file dreamsim(dreamsim_type="ensemble") reads from its cache folder, with random weights."""
    for name in ("clip_vitb16", "open_clip_vitb16"):
        # What load_clip_as_dino / load_open_clip_as_dino load: a ViT-B/16 whose pos_drop is a LayerNorm, plus
        # the image projection; they load it strictly, so a wrong key or shape fails here.
        vit = vit_base(patch_size=16)
        vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)
        proj = torch.randn(vit.embed_dim, 512) / vit.embed_dim ** 0.5
        torch.save({"state_dict": {**vit.state_dict(), "proj": proj}}, os.path.join(cache, f"{name}_pretrain.pth.tar"))
    # The DINO head that ViTExtractor reads out of the DINO training checkpoint's student.
    head = DINOHead(768, 2048)
    student = {f"module.head.mlp.{key}": value for key, value in head.mlp.state_dict().items()}
    student["module.head.last_layer.weight"] = head.last_layer.weight.detach().clone()
    torch.save({"student": student}, os.path.join(cache, "dino_vitb16_pretrain.pth"))
    os.makedirs(os.path.join(cache, "ensemble_lora"))
    with open(os.path.join(cache, "ensemble_lora", "adapter_config.json"), "w") as file:
        json.dump(ENSEMBLE_LORA, file)
    os.makedirs(os.path.join(cache, "facebookresearch_dino_main"))
    with open(os.path.join(cache, "facebookresearch_dino_main", "hubconf.py"), "w") as file:
        file.write(DINO_HUBCONF)


def refuse_connection(*args, **kwargs):
    raise OSError("the DreamSim test must not reach the network")


@pytest.fixture(scope="module")
def dreamsim_model():
    """(model, preprocess) as dreamsim(pretrained=True) builds them, with random weights in place of the download."""
    hub_dir = torch.hub.get_dir()  # dreamsim() points torch.hub at its cache folder; put it back afterwards
    # Any download attempt (github release, torch.hub, Hugging Face) fails the test instead of going out.
    with tempfile.TemporaryDirectory() as cache, torch.random.fork_rng(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse_connection)
        patch.setattr(socket.socket, "connect", refuse_connection)
        torch.manual_seed(0)
        write_random_dreamsim_cache(cache)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                model, preprocess = dreamsim_package.dreamsim(pretrained=False, device="cpu", cache_dir=cache)
        finally:
            torch.hub.set_dir(hub_dir)
    return model, preprocess


@pytest.fixture(scope="module")
def pil_images():
    """Three different tiny images and a copy of the first, as 8-bit PIL images and as floats in [0,1]."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    pixels = np.concatenate([pixels, pixels[:1]])
    return [Image.fromarray(p) for p in pixels], torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def our_embeddings(dreamsim_model, pil_images):
    model, preprocess = dreamsim_model
    return evaluation.dreamsim_embedder(model, preprocess, CPU)(pil_images[1], ["a prompt"] * 4)


def test_our_dreamsim_embeddings_are_the_packages_own(dreamsim_model, pil_images, our_embeddings):
    model, preprocess = dreamsim_model
    images, floats = pil_images
    # Both sides start from the same 8-bit images: our float input turns back into exactly these PIL images.
    assert [image.tobytes() for image in utils.to_pil(floats)] == [image.tobytes() for image in images]
    with torch.no_grad():
        theirs = model.embed(torch.cat([preprocess(image) for image in images]))
    assert our_embeddings.shape == theirs.shape == (4, EMBED_DIM)
    torch.testing.assert_close(our_embeddings, theirs)
    # dreamsim() normalizes embeddings; metrics.py's docstring relies on unit vectors.
    torch.testing.assert_close(our_embeddings.norm(dim=-1), torch.ones(4))


def test_dreamsim_diversity_is_the_packages_distance_averaged_over_pairs(dreamsim_model, pil_images, our_embeddings):
    model, preprocess = dreamsim_model
    per_prompt = evaluation.METRICS["dreamsim_diversity"].per_prompt
    pixels = torch.cat([preprocess(image) for image in pil_images[0][:3]])
    first, second = [0, 0, 1], [1, 2, 2]  # the pairs of a prompt with three images
    with torch.no_grad():
        theirs = model(pixels[first], pixels[second])  # DreamSim's distance, 1 - cosine, one per pair
    diversity = per_prompt(our_embeddings[:3])
    assert diversity == pytest.approx(theirs.double().mean().item(), abs=1e-6)
    assert diversity > 1e-3  # different images are apart, so the equality above is not 0 == 0
    assert per_prompt(our_embeddings[[0, 3]]) == pytest.approx(0, abs=1e-6)  # the image and its copy
