"""The paper's studies as one command each, in one resumable folder.

``iterations`` (paper Fig. 4): train one model per T_train, evaluate each at every T_eval, a mIoU grid.
``bases`` (paper Fig. 3): the ways of maintaining the bases (moving average, with and without L2-normalising
the batch estimate, learned by back-propagation, fixed) and of back-propagating through the EM stages
(none, all unrolled stages, the last stage only: Hamburger's one-step gradient), each trained and evaluated.
``heads``: the head layout (the authors' "reference": classifier on the EMA features alone; mmsegmentation's
"mmseg": the backbone's C5 concatenated back before the classifier) x the auxiliary FCN head off/on, with
per-class IoU, since what the layout changes is which classes keep their local evidence.

The folder holds ``study.json`` (what was asked), ``commands.sh`` (the equivalent train/eval commands),
``runs/<variant>/`` (ordinary run folders), ``results.json`` (every evaluated cell, written after each one),
``table.md`` and a figure; results.json and table.md say which machine (CPU model, torch version, threads)
trained each run, with which seed, and the command that rebuilds the folder. Running the same command again
continues: finished runs are not retrained, an interrupted run resumes from its newest checkpoint, evaluated
cells are kept.
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emanet import runtime
from emanet.checkpoint import claim_folder, write_text_atomic
from emanet.config import Config, load_config
from emanet.errors import ConfigError, RunFolderError, install_hint
from emanet.evaluation import evaluate, results_to_json
from emanet.experiments import plots
from emanet.experiments.report import markdown_table
from emanet.pretrained import load_model
from emanet.runtime import select_device
from emanet.train.data import build_datasets
from emanet.train.loop import train

logger = logging.getLogger(__name__)

STUDIES = ("iterations", "bases", "heads")
TRAIN_STAGES = (1, 2, 3, 4, 5)  # the paper's Fig. 4 trains T = 1..5 (accuracy saturates at T_train = 3)
EVAL_STAGES = (1, 2, 3, 4, 5, 6, 7, 8)
# name -> overrides; every variant sets all three axes, so the base config's own choice does not leak in
BASES_VARIANTS: dict[str, list[str]] = {
    "ema": ["model.bases_update=ema", "model.renormalize=false", "model.differentiable=false"],
    "ema_l2": ["model.bases_update=ema", "model.renormalize=true", "model.differentiable=false"],
    "learned": ["model.bases_update=learned", "model.renormalize=false", "model.differentiable=false"],
    "none": ["model.bases_update=none", "model.renormalize=false", "model.differentiable=false"],
    "ema_grad_all": ["model.bases_update=ema", "model.renormalize=false", "model.differentiable=true"],
    "ema_grad_last": ["model.bases_update=ema", "model.renormalize=false", "model.differentiable=last"],
}
BASES_LABELS = {
    "ema": "moving average (reference)",
    "ema_l2": "moving average, L2-normalised estimate",
    "learned": "learned by back-propagation",
    "none": "fixed (initial bases)",
    "ema_grad_all": "moving average + gradient through all stages",
    "ema_grad_last": "moving average + gradient through the last stage",
}

# every variant sets both axes, so the base config's own layout and aux head do not leak in
HEADS_VARIANTS: dict[str, list[str]] = {
    "reference": ["model.head_layout=reference", "model.aux=false"],
    "reference_aux": ["model.head_layout=reference", "model.aux=true"],
    "mmseg": ["model.head_layout=mmseg", "model.aux=false"],
    "mmseg_aux": ["model.head_layout=mmseg", "model.aux=true"],
}
HEADS_LABELS = {
    "reference": "classifier on the EMA features only (authors' code)",
    "reference_aux": "reference + auxiliary FCN head on C4",
    "mmseg": "C5 concatenated back before the classifier (mmsegmentation)",
    "mmseg_aux": "mmseg + auxiliary FCN head on C4",
}
VARIANT_STUDIES = {"bases": BASES_VARIANTS, "heads": HEADS_VARIANTS}  # studies of named variants, one cell each


@dataclass
class Variant:
    name: str
    overrides: list[str]  # on top of the study's config and overrides
    eval_stages: list[int | None]  # None: the model's own T


def plan(kind: str, *, train_stages=TRAIN_STAGES, eval_stages=EVAL_STAGES, variants=None) -> list[Variant]:
    if kind == "iterations":
        bad = [t for t in (*train_stages, *eval_stages) if t < 1]
        if bad or not train_stages or not eval_stages:
            raise ConfigError(
                f"--train-stages and --eval-stages need numbers >= 1, got {list(train_stages)} and {list(eval_stages)}"
            )
        return [Variant(f"T{t}", [f"model.num_stages={t}"], list(eval_stages)) for t in train_stages]
    if kind in VARIANT_STUDIES:
        known = VARIANT_STUDIES[kind]
        names = list(variants or known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown {kind} variant(s) {unknown}; choose from {', '.join(known)}")
        return [Variant(n, list(known[n]), [None]) for n in names]
    raise ConfigError(f"unknown study {kind!r}; choose from {', '.join(STUDIES)}")


def machine() -> dict[str, Any]:
    """runtime.machine() as studies record it (results.json names the thread count "threads")."""
    m = runtime.machine()
    m["threads"] = m.pop("torch_threads")
    return m


def study_command(
    kind: str,
    out: Path,
    *,
    config: str | None,
    overrides: list[str],
    variants: list[Variant],
    existing: dict[str, Path],
    max_images: int,
) -> str:
    """The `emanet study` command that (re)builds this folder, spelled out from the arguments."""
    args = ["emanet", "study", kind, *(["--config", config] if config else []), *overrides, "--out", str(out)]
    if kind == "iterations":
        args += ["--train-stages", ",".join(v.name[1:] for v in variants)]
        args += ["--eval-stages", ",".join(str(t) for t in variants[0].eval_stages)]
    else:
        args += ["--variants", ",".join(v.name for v in variants)]
    for name, path in existing.items():
        args += ["--run", f"{name}={path}"]
    if max_images:
        args += ["--max-images", str(max_images)]
    return shlex.join(args)


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))  # a study stopped mid-write keeps the previous file


def _commands(
    kind: str,
    config: str | None,
    overrides: list[str],
    out: Path,
    variants: list[Variant],
    runs: dict[str, Path],
    argv: list[str] | None,
) -> str:
    q = shlex.join
    lines = [
        "#!/usr/bin/env bash",
        f"# emanet study {kind}: the equivalent commands, one run and one evaluation each",
        "set -euo pipefail",
    ]
    if argv:
        lines += ["", "# the study itself (run again to continue an interrupted study):", q(["emanet", *argv])]
    cfg = ["--config", config] if config else []
    for v in variants:
        run = runs[v.name]
        lines += ["", f"# {v.name}: {' '.join(v.overrides)}"]
        if run == out / "runs" / v.name:
            lines.append(q(["emanet", "train", *cfg, *overrides, *v.overrides, f"train.out_dir={run}", "--resume"]))
        else:
            lines.append(f"# (existing run {run})")
        for t in v.eval_stages:
            extra = [] if t is None else [f"eval.eval_stages={t}"]
            name = v.name if t is None else f"{v.name}_Teval{t}"
            lines.append(q(["emanet", "eval", str(run), *extra, "--out", str(out / "evals" / f"{name}.json")]))
    return "\n".join(lines) + "\n"


def _existing_runs(existing_runs: dict[str, str] | None, todo: list[Variant]) -> dict[str, Path]:
    """The --run NAME=PATH runs, checked: each names a variant of this study and a path that exists."""
    existing = {k: Path(v) for k, v in (existing_runs or {}).items()}
    unknown = [k for k in existing if k not in {v.name for v in todo}]
    if unknown:
        raise ConfigError(f"--run names {unknown} are not variants of this study ({', '.join(v.name for v in todo)})")
    for name, path in existing.items():
        if not path.exists():
            raise FileNotFoundError(f"--run {name}={path}: no such run folder, checkpoint or model folder")
    return existing


def _start_folder(out: Path, spec: dict[str, Any]) -> None:
    """Claim the folder, then write study.json, or check that its study was started with the same settings."""
    claim_folder(out)
    spec_path = out / "study.json"
    if spec_path.is_file():
        before = json.loads(spec_path.read_text())
        if before != spec:
            raise RunFolderError(
                f"{out} holds a study started with other settings ({spec_path}); continue it with the "
                "same arguments, or give another --out"
            )
    else:
        _write_json(spec_path, spec)


def _train_variant(
    kind: str,
    v: Variant,
    config: Config,
    run: Path,
    timing: dict[str, float],
    trained: dict[str, Any],
    *,
    progress: bool,
) -> None:
    """Train one variant into ``run`` (resuming an interrupted run), adding its time to ``timing`` and its seed
    and machine to ``trained``."""
    cfg = copy.deepcopy(config)
    cfg.train.out_dir = str(run)
    logger.info(f"== {kind} study: training {v.name} ({' '.join(v.overrides)}) into {run}")
    t0 = time.perf_counter()
    train(cfg, resume=True, progress=progress)
    timing[f"train {v.name}"] = timing.get(f"train {v.name}", 0.0) + time.perf_counter() - t0
    # the machine that finished the run (an interrupted run resumed elsewhere is the rare exception)
    trained[v.name] = {"seed": cfg.train.seed, "machine": machine()}


def _evaluate_cells(
    v: Variant,
    run: Path,
    missing: list[int | None],
    results: dict[str, Any],
    results_path: Path,
    *,
    max_images: int,
    progress: bool,
) -> None:
    """Evaluate ``run`` at each T_eval of ``missing``, saving results.json after each cell."""
    cells, timing = results["cells"], results["seconds"]
    loaded = load_model(run)
    cfg = loaded.config
    device = select_device(cfg.train.device)
    model = loaded.model.to(device)
    _, val = build_datasets(cfg)
    results["classes"] = list(getattr(val, "classes", [])) or [str(c) for c in range(cfg.model.num_classes)]
    for t in missing:
        cfg.eval.eval_stages = t
        t0 = time.perf_counter()
        res = evaluate(model, val, cfg, device, max_images=max_images, progress=progress)
        timing[f"eval {v.name} T_eval={t}"] = time.perf_counter() - t0
        cells.setdefault(v.name, {})[str(t)] = {
            "mIoU": float(res["mIoU"]),
            "aAcc": float(res["aAcc"]),
            "IoU": results_to_json({"IoU": res["IoU"]})["IoU"],  # per class; None: absent from label and prediction
            "T_train": cfg.model.num_stages,
            "images": res["images"],
        }
        t_eval = t if t is not None else cfg.model.num_stages
        logger.info(f"{v.name} T_eval={t_eval}: mIoU {100 * float(res['mIoU']):.2f}")
        _write_json(results_path, results)


def run_study(
    kind: str,
    out: str | Path,
    *,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    train_stages=TRAIN_STAGES,
    eval_stages=EVAL_STAGES,
    variants: list[str] | None = None,
    existing_runs: dict[str, str] | None = None,
    max_images: int = 0,
    progress: bool = True,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Train (or take) every variant, evaluate every cell, write the table, figure and commands into ``out``.

    ``out`` is made and proven writable (checkpoint.claim_folder) once every argument and config is checked and
    before any training.
    """
    out = Path(out)
    todo = plan(kind, train_stages=train_stages, eval_stages=eval_stages, variants=variants)
    existing = _existing_runs(existing_runs, todo)
    configs = {v.name: load_config(config, [*overrides, *v.overrides]) for v in todo}  # every error before work
    runs = {v.name: existing.get(v.name, out / "runs" / v.name) for v in todo}
    spec = {
        "study": kind,
        "config": config,
        "overrides": list(overrides),
        "max_images": max_images,
        "variants": {
            v.name: {"overrides": v.overrides, "eval_stages": v.eval_stages, "run": str(runs[v.name])} for v in todo
        },
    }
    _start_folder(out, spec)
    write_text_atomic(out / "commands.sh", _commands(kind, config, list(overrides), out, todo, runs, argv))
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["command"] = study_command(
        kind, out, config=config, overrides=list(overrides), variants=todo, existing=existing, max_images=max_images
    )
    cells, timing = results.setdefault("cells", {}), results.setdefault("seconds", {})
    trained = results.setdefault("trained", {})  # variant -> {"seed", "machine"} of the run this study trained
    for v in todo:
        run = runs[v.name]
        missing = [t for t in v.eval_stages if str(t) not in cells.get(v.name, {})]
        if not missing:  # every cell measured: nothing to train, even where the run folder was not kept
            continue
        if v.name not in existing and not (run / "eval.json").is_file():  # finished runs end with eval.json
            cells.pop(v.name, None)  # cells of an earlier run of this variant would mix two trainings
            missing = list(v.eval_stages)
            _train_variant(kind, v, configs[v.name], run, timing, trained, progress=progress)
            _write_json(results_path, results)
        _evaluate_cells(v, run, missing, results, results_path, max_images=max_images, progress=progress)
    results["evaluated_on"] = machine()
    results["table"] = write_outputs(kind, out, todo, cells, classes=results.get("classes"))
    write_text_atomic(out / "table.md", (out / "table.md").read_text() + provenance(results, todo))
    _write_json(results_path, results)
    return results


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _machine_line(m: dict[str, Any]) -> str:
    return f"{m['cpu']}, torch {m['torch']}, {m['threads']} threads (date {m['date']})"


def provenance(results: dict[str, Any], variants: list[Variant]) -> str:
    """The lines under a table: the command, the seed, and the machine that trained each run."""
    trained = results.get("trained", {})
    lines = ["", "## How this table was made", "", f"Command: `{results['command']}`", ""]
    seeds = sorted({str(trained[v.name]["seed"]) for v in variants if v.name in trained})
    if seeds:
        lines.append(f"Seed (train.seed): {', '.join(seeds)}; a run is deterministic on one machine.")
    machines: dict[str, list[str]] = {}
    for v in variants:
        m = trained.get(v.name, {}).get("machine")
        machines.setdefault(
            _machine_line(m)
            if m
            else "not recorded (a run given with --run, or trained before studies recorded the machine)",
            [],
        ).append(v.name)
    if len(machines) == 1:
        lines.append(f"Trained on: {next(iter(machines))}.")
    else:
        lines += ["Trained on:", *(f"- {', '.join(names)}: {line}" for line, names in machines.items())]
    lines.append(f"Evaluated on: {_machine_line(results['evaluated_on'])}.")
    lines.append(
        "Floating-point sums differ between CPUs and thread counts and the differences compound over training,"
        " so the same command on another machine gives other figures (by a few points on these toy runs)."
    )
    return "\n".join(lines) + "\n"


def write_outputs(
    kind: str,
    out: Path,
    variants: list[Variant],
    cells: dict[str, dict[str, Any]],
    *,
    classes: list[str] | None = None,
) -> str:
    """table.md and the figure (iterations.png heatmap / bases.png bars / heads.png per-class bars; skipped
    without matplotlib)."""
    if kind == "iterations":
        stages = sorted({t for v in variants for t in v.eval_stages})
        header = ["T_train \\ T_eval", *map(str, stages)]
        rows = [
            [
                str(cells[v.name][str(stages[0])]["T_train"]),
                *(_pct(cells[v.name].get(str(t), {}).get("mIoU")) for t in stages),
            ]
            for v in variants
        ]
        figure, caption = "iterations.png", "mIoU (%) by EM stages in training (rows) and evaluation (columns)"
    elif kind == "bases":
        header = ["variant", "what", "overrides", "mIoU", "aAcc"]
        rows = [
            [
                v.name,
                BASES_LABELS[v.name],
                " ".join(v.overrides),
                _pct(cells[v.name]["None"]["mIoU"]),
                _pct(cells[v.name]["None"]["aAcc"]),
            ]
            for v in variants
        ]
        figure, caption = "bases.png", "mIoU (%) by bases maintenance and gradient"
    else:
        names = classes or [str(c) for c in range(len(cells[variants[0].name]["None"]["IoU"]))]
        header = ["variant", "what", "mIoU", "aAcc", *(f"IoU {c}" for c in names)]
        rows = [
            [
                v.name,
                HEADS_LABELS[v.name],
                _pct(cells[v.name]["None"]["mIoU"]),
                _pct(cells[v.name]["None"]["aAcc"]),
                *(_pct(x) for x in cells[v.name]["None"]["IoU"]),
            ]
            for v in variants
        ]
        figure, caption = "heads.png", "mIoU and per-class IoU (%) by head layout and auxiliary head"
    table = markdown_table(header, rows)
    try:
        if kind == "iterations":
            grid = [[100 * cells[v.name][str(t)]["mIoU"] for t in stages] for v in variants]
            plots.plot_stage_grid(grid, [r[0] for r in rows], stages, out / figure)
        elif kind == "bases":
            plots.plot_variants(
                [100 * cells[v.name]["None"]["mIoU"] for v in variants], [v.name for v in variants], out / figure
            )
        else:
            iou = [
                [100 * (x if x is not None else float("nan")) for x in cells[v.name]["None"]["IoU"]] for v in variants
            ]
            plots.plot_class_iou_groups(iou, [v.name for v in variants], names, out / figure)
        picture = f"\n\n![{caption}]({figure})"
    except ImportError:
        picture = f"\n\n(no figure: matplotlib is missing; {install_hint('report')})"
    write_text_atomic(out / "table.md", f"# emanet study {kind}\n\n{caption}\n\n{table}{picture}\n")
    return table
