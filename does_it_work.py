r"""The demo-world experiment of "Does it work?" (docs/demo.md): DRaFT+ against its KL coefficient, and
annealed guidance (AIG) of low-KL checkpoints toward the base model, on held-out prompts and seeds,
with 95% intervals over training seeds.

    python does_it_work.py                       # everything: 18 trainings, their evaluation, table and plot
    python does_it_work.py --seeds 0 --kl-coeffs 0 1 --out runs/does_it_work_small   # a quick look

Steps, each skipped when its output exists (so a stopped run continues where it was):
  1. train.py --preset demo --kl-coeff C --seed S --run-dir RUNS/klC-seedS, for every C and S;
  2. metrics.py --preset demo on the final checkpoint of each (the tuned model, `draft`), and with the
     AIG weighings too for the checkpoints of --anneal-kl-coeffs; the base model once;
  3. per configuration, the mean over training seeds of each metric's mean over prompts, with the 95%
     Student-t interval over seeds: OUT/results.json, OUT/results.md and OUT/does_it_work.png (gold
     aesthetic against gold fidelity and against diversity; the KL sweep and each AIG family a curve).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import tyro

import evaluation
import plots
import utils

ROOT = os.path.dirname(os.path.abspath(__file__))
METRICS = ("aesthetic", "gold_aesthetic", "gold_fidelity", "gold_shape", "gold_diversity")
STEPS = 100  # train.py --preset demo's


@dataclass
class ExperimentConfig:
    kl_coeffs: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)  # the KL sweep
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds of every configuration (the error bars are over them)
    anneal_kl_coeffs: tuple[float, ...] = (0.0, 0.01)  # checkpoints also evaluated with annealed guidance
    # AIG weighings of those checkpoints, from most to least tuned-model weight
    weighings: tuple[str, ...] = ("step_0.3", "power_0.5", "linear", "step_0.6", "power_2", "step_0.8", "power_4")
    runs: str = "runs/does_it_work"  # where the trainings and their metrics go
    out: str = "runs/does_it_work"  # where results.json, results.md and does_it_work.png go


def run(script: str, *args: str) -> None:
    command = [sys.executable, os.path.join(ROOT, script), *args]
    print("+", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def run_dir(cfg: ExperimentConfig, kl: float, seed: int) -> str:
    return os.path.join(cfg.runs, f"kl{kl:g}-seed{seed}")


def train_and_evaluate(cfg: ExperimentConfig) -> None:
    base = os.path.join(cfg.runs, "base.json")
    if not os.path.exists(base):
        run("metrics.py", "--preset", "demo", "--weighing", "base", "--out", base)
    for kl in cfg.kl_coeffs:
        for seed in cfg.seeds:
            folder = run_dir(cfg, kl, seed)
            checkpoint = utils.checkpoint_dir(folder, STEPS)
            if not os.path.exists(checkpoint):
                run("train.py", "--preset", "demo", "--kl-coeff", str(kl), "--seed", str(seed), "--run-dir", folder)
            result = os.path.join(folder, "metrics.json")
            weighings = ("draft", *(cfg.weighings if kl in cfg.anneal_kl_coeffs else ()))
            if not os.path.exists(result):
                run("metrics.py", "--preset", "demo", "--checkpoint", checkpoint, "--weighing", *weighings,
                    "--out", result)


def read_means(path: str) -> dict[str, dict[str, float]]:
    """{row (weighing): {metric: mean over prompts}} of a metrics.py JSON."""
    with open(path) as f:
        results = json.load(f)["results"]
    return {row: {name: result["metrics"][name]["mean"] for name in METRICS} for row, result in results.items()}


def final_kl(folder: str) -> float | None:
    """Mean logged KL of the last 10 steps."""
    records = utils.JsonlLog(os.path.join(folder, "log.jsonl")).records()[-10:]
    values = [r["kl"] for r in records if r.get("kl") is not None]
    return sum(values) / len(values) if values else None


def aggregate(cfg: ExperimentConfig) -> list[dict]:
    """One row per configuration: base, each kl_coeff's tuned model, each AIG weighing of each annealed kl_coeff."""
    base = read_means(os.path.join(cfg.runs, "base.json"))["base"]
    rows = [{"name": "base", "family": "base", **{name: {"mean": base[name], "ci95": None} for name in METRICS}}]
    for kl in cfg.kl_coeffs:
        per_seed = [read_means(os.path.join(run_dir(cfg, kl, seed), "metrics.json")) for seed in cfg.seeds]
        kls = [final_kl(run_dir(cfg, kl, seed)) for seed in cfg.seeds]
        weighings = ["draft", *(cfg.weighings if kl in cfg.anneal_kl_coeffs else ())]
        for weighing in weighings:
            row = {"name": f"kl {kl:g}" + ("" if weighing == "draft" else f", {weighing}"),
                   "family": "KL sweep" if weighing == "draft" else f"AIG of kl {kl:g}", "kl_coeff": kl,
                   "weighing": weighing, "seeds": len(cfg.seeds)}
            row.update({name: evaluation.mean_std_ci([seed[weighing][name] for seed in per_seed]) for name in METRICS})
            if weighing == "draft" and None not in kls:
                row["final_kl"] = evaluation.mean_std_ci(kls)
            rows.append(row)
    return rows


def cell(summary: dict, percent: bool = False) -> str:
    scale = 100 if percent else 1
    text = f"{summary['mean'] * scale:.1f}%" if percent else f"{summary['mean']:.3f}"
    if summary.get("ci95"):
        half = (summary["ci95"][1] - summary["ci95"][0]) / 2 * scale
        text += f" ± {half:.1f}" if percent else f" ± {half:.3f}"
    return text


def markdown(rows: list[dict]) -> str:
    head = "| model | learned aesthetic | gold aesthetic | gold fidelity | gold shape | diversity (pixel RMS) | final KL |"
    lines = [head, "|" + " --- |" * 7]
    for row in rows:
        kl = cell(row["final_kl"]) if "final_kl" in row else ""
        lines.append(f"| {row['name']} | {cell(row['aesthetic'])} | {cell(row['gold_aesthetic'])} | "
                     f"{cell(row['gold_fidelity'], True)} | {cell(row['gold_shape'], True)} | "
                     f"{cell(row['gold_diversity'])} | {kl} |")
    return "\n".join(lines) + "\n"


def point(row: dict, x_name: str, label: str = "") -> plots.Point:
    def interval(name):
        return tuple(row[name]["ci95"]) if row[name].get("ci95") else None

    return plots.Point(row[x_name]["mean"], row["gold_aesthetic"]["mean"], label, interval(x_name),
                       interval("gold_aesthetic"))


def figure(rows: list[dict]):
    """Gold aesthetic against gold fidelity and against diversity; a curve per family, AIG joined to its
    checkpoint (draft) and to the base model, the two ends of its mixing."""
    base = next(row for row in rows if row["family"] == "base")
    curves = list(dict.fromkeys(row["family"] for row in rows if row["family"] != "base"))
    panels = []
    for x_name, x_label in (("gold_fidelity", "gold fidelity (fraction of images with the prompted colours)"),
                            ("gold_diversity", "diversity (mean pairwise RMS pixel distance)")):
        series = []
        for curve in curves:
            members = [row for row in rows if row["family"] == curve]
            if curve == "KL sweep":
                points = [point(row, x_name, f"{row['kl_coeff']:g}") for row in members]
            else:
                tuned = next(row for row in rows if row["family"] == "KL sweep"
                             and row["kl_coeff"] == members[0]["kl_coeff"])
                points = ([point(tuned, x_name)] + [point(row, x_name, row["weighing"]) for row in members]
                          + [point(base, x_name)])
            series.append(plots.Series(curve, points, joined=True))
        series.append(plots.Series("base", [point(base, x_name, "base")]))
        title = f"mean over {base_seeds(rows)} training seeds, 95% intervals"
        panels.append(plots.Panel(series, x_label, "gold aesthetic", title))
    return plots.figure(panels, panel_size=(760, 560))


def base_seeds(rows: list[dict]) -> int:
    return max(row.get("seeds", 1) for row in rows)


@utils.exit_cleanly_on_usage_error
def main(cfg: ExperimentConfig) -> None:
    train_and_evaluate(cfg)
    rows = aggregate(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    utils.save_json(os.path.join(cfg.out, "results.json"), {"config": cfg.__dict__, "rows": rows})
    table = markdown(rows)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table)
    plots.save_png(figure(rows), os.path.join(cfg.out, "does_it_work.png"))
    print(table, end="")
    print(f"wrote {cfg.out}/results.json, results.md, does_it_work.png")


if __name__ == "__main__":
    main(tyro.cli(ExperimentConfig, description=__doc__))
