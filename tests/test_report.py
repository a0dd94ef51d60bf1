"""The HTML report: self-contained, escaped, and showing what the run decided."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from melanoma.storage import LocalStorage
from training.evaluation import evaluate_predictions
from training.report import build_report_from_run, render_report

HOSTILE_ID = "<script>alert(1)</script>"
ATTRIBUTE_BREAKER = '" onload="x'


def png(colour: int, size: int = 8) -> bytes:
    ok, data = cv2.imencode(".png", np.full((size, size, 3), colour, np.uint8))
    assert ok
    return data.tobytes()


def prediction_rows(localization: str = "back", dx: str = "mel") -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for split in ("val", "test"):
        for i in range(40):
            label = i % 3 == 0
            rows.append({
                "image_id": f"{split}_{i}",
                "lesion_id": f"{split}_L{i // 2}",
                "split": split,
                "label": int(label),
                "dx": dx if label else "nv",
                "probability": float(np.clip(0.35 * label + rng.uniform(0, 0.65), 0, 1)),
                "age": 40.0 + i,
                "sex": "female" if i % 2 else "male",
                "localization": localization if i % 4 else "face",
                "source": None,
            })
    return rows


def metrics_doc(**kwargs) -> dict:
    return evaluate_predictions(prediction_rows(**kwargs), n_boot=20, min_subgroup_count=5)


def gallery_entry(image_id: str, **extra) -> dict:
    entry = {
        "image_id": image_id,
        "label": 1,
        "dx": "mel",
        "probability": 0.93,
        "outcome": "TP",
        "selection": "most confident",
        "has_mask": True,
        "energy_inside": 0.71,
        "pointing_hit": True,
        "lesion_area_share": 0.2,
        "overlay_key": f"gradcam/overlays/{len(image_id)}.png",
    }
    entry.update(extra)
    return entry


def gradcam_summary(threshold: float, gallery: list[dict]) -> dict:
    group = {"n": 10, "n_without_mask": 2, "n_scored": 8, "energy_inside_mean": 0.6, "energy_inside_median": 0.62,
             "lesion_area_share_mean": 0.2, "pointing_hit_rate": 0.75}
    return {
        "method": "gradcam", "layer_name": "top_conv", "threshold": threshold, "strategy": "youden",
        "chosen_on": "val", "n_images": 10, "heatmaps_per_s": 12.5, "gallery": gallery,
        "focus": {"n_images": 10, "n_without_mask": 2, "n_empty_heatmap": 0, "overall": group,
                  "by_class": {"melanoma": group, "other": group},
                  "by_outcome": {k: group for k in sorted(("TP", "FP", "FN", "TN"))}},  # as json sort_keys left them
    }  # fmt: skip


class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(document: str) -> list[tuple[str, dict]]:
    collector = TagCollector()
    collector.feed(document)
    return collector.tags


def payload_of(metrics: dict) -> dict:
    choice = metrics["threshold"]
    return {"threshold": choice["value"], "strategy": choice["strategy"], "chosen_on": "val", "metrics_uri": "eval/metrics.json"}


def test_hostile_strings_are_escaped_everywhere():
    metrics = metrics_doc(localization=ATTRIBUTE_BREAKER, dx="<img src=http://evil.example/x.png>")
    metrics["warnings"] = [f"lesion {HOSTILE_ID} leaked"]
    metrics["external"] = {HOSTILE_ID: metrics["test"]}
    payload = dict(payload_of(metrics), strategy=ATTRIBUTE_BREAKER)
    gallery = [
        gallery_entry(HOSTILE_ID),
        gallery_entry(ATTRIBUTE_BREAKER, dx="<img src=http://evil.example/y.png>", outcome="<b>TP</b>"),
    ]
    images = {g["overlay_key"]: png(200) for g in gallery}
    images['roc"><script>alert(2)</script>.png'] = png(50)

    document = render_report(metrics, payload, gradcam_summary(payload["threshold"], gallery), gallery, images)
    tags = parse(document)

    assert {tag for tag, _ in tags}.isdisjoint({"script", "iframe", "object", "embed", "link", "base", "b"})
    for tag, attrs in tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
        assert not any("http" in (value or "") for name, value in attrs.items() if name in ("src", "href", "action"))
    assert "<script" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    assert "&quot; onload=&quot;x" in document
    # The hostile ids were escaped into the page, not dropped.
    assert document.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # warning, set name, gallery


def test_report_is_self_contained_and_complete():
    metrics = metrics_doc()
    payload = payload_of(metrics)
    gallery = [gallery_entry("ISIC_0001"), gallery_entry("ISIC_02", outcome="FN", energy_inside=None, has_mask=False)]
    overlay = png(120)
    images = {gallery[0]["overlay_key"]: overlay, gallery[1]["overlay_key"]: png(90), "roc.png": png(10), "bad.svg": b"<svg/>"}

    document = render_report(metrics, payload, gradcam_summary(payload["threshold"], gallery), gallery, images)

    assert "http://" not in document and "https://" not in document and "url(" not in document
    img_sources = [attrs["src"] for tag, attrs in parse(document) if tag == "img"]
    assert len(img_sources) == 3  # two overlays and one plot; the SVG is refused
    assert all(s.startswith("data:image/png;base64,") for s in img_sources)
    assert base64.b64decode(img_sources[-2].split(",", 1)[1]) == overlay
    assert "bad.svg missing or not a PNG" in document
    # The numbers a reader needs: intervals, the threshold and where it was chosen, focus.
    auroc = metrics["test"]["auroc"]
    assert f"{auroc['value']:.3f}" in document and f"{auroc['ci_low']:.3f}&ndash;{auroc['ci_high']:.3f}" in document
    assert f"{metrics['threshold']['value']:.4f}" in document and "<strong>val</strong>" in document
    assert "71.0% energy on a lesion covering 20.0%" in document and "no mask" in document
    assert "ISIC_0001" in document and "0.930" in document
    assert "Optimistic, not the result" in document
    assert f"{metrics['optimistic_test_youden']['threshold']:.4f}" in document
    assert "warning" not in document.split("<body>", 1)[1].split("<h2>Metrics")[0]  # no threshold mismatch
    positions = [document.index(f"outcome: {k}") for k in ("TP", "FP", "FN", "TN")]
    assert positions == sorted(positions)
    assert "train:" not in document and "test: 40 images, 14 melanoma" in document


def test_optimistic_section_only_when_present_and_mismatch_is_flagged():
    metrics = metrics_doc()
    del metrics["optimistic_test_youden"]
    payload = payload_of(metrics)
    document = render_report(metrics, payload, gradcam_summary(payload["threshold"] + 0.1, []), [], {})
    assert "Optimistic" not in document
    assert "Grad-CAM outcomes used threshold" in document


def test_build_report_from_run(tmp_path):
    storage = LocalStorage(tmp_path)
    metrics = metrics_doc()
    payload = payload_of(metrics)
    gallery = [gallery_entry("ISIC_7", overlay_key="gradcam/overlays/ISIC_7.png")]
    storage.write_bytes("eval/metrics.json", json.dumps(metrics).encode())
    storage.write_bytes("eval/roc.png", png(30))
    storage.write_bytes("eval/predictions.csv", b"image_id\n")
    storage.write_bytes("gradcam/gradcam_summary.json", json.dumps(gradcam_summary(payload["threshold"], gallery)).encode())
    storage.write_bytes("gradcam/overlays/ISIC_7.png", png(140))

    document = build_report_from_run(storage, payload)

    figures = document.split('<div class="plots">', 1)[1]
    assert "roc.png" in figures and "ISIC_7" in document
    assert sum(1 for tag, _ in parse(document) if tag == "img") == 2


def test_missing_gradcam_outputs_fail_loudly(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write_bytes("eval/metrics.json", json.dumps(metrics_doc()).encode())
    with pytest.raises(FileNotFoundError):
        build_report_from_run(storage, {"threshold": 0.5})
