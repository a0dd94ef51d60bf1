"""One self-contained HTML report of a run: metrics with intervals, threshold, plots, Grad-CAM.

The file must open anywhere (a laptop, an S3 console download, an e-mail attachment), so images
are inlined as ``data:`` URIs, the CSS is inline, and nothing is fetched. A Content-Security-Policy
meta tag forbids scripts and remote loads as a second line of defence; the first is that every
string from data (image ids, diagnoses, subgroup values, set names, keys) goes through html.escape.

Inputs: :mod:`training.evaluation`'s ``metrics.json``, :func:`training.gradcam.run_gradcam`'s summary.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Iterable

from training.tta import VIEWS_NOTE, views_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL_PREFIX = "eval"
GRADCAM_PREFIX = "gradcam"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 75rem; color: #1d2330; line-height: 1.4; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 2px solid #d6dbe4; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .92rem; }
th, td { border: 1px solid #d6dbe4; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: #eef1f6; }
.note { color: #56607a; font-size: .9rem; }
.warning { background: #fff4e5; border-left: 4px solid #e08a00; padding: .6rem 1rem; margin: 1rem 0; }
.optimistic { background: #fdecec; border: 2px dashed #c62828; padding: .6rem 1rem; margin: 1rem 0; } .optimistic h3 { color: #c62828; margin-top: 0; }
.plots, .gallery { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; border: 1px solid #d6dbe4; padding: .5rem; background: #fafbfd; }
.plots img { max-width: 36rem; } .gallery img { width: 28rem; }
figcaption { font-size: .85rem; margin-top: .3rem; } figcaption dl { display: grid; grid-template-columns: auto 1fr; gap: 0 .6rem; margin: 0; }
dt { color: #56607a; } dd { margin: 0; word-break: break-all; } .TP, .TN { color: #1b5e20; } .FP, .FN { color: #b71c1c; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    """Escaped text of any value; the only way data reaches the page."""
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    """A number for a table cell; None (undefined ratio, missing metric) shows as a dash."""
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _e(f"{value:.{digits}f}")
    return _e(value)


def _pct(value: float | None) -> str:
    return "&ndash;" if value is None else _e(f"{100 * value:.1f}%")


def _estimate(estimate: Any) -> str:
    """``{"value", "ci_low", "ci_high"}`` as "0.912 (0.881&ndash;0.940)"; a plain number as is."""
    if not isinstance(estimate, dict):
        return _num(estimate)
    text = _num(estimate.get("value"))
    low, high = estimate.get("ci_low"), estimate.get("ci_high")
    if low is not None and high is not None:
        text += f' <span class="note">({_num(low)}&ndash;{_num(high)})</span>'
    return text


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A table from already-escaped cell HTML (header cells are escaped here)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def data_uri(png: bytes) -> str | None:
    """A data URI for PNG bytes; anything else is refused (an SVG could carry script)."""
    if not png.startswith(PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes | None, alt: str) -> str:
    uri = data_uri(png) if png is not None else None
    if uri is None:
        return f'<p class="note">image {_e(alt)} missing or not a PNG</p>'
    return f'<img src="{uri}" alt="{_e(alt)}">'


# --------------------------------------------------------------------------- sections


_SET_ROWS = (
    ("AUROC", "auroc"),
    ("AUPRC", "auprc"),
    ("Sensitivity", "sensitivity"),
    ("Specificity", "specificity"),
)
_BINARY_ROWS = (("Accuracy", "accuracy"), ("PPV", "ppv"), ("NPV", "npv"), ("F1", "f1"))


def _set_table(blocks: dict[str, dict]) -> str:
    """Metrics of one or more set blocks (see :mod:`training.evaluation`), one column each."""
    names = list(blocks)
    rows = []
    for label, key in (("Images", "n_images"), ("Lesions", "n_lesions"), ("Melanoma", "n_melanoma")):
        rows.append([_e(label)] + [_num(blocks[n].get(key)) for n in names])
    rows.append(["Prevalence"] + [_pct(blocks[n].get("prevalence")) for n in names])
    for label, key in _SET_ROWS:
        rows.append([_e(label)] + [_estimate(blocks[n].get(key)) for n in names])
    for label, key in _BINARY_ROWS:
        rows.append([_e(label)] + [_num((blocks[n].get("at_threshold") or {}).get(key)) for n in names])
    rows.append(
        ["TP / FP / FN / TN"]
        + [
            " / ".join(_num((blocks[n].get("at_threshold") or {}).get(k)) for k in ("tp", "fp", "fn", "tn"))
            for n in names
        ]
    )
    rows.append(["Brier score"] + [_num((blocks[n].get("calibration") or {}).get("brier")) for n in names])
    rows.append(["ECE"] + [_num((blocks[n].get("calibration") or {}).get("ece")) for n in names])
    notes = "".join(
        f'<p class="note">{_e(n)}: {_e(blocks[n]["note"])}</p>' for n in names if blocks[n].get("note")
    )
    return _table(["Metric"] + names, rows) + notes


def _metrics_section(metrics: dict) -> str:
    blocks = {"test": metrics.get("test") or {}}
    for name, block in (metrics.get("external") or {}).items():
        blocks[f"external: {name}"] = block
    boot = (metrics.get("test") or {}).get("bootstrap") or {}
    ci_note = (
        f'<p class="note">In brackets: 95% percentile bootstrap intervals, {_e(boot.get("n_boot", "?"))} '
        "resamples of lesions (all images of a lesion together). Counts and ratios below the "
        "interval rows are at the threshold chosen on validation.</p>"
    )
    return (
        "<h2>Metrics</h2>"
        + _scores_note(metrics)
        + ci_note
        + _set_table(blocks)
        + _external_section(metrics)
        + _subgroups((metrics.get("test") or {}).get("subgroups") or {})
    )


def _external_section(metrics: dict) -> str:
    """Does the validation threshold hold on each external set? Score shift and site calibration."""
    externals = metrics.get("external") or {}
    if not externals:
        return ""
    rows = []
    for name, block in externals.items():
        shift = block.get("score_shift") or {}
        site = block.get("site_calibration") or {}
        held = site.get("held_out") or {}
        ci = site.get("threshold_ci") or [None, None]
        rows.append(
            [
                _e(name),
                _e(
                    "SHIFTED"
                    if shift.get("shifted")
                    else ("no" if shift.get("shifted") is False else "untested")
                ),
                _num(shift.get("ks_statistic")),
                _num(shift.get("median_logit_shift")),
                f"{_pct(shift.get('positive_rate'))} vs {_pct(shift.get('reference_positive_rate'))}",
                (
                    f"{_num(site.get('threshold'), 4)} [{_num(ci[0], 4)}, {_num(ci[1], 4)}]"
                    if "threshold" in site
                    else _e(site.get("skipped", ""))
                ),
                f"{_num(held.get('sensitivity'))} / {_num(held.get('specificity'))}" if held else "",
            ]
        )
    header = [
        "External set",
        "Score shift",
        "KS D",
        "Median logit shift",
        "Called melanoma (vs val)",
        "Site threshold [95% CI]",
        "Site-calibrated sens / spec on held-out cases",
    ]
    note = (
        "<p class=\"note\">Score shift: two-sample Kolmogorov-Smirnov test of the set's scores against validation's "
        "(warns at D &ge; 0.2 and p &lt; 0.01). A shifted set scores unlike the validation images: the validation "
        "threshold's sensitivity and specificity do not carry over. Site threshold: re-chosen on that set by the "
        "same strategy; its sensitivity/specificity are out-of-fold (chosen on the other folds of the set).</p>"
    )
    return "<h3>Other sites: does the operating point hold?</h3>" + _table(header, rows) + note


def _scores_note(metrics: dict) -> str:
    """What the scores are: per image, or pooled per lesion (then the per-image AUROC/AUPRC too)."""
    scores = metrics.get("scores") or {}
    views = _e(VIEWS_NOTE[views_of(metrics)])
    if scores.get("pooling", "none") == "none":
        return f'<p class="note">Scores: each image on its own.{views}</p>'
    per_image = (scores.get("per_image") or {}).get("test") or {}
    return (
        f'<p class="note">Scores: {_e(scores.get("rule", scores.get("pooling")))}. Every number below uses '
        f"them, the threshold included. Per image, unpooled, test AUROC {_estimate(per_image.get('auroc'))}, "
        f"AUPRC {_estimate(per_image.get('auprc'))}.{views}</p>"
    )


def _subgroups(subgroups: dict) -> str:
    if not subgroups:
        return ""
    rows = []
    for grouping, values in subgroups.items():
        for value, stats in values.items():
            rows.append(
                [
                    _e(f"{grouping} = {value}"),
                    _num(stats.get("n")),
                    _num(stats.get("n_melanoma")),
                    _num(stats.get("auroc")),
                    _num(stats.get("sensitivity")),
                    _num(stats.get("specificity")),
                    "small" if stats.get("small") else "",
                ]
            )
    header = ["Test subgroup", "Images", "Melanoma", "AUROC", "Sensitivity", "Specificity", ""]
    return "<h3>Test subgroups</h3>" + _table(header, rows)


def _threshold_section(metrics: dict, payload: dict, gradcam_summary: dict | None) -> str:
    chosen = metrics.get("threshold") or {}
    threshold = payload.get("threshold", chosen.get("value"))
    strategy = payload.get("strategy", chosen.get("strategy"))
    chosen_on = payload.get("chosen_on", chosen.get("chosen_on"))
    pooling = payload.get("pooling", (metrics.get("scores") or {}).get("pooling", "none"))
    parts = [
        "<h2>Decision threshold</h2>",
        f"<p>Melanoma is called when the {'lesion-pooled ' if pooling == 'lesion' else ''}probability is "
        f"&ge; <strong>{_num(threshold, 4)}</strong>, "
        f"chosen by <strong>{_e(strategy)}</strong> on the <strong>{_e(chosen_on)}</strong> split",
    ]
    target = payload.get("target_sensitivity", chosen.get("target_sensitivity"))
    if target is not None:
        parts.append(f" (target sensitivity {_num(target)})")
    parts.append(". Every test number in this report uses this threshold.</p>")
    val = chosen.get("val") or {}
    if val:
        rows = [
            [_e(k), _num(val.get(k))]
            for k in ("sensitivity", "specificity", "auroc", "auprc", "n_images", "n_lesions")
            if k in val
        ]
        parts.append(f"<h3>On {_e(chosen_on)}, where it was chosen</h3>" + _table(["Metric", "Value"], rows))
    used = (gradcam_summary or {}).get("threshold")
    if used is not None and threshold is not None and float(used) != float(threshold):
        parts.append(
            f'<p class="warning">Grad-CAM outcomes used threshold {_num(used, 4)}, not {_num(threshold, 4)}: '
            "the gallery's TP/FP/FN/TN do not match the metrics.</p>"
        )
    return "".join(parts)


def _optimistic_section(metrics: dict) -> str:
    optimistic = metrics.get("optimistic_test_youden")
    if not optimistic:
        return ""
    binary = optimistic.get("at_threshold") or {}
    rows = [
        [_e(k), _num(binary.get(k))] for k in ("sensitivity", "specificity", "accuracy", "ppv", "npv", "f1")
    ]
    return (
        '<div class="optimistic"><h3>Optimistic, not the result: threshold picked on the test set</h3>'
        f"<p>{_e(optimistic.get('warning', 'Chosen on the test set itself; biased upward.'))}</p>"
        f"<p>Threshold {_num(optimistic.get('threshold'), 4)} ({_e(optimistic.get('strategy', ''))} on "
        f"{_e(optimistic.get('chosen_on', 'test'))}).</p>"
        + _table(["Metric (optimistic)", "Value"], rows)
        + "</div>"
    )


def _plots_section(plots: dict[str, bytes]) -> str:
    if not plots:
        return ""
    figures = "".join(
        f"<figure>{_img(png, name)}<figcaption>{_e(name)}</figcaption></figure>"
        for name, png in sorted(plots.items())
    )
    return f'<h2>Plots</h2><div class="plots">{figures}</div>'


def _focus_rows(groups: dict) -> list[list[str]]:
    return [
        [
            _e(name),
            _num(stats.get("n")),
            _num(stats.get("n_scored")),
            _num(stats.get("n_without_mask")),
            _pct(stats.get("energy_inside_mean")),
            _pct(stats.get("energy_inside_median")),
            _pct(stats.get("lesion_area_share_mean")),
            _pct(stats.get("pointing_hit_rate")),
        ]
        for name, stats in groups.items()
    ]


_OUTCOME_ORDER = ("TP", "FP", "FN", "TN")


def _combine_text(combine_layers: str | None) -> str:
    """How an ensemble's member maps became one (nothing for a single model)."""
    if not combine_layers:
        return ""
    if combine_layers == "each":
        return " (an ensemble: the mean of its members' own maps)"
    return f" (members combined: {_e(combine_layers)})"


def _gradcam_section(summary: dict | None) -> str:
    if not summary:
        return '<h2>Grad-CAM</h2><p class="warning">No Grad-CAM summary for this run.</p>'
    focus = summary.get("focus") or {}
    speed = summary.get("heatmaps_per_s")
    parts = [
        "<h2>Grad-CAM: where the model looks</h2>",
        f"<p>{_e(summary.get('method', 'gradcam'))} on layer <code>{_e(summary.get('layer_name'))}</code>"
        + _combine_text(summary.get("combine_layers"))
        + f", {_num(summary.get('n_images'))} test images"
        + (f", {_num(float(speed), 1)} heatmaps/s" if speed else "")
        + ". <em>Energy inside</em> is the share of the heatmap's mass on the segmented lesion; "
        "compare it with the lesion's share of the image (what a uniform map would score). "
        "<em>Pointing hit</em>: the hottest pixel lies on the lesion. "
        f"{_num(focus.get('n_without_mask'))} images have no mask and are counted, not scored; "
        f"{_num(focus.get('n_empty_heatmap'))} maps were empty.</p>",
    ]
    header = [
        "Group",
        "Images",
        "Scored",
        "No mask",
        "Energy inside (mean)",
        "(median)",
        "Lesion area (mean)",
        "Pointing hit rate",
    ]
    groups = {"all": focus.get("overall") or {}}
    groups.update({f"class: {k}": v for k, v in (focus.get("by_class") or {}).items()})
    by_outcome = focus.get("by_outcome") or {}
    # The JSON file stores keys sorted; a reader expects the confusion-matrix order.
    ordered = [k for k in _OUTCOME_ORDER if k in by_outcome] + [
        k for k in by_outcome if k not in _OUTCOME_ORDER
    ]
    groups.update({f"outcome: {k}": by_outcome[k] for k in ordered})
    parts.append(_table(header, _focus_rows(groups)))
    parts.append(_focus_check_text(summary.get("lesion_focus_check")))
    return "".join(parts)


def _focus_check_text(check: dict | None) -> str:
    """The verdict of :func:`training.gradcam.lesion_focus_check`, a warning when it fails."""
    if not check or check.get("on_lesion") is None:
        return ""
    figures = (
        f"the maps of the {_num(check.get('n_scored'))} melanoma images with a mask put {_pct(check.get('energy_inside_mean'))} "
        f"of their energy on the lesion, which covers {_pct(check.get('lesion_area_share_mean'))} of the image"
    )
    if check["on_lesion"]:
        return f"<p>Lesion focus check passed: {figures}.</p>"
    return (
        f'<p class="warning">Lesion focus check failed: {figures}, no more than a uniform map would. '
        "The model draws its evidence from elsewhere in the image (borders, framing, markers); "
        "its scores may not carry over to images taken another way.</p>"
    )


def _gallery_section(gallery: list[dict], images: dict[str, bytes]) -> str:
    if not gallery:
        return ""
    figures = []
    for entry in gallery:
        out = str(entry.get("outcome", ""))
        focus = entry.get("energy_inside")
        focus_text = (
            f"{_pct(focus)} energy on a lesion covering {_pct(entry.get('lesion_area_share'))}; "
            f"pointing {'hit' if entry.get('pointing_hit') else 'miss'}"
            if focus is not None
            else ("no mask" if not entry.get("has_mask") else "empty map")
        )
        label = {1: "melanoma", 0: "other"}.get(entry.get("label"), entry.get("label"))
        fields = [
            ("image", _e(entry.get("image_id"))),
            ("probability", _num(entry.get("probability"))),
            ("label", _e(label) + (f" ({_e(entry['dx'])})" if entry.get("dx") else "")),
            (
                "outcome",
                f'<span class="{_e(out) if out in ("TP", "FP", "FN", "TN") else ""}">{_e(out)}</span> '
                f"&middot; {_e(entry.get('selection', ''))}",
            ),
            ("focus", focus_text),
        ]
        caption = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in fields)
        key = entry.get("overlay_key", entry.get("image_id"))
        figures.append(
            f"<figure>{_img(images.get(key), str(entry.get('image_id')))}<figcaption><dl>{caption}</dl></figcaption></figure>"
        )
    return (
        '<h3>Gallery</h3><p class="note">Per outcome, the most confident and the borderline '
        "(closest to the threshold) test images; left the input, right the Grad-CAM overlay.</p>"
        f'<div class="gallery">{"".join(figures)}</div>'
    )


def _promotion_section(decision: dict | None) -> str:
    """The registry's decision on this model (the promote step's, after the first report)."""
    if not decision:
        return ""
    verdict = "promoted to champion" if decision["promoted"] else "not promoted (kept, labelled rejected)"
    before = "none (the first model needs the floor and the focus check)"
    if decision.get("champion_before") is not None:
        champion = _num(decision["champion_val_auroc"], 4)
        before = f"v{_e(decision['champion_before'])}, re-scored on this val split: {champion}"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in decision["reasons"])
    return (
        f"<h2>Registry: {_e(decision['model'])} v{_e(decision['version'])} {verdict}</h2>"
        f"<p>Val AUROC {_num(decision['challenger_val_auroc'], 4)}; champion before: {before}.</p><ul>{reasons}</ul>"
    )


def render_report(
    metrics: dict,
    threshold_payload: dict,
    gradcam_summary: dict | None,
    gallery: list[dict],
    images: dict[str, bytes],
    promotion: dict | None = None,
) -> str:
    """The whole report as one HTML string.

    metrics: the ``metrics.json`` document of :mod:`training.evaluation`.
    threshold_payload: evaluate's XCom (``threshold``, ``strategy``, ``chosen_on``, ...).
    gradcam_summary: ``gradcam_summary.json`` of :func:`training.gradcam.run_gradcam` (or None).
    gallery: its gallery entries; each entry's image is ``images[entry["overlay_key"]]``.
    images: name -> PNG bytes; those not used by the gallery are shown as plots.
    promotion: the promote step's decision (``promotion.json``), once there is one.
    """
    used = {entry.get("overlay_key", entry.get("image_id")) for entry in gallery}
    plots = {name: png for name, png in images.items() if name not in used}
    warnings = "".join(f'<p class="warning">{_e(w)}</p>' for w in metrics.get("warnings") or [])
    subtitle = []
    if metrics.get("manifest_version") is not None:
        subtitle.append(f"data manifest version {_e(metrics['manifest_version'])}")
    counts = metrics.get("counts") or {}
    for split in ("train", "val", "test"):
        c = counts.get(split) or {}
        if c.get("images"):  # evaluation may see only val and test: no "train: 0 images"
            subtitle.append(f"{_e(split)}: {_num(c['images'])} images, {_num(c.get('melanoma'))} melanoma")
    body = "".join(
        [
            "<h1>Melanoma classifier report</h1>",
            f'<p class="note">{" &middot; ".join(subtitle)}</p>' if subtitle else "",
            warnings,
            _promotion_section(promotion),
            _threshold_section(metrics, threshold_payload, gradcam_summary),
            _metrics_section(metrics),
            _optimistic_section(metrics),
            _plots_section(plots),
            _gradcam_section(gradcam_summary),
            _gallery_section(gallery, images),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        "<title>Melanoma classifier report</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def build_report_from_run(run_storage, threshold_payload: dict) -> str:
    """Read a run's ``eval/metrics.json``, ``eval/*.png`` and Grad-CAM outputs and render the report."""
    metrics = json.loads(run_storage.read_bytes(f"{EVAL_PREFIX}/metrics.json"))
    images = {
        key.rpartition("/")[2]: run_storage.read_bytes(key)
        for key in run_storage.list_keys(EVAL_PREFIX)
        if key.endswith(".png")
    }
    summary = json.loads(run_storage.read_bytes(f"{GRADCAM_PREFIX}/gradcam_summary.json"))
    gallery = summary.get("gallery") or []
    for entry in gallery:
        images[entry["overlay_key"]] = run_storage.read_bytes(entry["overlay_key"])
    decided = run_storage.exists("promotion.json")  # the promote step re-renders the report with it
    promotion = json.loads(run_storage.read_bytes("promotion.json")) if decided else None
    return render_report(metrics, threshold_payload, summary, gallery, images, promotion)
