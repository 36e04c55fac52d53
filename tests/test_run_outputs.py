"""What a training run leaves for others to read: its wandb run (offline, read back from wandb's own
files) and the model card of each checkpoint folder."""

import json
import os
import struct
import subprocess
import sys

import pytest
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from wandb.proto import wandb_internal_pb2

import training
from conftest import ROOT, run_train
from test_train import common_args

WANDB_BLOCK = 32 * 1024  # wandb's transaction log is leveldb's log format: 32 KiB blocks of framed chunks


def wandb_records(path: str):
    """The protobuf records of an offline run's .wandb file, reassembled from their chunks."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    position, parts = 7, b""  # after the file header: magic, format version
    while position + 7 <= len(data):
        if WANDB_BLOCK - position % WANDB_BLOCK < 7:  # a block's tail too short for a chunk header is padding
            position += WANDB_BLOCK - position % WANDB_BLOCK
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])  # after the CRC
        parts += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(parts)
            parts = b""


def offline_runs(run_dir) -> list[dict]:
    """Each offline wandb run in the run dir, oldest first: its id, its rewind point and its history rows."""
    folder = os.path.join(run_dir, "wandb")
    runs = []
    for name in sorted(n for n in os.listdir(folder) if n.startswith("offline-run-")):
        (log,) = [f for f in os.listdir(os.path.join(folder, name)) if f.endswith(".wandb")]
        run = {"folder": os.path.join(folder, name), "rows": []}
        for record in wandb_records(os.path.join(folder, name, log)):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                point = record.run.branch_point if record.run.HasField("branch_point") else None
                run["rewound_to"] = (point.run, point.metric, point.value) if point else None
            elif kind == "history":
                run["rows"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in record.history.item})
        runs.append(run)
    return runs


@pytest.fixture(scope="module")
def wandb_run(tiny_sd, tiny_clip, prompt_file, tmp_path_factory):
    """Two steps, then the same command with --steps 3: a resume from the step-2 checkpoint."""
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--save-every", "1", "--wandb", "--val-every", "2",
                       "--val-prompts", "2")
    run_train([*args, "--steps", "2"], env=env)
    first_id = json.loads((run_dir / training.WANDB_RUN).read_text())["id"]
    run_train([*args, "--steps", "3"], env=env)
    return run_dir, first_id


def test_wandb_logs_every_step_once_and_a_resume_continues_the_same_run(wandb_run):
    run_dir, first_id = wandb_run
    first, resumed = offline_runs(run_dir)
    assert first["id"] == resumed["id"] == first_id  # the id kept in the run dir
    assert first["rewound_to"] is None and resumed["rewound_to"] == (first_id, "_step", 2)  # the checkpoint's step
    # the run as wandb keeps it: the first run's rows up to the rewind point, then the resumed run's
    rows = [row for row in first["rows"] if row["_step"] <= 2] + resumed["rows"]
    assert [row["_step"] for row in rows] == [1, 2, 3]
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    for row, record in zip(rows, logged, strict=True):
        scalars = {key: value for key, value in record.items() if key != "step"}
        assert {key: row[key] for key in scalars} == pytest.approx(scalars)


def test_wandb_gets_the_validation_grid_and_curves_as_images(wandb_run):
    run_dir, _ = wandb_run
    first, resumed = offline_runs(run_dir)
    step_2 = next(row for row in first["rows"] if row["_step"] == 2)  # --val-every 2
    assert step_2["val/grid/_type"] == step_2["curves/_type"] == "image-file"
    assert (step_2["curves/width"], step_2["curves/height"]) == (3 * 480, 320)
    for name in ("val/grid", "curves"):
        assert os.path.isfile(os.path.join(first["folder"], "files", step_2[f"{name}/path"]))
    step_3 = resumed["rows"][-1]  # the last step: the grid and the curves again
    assert step_3["val/grid/_type"] == step_3["curves/_type"] == "image-file"
    assert "val/grid/_type" not in next(row for row in first["rows"] if row["_step"] == 1)


def test_wandb_asked_for_but_not_installed_is_one_line_and_writes_nothing(tiny_sd, tiny_clip, prompt_file, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train.py", *common_args(tiny_sd, tiny_clip, prompt_file, run_dir, "--wandb", "--steps", "1")]
    # None in sys.modules is Python's own way of making a package unimportable
    code = (f"import sys, runpy; sys.modules['wandb'] = None; sys.argv = {argv!r}; "
            "runpy.run_path('train.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --wandb needs the wandb package: pip install wandb (or train without --wandb)"]
    assert not run_dir.exists()


def test_each_checkpoint_carries_a_hub_model_card_and_stays_a_lora_folder(wandb_run, tiny_sd):
    run_dir, _ = wandb_run
    folder = run_dir / "checkpoints" / "step-0000003"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers"
    assert {"text-to-image", "diffusers-training", "lora", "pickscore"} <= set(card.data.tags)
    assert "--steps 3" in card.text and "| `--kl-coeff` | `0.1` |" in card.text
    last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert f"| `reward_mean` | {last['reward_mean']:.6g} |" in card.text  # the final logged metrics
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(str(folder))  # the card changes nothing for the stock loader
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_model_card_is_the_one_diffusers_builds_for_the_same_description(tmp_path):
    """Ours against diffusers' own load_or_create_model_card + populate_model_card (offline, so that it
    falls back to its template), for a Hub base model."""
    cfg = training.TrainConfig(model="stable-diffusion-v1-5/stable-diffusion-v1-5", run_dir=str(tmp_path / "run"))
    ours = training.model_card(cfg, 8, 1000, {"reward_mean": 21.5, "kl": 0.002})
    assert ours.data.base_model == cfg.model
    description = ours.text.split("-->", 1)[1].split("## Intended uses", 1)[0].strip()
    code = ("import sys, json; from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card; "
            "args = json.load(sys.stdin); "
            "card = load_or_create_model_card('draftp-tests/no-such-model', from_training=True, inference=True, "
            "base_model=args['base_model'], model_description=args['description']); "
            "print(str(populate_model_card(card, tags=args['tags'])), end='')")
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
                            input=json.dumps({"base_model": cfg.model, "description": description,
                                              "tags": ours.data.tags})).stdout
    assert str(ours) == theirs
