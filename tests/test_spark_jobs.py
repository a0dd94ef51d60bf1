"""The real Spark jobs (``spark-submit --master local[2]``) over the bad-input corpus, several
drops, reruns, augmentation, an ISIC-layout drop and S3 (moto) roots.

Each ``spark-submit`` costs ~10 s of JVM and SparkContext start-up, so the runs happen once
in module-scoped fixtures and the tests below only assert on what they wrote. Runs that find
nothing to do exit before starting a SparkContext (a few seconds each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from melanoma import ingest
from melanoma.image_decode import NOTES
from melanoma.manifest import content_without_version, latest_manifest, manifest_versions, read_verified_shard
from melanoma.spark_settings import submit_conf
from melanoma.splits import assign_split
from melanoma.storage import LocalStorage, S3Storage

from badcorpus import CONVERSION_NOTES, DECODE_REASONS, SCAN_REASONS, build_bad_drop
from test_ingest import all_records, entries_for, quarantine_lines, shard_bytes, snapshot, write_ham_drop

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BAD = "bad-2024-01-01"
CLEAN = "ham-2024-02-01"
ISIC = "isic-2024-03-01"
SPARK_TIMEOUT_S = 600


def spark_submit(job: str, *args: str, env: dict | None = None) -> dict:
    """Run ``spark_jobs/<job>.py`` through spark-submit on local[2]; returns the job's summary line."""
    venv_bin = Path(sys.executable).parent
    full_env = {
        **os.environ,
        **(env or {}),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        "spark-submit",
        "--master",
        "local[2]",
        # The DAG's spark-submit settings (Python, driver JVM options), so tests run what it runs.
        *[arg for key, value in submit_conf(sys.executable).items() for arg in ("--conf", f"{key}={value}")],
        str(PROJECT_ROOT / "spark_jobs" / f"{job}.py"),
        *args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=full_env, cwd=PROJECT_ROOT, timeout=SPARK_TIMEOUT_S
    )
    assert done.returncode == 0, (
        f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"{job}: summary ")]
    assert lines, done.stdout[-3000:]
    return json.loads(lines[-1].removeprefix(f"{job}: summary "))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two drops (the bad corpus and a clean one sharing an image id), processed one after the
    other into ``seq`` and both at once into ``all``; then reruns, augment and its rerun on ``all``."""
    base = tmp_path_factory.mktemp("spark")
    raw, seq, together = base / "raw", base / "seq", base / "all"
    expected = build_bad_drop(raw, BAD, None)
    # good_1 (a melanoma of the bad drop) comes again in the clean drop: a cross-drop duplicate.
    write_ham_drop(raw, CLEAN, ["good_1", *(f"ISIC_{i:07d}" for i in range(30))])
    state: dict = {"raw": raw, "seq": seq, "all": together, "expected": expected}

    state["seq_first"] = spark_submit(
        "preprocess",
        "--raw-root",
        str(raw),
        "--processed-root",
        str(seq),
        "--drops",
        BAD,
        "--shard-size",
        "8",
    )
    state["seq_second"] = spark_submit(
        "preprocess", "--raw-root", str(raw), "--processed-root", str(seq), "--shard-size", "8"
    )
    state["all_first"] = spark_submit(
        "preprocess", "--raw-root", str(raw), "--processed-root", str(together), "--shard-size", "8"
    )
    state["preprocessed_files"] = snapshot(together)
    state["rerun"] = spark_submit(
        "preprocess", "--raw-root", str(raw), "--processed-root", str(together), "--shard-size", "8"
    )
    state["rerun_drop"] = spark_submit(
        "preprocess", "--raw-root", str(raw), "--processed-root", str(together), "--drops", BAD
    )
    state["files_after_reruns"] = snapshot(together)
    state["augment"] = spark_submit("augment", "--processed-root", str(together))
    state["augmented_files"] = snapshot(together)
    state["augment_rerun"] = spark_submit("augment", "--processed-root", str(together))
    state["files_after_augment_rerun"] = snapshot(together)
    return state


def manifest_at(root: Path, version: int) -> dict:
    return json.loads((root / "processed" / f"manifest-{version:06d}.json").read_text())


def test_every_bad_input_is_quarantined_with_its_reason(runs):
    manifest = manifest_at(runs["all"], 1)
    entries = quarantine_lines(runs["all"], BAD)
    written = {r["image_id"]: r for r in all_records(runs["all"], manifest) if r["source_drop"] == BAD}
    for image_id, outcome in runs["expected"].items():
        reasons = {e["reason"] for e in entries_for(entries, image_id)}
        if outcome in SCAN_REASONS | DECODE_REASONS:
            assert outcome in reasons, (image_id, outcome, reasons)
            # Identical duplicates keep their first row/file; every other bad input is not written.
            assert (image_id in written) == (image_id in ("dup_row", "dup_file")), image_id
        else:
            assert image_id in written and not reasons, (image_id, reasons)
    # Each stage's reasons are all present: the corpus is complete and both stages report.
    assert SCAN_REASONS | DECODE_REASONS <= {e["reason"] for e in entries}


def test_every_convertible_input_is_written_with_its_note(runs):
    manifest = manifest_at(runs["all"], 1)
    written = {r["image_id"]: r for r in all_records(runs["all"], manifest)}
    noted = {image_id: note for image_id, note in runs["expected"].items() if note in NOTES}
    assert set(noted.values()) == CONVERSION_NOTES
    for image_id, note in noted.items():
        assert note in written[image_id]["conversions"], (image_id, written[image_id]["conversions"])
        assert manifest["accounting"][BAD]["conversions"][note] >= 1
    assert "conv_large" in written  # 4000x3000, decoded at reduced scale


def test_accounting_invariant_holds_in_manifest_and_quarantine_file(runs):
    manifest = manifest_at(runs["all"], 1)
    for drop_id in (BAD, CLEAN):
        accounting = manifest["accounting"][drop_id]
        entries = quarantine_lines(runs["all"], drop_id)
        records = [r for r in all_records(runs["all"], manifest) if r["source_drop"] == drop_id]
        assert accounting["inputs"] == accounting["written"] + accounting["quarantined"], drop_id
        assert accounting["written"] == len(records)
        assert accounting["quarantined"] == len(entries) == sum(accounting["quarantine_reasons"].values())
        assert accounting["layout"] == "ham10000"
    assert runs["all_first"]["inputs"] == sum(manifest["accounting"][d]["inputs"] for d in (BAD, CLEAN))
    assert runs["all_first"]["tasks"] > 2  # shard size 8: several partitions ran


def test_a_duplicate_across_drops_keeps_the_first_drops_copy(runs):
    entries = quarantine_lines(runs["all"], CLEAN)
    assert [(e["item"], e["reason"]) for e in entries] == [("good_1", "duplicate-image-id")]
    manifest = manifest_at(runs["all"], 1)
    assert [r["source_drop"] for r in all_records(runs["all"], manifest) if r["image_id"] == "good_1"] == [
        BAD
    ]


def test_two_drops_one_after_another_equal_both_at_once(runs):
    seq, together = runs["seq"], runs["all"]
    assert manifest_versions(LocalStorage(seq)) == [1, 2]
    first, second, at_once = manifest_at(seq, 1), manifest_at(seq, 2), manifest_at(together, 1)
    assert first["drops"] == [BAD] and second["drops"] == [BAD, CLEAN]
    assert content_without_version(second) == content_without_version(at_once)
    assert shard_bytes(seq, second) == shard_bytes(together, at_once)
    for shard in at_once["shards"]:
        assert (seq / shard["key"]).read_bytes() == (together / shard["key"]).read_bytes()
    for name in (
        ingest.quarantine_key(BAD),
        ingest.quarantine_key(CLEAN),
        ingest.index_key(BAD),
        ingest.index_key(CLEAN),
    ):
        assert (seq / name).read_bytes() == (together / name).read_bytes(), name
    # The second run of the sequence scanned and wrote only the new drop.
    assert runs["seq_second"]["drops"] == [CLEAN] and runs["seq_second"]["layouts"] == {CLEAN: "ham10000"}


def test_splits_follow_the_lesion_hash(runs):
    manifest = manifest_at(runs["all"], 1)
    for record in all_records(runs["all"], manifest):
        assert record["split"] == assign_split(record["lesion_id"])


def test_spark_writes_the_same_bytes_as_the_in_process_engine(runs, tmp_path):
    ingest.run_preprocess(str(runs["raw"]), str(tmp_path), ingest.local_engine, shard_size=8)
    local = latest_manifest(LocalStorage(tmp_path))
    spark = manifest_at(runs["all"], 1)
    assert content_without_version(local) == content_without_version(spark)
    assert shard_bytes(tmp_path, local) == shard_bytes(runs["all"], spark)


def test_a_rerun_changes_nothing(runs):
    assert runs["rerun"]["manifest_key"] is None and runs["rerun"]["drops"] == []
    assert runs["rerun_drop"]["manifest_key"] is None  # --drops naming a processed drop
    assert runs["files_after_reruns"] == runs["preprocessed_files"]  # same paths, mtimes and sha256
    assert [k for k in runs["files_after_reruns"] if "/manifest-" in k] == ["processed/manifest-000001.json"]


def test_augment_adds_two_copies_per_training_melanoma_only(runs):
    before, after = manifest_at(runs["all"], 1), manifest_at(runs["all"], 2)
    n_train_mel = before["counts"]["train"]["1"]
    assert n_train_mel > 0
    assert after["augmented_counts"]["train"] == {"0": 0, "1": 2 * n_train_mel}
    assert after["augmented_counts"]["val"] == after["augmented_counts"]["test"] == {"0": 0, "1": 0}
    assert runs["augment"]["images"] == 2 * n_train_mel
    assert after["counts"] == before["counts"] and after["accounting"] == before["accounting"]
    originals = {s["key"]: s for s in before["shards"]}
    assert [s for s in after["shards"] if s["kind"] == "original"] == before["shards"]
    # Val/test (and every original shard) keep their bytes and mtimes.
    assert {k: v for k, v in runs["augmented_files"].items() if k in originals} == {
        k: runs["preprocessed_files"][k] for k in originals
    }
    augmented = [s for s in after["shards"] if s["kind"] == "augmented"]
    assert augmented and all(
        s["split"] == "train" and originals[s["augment_of"]]["split"] == "train" for s in augmented
    )
    storage = LocalStorage(runs["all"])
    for shard in augmented:
        source = read_verified_shard(storage, originals[shard["augment_of"]])
        copies = read_verified_shard(storage, shard)
        melanoma = [r["image_id"] for r in source.records if r["label"] == 1]
        assert [r["augment_of"] for r in copies.records] == [i for i in melanoma for _ in range(2)]


def test_augment_rerun_is_a_no_op(runs):
    assert runs["augment_rerun"]["manifest_key"] is None
    assert runs["files_after_augment_rerun"] == runs["augmented_files"]
    assert manifest_versions(LocalStorage(runs["all"])) == [1, 2]


def test_s3_roots_and_an_isic_drop_from_executors(isic_sample_dir, s3_env, s3_bucket, tmp_path):
    """One run reading raw drops from and writing shards to a real S3 endpoint (moto over HTTP):
    a HAM10000-layout drop with a truncated image, and the ISIC sample (JSON per image)."""
    s3 = boto3.client("s3", endpoint_url=s3_env["MELANOMA_S3_ENDPOINT_URL"])
    local_raw = tmp_path / "raw"
    write_ham_drop(local_raw, CLEAN, [f"ISIC_{i:07d}" for i in range(9_000_000, 9_000_012)])
    truncated = local_raw / CLEAN / "images" / "ISIC_9000003.jpg"
    truncated.write_bytes(truncated.read_bytes()[:400])
    for path in sorted(local_raw.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"raw/{path.relative_to(local_raw).as_posix()}")
    for path in sorted(isic_sample_dir.iterdir()):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"raw/{ISIC}/{path.name}")

    summary = spark_submit(
        "preprocess",
        "--raw-root",
        f"s3://{s3_bucket}/raw",
        "--processed-root",
        f"s3://{s3_bucket}/data",
        env=s3_env,
    )
    assert summary["layouts"] == {CLEAN: "ham10000", ISIC: "isic"}
    assert summary["manifest_uri"] == f"s3://{s3_bucket}/data/processed/manifest-000001.json"

    storage = S3Storage(s3_bucket, "data", s3_env["MELANOMA_S3_ENDPOINT_URL"])
    manifest = latest_manifest(storage)
    isic = manifest["accounting"][ISIC]
    assert (
        isic["layout"] == "isic"
        and isic["inputs"] == 40
        and isic["written"] == 40
        and isic["quarantined"] == 0
    )
    ham = manifest["accounting"][CLEAN]
    assert (ham["inputs"], ham["written"], ham["quarantined"]) == (12, 11, 1)
    quarantine = [json.loads(line) for line in storage.read_bytes(ham["quarantine_key"]).splitlines()]
    assert [(q["item"], q["reason"]) for q in quarantine] == [("ISIC_9000003", "truncated")]
    records = [
        r for s in manifest["shards"] for r in read_verified_shard(storage, s).records
    ]  # sha256 checked
    isic_records = [r for r in records if r["source_drop"] == ISIC]
    assert (
        len(isic_records) == 40 and sum(r["label"] for r in isic_records) == 20
    )  # 20 melanoma, 20 nevus in the sample
    assert {r["dx"] for r in isic_records} == {"mel", "nv"}
    keys = set(storage.list_keys("processed"))
    assert {s["key"] for s in manifest["shards"]} <= keys
    assert {ingest.index_key(ISIC), ingest.quarantine_key(ISIC), ingest.index_key(CLEAN)} <= keys


def test_spark_engine_keeps_spark_submit_settings_and_preloads_workers(tmp_path) -> None:
    """SPARK_DEFAULTS fill gaps only: a --conf given to spark-submit wins; by default the
    workers fork from melanoma.spark_daemon with the ingestion code already imported."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        "from pyspark import SparkContext\n"
        "from melanoma.job_common import spark_engine\n"
        "def probe(_):\n"
        "    import os, sys\n"
        "    daemon = open(f'/proc/{os.getppid()}/cmdline').read().split('\\0')\n"
        "    return {'daemon': daemon[daemon.index('-m') + 1], 'preloaded': {'melanoma.preprocess_chunk', 'melanoma.augment_job'} <= set(sys.modules)}\n"
        "with spark_engine('probe') as run:\n"
        "    conf = SparkContext.getOrCreate().getConf()\n"
        "    print('probe: summary ' + json.dumps({'workers': run(probe, [0]), 'ui': conf.get('spark.ui.enabled')}))\n"
    )
    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    conf = [arg for key, value in submit_conf(sys.executable).items() for arg in ("--conf", f"{key}={value}")]

    def submit(*extra: str) -> dict:
        command = ["spark-submit", "--master", "local[1]", *conf, *extra, str(script)]
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=SPARK_TIMEOUT_S
        )
        assert done.returncode == 0, done.stderr[-3000:]
        line = [x for x in done.stdout.splitlines() if x.startswith("probe: summary ")][-1]
        return json.loads(line.removeprefix("probe: summary "))

    defaults = submit()
    assert defaults == {"workers": [{"daemon": "melanoma.spark_daemon", "preloaded": True}], "ui": "false"}
    overridden = submit(
        "--conf", "spark.python.daemon.module=pyspark.daemon", "--conf", "spark.ui.enabled=true"
    )
    assert overridden == {"workers": [{"daemon": "pyspark.daemon", "preloaded": False}], "ui": "true"}
