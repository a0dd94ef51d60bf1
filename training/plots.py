"""Evaluation plots of the test set, one PNG each, drawn from the metrics document.

Figures are built with matplotlib's object API on an Agg canvas: nothing needs a display
and no global pyplot state (or backend setting) leaks into the calling process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from training import metrics as m

DPI = 110
MODEL_COLOR = "#1f4e9c"
CHOSEN_COLOR = "#d62728"
DEFAULT_COLOR = "#2ca02c"
MELANOMA_COLOR = "#d62728"
OTHER_COLOR = "#7f7f7f"
FILENAMES = {
    "roc": "roc_test.png",
    "pr": "pr_test.png",
    "confusion_0.5": "confusion_test_at_0.5.png",
    "confusion_threshold": "confusion_test_at_threshold.png",
    "reliability": "reliability_test.png",
}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(estimate: dict) -> str:
    text = _fmt(estimate["value"])
    if estimate.get("ci_low") is not None:
        text += f" (95% CI {estimate['ci_low']:.3f}-{estimate['ci_high']:.3f})"
    return text


def _set_title(test: dict) -> str:
    return f"test set: {test['n_images']} images, {test['n_lesions']} lesions, {test['n_melanoma']} melanoma"


def _operating_points(metrics: dict) -> list[tuple[str, dict, str, str]]:
    """(legend label, binary metrics, color, marker) of the chosen and the 0.5 threshold."""
    choice = metrics["threshold"]
    test = metrics["test"]
    return [
        (
            f"threshold {choice['value']:.3f} ({choice['strategy']}, chosen on {choice['chosen_on']})",
            test["at_threshold"],
            CHOSEN_COLOR,
            "o",
        ),
        ("threshold 0.5", test["at_0.5"], DEFAULT_COLOR, "s"),
    ]


def _plot_point(ax, x: float, y: float, *, label: str, color: str, marker: str) -> None:
    """One operating point: a marker, no line."""
    ax.plot(x, y, marker=marker, ms=9, color=color, ls="none", label=label)


def _unit_square(ax, *, xlabel: str, ylabel: str, title: str) -> None:
    """Square axes over [0, 1] both ways (0.01 of margin), gridded, with a 10 pt title."""
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.title.set_fontsize(10)
    ax.set_box_aspect(1)
    ax.grid(alpha=0.3)


def plot_roc(metrics: dict, curves: dict, path: Path) -> Path:
    """ROC curve with AUROC and its CI, the chance line and both operating points; at the
    chosen one, error bars show the bootstrap CIs of sensitivity and specificity."""
    test = metrics["test"]
    figure = _figure(6.4, 6.0)
    ax = figure.add_subplot()
    ax.plot(
        curves["roc"]["fpr"],
        curves["roc"]["tpr"],
        color=MODEL_COLOR,
        lw=2,
        label=f"model, AUROC {_with_ci(test['auroc'])}",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUROC 0.5)")
    for label, point, color, marker in _operating_points(metrics):
        if point["sensitivity"] is None or point["specificity"] is None:
            continue
        x, y = 1 - point["specificity"], point["sensitivity"]
        _plot_point(
            ax,
            x,
            y,
            label=f"{label}: sens {y:.2f}, spec {point['specificity']:.2f}",
            color=color,
            marker=marker,
        )
    sens, spec = test["sensitivity"], test["specificity"]
    if sens["ci_low"] is not None and spec["ci_low"] is not None:
        x, y = 1 - spec["value"], sens["value"]
        # Clamped at 0: on tiny sets a percentile interval can miss its point estimate,
        # and matplotlib refuses negative error lengths.
        ax.errorbar(
            x,
            y,
            color=CHOSEN_COLOR,
            capsize=4,
            lw=1,
            xerr=[[max(0.0, x - (1 - spec["ci_high"]))], [max(0.0, (1 - spec["ci_low"]) - x)]],
            yerr=[[max(0.0, y - sens["ci_low"])], [max(0.0, sens["ci_high"] - y)]],
        )
    _unit_square(
        ax,
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        title=f"ROC curve, {_set_title(test)}",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_pr(metrics: dict, curves: dict, path: Path) -> Path:
    """Precision-recall curve with AUPRC and its CI, the prevalence (no-skill) baseline and
    both operating points."""
    test = metrics["test"]
    figure = _figure(6.4, 7.8)
    ax = figure.add_subplot()
    ax.plot(
        curves["pr"]["recall"],
        curves["pr"]["precision"],
        color=MODEL_COLOR,
        lw=2,
        drawstyle="steps-post",
        label=f"model, AUPRC {_with_ci(test['auprc'])}",
    )
    ax.axhline(
        test["prevalence"],
        ls="--",
        color="grey",
        lw=1,
        label=f"no skill: prevalence {test['prevalence']:.3f}",
    )
    for label, point, color, marker in _operating_points(metrics):
        if point["sensitivity"] is None or point["ppv"] is None:
            continue
        _plot_point(
            ax,
            point["sensitivity"],
            point["ppv"],
            label=f"{label}: recall {point['sensitivity']:.2f}, precision {point['ppv']:.2f}",
            color=color,
            marker=marker,
        )
    _unit_square(
        ax,
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=f"Precision-recall curve, {_set_title(test)}",
    )
    # Below the axes: inside, any corner can hide the curve or the prevalence line.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8)
    return _save(figure, path)


def plot_confusion(binary: dict, title: str, path: Path) -> Path:
    """2x2 confusion matrix: counts and row percentages (share of each true class) per
    cell, shaded by the row percentage so the two classes compare despite the imbalance."""
    cells = [[binary["tn"], binary["fp"]], [binary["fn"], binary["tp"]]]
    shares = []
    for row in cells:
        total = sum(row)
        shares.append([count / total if total else 0.0 for count in row])
    figure = _figure(6.0, 4.6)
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i, row in enumerate(cells):
        total = sum(row)
        for j, count in enumerate(row):
            share = f"{100 * count / total:.1f}%" if total else "-"
            ax.text(
                j,
                i,
                f"{count}\n{share}",
                ha="center",
                va="center",
                fontsize=13,
                color="white" if shares[i][j] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], ["other", "melanoma"])
    ax.set_yticks([0, 1], ["other", "melanoma"])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.title.set_fontsize(10)
    figure.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    return _save(figure, path)


def plot_reliability(metrics: dict, curves: dict, path: Path) -> Path:
    """Reliability diagram (fraction of melanoma per probability bin vs. the diagonal) over
    a histogram of the scores of each class."""
    test = metrics["test"]
    calibration = test["calibration"]
    curve = calibration["curve"]
    figure = _figure(6.4, 7.0)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.plot(
        curve["mean_predicted"],
        curve["fraction_positive"],
        marker="o",
        color=MODEL_COLOR,
        lw=2,
        label=f"model ({calibration['n_bins']} equal-width bins)",
    )
    top.set(
        xlim=(0, 1),
        ylim=(-0.01, 1.01),
        ylabel="observed fraction of melanoma",
        title=(
            f"Reliability, {_set_title(test)}\nBrier {calibration['brier']:.4f}, ECE {calibration['ece']:.4f}"
        ),
    )
    top.title.set_fontsize(10)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)

    histogram = curves["score_histogram"]
    edges = histogram["edges"]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    bottom.bar(
        edges[:-1],
        histogram["other"],
        width=widths,
        align="edge",
        color=OTHER_COLOR,
        edgecolor="white",
        label="other",
    )
    bottom.bar(
        edges[:-1],
        histogram["melanoma"],
        width=widths,
        align="edge",
        color=MELANOMA_COLOR,
        edgecolor="white",
        bottom=histogram["other"],
        label="melanoma",
    )
    bottom.set(xlabel="predicted probability of melanoma", ylabel="images")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(loc="upper right", fontsize=8)
    return _save(figure, path)


def _test_curves(metrics: dict, rows: Sequence[dict] | None) -> dict | None:
    if rows is None:
        return metrics["test"].get("curves")
    test_rows = [r for r in rows if r["split"] == "test"]
    return m.curve_points([int(r["label"]) for r in test_rows], [float(r["probability"]) for r in test_rows])


def plot_all(metrics: dict, rows: Sequence[dict] | None, out_dir: Path) -> list[Path]:
    """Write every test-set plot into ``out_dir``; returns the paths.

    Curves come from the test rows of ``rows`` when given, else from
    ``metrics["test"]["curves"]``; without either (a one-class test set) the ROC, PR and
    reliability plots are skipped and only the confusion matrices are written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = metrics["test"]
    choice = metrics["threshold"]
    curves = _test_curves(metrics, rows)
    paths = []
    if curves is not None:
        paths += [
            plot_roc(metrics, curves, out_dir / FILENAMES["roc"]),
            plot_pr(metrics, curves, out_dir / FILENAMES["pr"]),
        ]
    paths += [
        plot_confusion(
            test["at_0.5"],
            f"Confusion matrix at threshold 0.5\n{_set_title(test)}",
            out_dir / FILENAMES["confusion_0.5"],
        ),
        plot_confusion(
            test["at_threshold"],
            f"Confusion matrix at threshold {choice['value']:.3f} "
            f"({choice['strategy']}, chosen on {choice['chosen_on']})\n{_set_title(test)}",
            out_dir / FILENAMES["confusion_threshold"],
        ),
    ]
    if curves is not None:
        paths.append(plot_reliability(metrics, curves, out_dir / FILENAMES["reliability"]))
    return paths
