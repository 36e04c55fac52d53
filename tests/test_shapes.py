"""The shipped real configurations (configs/real) build into networks of the published sizes."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shapes  # noqa: E402


@pytest.mark.parametrize("model", shapes.real_models())
def test_real_configs_on_the_meta_device_have_the_published_parameter_counts(model):
    assert shapes.network_parameter_counts(model) == shapes.published_counts()[model]


def test_reward_backbones_on_the_meta_device_have_the_published_parameter_counts():
    counts = {name: shapes.parameter_count(shapes.build_reward_backbone(name)) for name in shapes.reward_backbones()}
    assert counts == shapes.published_counts()["rewards"]


def test_every_family_of_the_project_ships_its_real_configs():
    assert {shapes.pipeline_class_name(shapes.model_folder(m)) for m in shapes.real_models()} == {
        "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
        "Flux2KleinPipeline"}
