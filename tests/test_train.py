"""Training on real HAM10000 images: artifacts, resume after a kill, cached == uncached.

The processed data is built without Spark from a small drop cut out of ../shared/data/ham10000
(the same ingest functions the Spark jobs run), with the augmented melanoma copies.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from melanoma import ingest  # noqa: E402
from melanoma.manifest import commit_manifest, latest_manifest, require_manifest  # noqa: E402
from melanoma.splits import assign_split  # noqa: E402
from melanoma.storage import open_storage  # noqa: E402
from training.checkpoints import CHECKPOINTS, check_resumable, read_state  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import DX_CLASSES, class_weights, load_arrays, target_class_weights  # noqa: E402
from training.machine import numerics_fingerprint  # noqa: E402
from training.model import fine_tune_cut  # noqa: E402
from training.train import ensemble_members, run_training  # noqa: E402
from training.variants import epoch_order, train_variant  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DROP = "ham-small-2026-01-01"
# Lesions per split and class: (melanoma, other). About 300 images, about 2/3 of them train.
WANTED = {"train": (45, 90), "val": (15, 40), "test": (8, 16)}


def _pick_rows(ham10000_dir: Path) -> list[dict]:
    """Whole lesions (all their images), a fixed number per split and class, in a fixed
    pseudo-random order (the CSV is sorted by diagnosis; its head would be all 'bkl')."""
    with open(ham10000_dir / "HAM10000_metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_lesion: dict[str, list[dict]] = {}
    for row in rows:
        by_lesion.setdefault(row["lesion_id"], []).append(row)
    taken = {(split, mel): 0 for split in WANTED for mel in (1, 0)}
    chosen = []
    for lesion_id, lesion_rows in sorted(
        by_lesion.items(), key=lambda item: hashlib.sha256(item[0].encode()).hexdigest()
    ):
        key = (assign_split(lesion_id), int(lesion_rows[0]["dx"] == "mel"))
        if taken[key] < WANTED[key[0]][1 - key[1]]:
            taken[key] += 1
            chosen += lesion_rows
    return chosen


def build_processed(ham10000_dir: Path, root: Path) -> tuple[str, str]:
    """A raw drop and its processed shards (+ augmented copies), as the two Spark jobs make them."""
    rows = _pick_rows(ham10000_dir)
    raw = root / "raw"
    images = raw / DROP / "images"
    images.mkdir(parents=True)
    for row in rows:
        shutil.copy(ham10000_dir / "images" / f"{row['image_id']}.jpg", images / f"{row['image_id']}.jpg")
    with open(raw / DROP / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    processed = str(root / "data")
    out = open_storage(processed)
    plan = ingest.plan_drop(str(raw), processed, DROP, {})
    results = [ingest.process_chunk(task) for task in plan.tasks]
    commit_manifest(out, ingest.finish_drops(out, None, [plan], results, logical_date="2026-01-01"))
    previous = require_manifest(out)
    augmented = [ingest.augment_shard(task) for task in ingest.augment_tasks(processed, previous)]
    commit_manifest(
        out,
        ingest.finish_augment(
            previous, augmented, logical_date="2026-01-01", copies=ingest.COPIES_PER_MELANOMA
        ),
    )
    return str(raw), processed


@pytest.fixture(scope="module")
def processed_root(ham10000_dir, tmp_path_factory) -> str:
    return build_processed(ham10000_dir, tmp_path_factory.mktemp("train-data"))[1]


def _weights_by_name(model, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {
        f"{layer.name}/{i}": np.asarray(w)
        for layer in model.layers
        if layer.name.startswith(prefixes)
        for i, w in enumerate(layer.get_weights())
    }


# --- fast checks (no training) ----------------------------------------------------------------


def test_class_weights_and_targets():
    labels = np.array([0] * 90 + [1] * 10)
    balanced = class_weights(labels)
    assert balanced == pytest.approx({0: 100 / 180, 1: 100 / 20})
    assert class_weights(labels, "reference") == {0: 0.5, 1: 28.5}
    assert class_weights(labels, "seed") == {0: 0.5, 1: 28.5}  # its name before the rename, in old configs
    dx = target_class_weights(balanced, "dx")
    assert dx[DX_CLASSES.index("mel")] == balanced[1]
    assert all(dx[i] == balanced[0] for i, name in enumerate(DX_CLASSES) if name != "mel")
    with pytest.raises(ValueError, match="target"):
        TrainConfig("p", "r", target="nope")


def test_epoch_order_is_a_function_of_seed_phase_epoch():
    a = epoch_order(50, 0, 1, 3)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, epoch_order(50, 0, 1, 3))
    assert not np.array_equal(a, epoch_order(50, 0, 1, 4))
    assert not np.array_equal(a, epoch_order(50, 0, 2, 3))


def test_train_variants_flip_or_draw_the_augment_transform_per_image_and_seed():
    from melanoma.augment import augment_image, draw_params

    images = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    ids = ["ISIC_a", "ISIC_b", "ISIC_c"]
    np.testing.assert_array_equal(train_variant(images, ids, 1), images[:, :, ::-1])  # no seed: the flips
    np.testing.assert_array_equal(
        train_variant(images, ids, 0, augment_seed=7), images
    )  # variant 0 is as stored
    drawn = train_variant(images, ids, 2, augment_seed=7)
    assert drawn.shape == images.shape and drawn.dtype == np.uint8
    np.testing.assert_array_equal(drawn[1], augment_image(images[1], draw_params("ISIC_b:train-variant:7:2")))
    np.testing.assert_array_equal(
        drawn, train_variant(images, ids, 2, augment_seed=7)
    )  # a rerun draws the same
    assert not np.array_equal(drawn, train_variant(images, ids, 2, augment_seed=8))
    assert not np.array_equal(drawn, train_variant(images, ids, 3, augment_seed=7))
    with pytest.raises(ValueError, match="ids"):
        train_variant(images, ids[:2], 1, augment_seed=7)
    with pytest.raises(ValueError, match="caches"):
        TrainConfig("p", "r", train_augment=True, fine_tune_cache=False)


def test_colour_jitter_recolours_the_augment_draws_and_keeps_their_geometry():
    from dataclasses import replace

    from melanoma.augment import COLOUR_JITTER, augment_image, draw_params

    images = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    ids = ["ISIC_a", "ISIC_b"]
    plain, jittered = draw_params("ISIC_b:train-variant:7:2"), draw_params("ISIC_b:train-variant:7:2", True)
    # Same flips, rotation, zoom and brightness; a hue, saturation and contrast of their own.
    assert replace(jittered, hue=0.0, saturation=1.0, contrast=1.0) == plain
    assert (plain.hue, plain.saturation, plain.contrast) == (0.0, 1.0, 1.0)
    for name, field in (("hue_degrees", "hue"), ("saturation", "saturation"), ("contrast", "contrast")):
        low, high = COLOUR_JITTER[name]
        assert low <= getattr(jittered, field) <= high and getattr(jittered, field) != getattr(plain, field)
    drawn = train_variant(images, ids, 2, augment_seed=7, colour_jitter=True)
    np.testing.assert_array_equal(drawn[1], augment_image(images[1], jittered))
    np.testing.assert_array_equal(train_variant(images, ids, 0, augment_seed=7, colour_jitter=True), images)
    with pytest.raises(ValueError, match="train_augment"):
        TrainConfig("p", "r", train_colour_jitter=True)


def test_random_crop_replaces_the_zoom_with_a_box_stretched_to_the_image():
    from dataclasses import replace

    from melanoma.augment import RANDOM_CROP, AugmentParams, augment_image, draw_params

    key = "ISIC_b:train-variant:7:2"
    plain, cropped = draw_params(key), draw_params(key, random_crop=True)
    # Same flips, rotation, brightness and colour; no zoom; a box of the configured area and aspect.
    assert replace(cropped, zoom=plain.zoom, crop=plain.crop) == plain and cropped.zoom == 1.0
    assert replace(draw_params(key, True, True), crop=plain.crop, zoom=plain.zoom) == draw_params(key, True)
    x, y, w, h = cropped.crop
    assert 0.0 <= x <= x + w <= 1.0 and 0.0 <= y <= y + h <= 1.0
    assert RANDOM_CROP["area"][0] - 1e-9 <= w * h <= 1.0 and (w, h) != (1.0, 1.0)
    # A pure crop of the right half of a left-dark, right-bright image is bright everywhere.
    image = np.zeros((224, 224, 3), np.uint8)
    image[:, 100:] = 200  # the box starts at 112: its first column samples 111.75, still bright
    right_half = AugmentParams(False, False, 0.0, 1.0, 1.0, crop=(0.5, 0.0, 0.5, 1.0))
    assert augment_image(image, right_half).min() == 200
    # The whole image as the box is the identity.
    whole = AugmentParams(False, False, 0.0, 1.0, 1.0)
    np.testing.assert_array_equal(augment_image(image, whole), image)
    images = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    drawn = train_variant(images, ["ISIC_a", "ISIC_b"], 2, augment_seed=7, random_crop=True)
    np.testing.assert_array_equal(drawn[1], augment_image(images[1], cropped))
    with pytest.raises(ValueError, match="train_augment"):
        TrainConfig("p", "r", train_random_crop=True)


def test_resuming_checks_settings_added_since_as_their_defaults(tmp_path):
    run = open_storage(str(tmp_path / "run"))
    older = {
        name: value
        for name, value in json.loads(json.dumps(TrainConfig("p", "r").__dict__)).items()
        if name != "train_augment"
    }
    run.write_bytes(f"{CHECKPOINTS}/run-config.json", json.dumps(older).encode())
    check_resumable(run, TrainConfig("p", "r"))  # the setting did not exist then: it was off
    with pytest.raises(ValueError, match="train_augment"):
        check_resumable(run, TrainConfig("p", "r", train_augment=True))


def test_fine_tune_cut_is_the_input_of_the_first_unfrozen_block():
    from training.model import build_classifier

    model = build_classifier("efficientnet_lite0", None)
    assert fine_tune_cut(model, 1).name == model.get_layer("block6d_add").output.name
    assert fine_tune_cut(model, 4).name == model.get_layer("block6a_project_bn").output.name
    assert fine_tune_cut(model, 5).name == model.get_layer("block5c_add").output.name
    assert fine_tune_cut(model, 0).name == model.get_layer("top_activation").output.name
    # The tail from the cut is the same function as the whole network.
    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    cut = fine_tune_cut(model, 5)
    trunk, tail = keras.Model(model.input, cut), keras.Model(cut, model.output)
    np.testing.assert_allclose(
        tail.predict(trunk.predict(images, verbose=0), verbose=0),
        model.predict(images, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_dx_classifier_ends_in_the_melanoma_probability():
    from training.gradcam import gradcam_heatmaps
    from training.model import build_classifier, freeze_backbone, head_model, load_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier("efficientnet_lite0", None, classes=DX_CLASSES)
    assert model.output.shape[-1] == 1
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Activation) and last.activation is keras.activations.sigmoid
    images = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    logits = keras.Model(model.input, model.get_layer("dx_logits").output).predict(images, verbose=0)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        model.predict(images, verbose=0)[:, 0], softmax[:, DX_CLASSES.index("mel")], rtol=1e-4, atol=1e-6
    )
    # The extra head layers are head, not backbone: trainable when the backbone is frozen.
    freeze_backbone(model)
    assert model.get_layer("dx_logits").trainable and not model.get_layer("top_conv").trainable
    assert head_model(model).output.shape[-1] == 1
    heatmaps = gradcam_heatmaps(model, images[:2], "top_activation")
    assert heatmaps.shape[0] == 2 and np.isfinite(heatmaps).all()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dx-{os.getpid()}.keras"
    model.save(path)
    try:
        np.testing.assert_allclose(
            load_classifier(path).predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5
        )
    finally:
        path.unlink()


def test_shard_dataset_streams_every_training_image(processed_root):
    """The tf.data pipeline: every (augmented included) training image once, verified shards, flips."""
    from training.data import shard_dataset

    storage = open_storage(processed_root)
    manifest = latest_manifest(storage)
    arrays = load_arrays(storage, manifest, "train", augmented=True)
    by_bytes = {
        hash(image.tobytes()): (image, record) for image, record in zip(arrays.images, arrays.records)
    }
    seen = 0
    for images, labels in shard_dataset(
        storage, manifest, ["train"], augmented=True, batch_size=32, shuffle=True, target="dx"
    ):
        assert (
            images.dtype.name == "uint8"
            and images.shape[1:] == (224, 224, 3)
            and labels.dtype.name == "int32"
        )
        for image, label in zip(images.numpy(), labels.numpy()):
            _, record = by_bytes[hash(image.tobytes())]
            assert DX_CLASSES[label] == record["dx"]
            seen += 1
    assert seen == len(arrays)
    first = next(
        iter(
            shard_dataset(storage, manifest, ["train"], augmented=False, batch_size=4, shuffle=False, flip=1)
        )
    )[0].numpy()
    plain = next(
        iter(shard_dataset(storage, manifest, ["train"], augmented=False, batch_size=4, shuffle=False))
    )[0].numpy()
    np.testing.assert_array_equal(first, plain[:, :, ::-1])


# --- real training ----------------------------------------------------------------------------


@pytest.mark.slow
def test_training_end_to_end_writes_artifacts(processed_root, tmp_path):
    """Phase 1 on cached features, phase 2 on cached activations (2 blocks), dx target."""
    from training.model_io import load_model

    run_root = str(tmp_path / "run")
    cfg = TrainConfig(
        processed_root,
        run_root,
        epochs=4,
        fine_tune_epochs=2,
        fine_tune_blocks=2,
        target="dx",
        fine_tune_learning_rate=1e-4,
        cache_dtype="float32",
    )
    result = run_training(cfg)
    run = open_storage(run_root)
    for key in (
        "model/model.keras",
        "model/history.json",
        "model/config.json",
        "model/provenance.json",
        "model/checkpoints/state.json",
    ):
        assert run.exists(key), key
    history = json.loads(run.read_bytes("model/history.json"))
    assert len(history["phase1"]["val_auroc"]) == 4 and len(history["phase2"]["val_auroc"]) == 2
    assert all(0.0 <= v <= 1.0 for v in history["phase1"]["val_auroc"] + history["phase2"]["val_auroc"])
    config = json.loads(run.read_bytes("model/config.json"))
    assert config["target"] == "dx" and config["fine_tune_blocks"] == 2 and config["learning_rate"] == 1e-4
    provenance = json.loads(run.read_bytes("model/provenance.json"))
    assert provenance["weights"] == "imagenet" and len(provenance["weights_sha256"]) == 64
    assert provenance["classes"] == list(DX_CLASSES)
    assert provenance["machine"]["numerics_fingerprint"] == numerics_fingerprint()
    assert result["epochs_run"] == {"phase1": 4, "phase2": 2}
    state = read_state(run)
    assert state["phase"] == 2 and state["done"]

    # model.keras is the full image -> probability network; on val it scores what training measured.
    model = load_model(run.uri("model/model.keras"))
    assert model.input.shape[1:] == (224, 224, 3) and model.output.shape[1:] == (1,)
    val = load_arrays(open_storage(processed_root), latest_manifest(open_storage(processed_root)), "val")
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(val.labels, model.predict(val.images, verbose=0)[:, 0])
    best = max([state["baseline"]["val_auroc"], *history["phase2"]["val_auroc"]])
    assert auroc == pytest.approx(best, abs=1e-3)


@pytest.mark.slow
def test_cached_training_equals_running_the_frozen_network_every_epoch(processed_root, tmp_path):
    """Same seed: phase 1 on cached features == phase 1 on images; phase 2 on cached
    activations == phase 2 on images with the same blocks unfrozen (BatchNorm in inference)."""
    from training.model_io import load_model

    common = dict(
        epochs=2,
        fine_tune_epochs=2,
        fine_tune_blocks=1,
        limit_train=150,
        fine_tune_learning_rate=1e-4,
        cache_dtype="float32",
        train_flips=2,
    )  # odd epochs train on left-right flipped images: cached per variant vs flipped on the fly
    runs = {}
    for cached in (True, False):
        root = str(tmp_path / f"cached-{cached}")
        runs[cached] = (
            run_training(
                TrainConfig(processed_root, root, feature_cache=cached, fine_tune_cache=cached, **common)
            ),
            root,
        )
    histories = {
        c: json.loads(open_storage(root).read_bytes("model/history.json")) for c, (_, root) in runs.items()
    }
    for phase in ("phase1", "phase2"):
        np.testing.assert_allclose(
            histories[True][phase]["val_auroc"], histories[False][phase]["val_auroc"], atol=2e-3
        )
        np.testing.assert_allclose(histories[True][phase]["loss"], histories[False][phase]["loss"], rtol=1e-3)
    models = {c: load_model(open_storage(root).uri("model/model.keras")) for c, (_, root) in runs.items()}
    trained = ("head_", "melanoma_probability", "block7a_", "top_")
    a, b = _weights_by_name(models[True], trained), _weights_by_name(models[False], trained)
    assert a.keys() == b.keys() and any(k.startswith("block7a_") for k in a)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=2e-4, err_msg=key)
    # Frozen layers stayed at their ImageNet values in both.
    np.testing.assert_array_equal(
        models[True].get_layer("block6d_expand_conv").kernel.numpy(),
        models[False].get_layer("block6d_expand_conv").kernel.numpy(),
    )


def _train_cli(processed_root: str, run_root: str, config: dict) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--processed-root",
            processed_root,
            "--run-root",
            run_root,
            "--config",
            json.dumps(config),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_killed_training_resumes_from_the_next_epoch(processed_root, tmp_path):
    """Kill `python -m training train` after its first checkpoint; the rerun continues there."""
    run_root = tmp_path / "run"
    # Phase 1 on images (no feature cache) makes an epoch last long enough to kill it mid-run.
    config = {"epochs": 5, "feature_cache": False, "limit_train": 200, "patience": 10}
    first = _train_cli(processed_root, str(run_root), config)
    state_file = run_root / "model" / "checkpoints" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if state_file.exists() and json.loads(state_file.read_text())["epoch"] >= 0:
            break
        time.sleep(0.1)
    assert first.poll() is None, "training finished before it could be killed:\n" + first.communicate()[0]
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed = json.loads(state_file.read_text())
    done_epochs = killed["epoch"] + 1
    assert killed["phase"] == 1 and not killed["done"] and 1 <= done_epochs < 5
    assert not (run_root / "model" / "model.keras").exists()

    second = _train_cli(processed_root, str(run_root), config)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert f"resuming phase 1 at epoch {done_epochs + 1}" in output
    assert "epoch 1/5" not in output  # did not start over
    assert f"epoch {done_epochs + 1}/5" in output and "epoch 5/5" in output
    history = json.loads((run_root / "model" / "history.json").read_text())
    assert len(history["phase1"]["val_auroc"]) == 5
    # The epochs before the kill are kept as they were, not retrained.
    assert history["phase1"]["val_auroc"][:done_epochs] == killed["history"]["val_auroc"]
    assert (run_root / "model" / "model.keras").exists()


@pytest.mark.slow
def test_a_run_stopped_by_its_time_budget_continues_only_when_asked(processed_root, tmp_path, caplog):
    run_root = str(tmp_path / "run")
    # A budget this small lets each phase run its first epoch (no epoch time known yet), then stops it.
    config = dict(epochs=3, fine_tune_epochs=3, fine_tune_blocks=1, limit_train=120, target="dx")
    first = run_training(TrainConfig(processed_root, run_root, max_train_seconds=1e-3, **config))
    assert first["epochs_run"] == {"phase1": 1, "phase2": 1}
    assert first["stop_reason"]["phase2"].startswith("time budget")
    stopped = read_state(open_storage(run_root))

    again = run_training(TrainConfig(processed_root, run_root, **config))  # a finished run is left as it is
    assert again["epochs_run"] == first["epochs_run"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training"):
        longer = run_training(TrainConfig(processed_root, run_root, continue_after_budget=True, **config))
    out = caplog.text  # log lines (stderr in the CLI)
    phase2_epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("phase 2 epochs:")]
    assert "continuing it" in out and "resuming phase 2 at epoch 2" in out
    assert len(phase2_epochs) == 2 and not any("; epoch 1/3:" in line for line in phase2_epochs)
    assert longer["epochs_run"] == {"phase1": 1, "phase2": 3}
    history = json.loads(open_storage(run_root).read_bytes("model/history.json"))
    assert (
        history["phase2"]["val_auroc"][:1] == stopped["history"]["val_auroc"]
    )  # the first epoch kept, not retrained
    assert read_state(open_storage(run_root))["stop_reason"] == "epochs done"


#: A small run whose second training variant is an augment draw (seed 3).
SMALL_AUGMENTED = dict(epochs=2, limit_train=60, train_flips=2, train_augment=True, seed=3)


def test_augmented_training_variants_are_cached_once_per_variant(processed_root, tmp_path):
    run_root = str(tmp_path / "run")
    config = TrainConfig(processed_root, run_root, fine_tune_epochs=1, fine_tune_blocks=1, **SMALL_AUGMENTED)
    result = run_training(config)
    assert result["epochs_run"] == {"phase1": 2, "phase2": 1}
    run = open_storage(run_root)
    metas = {
        key: json.loads(run.read_bytes(key))
        for key in run.list_keys(CHECKPOINTS)
        if "/features-train" in key and key.endswith(".json")
    }
    drawn = {key: meta for key, meta in metas.items() if "/features-train-aug1-" in key}
    assert len(drawn) == 2 and all(
        meta["augment"]["seed"] == 3 and meta["flip_variant"] == 1 for meta in drawn.values()
    )
    assert not any("-flip" in key for key in metas)
    stored = [meta for key, meta in metas.items() if "/features-train-" in key and "-aug" not in key]
    assert len(stored) == 2 and not any("augment" in meta for meta in stored)


@pytest.mark.slow
def test_checkpoints_and_artifacts_on_object_storage(processed_root, s3_bucket, caplog):
    """Run root in S3 (moto): checkpoints each epoch, artifacts, and a rerun that reuses them."""
    run_root = f"s3://{s3_bucket}/runs/r1"
    config = dict(epochs=2, fine_tune_epochs=1, fine_tune_blocks=1, limit_train=120, target="dx")
    first = run_training(TrainConfig(processed_root, run_root, **config))
    run = open_storage(run_root)
    keys = set(run.list_keys("model"))
    for key in (
        "model/model.keras",
        "model/history.json",
        "model/config.json",
        "model/provenance.json",
        "model/checkpoints/state.json",
        "model/checkpoints/phase1-last.weights.h5",
        "model/checkpoints/phase1-optimizer.npz",
        "model/checkpoints/phase2-best.weights.h5",
        "model/checkpoints/phase2-final.weights.h5",
    ):
        assert key in keys, key
    assert any(k.startswith("model/checkpoints/features-train-") and k.endswith(".npy") for k in keys)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training"):
        again = run_training(TrainConfig(processed_root, run_root, **config))
    out = caplog.text
    assert "manifest v" in out  # the run's log lines were captured
    assert (
        "; epoch 1/" not in out and "caching" not in out and "cached" not in out
    )  # nothing retrained, nothing recomputed
    assert again["best_val_auroc"] == first["best_val_auroc"] and again["epochs_run"] == first["epochs_run"]


@pytest.mark.slow
def test_ensemble_training_trains_each_seed_and_exports_their_average(processed_root, tmp_path):
    from training.ensemble import gradcam_layer_names
    from training.model_io import load_model

    run_root = str(tmp_path / "run")
    cfg = TrainConfig(processed_root, run_root, epochs=2, limit_train=120, ensemble_size=2, seed=5)
    result = run_training(cfg)

    run = open_storage(run_root)
    assert sorted(result["members"]) == ["seed-5", "seed-6"] and result["ensemble_size"] == 2
    member_models = [load_model(run.uri(f"members/seed-{seed}/model/model.keras")) for seed in (5, 6)]
    ensemble = load_model(result["model_uri"])
    assert result["model_uri"] == run.uri("model/model.keras")
    assert gradcam_layer_names(ensemble) == ["m0_top_activation", "m1_top_activation"]
    val = load_arrays(open_storage(processed_root), latest_manifest(open_storage(processed_root)), "val")
    images = val.images[:16]
    member_p = np.stack([m.predict(images, verbose=0)[:, 0].astype(np.float64) for m in member_models])
    assert not np.allclose(member_p[0], member_p[1], atol=1e-4)  # different seeds, different members
    expected = 1 / (1 + np.exp(-np.mean(np.log(member_p) - np.log1p(-member_p), axis=0)))
    np.testing.assert_allclose(ensemble.predict(images, verbose=0)[:, 0], expected, rtol=1e-4, atol=1e-6)
    provenance = json.loads(run.read_bytes("model/provenance.json"))
    assert sorted(provenance["ensemble_of"]) == ["seed-5", "seed-6"]
    # A second call resumes: both members are finished, nothing is retrained.
    again = run_training(cfg)
    assert {name: m["epochs_run"] for name, m in again["members"].items()} == {
        name: m["epochs_run"] for name, m in result["members"].items()
    }


def test_colour_mixed_ensemble_trains_each_seed_with_and_without_jitter():
    cfg = TrainConfig(
        "p", "r", train_flips=2, train_augment=True, ensemble_size=2, ensemble_colour_mix=True, seed=4
    )
    members = ensemble_members(cfg)
    assert [name for name, _ in members] == ["seed-4", "seed-5", "seed-4-jitter", "seed-5-jitter"]
    assert [(m.seed, m.train_colour_jitter) for _, m in members] == [
        (4, False),
        (5, False),
        (4, True),
        (5, True),
    ]
    assert all(m.ensemble_size == 1 and not m.ensemble_colour_mix for _, m in members)
    plain = TrainConfig(
        "p", "r", train_flips=2, train_augment=True, train_colour_jitter=True, ensemble_size=2
    )
    assert [(name, m.train_colour_jitter) for name, m in ensemble_members(plain)] == [
        ("seed-0", True),
        ("seed-1", True),
    ]
    with pytest.raises(ValueError, match="ensemble_colour_mix"):
        TrainConfig("p", "r", ensemble_colour_mix=True)  # no train_augment draws to jitter
    with pytest.raises(ValueError, match="ensemble_colour_mix"):
        TrainConfig("p", "r", train_augment=True, train_colour_jitter=True, ensemble_colour_mix=True)


@pytest.mark.slow
def test_colour_mixed_ensemble_exports_a_plain_and_a_jittered_member(processed_root, tmp_path):
    run_root = str(tmp_path / "run")
    result = run_training(TrainConfig(processed_root, run_root, ensemble_colour_mix=True, **SMALL_AUGMENTED))
    assert sorted(result["members"]) == ["seed-3", "seed-3-jitter"] and result["ensemble_colour_mix"]
    run = open_storage(run_root)
    jitter_drawn = {}
    for name in ("seed-3", "seed-3-jitter"):
        metas = [
            json.loads(run.read_bytes(key))
            for key in run.list_keys(f"members/{name}/{CHECKPOINTS}")
            if "/features-train-aug1-" in key and key.endswith(".json")
        ]
        assert metas and all(meta["augment"]["seed"] == 3 for meta in metas)
        jitter_drawn[name] = {meta["augment"].get("colour_jitter", False) for meta in metas}
    assert jitter_drawn == {"seed-3": {False}, "seed-3-jitter": {True}}
    provenance = json.loads(run.read_bytes("model/provenance.json"))
    assert sorted(provenance["ensemble_of"]) == ["seed-3", "seed-3-jitter"]


def test_ensemble_size_is_checked():
    with pytest.raises(ValueError, match="ensemble_size"):
        TrainConfig("p", "r", ensemble_size=0)


def test_label_smoothing_is_checked():
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig("p", "r", label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig("p", "r", label_smoothing=-0.1)


def test_smoothed_sparse_crossentropy_is_the_cross_entropy_against_smoothed_targets():
    from training.phases import smoothed_sparse_crossentropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 7)).astype(np.float32)
    labels = np.array([0, 1, 2, 4, 6, 4])
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    for smoothing in (0.0, 0.1, 0.3):
        targets = np.full((6, 7), smoothing / 7)
        targets[np.arange(6), labels] += 1.0 - smoothing
        expected = -(targets * log_softmax).sum(axis=1)
        got = np.asarray(smoothed_sparse_crossentropy(smoothing, 7)(labels.reshape(-1, 1), logits))
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Without smoothing it is Keras' own sparse cross-entropy.
    plain = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    np.testing.assert_allclose(
        np.asarray(smoothed_sparse_crossentropy(0.0, 7)(labels, logits)), np.asarray(plain), rtol=1e-5
    )


def test_weight_interpolation_mixes_two_ends_of_one_architecture():
    from training.weight_interpolation import interpolate_weights

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    rng = np.random.default_rng(0)
    start = [rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()]
    end = [rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()]
    for alpha in (0.0, 0.25, 1.0):
        interpolate_weights(model, start, end, alpha)
        for got, s, e in zip(model.get_weights(), start, end):
            np.testing.assert_allclose(got, (1 - alpha) * s + alpha * e, rtol=1e-6)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        interpolate_weights(model, start, end, 1.5)
    with pytest.raises(ValueError, match="not one architecture"):
        interpolate_weights(model, start[:-1], end, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        interpolate_weights(model, [w.T for w in start], end, 0.5)


def test_fine_tune_interpolation_is_checked():
    with pytest.raises(ValueError, match="fine_tune_interpolation must be in"):
        TrainConfig("p", "r", fine_tune_epochs=2, fine_tune_interpolation=1.2)
    with pytest.raises(ValueError, match="needs fine_tune_epochs"):
        TrainConfig("p", "r", fine_tune_epochs=0, fine_tune_interpolation=0.5)


@pytest.mark.slow
def test_the_exported_model_interpolates_phase_1_and_phase_2_weights(processed_root, tmp_path):
    from training.model_io import load_model, load_weights_bytes

    run_root = str(tmp_path / "run")
    config = dict(
        epochs=2, fine_tune_epochs=2, fine_tune_blocks=1, limit_train=60, fine_tune_learning_rate=1e-3
    )
    run_training(TrainConfig(processed_root, run_root, fine_tune_interpolation=0.5, **config))
    run = open_storage(run_root)
    exported = load_model(run.uri("model/model.keras"))
    ends = {}
    for phase in (1, 2):
        load_weights_bytes(exported, run.read_bytes(f"{CHECKPOINTS}/phase{phase}-final.weights.h5"))
        ends[phase] = exported.get_weights()
    moved = [i for i, (a, b) in enumerate(zip(ends[1], ends[2])) if not np.array_equal(a, b)]
    assert moved, "phase 2 changed no weight: nothing to interpolate"
    got = load_model(run.uri("model/model.keras")).get_weights()
    for a, b, w in zip(ends[1], ends[2], got):
        np.testing.assert_allclose(w, 0.5 * a + 0.5 * b, rtol=1e-5, atol=1e-6)
    assert json.loads(run.read_bytes("model/provenance.json"))["fine_tune_interpolation"] == 0.5

    # Applied at export: the finished run exported again with 1 is phase 2's model itself.
    run_training(TrainConfig(processed_root, run_root, **config))
    for b, w in zip(ends[2], load_model(run.uri("model/model.keras")).get_weights()):
        np.testing.assert_array_equal(w, b)
