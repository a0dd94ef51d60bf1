"""Quality benchmark: the pipeline's own preprocess -> train -> evaluate on the whole of HAM10000.

    make bench-quality                       # = python benchmarks/bench_quality.py
    python benchmarks/bench_quality.py --budget-minutes 16 --train-flips 1   # a shorter run

1. Preprocessing: the real Spark jobs (``spark_jobs/preprocess.py`` then ``augment.py``,
   ``local[2]``) turn ``../shared/data/ham10000`` into shards under
   ``benchmarks/work/quality/data``; processed data whose manifest already records the
   augmentation is reused (``--reprocess`` forces a fresh run).
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
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine_info import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(os.environ.get("MELANOMA_SHARED_DATA", ROOT.parent / "shared" / "data"))
WORK = ROOT / "benchmarks" / "work" / "quality"
PROCESSED = WORK / "data"
RESULTS = ROOT / "benchmarks" / "results"
TARGET = {"auroc": 0.93, "auprc": 0.65}
#: External test sets (other clinics and devices) under ../shared/data, evaluated at the HAM
#: validation threshold and never used to train or choose anything; PH² has lesion masks.
EXTERNAL_DROPS = "ph2,isic_uda1_sample"
EXTERNAL_TARGET = {"ph2": {"auroc": 0.85, "sensitivity": 0.70}}
EVAL_RESERVE_S = 240  # evaluate (val + test forward passes, bootstrap) and writing results


def log(message: str) -> None:
    print(f"[bench-quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


def rel(path: Path | str) -> str:
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------- preprocessing


def processed_manifest() -> dict | None:
    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage

    return latest_manifest(open_storage(PROCESSED)) if PROCESSED.is_dir() else None


def preprocess(reprocess: bool) -> dict:
    """Run the two Spark jobs unless augmented processed data is already there."""
    manifest = processed_manifest()
    if manifest is not None and manifest.get("augmentation") and not reprocess:
        log(f"reusing processed data {rel(PROCESSED)} (manifest v{manifest['version']})")
        return {"reused": True, "seconds": 0.0, "manifest_version": manifest["version"]}
    if not (SHARED / "ham10000").is_dir():
        raise SystemExit(f"HAM10000 not found at {SHARED / 'ham10000'} (see README: ../shared/data)")
    if shutil.which("java") is None:
        raise SystemExit("java not found: Spark needs Java 17+")
    if PROCESSED.exists():
        shutil.rmtree(PROCESSED)
    venv_bin = ROOT / ".venv" / "bin"
    env = dict(
        os.environ, SPARK_LOCAL_IP="127.0.0.1", PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    spark_submit = str(venv_bin / "spark-submit") if (venv_bin / "spark-submit").exists() else "spark-submit"
    common = [spark_submit, "--master", "local[2]", "--conf", f"spark.pyspark.python={sys.executable}"]
    commands = [
        [
            *common,
            "spark_jobs/preprocess.py",
            "--raw-root",
            str(SHARED),
            "--drops",
            "ham10000",
            "--processed-root",
            rel(PROCESSED),
        ],
        [*common, "spark_jobs/augment.py", "--processed-root", rel(PROCESSED)],
    ]
    started = time.perf_counter()
    for command in commands:
        log("running " + " ".join(command[4:]))
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        for line in done.stdout.splitlines():
            if line.startswith(("preprocess:", "augment:")):
                log(line)
    manifest = processed_manifest()
    return {
        "reused": False,
        "seconds": round(time.perf_counter() - started, 1),
        "manifest_version": manifest["version"],
    }


# --------------------------------------------------------------------------- cached vs uncached


def speedup(n_images: int, blocks: int, target: str) -> dict:
    """One short training each way on the first ``n_images`` training images (whole lesions)."""
    from melanoma.storage import open_storage
    from training.train import TrainConfig, run_training

    runs = {}
    for cached in (True, False):
        root = WORK / "runs" / f"speedup-{'cached' if cached else 'uncached'}"
        shutil.rmtree(root, ignore_errors=True)
        cfg = TrainConfig(
            str(PROCESSED),
            str(root),
            epochs=2,
            fine_tune_epochs=1,
            fine_tune_blocks=blocks,
            target=target,
            feature_cache=cached,
            fine_tune_cache=cached,
            cache_dtype="float32",
            limit_train=n_images,
            limit_val=n_images,
        )
        log(f"speed-up: {'cached' if cached else 'uncached'} run on {n_images} train / {n_images} val images")
        result = run_training(cfg)
        history = json.loads(open_storage(str(root)).read_bytes("model/history.json"))
        runs["cached" if cached else "uncached"] = {
            "train_images": n_images,
            "total_seconds": round(result["train_seconds"] - result["cpu_lock_wait_seconds"], 1),
            "cache_seconds": result.get("cache_seconds", 0.0),
            "phase1_epoch_seconds": history["phase1"]["epoch_seconds"],
            "phase2_epoch_seconds": history["phase2"]["epoch_seconds"],
            "phase1_fit_seconds": history["phase1"]["train_seconds"],
            "phase2_fit_seconds": history["phase2"]["train_seconds"],
            "phase1_val_auroc": history["phase1"]["val_auroc"],
            "phase2_val_auroc": history["phase2"]["val_auroc"],
        }
        shutil.rmtree(root, ignore_errors=True)
    c, u = runs["cached"], runs["uncached"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary = {
        "images": n_images,
        "fine_tune_blocks": blocks,
        **runs,
        "phase1_epoch_speedup": round(mean(u["phase1_epoch_seconds"]) / mean(c["phase1_epoch_seconds"]), 1),
        "phase2_epoch_speedup": round(mean(u["phase2_epoch_seconds"]) / mean(c["phase2_epoch_seconds"]), 1),
        "phase1_fit_speedup": round(mean(u["phase1_fit_seconds"]) / mean(c["phase1_fit_seconds"]), 1),
        "phase2_fit_speedup": round(mean(u["phase2_fit_seconds"]) / mean(c["phase2_fit_seconds"]), 1),
        "max_val_auroc_difference": max(
            abs(a - b)
            for a, b in zip(
                c["phase1_val_auroc"] + c["phase2_val_auroc"], u["phase1_val_auroc"] + u["phase2_val_auroc"]
            )
        ),
        "note": "epoch_seconds = fit + validation pass + checkpoint; fit_seconds = the training pass alone; "
        "the cached run also pays cache_seconds once (train + val images through the frozen part)",
    }
    log(
        f"speed-up on {n_images} images: phase 1 epoch x{summary['phase1_epoch_speedup']} (fit x{summary['phase1_fit_speedup']}), "
        f"phase 2 epoch x{summary['phase2_epoch_speedup']} (fit x{summary['phase2_fit_speedup']}); "
        f"largest val AUROC difference {summary['max_val_auroc_difference']:.5f}"
    )
    return summary


# --------------------------------------------------------------------------- machine


def machine() -> dict:
    import keras
    import tensorflow as tf

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": bool(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "platform": platform.platform(),
    }


def estimate(metrics: dict, name: str) -> dict:
    block = metrics["test"][name]
    return {"value": block["value"], "ci_low": block["ci_low"], "ci_high": block["ci_high"]}


def external_specs(names: str) -> list[str]:
    """``RAW_ROOT::DROP_ID`` of each external drop named (comma-separated; empty or "none": none)."""
    drops = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    missing = [d for d in drops if not (SHARED / d).is_dir()]
    if missing:
        raise SystemExit(f"external drop(s) {missing} not found under {SHARED} (see README: ../shared/data)")
    return [f"{SHARED}::{d}" for d in drops]


def evaluate(args: argparse.Namespace, run_root: Path) -> dict:
    """The pipeline's evaluate step on the run (internal + external sets), then Grad-CAM lesion
    focus on the external sets that have lesion masks; returns ``{name: focus summary}``."""
    from training.tasks import evaluate_run, external_focus_run

    specs = external_specs(args.external)
    evaluate_run(
        str(PROCESSED),
        str(run_root),
        strategy="youden",
        n_boot=args.n_boot,
        pooling=args.pooling,
        external=specs,
    )
    focus = {}
    for spec in specs:
        drop = spec.rpartition("::")[2]
        if (SHARED / drop / "masks").is_dir():
            focus[drop] = external_focus_run(str(PROCESSED), str(run_root), spec)
            log(f"external {drop}: lesion focus {json.dumps(focus[drop]['check'])}")
    return focus


def external_fields(metrics: dict, focus: dict) -> dict:
    """Per external drop: discrimination with CIs, the HAM-validation operating point there,
    the score shift against validation, what site calibration gives out of fold, lesion focus."""
    out = {}
    for name, block in (metrics.get("external") or {}).items():
        site = block.get("site_calibration") or {}
        shift = block.get("score_shift") or {}
        out[name] = {
            "n_images": block["n_images"],
            "n_melanoma": block["n_melanoma"],
            **{
                key: {
                    "value": block[key]["value"],
                    "ci_low": block[key]["ci_low"],
                    "ci_high": block[key]["ci_high"],
                }
                for key in ("auroc", "auprc", "sensitivity", "specificity")
            },
            "calibration": {k: block["calibration"][k] for k in ("brier", "ece")},
            "score_shift": {
                k: shift.get(k)
                for k in (
                    "shifted",
                    "ks_statistic",
                    "p_value",
                    "median_logit_shift",
                    "positive_rate",
                    "reference_positive_rate",
                )
            },
            "score_quantiles": block.get("score_quantiles"),
            "site_calibration": {
                k: site.get(k)
                for k in ("threshold", "threshold_ci", "held_out", "strategy", "skipped")
                if k in site
            },
            "lesion_focus": (focus.get(name) or {}).get("check"),
            "target": EXTERNAL_TARGET.get(name),
        }
        if name in EXTERNAL_TARGET:
            target = EXTERNAL_TARGET[name]
            out[name]["target_met"] = (
                block["auroc"]["value"] >= target["auroc"]
                and block["sensitivity"]["value"] >= target["sensitivity"]
            )
    return out


def evaluation_fields(metrics: dict, focus: dict | None = None) -> dict:
    """The figures of quality.json that come from ``eval/metrics.json`` (and external lesion focus)."""
    test, scores = metrics["test"], metrics["scores"]
    return {
        "auroc": test["auroc"]["value"],
        "auprc": test["auprc"]["value"],
        "threshold": metrics["threshold"]["value"],
        "sensitivity": test["sensitivity"]["value"],
        "specificity": test["specificity"]["value"],
        "auroc_ci": estimate(metrics, "auroc"),
        "auprc_ci": estimate(metrics, "auprc"),
        "sensitivity_ci": estimate(metrics, "sensitivity"),
        "specificity_ci": estimate(metrics, "specificity"),
        "pooling": scores["pooling"],
        "per_image": scores.get("per_image"),  # the unpooled figures when pooled
        "threshold_strategy": metrics["threshold"]["strategy"],
        "threshold_chosen_on": metrics["threshold"]["chosen_on"],
        "val": {k: metrics["threshold"]["val"][k] for k in ("auroc", "auprc", "sensitivity", "specificity")},
        "target": TARGET,
        "target_met": test["auroc"]["value"] >= TARGET["auroc"] and test["auprc"]["value"] >= TARGET["auprc"],
        "external": external_fields(metrics, focus or {}),
        "warnings": metrics.get("warnings", []),
    }


def reevaluate(args: argparse.Namespace, command: str) -> int:
    """Evaluate the recorded run's model again; training figures stay as recorded."""
    recorded = json.loads((RESULTS / "quality.json").read_text())
    run_root = WORK / "runs" / args.name
    if Path(recorded["model_uri"]) != Path(rel(run_root / "model" / "model.keras")):
        raise SystemExit(f"results/quality.json records {recorded['model_uri']}, not the run {args.name!r}")
    started = time.perf_counter()
    focus = evaluate(args, run_root)
    metrics = json.loads((run_root / "eval" / "metrics.json").read_text())
    result = {
        **recorded,
        **evaluation_fields(metrics, focus),
        "evaluate_seconds": round(time.perf_counter() - started, 1),
        "reevaluated": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command,
        },
    }
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "quality.md")
    log(
        f"re-evaluated {args.name}: test AUROC {result['auroc']:.4f}, AUPRC {result['auprc']:.4f} ({result['pooling']} pooling)"
    )
    return 0


def member_summary(run_root: Path) -> dict:
    """Training figures of one finished run, from its own files."""
    config = json.loads((run_root / "model" / "config.json").read_text())
    history = json.loads((run_root / "model" / "history.json").read_text())
    state = json.loads((run_root / "model" / "checkpoints" / "state.json").read_text())
    phases = {}
    for phase, h in history.items():
        seconds = h.get("epoch_seconds", [])
        phases[phase] = {
            "epochs": len(h.get("val_auroc", [])),
            "best_val_auroc": max(h.get("val_auroc", [float("nan")])),
            "mean_epoch_seconds": round(sum(seconds) / len(seconds), 1) if seconds else None,
            "train_seconds": round(sum(seconds), 1),
        }
    return {
        "model_uri": rel(run_root / "model" / "model.keras"),
        "seed": config["seed"],
        "fine_tune_blocks": config["fine_tune_blocks"],
        "target": config["target"],
        "train_flips": config["train_flips"],
        "train_augment": config.get("train_augment", False),
        "budget_seconds": config.get("max_train_seconds"),
        "phases": phases,
        "phase2_stop_reason": state.get("stop_reason"),
    }


def ensemble_of_runs(args: argparse.Namespace, command: str) -> int:
    from training.ensemble import save_ensemble

    names = [n.strip() for n in args.ensemble_of.split(",") if n.strip()]
    if len(names) < 2 or args.name in names:
        raise SystemExit("--ensemble-of needs two or more finished runs, and a --name of its own")
    members = {name: member_summary(WORK / "runs" / name) for name in names}
    run_root = WORK / "runs" / args.name
    shutil.rmtree(run_root, ignore_errors=True)
    started = time.perf_counter()
    save_ensemble(
        [str(WORK / "runs" / name / "model" / "model.keras") for name in names],
        str(run_root / "model" / "model.keras"),
    )
    focus = evaluate(args, run_root)
    metrics = json.loads((run_root / "eval" / "metrics.json").read_text())
    manifest = processed_manifest()
    test = metrics["test"]
    result = {
        **evaluation_fields(metrics, focus),
        "ensemble_of": members,
        "evaluate_seconds": round(time.perf_counter() - started, 1),
        "model_uri": rel(run_root / "model" / "model.keras"),
        "metrics_uri": rel(run_root / "eval" / "metrics.json"),
        "counts": split_counts(manifest, test),
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "notes": args.notes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_ensemble_markdown(result, RESULTS / "quality.md")
    log(
        f"ensemble of {names}: test AUROC {result['auroc']:.4f} {result['auroc_ci']}, AUPRC {result['auprc']:.4f} {result['auprc_ci']}; "
        f"val {result['val']['auroc']:.4f} / {result['val']['auprc']:.4f}"
    )
    return 0


def split_counts(manifest: dict, test: dict) -> dict:
    """Image counts of the processed data set, from its manifest and the test block of metrics.json."""
    return {
        "train": manifest["counts"]["train"]["0"] + manifest["counts"]["train"]["1"],
        "train_augmented": manifest["augmented_counts"]["train"]["1"],
        "val": manifest["counts"]["val"]["0"] + manifest["counts"]["val"]["1"],
        "test": test["n_images"],
        "test_melanoma": test["n_melanoma"],
        "test_lesions": test["n_lesions"],
    }


def _estimate_text(e: dict) -> str:
    return f"{e['value']:.3f} (95% CI {e['ci_low']:.3f}-{e['ci_high']:.3f})"


def test_metric_rows(r: dict, extra: list[str] = ()) -> list[str]:
    """The markdown table of test metrics (with the unpooled figures when scores were pooled)."""
    fmt = _estimate_text
    rows = [
        "| test metric | value |",
        "|---|---|",
        f"| AUROC | {fmt(r['auroc_ci'])} |",
        f"| AUPRC | {fmt(r['auprc_ci'])} |",
        f"| threshold (chosen on val) | {r['threshold']:.3f} |",
        f"| sensitivity at it | {fmt(r['sensitivity_ci'])} |",
        f"| specificity at it | {fmt(r['specificity_ci'])} |",
        f"| val AUROC / AUPRC (the scores the threshold was chosen on) | {r['val']['auroc']:.3f} / {r['val']['auprc']:.3f} |",
        *extra,
    ]
    rows += external_metric_rows(r)
    if r.get("per_image"):
        per_image = r["per_image"]
        rows += [
            f"| per image, unpooled: test AUROC | {fmt(per_image['test']['auroc'])} |",
            f"| per image, unpooled: test AUPRC | {fmt(per_image['test']['auprc'])} |",
            f"| per image, unpooled: val AUROC / AUPRC | {per_image['val']['auroc']:.3f} / {per_image['val']['auprc']:.3f} |",
        ]
    return rows


def external_metric_rows(r: dict) -> list[str]:
    """Internal and external side by side: the HAM-validation threshold on other clinics' images."""
    if not r.get("external"):
        return []
    fmt = _estimate_text
    rows = [
        "",
        "| set (never trained or chosen on) | images (melanoma) | AUROC | AUPRC | sensitivity / specificity at the HAM-val threshold "
        "| score shift vs HAM val (KS D, median logit) | site-calibrated sens / spec, out of fold | lesion focus (melanoma maps on lesion vs area) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in r["external"].items():
        shift, site, focus = e["score_shift"], e.get("site_calibration") or {}, e.get("lesion_focus") or {}
        held = site.get("held_out") or {}
        rows.append(
            f"| {name} | {e['n_images']} ({e['n_melanoma']}) | {fmt(e['auroc'])} | {e['auprc']['value']:.3f} | "
            f"{e['sensitivity']['value']:.3f} / {e['specificity']['value']:.3f} | "
            f"{'**shifted**' if shift.get('shifted') else 'no shift'} ({(shift.get('ks_statistic') or 0):.2f}, {(shift.get('median_logit_shift') or 0):+.2f}) | "
            + (
                f"{held['sensitivity']:.3f} / {held['specificity']:.3f} (threshold {site['threshold']:.3f}) | "
                if held
                else "- | "
            )
            + (
                f"{focus['energy_inside_mean']:.1%} vs {focus['lesion_area_share_mean']:.1%} |"
                if focus.get("energy_inside_mean") is not None
                else "- |"
            )
        )
    return rows


def write_ensemble_markdown(result: dict, path: Path) -> None:
    r = result
    lines = [
        "## Model quality (HAM10000, ensemble of EfficientNet-Lite0 runs, CPU)",
        "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']['cpu']}, {r['machine']['cores']} cores, no GPU "
        f"(TensorFlow {r['machine']['tensorflow']}, Keras {r['machine']['keras']}).",
        "",
        f"One model averaging the melanoma logits of {len(r['ensemble_of'])} bench-quality runs (the model a run with "
        f"`ensemble_size={len(r['ensemble_of'])}` exports). Lesion-grouped split: {r['counts']['train']} train images "
        f"(+{r['counts']['train_augmented']} augmented melanoma copies), {r['counts']['val']} val, {r['counts']['test']} test "
        f"({r['counts']['test_melanoma']} melanoma). Threshold chosen on validation ({r['threshold_strategy']}). "
        + (
            "Scores pooled per lesion (sigmoid of the mean logit of the lesion's images)."
            if r.get("pooling") == "lesion"
            else "Each image scored on its own."
        ),
        "",
        *test_metric_rows(r),
    ]
    lines += [
        "",
        f"Target AUROC >= {TARGET['auroc']} and AUPRC >= {TARGET['auprc']}: **{'met' if r['target_met'] else 'not met'}**.",
        "",
        "| member | seed | blocks | training variants | phase 1 epochs (best val AUROC) | phase 2 epochs (best val AUROC) | phase 2 s/epoch | phase 2 stop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["ensemble_of"].items():
        p1, p2 = m["phases"].get("phase1", {}), m["phases"].get("phase2", {})
        lines.append(
            f"| `{name}` | {m['seed']} | {m['fine_tune_blocks']} | {training_variants_cell(m)} | {p1.get('epochs')} ({p1.get('best_val_auroc', float('nan')):.3f}) | "
            f"{p2.get('epochs')} ({p2.get('best_val_auroc', float('nan')):.3f}) | {p2.get('mean_epoch_seconds')} | {m.get('phase2_stop_reason')} |"
        )
    lines.append("")
    if r.get("notes"):
        lines += [r["notes"], ""]
    path.write_text("\n".join(lines))


def training_variants_cell(settings: dict) -> str:
    """The ensemble member table's short form of :func:`training_variants_text`."""
    n = settings["train_flips"]
    if n == 1:
        return "1"
    return f"{n} ({'stored + augment draws' if settings.get('train_augment') else 'flips'})"


def training_variants_text(settings: dict) -> str:
    """What the epochs train on, from a run's resolved config."""
    n = settings["train_flips"]
    if n == 1:
        return "training images as stored"
    if settings.get("train_augment"):
        return (
            f"training images in {n} variants (stored, then {n - 1} random draws per image of the augment job's flips, "
            f"rotation, zoom and brightness; epoch e uses variant e mod {n})"
        )
    return f"training images in {n} flip variants (stored, left-right, up-down, both; epoch e uses variant e mod {n})"


def write_markdown(result: dict, path: Path) -> None:
    from training.efficientnet_lite import VARIANTS

    r = result
    s = r["settings"]
    epochs = r["epochs"]
    lines = [
        f"## Model quality (HAM10000, {VARIANTS[s.get('backbone', 'efficientnet_lite0')].title}, CPU)",
        "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']['cpu']}, {r['machine']['cores']} cores, no GPU "
        f"(TensorFlow {r['machine']['tensorflow']}, Keras {r['machine']['keras']}).",
        "",
        f"Data: all of HAM10000 through the Spark jobs ({'reused' if r['preprocess']['reused'] else 'run'}: "
        f"{r['preprocess']['seconds']:.0f} s), lesion-grouped split: {r['counts']['train']} train images "
        f"(+{r['counts']['train_augmented']} augmented melanoma copies), {r['counts']['val']} val, {r['counts']['test']} test "
        f"({r['counts']['test_melanoma']} melanoma). Threshold chosen on validation ({r['threshold_strategy']}). "
        + (
            "Scores pooled per lesion: each image scored by the sigmoid of the mean logit of its lesion's images (the pipeline's default)."
            if r.get("pooling") == "lesion"
            else "Each image scored on its own."
        ),
        "",
        *test_metric_rows(
            r,
            extra=[
                f"| best val AUROC in training, per image (phase 1 / 2) | {r['best_val_auroc'].get('phase1', float('nan')):.3f} / "
                f"{r['best_val_auroc'].get('phase2', float('nan')):.3f} |"
            ],
        ),
    ]
    lines += [
        "",
        f"Target AUROC >= {TARGET['auroc']} and AUPRC >= {TARGET['auprc']}: **{'met' if r['target_met'] else 'not met'}**.",
        "",
        f"Training {r['train_seconds'] / 60:.1f} min; the whole benchmark {r['total_seconds_excluding_lock_waits'] / 60:.1f} min"
        f"{' (%.1f min wall clock, the rest waiting while other benchmarks held the CPU lock)' % (r['total_seconds'] / 60) if r['cpu_lock_wait_seconds'] >= 1 else ''}. "
        f"target `{s['target']}`, {training_variants_text(s)}, "
        f"phase 1 head on cached pooled features, lr {s['learning_rate']}, {epochs['phase1']} epochs (best {epochs['phase1_best']}); "
        f"phase 2 last {s['fine_tune_blocks']} blocks + head on cached activations ({s['cache_dtype']}), lr {s['fine_tune_learning_rate']}, "
        f"{epochs['phase2']} epochs (best {epochs['phase2_best']}){' — stopped by the time budget' if epochs.get('phase2_stopped_by_budget') else ''}. "
        f"Adam (0.9, 0.999), batch {s['batch_size']}, class weights {s['class_weight']}"
        f"{', label smoothing %s' % s['label_smoothing'] if s.get('label_smoothing') else ''}, early-stopping patience {s['patience']}"
        f"{', learning rate x%s after %d epochs without improvement' % (s['lr_decay_factor'], s['lr_decay_patience']) if s['lr_decay_patience'] else ''}. "
        f"Per epoch: phase 1 {r['epoch_seconds']['phase1']:.1f} s, phase 2 {r['epoch_seconds']['phase2']:.0f} s; "
        f"one-time caching {r['cache_seconds']:.0f} s.",
        "",
    ]
    if r.get("speedup"):
        sp = r["speedup"]
        lines += [
            f"Cached vs uncached ({sp['images']} train images, same seed): phase 1 epoch "
            f"{sum(sp['cached']['phase1_epoch_seconds']) / len(sp['cached']['phase1_epoch_seconds']):.1f} s vs "
            f"{sum(sp['uncached']['phase1_epoch_seconds']) / len(sp['uncached']['phase1_epoch_seconds']):.1f} s "
            f"(x{sp['phase1_epoch_speedup']}), phase 2 ({sp['fine_tune_blocks']} blocks) "
            f"{sum(sp['cached']['phase2_epoch_seconds']):.1f} s vs {sum(sp['uncached']['phase2_epoch_seconds']):.1f} s "
            f"(x{sp['phase2_epoch_speedup']}); training pass alone x{sp['phase1_fit_speedup']} and x{sp['phase2_fit_speedup']} "
            f"(epochs include the validation pass and the checkpoint); the cached run pays {sp['cached']['cache_seconds']:.0f} s once "
            f"to cache. Largest val AUROC difference between the two runs: {sp['max_val_auroc_difference']:.5f}.",
            "",
        ]
    if r.get("continued_from"):
        c = r["continued_from"]
        lines += [
            f"Continued from run `{c['run']}`, whose phase {c['phase']} had stopped after {c['epochs_before']} epochs "
            f"({c['stop_reason_before']}): the epochs above include those, while the training time is this call's only.",
            "",
        ]
    if r.get("reevaluated"):
        lines += [
            f"Evaluation rerun on this model with `{r['reevaluated']['command']}` ({r['reevaluated']['date']}); "
            "the training figures are from the original run.",
            "",
        ]
    if r.get("notes"):
        lines += [r["notes"], ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    started = time.perf_counter()
    command = "python benchmarks/bench_quality.py" + (
        ""
        if argv is None and len(sys.argv) == 1
        else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    if args.reevaluate:
        return reevaluate(args, command)
    if args.ensemble_of:
        return ensemble_of_runs(args, command)
    prep = preprocess(args.reprocess)

    from melanoma.storage import open_storage
    from training.train import CpuTurns, TrainConfig, run_training

    run_root = WORK / "runs" / args.name
    continued = None
    if args.continue_from:
        source = WORK / "runs" / args.continue_from
        source_state = source / "model" / "checkpoints" / "state.json"
        if not source_state.exists() or not (source / "model" / "config.json").exists():
            raise SystemExit(f"--continue-from {args.continue_from}: {rel(source)} holds no finished run")
        if not run_root.exists():  # else an interrupted continuation resumes where it stopped
            shutil.copytree(source, run_root)
        before = json.loads(source_state.read_text())
        settings = json.loads((source / "model" / "config.json").read_text())
        continued = {
            "run": args.continue_from,
            "phase": before["phase"],
            "epochs_before": before["epoch"] + 1,
            "stop_reason_before": before.get("stop_reason"),
        }
        sp = None
    else:
        sp = (
            speedup(args.speedup_images, args.fine_tune_blocks, args.target)
            if args.speedup_images > 0
            else None
        )
        shutil.rmtree(run_root, ignore_errors=True)
    budget_s = args.budget_minutes * 60
    train_budget = budget_s - (time.perf_counter() - started - CpuTurns.waited) - EVAL_RESERVE_S
    if continued:
        cfg = TrainConfig.from_dict(
            {
                **settings,
                "processed_root": str(PROCESSED),
                "run_root": str(run_root),
                "max_train_seconds": train_budget,
                "continue_after_budget": True,
            }
        )
    else:
        cfg = train_config(args, str(PROCESSED), str(run_root), train_budget=train_budget)
    log(
        f"training: {train_budget / 60:.1f} min left for it (budget {args.budget_minutes:.0f} min, {EVAL_RESERVE_S} s kept for evaluation)"
    )
    trained = run_training(cfg)
    log(
        f"trained: {json.dumps(trained['best_val_auroc'])} best val AUROC, epochs {trained['epochs_run']}, {trained['train_seconds']:.0f} s"
    )

    evaluate_started = time.perf_counter()
    with CpuTurns.turn():
        focus = evaluate(args, run_root)
    evaluate_seconds = time.perf_counter() - evaluate_started
    run = open_storage(str(run_root))
    metrics = json.loads(run.read_bytes("eval/metrics.json"))
    history = json.loads(run.read_bytes("model/history.json"))
    state = json.loads(run.read_bytes("model/checkpoints/state.json"))
    manifest = processed_manifest()
    total = time.perf_counter() - started
    waited = CpuTurns.waited

    def phase_info(name: str) -> tuple[int, int | str, float]:
        h = history.get(name, {})
        aurocs = h.get("val_auroc", [])
        seconds = h.get("epoch_seconds", [])
        best = (aurocs.index(max(aurocs)) + 1) if aurocs else 0
        if (
            name == "phase2"
            and state.get("baseline")
            and (not aurocs or max(aurocs) <= state["baseline"]["val_auroc"])
        ):
            best = "0 (phase 1 weights kept)"
        return len(aurocs), best, (sum(seconds) / len(seconds) if seconds else 0.0)

    p1, p2 = phase_info("phase1"), phase_info("phase2")
    test = metrics["test"]
    result = {
        **evaluation_fields(metrics, focus),
        "train_seconds": round(trained["train_seconds"] - trained["cpu_lock_wait_seconds"], 1),
        "train_wall_seconds": trained["train_seconds"],
        "cache_seconds": trained.get("cache_seconds", 0.0),
        "evaluate_seconds": round(evaluate_seconds, 1),
        "total_seconds": round(total, 1),
        "cpu_lock_wait_seconds": round(waited, 1),
        "total_seconds_excluding_lock_waits": round(total - waited, 1),
        "budget_minutes": args.budget_minutes,
        "model_uri": rel(run_root / "model" / "model.keras"),
        "metrics_uri": rel(run_root / "eval" / "metrics.json"),
        "best_val_auroc": trained["best_val_auroc"],
        "epochs": {
            "phase1": p1[0],
            "phase1_best": p1[1],
            "phase2": p2[0],
            "phase2_best": p2[1],
            "phase2_stopped_by_budget": str(
                (trained.get("stop_reason") or {}).get("phase2") or ""
            ).startswith("time budget"),
            "stop_reason": trained.get("stop_reason"),
        },
        "epoch_seconds": {"phase1": round(p1[2], 2), "phase2": round(p2[2], 1)},
        "settings": {
            k: v
            for k, v in json.loads(run.read_bytes("model/config.json")).items()
            if k not in ("processed_root", "run_root", "extra")
        },
        "counts": split_counts(manifest, test),
        "preprocess": prep,
        "speedup": sp,
        "continued_from": continued,
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "notes": args.notes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "quality.md")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
