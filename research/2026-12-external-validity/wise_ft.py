"""WiSE-FT on one bench-quality run (pre-registered in this folder's README, run ``wise``).

Weight-space interpolation between the run's phase-1 model (frozen backbone, trained head; its
``checkpoints/phase1-final.weights.h5``) and its fine-tuned model (``model/model.keras``):
``(1 - a) * phase1 + a * fine_tuned``, as in Wortsman et al., "Robust fine-tuning of zero-shot
models" (CVPR 2022), by the product's :func:`training.weight_interpolation.interpolate_weights`
(the ``fine_tune_interpolation`` setting applies the same at export).

    # 1. the choice: each a scored on HAM validation (and test), no external set
    .venv/bin/python research/2026-12-external-validity/wise_ft.py choose wise OUT.json
    # 2. afterwards, whatever the rule said: PH² and the ISIC sample for every a
    .venv/bin/python research/2026-12-external-validity/wise_ft.py external wise OUT.json

Each interpolated model is written as its own run (``benchmarks/work/quality/runs/<name>-aNNN``)
and evaluated by the pipeline's evaluate step, as ``bench_quality.py --reevaluate`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.quality_common import WORK  # noqa: E402
from benchmarks.quality_evaluation import evaluate, evaluation_fields  # noqa: E402
from benchmarks.quality_external import EXTERNAL_DROPS  # noqa: E402
from melanoma.settings import SETTINGS  # noqa: E402
from training.checkpoints import CHECKPOINTS  # noqa: E402
from training.model_io import load_model, load_weights_bytes, save_model  # noqa: E402
from training.weight_interpolation import interpolate_weights  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHOOSABLE = (0.25, 0.5, 0.75)
ALLOWED_COST = 0.005  # issue #24: a change may cost HAM validation at most this much AUROC

log = logging.getLogger("wise_ft")


def interpolated_runs(name: str) -> dict[float, Path]:
    """One run folder per a, its model interpolated; the run's other files copied as they are."""
    source = WORK / "runs" / name
    model = load_model(str(source / "model" / "model.keras"))
    end = model.get_weights()
    load_weights_bytes(model, (source / CHECKPOINTS / "phase1-final.weights.h5").read_bytes())
    start = model.get_weights()
    runs = {}
    for alpha in ALPHAS:
        target = WORK / "runs" / f"{name}-a{round(alpha * 100):03d}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source / "model", target / "model", ignore=shutil.ignore_patterns("model.keras"))
        interpolate_weights(model, start, end, alpha)
        save_model(model, str(target / "model" / "model.keras"))
        runs[alpha] = target
    return runs


def choice(val_auroc: dict[float, float]) -> float | None:
    """The pre-registered rule: the smallest choosable a within ALLOWED_COST of a = 1 on HAM val."""
    floor = val_auroc[1.0] - ALLOWED_COST
    return next((a for a in CHOOSABLE if val_auroc[a] >= floor), None)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=("choose", "external"))
    parser.add_argument("name")
    parser.add_argument("out")
    args = parser.parse_args()
    runs = interpolated_runs(args.name)
    evaluation = argparse.Namespace(
        external="none" if args.stage == "choose" else EXTERNAL_DROPS,
        n_boot=SETTINGS["n_boot"].default,
        pooling=SETTINGS["score_pooling"].default,
        test_time_augmentation=False,
    )
    results = {}
    for alpha, run_root in runs.items():
        focus = evaluate(evaluation, run_root)
        metrics = json.loads((run_root / "eval" / "metrics.json").read_text())
        results[str(alpha)] = evaluation_fields(metrics, focus)
        log.info("a=%.2f: HAM val AUROC %.4f", alpha, results[str(alpha)]["val"]["auroc"])
    val = {alpha: results[str(alpha)]["val"]["auroc"] for alpha in ALPHAS}
    out = {"stage": args.stage, "run": args.name, "val_auroc": {str(a): v for a, v in val.items()}}
    out["chosen_alpha"] = choice(val)
    out["results"] = results
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log.info("chosen a: %s (HAM val AUROC by a: %s)", out["chosen_alpha"], out["val_auroc"])


if __name__ == "__main__":
    main()
