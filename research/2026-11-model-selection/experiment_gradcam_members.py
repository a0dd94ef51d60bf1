"""Experiment: how an ensemble's Grad-CAM combines its members' maps, and how each model's maps sit on val lesions.

An ensemble averages its members' melanoma logits, so the gradient reaching member m's last
conv maps is 1/M of that member's own gradient. Two ways to turn that into one heatmap
(``training.gradcam.gradcam_heatmaps(combine_layers=...)``):

- ``joint``: the members' maps as one concatenated map, positive part of the total (one
  member's counter-evidence can cancel another's evidence);
- ``each``: the positive part of each member's weighted sum, added up: the mean of the
  members' own Grad-CAM maps.

Both (and each member's own map) are scored for lesion focus (share of the map's energy on the segmented lesion, pointing
game) on every validation image with a mask, grouped as ``bench-gradcam`` groups the test
split, at the run's validation threshold on the scores evaluate used. The test split is not
read. A run of one model gets its own map scored the same way. Writes
``research/2026-11-model-selection/results/experiment_gradcam_members-<run>.json``.

    python research/2026-11-model-selection/experiment_gradcam_members.py --run ens3-long
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent  # research/2026-11-model-selection
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "benchmarks" / "work" / "quality"
RESULTS = HERE / "results"


def scored_rows(model, shard, scores: dict[str, float], threshold: float, layers: list[str], combine: str) -> tuple[list[dict], float]:
    """Per-image focus rows (:func:`training.gradcam.focus_rows`) and the seconds the heatmaps took."""
    from training.gradcam import focus_rows, gradcam_heatmaps

    started = time.perf_counter()
    heatmaps = gradcam_heatmaps(model, shard.images, layers, combine_layers=combine)
    seconds = time.perf_counter() - started
    return focus_rows(shard, heatmaps, scores, threshold), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="ens3-long", help="a run under benchmarks/work/quality/runs with eval/ done (an ensemble, or one model)")
    args = parser.parse_args(argv)

    from melanoma.manifest import latest_manifest, load_split
    from melanoma.storage import open_storage
    from training.ensemble import gradcam_layer_names
    from training.evaluation import decision_scores, xcom_payload
    from training.gradcam import COMBINE_LAYERS, lesion_focus_check, summarise_focus
    from training.predict import load_model

    run = open_storage(str(WORK / "runs" / args.run))
    model = load_model(run.uri("model/model.keras"))
    layers = gradcam_layer_names(model)
    metrics = json.loads(run.read_bytes("eval/metrics.json"))
    if "scores" not in metrics:
        raise SystemExit(f"run {args.run} was evaluated before metrics.json schema 2 (no 'scores' block): evaluate it again first")
    payload = xcom_payload(metrics, run.uri("eval/metrics.json"))
    rows = [r for r in csv.DictReader(io.StringIO(run.read_bytes("eval/predictions.csv").decode())) if r["split"] == "val"]
    scores = decision_scores([r["image_id"] for r in rows], [float(r["probability"]) for r in rows],
                             [r["lesion_id"] for r in rows], payload.get("pooling", "none"))
    processed = open_storage(str(WORK / "data"))
    val = load_split(processed, latest_manifest(processed), ["val"])

    # Each member's own map too (one layer: the gradient of the averaged logit there is 1/M of
    # the member's own, which the scaling to peak 1 removes), to see where the focus is lost.
    if len(layers) > 1:
        variants = {combine: (layers, combine) for combine in COMBINE_LAYERS}
        variants.update({f"member {layer}": ([layer], "each") for layer in layers})
    else:  # one model: its own map only
        variants = {"model": (layers, "each")}
    results = {}
    for name, (chosen, combine) in variants.items():
        focus, seconds = scored_rows(model, val, scores, float(payload["threshold"]), chosen, combine)
        summary = summarise_focus(focus)
        results[name] = {"heatmaps_per_s": round(len(val) / seconds, 2), "focus": summary, "lesion_focus_check": lesion_focus_check(summary)}
        tp, mel = summary["by_outcome"]["TP"], summary["by_class"]["melanoma"]
        print(f"{name}: all {summary['overall']['energy_inside_mean']:.3f} energy / {summary['overall']['pointing_hit_rate']:.3f} pointing; "
              f"melanoma {mel['energy_inside_mean']:.3f} / {mel['pointing_hit_rate']:.3f}; TP {tp['energy_inside_mean']:.3f} / "
              f"{tp['pointing_hit_rate']:.3f} (lesion area {tp['lesion_area_share_mean']:.3f}); {len(val) / seconds:.1f} maps/s; "
              f"melanoma maps on the lesion: {results[name]['lesion_focus_check']['on_lesion']}", flush=True)
    doc = {
        "command": "python research/2026-11-model-selection/experiment_gradcam_members.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": args.run,
        "layers": layers,
        "split": "val",
        "n_images": len(val),
        "threshold": payload["threshold"],
        "pooling": payload.get("pooling", "none"),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"experiment_gradcam_members-{args.run}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
