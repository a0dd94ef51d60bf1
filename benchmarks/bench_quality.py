"""Quality benchmark: the pipeline's own preprocess -> train -> evaluate on the whole of HAM10000.

    make bench-quality                       # = python benchmarks/bench_quality.py
    python benchmarks/bench_quality.py --budget-minutes 16 --train-flips 1   # a shorter run

1. Preprocessing: the real Spark jobs (``spark_jobs/preprocess.py`` then ``augment.py``,
   ``local[2]``) turn ``../shared/data/ham10000`` into shards under
   ``benchmarks/work/quality/data``; processed data whose manifest already records the
   augmentation and the current preprocessing version is reused (``--reprocess`` forces a
   fresh run). ``--colour-constancy shades_of_gray`` trains on a root of its own
   (``data-shades_of_gray``); a run is always evaluated on the root it trained on.
2. Cached vs uncached (``--speedup-images``, 0 to skip): the same short training, once on
   cached backbone outputs and once running the frozen backbone every epoch, on a subset,
   to measure the per-epoch speed-up and show the two reach the same validation AUROC.
3. Training: :func:`training.train.run_training` with EfficientNet-Lite0 (ImageNet; ``--backbone`` for Lite1/Lite2): phase 1
   (head, frozen backbone) on cached features, phase 2 fine-tuning the last blocks on cached
   activations; each phase stops early on validation AUROC, and phase 2 also stops when the
   time left in the budget would not fit one more epoch (the epochs run are recorded).
4. Evaluation: :func:`training.tasks.evaluate_run`, the pipeline's evaluate step: scores
   pooled per lesion (``--pooling lesion``, the pipeline's default; ``none`` scores each
   image alone), threshold chosen on validation (Youden), test metrics with lesion-bootstrap
   95% intervals on the lesion-grouped test split; the per-image (unpooled) AUROC/AUPRC are
   recorded beside the pooled ones. Nothing is chosen on the test split.

Writes ``benchmarks/results/quality.json`` and ``quality.md``; the run (model, checkpoints,
eval/) stays under ``benchmarks/work/quality/runs/<name>``.

    python benchmarks/bench_quality.py --reevaluate --name deeper11 --pooling lesion

evaluates the model that ``results/quality.json`` records again (no training), e.g. after
a change to the evaluation, keeping that file's training figures.

    python benchmarks/bench_quality.py --ensemble-of deeper11,seed1 --name ens2

builds the ensemble of finished runs (:func:`training.ensemble.build_ensemble`, the model
a run with ``ensemble_size`` exports) under ``runs/ens2`` and evaluates it; each member's
training figures are read from its own run folder.

This script parses the flags and runs the steps; the steps live beside it, imported as
``benchmarks.quality_*``: ``quality_runs`` (preprocessing, the speed-up timing, continuing a
run, the run's figures), ``quality_evaluation`` (the evaluate step, ``--reevaluate``),
``quality_external`` (the external sets), ``quality_ensemble`` (``--ensemble-of``),
``quality_report`` (quality.json and quality.md) and ``quality_common`` (paths, targets, log).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.quality_common import EVAL_RESERVE_S, RESULTS, WORK, log, rel, setup_logging  # noqa: E402
from benchmarks.quality_ensemble import ensemble_of_runs  # noqa: E402
from benchmarks.quality_evaluation import evaluate, reevaluate  # noqa: E402
from benchmarks.quality_external import EXTERNAL_DROPS  # noqa: E402
from benchmarks.quality_report import write_markdown, write_results  # noqa: E402
from benchmarks.quality_runs import (  # noqa: E402
    continue_run,
    continued_config,
    preprocess,
    run_result,
    speedup,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


#: The recipe flags: declared in melanoma.settings, defaults from the best recipe (what a default
#: scheduled run trains). Lite0-2 only: the benchmark reads package weights, offline.
RECIPE_FLAGS = (
    "target",
    "backbone",
    "epochs",
    "fine_tune_epochs",
    "fine_tune_blocks",
    "learning_rate",
    "fine_tune_learning_rate",
    "patience",
    "lr_decay_patience",
    "train_flips",
    "train_augment",
    "train_colour_jitter",
    "train_random_crop",
    "fine_tune_interpolation",
    "label_smoothing",
    "class_weight",
)
BENCH_BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def flag_help(setting) -> str:
    """A setting's description as argparse help (which formats it with %: "95%" must be escaped)."""
    return setting.description.replace(" Empty: the recipe's.", "").replace("%", "%%")


def add_setting_flag(parser: argparse.ArgumentParser, name: str, default, choices=None) -> None:
    """``--name`` for a run setting of melanoma.settings: its type, choices and description."""
    from melanoma.settings import SETTINGS

    setting = SETTINGS[name]
    flag = "--" + name.replace("_", "-")
    if setting.schema.get("type") == "boolean":
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=default, help=flag_help(setting)
        )
        return
    enum = choices or setting.schema.get("enum")
    kind = {"integer": int, "number": float}.get(setting.schema.get("type"), type(default))
    parser.add_argument(flag, type=kind, default=default, choices=enum, help=flag_help(setting))


def build_parser() -> argparse.ArgumentParser:
    from melanoma.colour_constancy import COLOUR_CONSTANCY
    from melanoma.settings import RECIPES, SETTINGS

    best = {**{n: s.default for n, s in SETTINGS.items()}, **RECIPES["best"]}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=float(best["max_train_minutes"]),
        help="whole run, preprocessing included (default: the best recipe's max_train_minutes)",
    )
    for name in RECIPE_FLAGS:
        add_setting_flag(parser, name, best[name], BENCH_BACKBONES if name == "backbone" else None)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed (initialisation, shuffling, dropout); the split does not depend on it",
    )
    parser.add_argument(
        "--speedup-images", type=int, default=512, help="subset for the cached vs uncached timing; 0 skips it"
    )
    parser.add_argument("--n-boot", type=int, default=best["n_boot"], help=flag_help(SETTINGS["n_boot"]))
    parser.add_argument(
        "--external",
        default=EXTERNAL_DROPS,
        help="comma-separated external drops under ../shared/data, evaluated at the HAM validation threshold ('none': none)",
    )
    parser.add_argument(
        "--pooling",
        default=best["score_pooling"],
        choices=SETTINGS["score_pooling"].schema["enum"],
        help="decision scores: pooled per lesion or per image",
    )
    add_setting_flag(parser, "test_time_augmentation", best["test_time_augmentation"])
    parser.add_argument(
        "--ensemble-of",
        default="",
        help="comma-separated finished run names: evaluate their ensemble as --name (no training)",
    )
    parser.add_argument(
        "--continue-from",
        default="",
        help="a finished run stopped by its time budget: copy it to --name and train on from its last epoch "
        "with its own settings under --budget-minutes (the source run stays as recorded)",
    )
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="no training: evaluate again the run that results/quality.json records (it must be --name)",
    )
    parser.add_argument(
        "--reprocess", action="store_true", help="rerun the Spark jobs even if processed data exists"
    )
    parser.add_argument(
        "--colour-constancy",
        default=COLOUR_CONSTANCY[0],
        choices=COLOUR_CONSTANCY,
        help="colour constancy of the processed data to train on (one processed root per method)",
    )
    parser.add_argument("--name", default="bench", help="run folder name under benchmarks/work/quality/runs")
    parser.add_argument("--notes", default="", help="free text added to quality.md (what else was tried)")
    return parser


def train_config(args: argparse.Namespace, processed_root: str, run_root: str, *, train_budget: float):
    """The TrainConfig of a fresh bench run: the recipe flags mapped as the DAG maps its Params."""
    from melanoma.settings import config_fields
    from training.config import TrainConfig

    fields = config_fields({name: getattr(args, name) for name in RECIPE_FLAGS})
    return TrainConfig(
        processed_root,
        run_root,
        **fields,
        weights="imagenet",
        feature_cache=True,
        fine_tune_cache=True,
        cache_dtype="float16",
        max_train_seconds=train_budget,
        seed=args.seed,
    )


def command_line(argv: list[str] | None) -> str:
    """The command as quality.json records it."""
    return "python benchmarks/bench_quality.py" + (
        ""
        if argv is None and len(sys.argv) == 1
        else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )


def log_result(result: dict, total: float) -> None:
    """The run's headline figures: two log lines, then one JSON line on stdout."""
    log(
        f"test AUROC {result['auroc']:.4f} {result['auroc_ci']}, AUPRC {result['auprc']:.4f} {result['auprc_ci']}, "
        f"threshold {result['threshold']:.3f} (val), sensitivity {result['sensitivity']:.3f}, specificity {result['specificity']:.3f}"
    )
    log(
        f"target {'met' if result['target_met'] else 'NOT met'}; total {total / 60:.1f} min; wrote {rel(RESULTS / 'quality.json')} and quality.md"
    )
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "auroc",
                    "auprc",
                    "threshold",
                    "sensitivity",
                    "specificity",
                    "train_seconds",
                    "model_uri",
                )
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    command = command_line(argv)
    if args.reevaluate:
        return reevaluate(args, command)
    if args.ensemble_of:
        return ensemble_of_runs(args, command)
    prep = preprocess(args.reprocess, args.colour_constancy)
    processed_root = prep.pop("root")

    from training.tracking import record_document, record_step, tracking_uri
    from training.train import CpuTurns, run_training

    run_root = WORK / "runs" / args.name
    if args.continue_from:
        continued, settings = continue_run(args.continue_from, run_root)
        sp = None
    else:
        continued, settings = None, None
        sp = (
            speedup(args.speedup_images, args.fine_tune_blocks, args.target, processed_root)
            if args.speedup_images > 0
            else None
        )
        shutil.rmtree(run_root, ignore_errors=True)
    budget_s = args.budget_minutes * 60
    train_budget = budget_s - (time.perf_counter() - started - CpuTurns.waited) - EVAL_RESERVE_S
    if continued:
        cfg = continued_config(settings, run_root, train_budget)
    else:
        cfg = train_config(args, str(processed_root), str(run_root), train_budget=train_budget)
    log(
        f"training: {train_budget / 60:.1f} min left for it (budget {args.budget_minutes:.0f} min, {EVAL_RESERVE_S} s kept for evaluation)"
    )
    trained = run_training(cfg)
    record_step("train", str(run_root), trained)
    log(
        f"trained: {json.dumps(trained['best_val_auroc'])} best val AUROC, epochs {trained['epochs_run']}, {trained['train_seconds']:.0f} s"
    )

    evaluate_started = time.perf_counter()
    with CpuTurns.turn():
        focus = evaluate(args, run_root)
    result, total = run_result(
        args,
        run_root,
        trained,
        started=started,
        evaluate_seconds=time.perf_counter() - evaluate_started,
        focus=focus,
        prep=prep,
        sp=sp,
        continued=continued,
        command=command,
    )
    write_results(result, write_markdown)
    run_id = record_document(str(run_root), "quality.json", result, {"melanoma.source": "bench_quality"})
    log(f"tracked: MLflow run {run_id} in {tracking_uri(str(run_root))}")
    log_result(result, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
