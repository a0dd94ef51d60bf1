"""Writing bench-quality's results: ``benchmarks/results/quality.json`` and the ``quality.md`` section."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.quality_common import RESULTS, TARGET
from training.tta import VIEWS_NOTE


def write_results(result: dict, write_section) -> None:
    """quality.json, and quality.md by ``write_section`` (:func:`write_markdown` for a run,
    :func:`write_ensemble_markdown` for an ensemble)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section(result, RESULTS / "quality.md")


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
    if r.get("per_image"):
        per_image = r["per_image"]
        rows += [
            f"| per image, unpooled: test AUROC | {fmt(per_image['test']['auroc'])} |",
            f"| per image, unpooled: test AUPRC | {fmt(per_image['test']['auprc'])} |",
            f"| per image, unpooled: val AUROC / AUPRC | {per_image['val']['auroc']:.3f} / {per_image['val']['auprc']:.3f} |",
        ]
    return rows + external_metric_rows(r)  # a table of its own, after the test metrics


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


def external_target_lines(r: dict) -> list[str]:
    """One line per external set with a target (AUROC and sensitivity at the HAM-val threshold)."""
    return [
        f"Target on {name}: AUROC >= {e['target']['auroc']} and sensitivity >= {e['target']['sensitivity']} at the "
        f"HAM-val threshold: **{'met' if e['target_met'] else 'not met'}**."
        for name, e in (r.get("external") or {}).items()
        if e.get("target")
    ]


def command_line(r: dict) -> str:
    """The command, date and machine of a result; its vector extensions and numerics fingerprint where
    recorded (results before 2026-12-03 lack them): equal fingerprints train alike."""
    m = r["machine"]
    arithmetic = (
        f"; {'/'.join(m['cpu_vector_flags']) or 'no vector extensions listed'}, numerics fingerprint {m['numerics_fingerprint']}"
        if "numerics_fingerprint" in m
        else ""
    )
    return (
        f"Command: `{r['command']}` — {r['date']}, {m['cpu']}, {m['cores']} cores, no GPU "
        f"(TensorFlow {m['tensorflow']}, Keras {m['keras']}{arithmetic})."
    )


def write_ensemble_markdown(result: dict, path: Path) -> None:
    r = result
    lines = [
        "## Model quality (HAM10000, ensemble of EfficientNet-Lite0 runs, CPU)",
        "",
        command_line(r),
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
        *external_target_lines(r),
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
        scale = "a random resized crop" if settings.get("train_random_crop") else "zoom"
        colour = ", hue, saturation and contrast" if settings.get("train_colour_jitter") else ""
        return (
            f"training images in {n} variants (stored, then {n - 1} random draws per image of the augment job's flips, "
            f"rotation, {scale} and brightness{colour}; epoch e uses variant e mod {n})"
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
        command_line(r),
        "",
        f"Data: all of HAM10000 through the Spark jobs ({'reused' if r['preprocess']['reused'] else 'run'}: "
        f"{r['preprocess']['seconds']:.0f} s), lesion-grouped split: {r['counts']['train']} train images "
        f"(+{r['counts']['train_augmented']} augmented melanoma copies), {r['counts']['val']} val, {r['counts']['test']} test "
        f"({r['counts']['test_melanoma']} melanoma). Threshold chosen on validation ({r['threshold_strategy']}). "
        + (
            "Scores pooled per lesion: each image scored by the sigmoid of the mean logit of its lesion's images (the pipeline's default)."
            if r.get("pooling") == "lesion"
            else "Each image scored on its own."
        )
        + VIEWS_NOTE[r.get("views", 1)],
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
        *external_target_lines(r),
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
