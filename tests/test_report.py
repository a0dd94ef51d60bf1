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
            rows.append(
                {
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
                }
            )
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
    group = {
        "n": 10,
        "n_without_mask": 2,
        "n_scored": 8,
        "energy_inside_mean": 0.6,
        "energy_inside_median": 0.62,
        "lesion_area_share_mean": 0.2,
        "pointing_hit_rate": 0.75,
    }
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
    return {
        "threshold": choice["value"],
        "strategy": choice["strategy"],
        "chosen_on": "val",
        "metrics_uri": "eval/metrics.json",
    }


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

    document = render_report(
        metrics, payload, gradcam_summary(payload["threshold"], gallery), gallery, images
    )
    tags = parse(document)

    assert {tag for tag, _ in tags}.isdisjoint({"script", "iframe", "object", "embed", "link", "base", "b"})
    for tag, attrs in tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
        assert not any(
            "http" in (value or "") for name, value in attrs.items() if name in ("src", "href", "action")
        )
    assert "<script" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    assert "&quot; onload=&quot;x" in document
    # The hostile ids were escaped into the page, not dropped.
    assert document.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # warning, set name, gallery


def test_report_is_self_contained_and_complete():
    metrics = metrics_doc()
    payload = payload_of(metrics)
    gallery = [
        gallery_entry("ISIC_0001"),
        gallery_entry("ISIC_02", outcome="FN", energy_inside=None, has_mask=False),
    ]
    overlay = png(120)
    images = {
        gallery[0]["overlay_key"]: overlay,
        gallery[1]["overlay_key"]: png(90),
        "roc.png": png(10),
        "bad.svg": b"<svg/>",
    }

    document = render_report(
        metrics, payload, gradcam_summary(payload["threshold"], gallery), gallery, images
    )

    assert "http://" not in document and "https://" not in document and "url(" not in document
    img_sources = [attrs["src"] for tag, attrs in parse(document) if tag == "img"]
    assert len(img_sources) == 3  # two overlays and one plot; the SVG is refused
    assert all(s.startswith("data:image/png;base64,") for s in img_sources)
    assert base64.b64decode(img_sources[-2].split(",", 1)[1]) == overlay
    assert "bad.svg missing or not a PNG" in document
    # The numbers a reader needs: intervals, the threshold and where it was chosen, focus.
    auroc = metrics["test"]["auroc"]
    assert (
        f"{auroc['value']:.3f}" in document
        and f"{auroc['ci_low']:.3f}&ndash;{auroc['ci_high']:.3f}" in document
    )
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
    storage.write_bytes(
        "gradcam/gradcam_summary.json", json.dumps(gradcam_summary(payload["threshold"], gallery)).encode()
    )
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


# --------------------------------------------------------------------------- the report's link on S3


def report_link_plugin():
    """The Airflow plugin module, loaded from its file as Airflow's plugin manager does."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("airflow")
    path = Path(__file__).resolve().parents[1] / "plugins" / "melanoma_report_link.py"
    spec = importlib.util.spec_from_file_location("melanoma_report_link_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(storage) -> dict:
    metrics = metrics_doc()
    payload = payload_of(metrics)
    gallery = [gallery_entry("ISIC_7", overlay_key="gradcam/overlays/ISIC_7.png")]
    storage.write_bytes("eval/metrics.json", json.dumps(metrics).encode())
    storage.write_bytes(
        "gradcam/gradcam_summary.json", json.dumps(gradcam_summary(payload["threshold"], gallery)).encode()
    )
    storage.write_bytes("gradcam/overlays/ISIC_7.png", png(140))
    return payload


def test_report_on_s3_opens_through_a_presigned_http_link(s3_bucket, s3_env, monkeypatch):
    import urllib.request
    from urllib.parse import parse_qs, urlparse

    from melanoma.storage import open_storage
    from training.tasks import report_run

    plugin = report_link_plugin()
    run_root = f"s3://{s3_bucket}/runs/scheduled__1"
    payload = write_run(open_storage(run_root))
    result = report_run(run_root, payload)
    assert result["report_uri"] == f"{run_root}/report.html"
    monkeypatch.setenv("MELANOMA_REPORT_LINK_EXPIRES_S", "120")

    # What the DAG pushes is the s3:// URI (JSON-encoded in the XCom table).
    href = plugin.report_href(json.dumps(result["report_uri"]), f"s3://{s3_bucket}")

    endpoint = urlparse(s3_env["MELANOMA_S3_ENDPOINT_URL"])
    link = urlparse(href)
    assert (link.scheme, link.netloc) == (endpoint.scheme, endpoint.netloc)
    assert link.path == f"/{s3_bucket}/runs/scheduled__1/report.html"
    query = parse_qs(link.query)
    assert query["X-Amz-Expires"] == ["120"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["response-content-type"] == ["text/html; charset=utf-8"]
    with urllib.request.urlopen(href, timeout=10) as response:  # what the browser does with the link
        body = response.read().decode()
    assert body.startswith("<!DOCTYPE html>") and "ISIC_7" in body


def test_s3_report_link_is_signed_for_the_browsers_endpoint(s3_env, monkeypatch):
    from urllib.parse import urlparse

    plugin = report_link_plugin()
    # Containers reach MinIO as http://minio:9000, the browser as the published port.
    monkeypatch.setenv("MELANOMA_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("MELANOMA_S3_PUBLIC_ENDPOINT_URL", "http://127.0.0.1:9000")
    link = urlparse(plugin.report_href("s3://melanoma/data/runs/x/report.html", "s3://melanoma/data"))
    assert (link.scheme, link.netloc, link.path) == (
        "http",
        "127.0.0.1:9000",
        "/melanoma/data/runs/x/report.html",
    )


def test_s3_report_without_endpoint_or_credentials_gets_no_link(s3_env, monkeypatch, tmp_path):
    plugin = report_link_plugin()
    uri = json.dumps("s3://melanoma/runs/x/report.html")
    monkeypatch.setenv("MELANOMA_DATA_ROOT", "s3://melanoma")
    for name in ("MELANOMA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "MELANOMA_S3_PUBLIC_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert plugin.report_href(uri) == ""  # no http(s) endpoint known: nothing a browser could open
    monkeypatch.setenv("MELANOMA_S3_PUBLIC_ENDPOINT_URL", "javascript:alert(1)//")
    assert plugin.report_href(uri) == ""
    monkeypatch.setenv("MELANOMA_S3_PUBLIC_ENDPOINT_URL", "https://s3.eu-west-1.amazonaws.com")
    assert plugin.report_href(uri).startswith(
        "https://s3.eu-west-1.amazonaws.com/melanoma/runs/x/report.html?"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert plugin.report_href(uri) == ""  # an unsigned URL would only show "access denied"
    assert plugin.report_href(json.dumps("s3://bucket-only")) == ""


def test_report_says_which_scores_it_measured():
    plain = render_report(metrics_doc(), payload_of(metrics_doc()), gradcam_summary(None, []), [], {})
    assert "Scores: each image on its own." in plain and "lesion-pooled" not in plain

    pooled = evaluate_predictions(prediction_rows(), n_boot=20, min_subgroup_count=5, pooling="lesion")
    payload = payload_of(pooled)
    document = render_report(pooled, payload, gradcam_summary(payload["threshold"], []), [], {})
    per_image = pooled["scores"]["per_image"]["test"]["auroc"]
    assert "lesion-pooled probability" in document and "mean logit of the lesion" in document
    assert f"test AUROC {per_image['value']:.3f}" in document
    assert per_image["value"] != pooled["test"]["auroc"]["value"]


def test_report_says_how_an_ensembles_maps_were_combined():
    metrics = metrics_doc()
    payload = payload_of(metrics)
    single = render_report(metrics, payload, gradcam_summary(payload["threshold"], []), [], {})
    assert "members" not in single
    summary = dict(
        gradcam_summary(payload["threshold"], []),
        layer_name="m0_top_conv + m1_top_conv",
        combine_layers="each",
    )
    ensemble = render_report(metrics, payload, summary, [], {})
    assert (
        "<code>m0_top_conv + m1_top_conv</code> (an ensemble: the mean of its members' own maps)" in ensemble
    )


def test_report_warns_when_the_melanoma_maps_are_off_the_lesion():
    metrics = metrics_doc()
    payload = payload_of(metrics)
    check = {
        "group": "class: melanoma",
        "n_scored": 12,
        "energy_inside_mean": 0.11,
        "lesion_area_share_mean": 0.34,
        "on_lesion": False,
    }
    failed = render_report(
        metrics, payload, dict(gradcam_summary(payload["threshold"], []), lesion_focus_check=check), [], {}
    )
    assert 'class="warning">Lesion focus check failed: the maps of the 12 melanoma images' in failed
    assert "11.0%" in failed and "34.0%" in failed
    passed = render_report(
        metrics,
        payload,
        dict(
            gradcam_summary(payload["threshold"], []),
            lesion_focus_check=dict(check, energy_inside_mean=0.7, on_lesion=True),
        ),
        [],
        {},
    )
    assert "Lesion focus check passed" in passed and "check failed" not in passed
    older = render_report(
        metrics, payload, gradcam_summary(payload["threshold"], []), [], {}
    )  # a summary from before the check
    assert "Lesion focus check" not in older
