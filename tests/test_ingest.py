"""The preprocess/augment logic without Spark: driver and executor functions called directly.

The Spark jobs only hand :func:`melanoma.preprocess_chunk.process_chunk` and
:func:`melanoma.augment_job.augment_shard` to executors; here the same functions run in this
process (``local_engine``), which is fast enough to check every rule on every input.
tests/test_spark_jobs.py runs the real jobs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from melanoma import ingest, job_common, preprocess_chunk
from melanoma.image_decode import NOTES
from melanoma.manifest import content_without_version, latest_manifest, read_verified_shard
from melanoma.records import decode_shard
from melanoma.splits import assign_split
from melanoma.storage import LocalStorage

from badcorpus import (
    COLUMNS,
    DECODE_REASONS,
    SCAN_REASONS,
    build_bad_drop,
    jpeg_bytes,
    lesion_mask,
    png_bytes,
    synthetic_lesion,
)

BAD = "bad-2024-01-01"


def write_ham_drop(
    root: Path, drop_id: str, ids: list[str], *, melanoma_every: int = 3, masks: bool = True
) -> None:
    """A clean HAM10000-layout drop of small synthetic images (every ``melanoma_every``-th is mel)."""
    folder = root / drop_id / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, image_id in enumerate(ids):
        rgb = synthetic_lesion(96, 72, seed=int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16))
        (folder / f"{image_id}.jpg").write_bytes(jpeg_bytes(rgb))
        if masks:
            (folder / f"{image_id}_segmentation.png").write_bytes(png_bytes(lesion_mask(rgb)))
        dx = "mel" if index % melanoma_every == 0 else "nv"
        rows.append([f"HAM_{image_id}", image_id, dx, "histo", "45.0", "male", "back"])
    with open(root / drop_id / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def shard_bytes(root: Path, manifest: dict) -> dict[str, str]:
    return {s["key"]: hashlib.sha256((root / s["key"]).read_bytes()).hexdigest() for s in manifest["shards"]}


def quarantine_lines(root: Path, drop_id: str) -> list[dict]:
    return [json.loads(line) for line in (root / ingest.quarantine_key(drop_id)).read_text().splitlines()]


def entries_for(entries: list[dict], image_id: str) -> list[dict]:
    """Quarantine entries about ``image_id``: by id, or by an object key whose file stem is the id."""
    return [
        e for e in entries if e["item"] == image_id or ("/" in e["item"] and Path(e["item"]).stem == image_id)
    ]


def all_records(root: Path, manifest: dict, kind: str = "original") -> list[dict]:
    storage = LocalStorage(root)
    return [
        r for s in manifest["shards"] if s["kind"] == kind for r in read_verified_shard(storage, s).records
    ]


class NoEngine:
    """An engine that fails the test if started: proves a run did not need executors."""

    def __call__(self):
        raise AssertionError("the engine was started although there was nothing to do")


@pytest.fixture(scope="module")
def bad_raw(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("raw")
    return root, build_bad_drop(root, BAD, None)


@pytest.fixture(scope="module")
def bad_run(bad_raw, tmp_path_factory) -> tuple[Path, dict, dict]:
    raw, _ = bad_raw
    out = tmp_path_factory.mktemp("out")
    summary = ingest.run_preprocess(str(raw), str(out), ingest.local_engine, shard_size=8)
    return out, summary, latest_manifest(LocalStorage(out))


# --- plan_drop ----------------------------------------------------------------------------------


def test_plan_drop_cuts_sorted_inputs_into_fixed_chunks(bad_raw, tmp_path):
    raw, expected = bad_raw
    plan = ingest.plan_drop(str(raw), str(tmp_path), BAD, {}, shard_size=4)
    ids = [item["image_id"] for task in plan.tasks for item in task.items]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert [len(t.items) for t in plan.tasks[:-1]] == [4] * (len(plan.tasks) - 1) and 1 <= len(
        plan.tasks[-1].items
    ) <= 4
    assert [t.chunk_index for t in plan.tasks] == list(range(len(plan.tasks)))
    # Scan-time reasons are decided here; everything else goes to the executors.
    for image_id, outcome in expected.items():
        if outcome in SCAN_REASONS:
            assert outcome in {e["reason"] for e in entries_for(plan.quarantined, image_id)}, image_id
        else:
            assert image_id in ids, image_id
    assert plan.n_inputs == len(ids) + len(plan.quarantined)
    assert plan.layout == "ham10000"


def test_plan_drop_rejects_a_bad_shard_size(bad_raw, tmp_path):
    raw, _ = bad_raw
    with pytest.raises(ValueError, match="shard_size"):
        ingest.plan_drop(str(raw), str(tmp_path), BAD, {}, shard_size=0)


# --- process_chunk through a whole run -------------------------------------------------------


def test_every_bad_input_is_quarantined_with_its_reason(bad_raw, bad_run):
    _, expected = bad_raw
    out, summary, manifest = bad_run
    entries = quarantine_lines(out, BAD)
    written = {r["image_id"]: r for r in all_records(out, manifest)}
    for image_id, outcome in expected.items():
        reasons = {e["reason"] for e in entries_for(entries, image_id)}
        if outcome in SCAN_REASONS | DECODE_REASONS:
            assert outcome in reasons, (image_id, outcome, reasons)
        else:
            assert image_id in written and not reasons, (image_id, reasons)
    assert DECODE_REASONS <= set(expected.values())  # the corpus exercises every decode reason
    assert {e["drop_id"] for e in entries} == {BAD}
    assert summary["layouts"] == {BAD: "ham10000"}


def test_every_convertible_input_is_written_with_its_note(bad_raw, bad_run):
    _, expected = bad_raw
    out, _, manifest = bad_run
    written = {r["image_id"]: r for r in all_records(out, manifest)}
    noted = {image_id: note for image_id, note in expected.items() if note in NOTES}
    assert noted  # png-content, alpha-dropped, grayscale->rgb, cmyk->rgb, 16bit->8bit, exif-rotated
    for image_id, note in noted.items():
        assert note in written[image_id]["conversions"], (image_id, written[image_id]["conversions"])
        assert manifest["accounting"][BAD]["conversions"][note] >= 1
    assert written["conv_large"]["conversions"] == []  # 4000x3000: decoded at 1/8 scale, nothing to note
    assert written["conv_cmyk"]["has_mask"] is False and written["good_0"]["has_mask"] is True


def test_accounting_invariant_in_the_manifest_and_the_quarantine_file(bad_run):
    out, summary, manifest = bad_run
    accounting = manifest["accounting"][BAD]
    entries = quarantine_lines(out, BAD)
    records = all_records(out, manifest)
    assert accounting["inputs"] == accounting["written"] + accounting["quarantined"]
    assert accounting["written"] == len(records) == sum(s["count"] for s in manifest["shards"])
    assert accounting["quarantined"] == len(entries)
    assert sum(accounting["quarantine_reasons"].values()) == len(entries)
    assert summary["inputs"] == accounting["inputs"] and summary["tasks"] > 1  # shard_size=8: several chunks
    index = json.loads((out / ingest.index_key(BAD)).read_text())
    assert sorted(r["image_id"] for r in records) == [e["image_id"] for e in index]


def test_shards_hold_224_images_with_split_by_lesion_hash(bad_run):
    out, _, manifest = bad_run
    storage = LocalStorage(out)
    for entry in manifest["shards"]:
        shard = read_verified_shard(storage, entry)
        assert shard.images.shape[1:] == (224, 224, 3) and shard.images.dtype == np.uint8
        assert shard.masks.shape[1:] == (224, 224) and set(np.unique(shard.masks)) <= {0, 255}
        for record in shard.records:
            assert record["split"] == entry["split"] == assign_split(record["lesion_id"])
            assert record["source_drop"] == BAD and record["kind"] == "original"
    assert manifest["counts"] == ingest.count_by_split(manifest["shards"], "original")


def test_a_rerun_or_a_processed_drop_writes_nothing_and_starts_no_engine(bad_raw, bad_run):
    raw, _ = bad_raw
    out, _, _ = bad_run
    before = snapshot(out)
    assert ingest.run_preprocess(str(raw), str(out), NoEngine())["manifest_key"] is None
    assert ingest.run_preprocess(str(raw), str(out), NoEngine(), drops=[BAD])["manifest_key"] is None
    assert snapshot(out) == before


def test_an_unknown_drop_is_an_error(bad_raw, tmp_path):
    raw, _ = bad_raw
    with pytest.raises(FileNotFoundError, match="nope"):
        ingest.run_preprocess(str(raw), str(tmp_path), NoEngine(), drops=["nope"])


# --- determinism --------------------------------------------------------------------------------


def test_identical_inputs_give_byte_identical_shards(bad_raw, tmp_path):
    raw, _ = bad_raw
    plan = ingest.plan_drop(str(raw), str(tmp_path / "a"), BAD, {}, shard_size=8)
    task = plan.tasks[0]
    first = ingest.process_chunk(task)
    second = ingest.process_chunk(dataclasses.replace(task, processed_root=str(tmp_path / "b")))
    assert first.shards == second.shards  # keys, counts and sha256
    for shard in first.shards:
        data = (tmp_path / "a" / shard["key"]).read_bytes()
        assert data == (tmp_path / "b" / shard["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(decode_shard(data)) == shard["count"]


def test_chunking_and_outputs_do_not_depend_on_parallelism(bad_raw, tmp_path):
    raw, _ = bad_raw
    plans = [ingest.plan_drop(str(raw), str(tmp_path / "x"), BAD, {}, shard_size=5) for _ in range(2)]
    assert plans[0] == plans[1]  # the chunking is a function of the drop alone
    runs = {}
    for name, workers in (("serial", 1), ("threads", 4)):
        out = tmp_path / name
        with ingest.local_engine(workers) as map_tasks:
            results = map_tasks(
                ingest.process_chunk, ingest.plan_drop(str(raw), str(out), BAD, {}, shard_size=5).tasks
            )
        random.Random(workers).shuffle(results)  # results may arrive in any order
        plan = ingest.plan_drop(str(raw), str(out), BAD, {}, shard_size=5)
        manifest = ingest.finish_drops(LocalStorage(out), None, [plan], results, logical_date=None)
        runs[name] = (manifest, snapshot(out))
    (m1, files1), (m2, files2) = runs["serial"], runs["threads"]
    assert m1 == m2
    assert {k: v[1] for k, v in files1.items()} == {k: v[1] for k, v in files2.items()}


# --- several drops ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_drops(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("two")
    write_ham_drop(raw, "ham-2024-01-01", [f"ISIC_{i:07d}" for i in range(0, 12)])
    # Overlaps the first drop on ISIC_0000010 and ISIC_0000011: the later copies are duplicates.
    write_ham_drop(raw, "ham-2024-02-01", [f"ISIC_{i:07d}" for i in range(10, 20)])
    return raw


def test_duplicate_ids_across_drops_keep_the_first_drops_copy(two_drops, tmp_path):
    out = tmp_path / "out"
    ingest.run_preprocess(str(two_drops), str(out), ingest.local_engine, drops=["ham-2024-01-01"])
    ingest.run_preprocess(str(two_drops), str(out), ingest.local_engine)
    manifest = latest_manifest(LocalStorage(out))
    duplicates = [e for e in quarantine_lines(out, "ham-2024-02-01") if e["reason"] == "duplicate-image-id"]
    assert sorted(e["item"] for e in duplicates) == ["ISIC_0000010", "ISIC_0000011"]
    assert all("ham-2024-01-01" in e["detail"] for e in duplicates)
    records = all_records(out, manifest)
    assert len(records) == 20 and len({r["image_id"] for r in records}) == 20
    assert {r["source_drop"] for r in records if r["image_id"] == "ISIC_0000010"} == {"ham-2024-01-01"}
    assert (
        manifest["accounting"]["ham-2024-02-01"]["inputs"] == 10
        and manifest["accounting"]["ham-2024-02-01"]["written"] == 8
    )


def test_a_new_root_takes_the_requested_colour_constancy_and_keeps_it(two_drops, tmp_path):
    """The method is chosen when a root starts; later drops follow it; another one is refused."""
    out = tmp_path / "out"
    ingest.run_preprocess(
        str(two_drops),
        str(out),
        ingest.local_engine,
        drops=["ham-2024-01-01"],
        colour_constancy="shades_of_gray",
    )
    ingest.run_preprocess(str(two_drops), str(out), ingest.local_engine)  # no request: the root's own
    manifest = latest_manifest(LocalStorage(out))
    assert manifest["preprocessing"]["colour_constancy"] == "shades_of_gray"
    assert manifest["drops"] == ["ham-2024-01-01", "ham-2024-02-01"]
    with pytest.raises(ValueError, match="started with colour constancy 'shades_of_gray'"):
        ingest.run_preprocess(str(two_drops), str(out), ingest.local_engine, colour_constancy="none")
    default = tmp_path / "default"
    ingest.run_preprocess(str(two_drops), str(default), ingest.local_engine, drops=["ham-2024-01-01"])
    assert latest_manifest(LocalStorage(default))["preprocessing"]["colour_constancy"] == "none"


def test_duplicates_within_one_run_are_caught_the_same_way(two_drops, tmp_path):
    plans = ingest.plan_drops(str(two_drops), str(tmp_path), None, ["ham-2024-01-01", "ham-2024-02-01"])
    second = plans[1]
    assert sorted(e["item"] for e in second.quarantined if e["reason"] == "duplicate-image-id") == [
        "ISIC_0000010",
        "ISIC_0000011",
    ]


def test_drops_one_after_another_equal_both_at_once(two_drops, tmp_path):
    sequential, together = tmp_path / "seq", tmp_path / "all"
    ingest.run_preprocess(
        str(two_drops), str(sequential), ingest.local_engine, drops=["ham-2024-01-01"], shard_size=4
    )
    ingest.run_preprocess(str(two_drops), str(sequential), ingest.local_engine, shard_size=4)
    ingest.run_preprocess(str(two_drops), str(together), ingest.local_engine, shard_size=4)
    m_seq, m_all = latest_manifest(LocalStorage(sequential)), latest_manifest(LocalStorage(together))
    assert (m_seq["version"], m_all["version"]) == (2, 1)
    assert content_without_version(m_seq) == content_without_version(m_all)
    assert shard_bytes(sequential, m_seq) == shard_bytes(together, m_all)


# --- accounting breakage ---------------------------------------------------------------------------


@pytest.fixture
def planned(bad_raw, tmp_path) -> tuple[Path, ingest.DropPlan, list[ingest.ChunkResult]]:
    raw, _ = bad_raw
    plan = ingest.plan_drop(str(raw), str(tmp_path), BAD, {}, shard_size=8)
    return tmp_path, plan, [ingest.process_chunk(t) for t in plan.tasks]


def _breaks(out: Path, plan, results, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        ingest.finish_drops(LocalStorage(out), None, [plan], results, logical_date=None)
    assert not (out / ingest.quarantine_key(BAD)).exists()  # nothing written before the check
    assert not (out / ingest.index_key(BAD)).exists()


def test_a_lost_image_breaks_the_accounting(planned):
    out, plan, results = planned
    at = next(i for i, r in enumerate(results) if r.index)
    results[at] = dataclasses.replace(results[at], index=results[at].index[1:])
    _breaks(out, plan, results, "accounting broken")


def test_a_lost_quarantine_entry_breaks_the_accounting(planned):
    out, plan, results = planned
    lossy = dataclasses.replace(plan, quarantined=plan.quarantined[1:])
    _breaks(out, lossy, results, "accounting broken")


def test_a_shard_count_disagreeing_with_the_index_breaks_the_accounting(planned):
    out, plan, results = planned
    at = next(i for i, r in enumerate(results) if r.shards)
    shards = [dict(results[at].shards[0], count=results[at].shards[0]["count"] + 1), *results[at].shards[1:]]
    results[at] = dataclasses.replace(results[at], shards=shards)
    _breaks(out, plan, results, "shard counts")


def test_a_missing_or_repeated_chunk_result_is_refused(planned):
    out, plan, results = planned
    _breaks(out, plan, results[1:], "do not match")
    _breaks(out, plan, [*results, results[0]], "do not match")


def test_an_intact_run_passes(planned):
    out, plan, results = planned
    manifest = ingest.finish_drops(LocalStorage(out), None, [plan], results, logical_date="2024-01-01")
    assert manifest["accounting"][BAD]["inputs"] == plan.n_inputs
    assert (out / ingest.quarantine_key(BAD)).exists()


# --- executor edge cases -------------------------------------------------------------------------


def test_an_image_deleted_after_the_scan_is_quarantined_as_missing(two_drops, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(two_drops / "ham-2024-01-01", raw / "ham-2024-01-01")
    plan = ingest.plan_drop(str(raw), str(tmp_path / "out"), "ham-2024-01-01", {})
    (raw / "ham-2024-01-01" / "images" / "ISIC_0000003.jpg").unlink()
    (raw / "ham-2024-01-01" / "images" / "ISIC_0000004_segmentation.png").unlink()
    result = ingest.process_chunk(plan.tasks[0])
    assert [(q["item"], q["reason"]) for q in result.quarantined] == [("ISIC_0000003", "missing-image")]
    assert result.conversions == {"mask-unusable: missing": 1}
    assert sum(s["count"] for s in result.shards) == 11


def test_an_unforeseen_decoder_error_quarantines_only_that_image(two_drops, tmp_path, monkeypatch):
    real = preprocess_chunk.preprocess_image_bytes
    poisoned = (two_drops / "ham-2024-01-01" / "images" / "ISIC_0000005.jpg").read_bytes()

    def flaky(data, size, **options):
        if data == poisoned:
            raise ZeroDivisionError("simulated decoder bug")
        return real(data, size, **options)

    monkeypatch.setattr(preprocess_chunk, "preprocess_image_bytes", flaky)
    plan = ingest.plan_drop(str(two_drops), str(tmp_path), "ham-2024-01-01", {})
    result = ingest.process_chunk(plan.tasks[0])
    assert [(q["item"], q["reason"]) for q in result.quarantined] == [("ISIC_0000005", "undecodable")]
    assert "ZeroDivisionError" in result.quarantined[0]["detail"]


def test_a_storage_error_fails_the_task_instead_of_quarantining(two_drops, tmp_path, monkeypatch):
    plan = ingest.plan_drop(str(two_drops), str(tmp_path), "ham-2024-01-01", {})

    def denied(self, key):
        raise PermissionError(f"denied: {key}")

    monkeypatch.setattr(job_common, "_STORAGES", {})
    monkeypatch.setattr(LocalStorage, "read_bytes", denied)
    with pytest.raises(PermissionError):
        ingest.process_chunk(plan.tasks[0])


# --- augmentation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def augmented(two_drops, tmp_path_factory) -> tuple[Path, dict, dict, dict[str, tuple[int, str]]]:
    """(processed root, manifest before augment, after, original shards' (mtime, sha256) before)."""
    out = tmp_path_factory.mktemp("aug")
    ingest.run_preprocess(str(two_drops), str(out), ingest.local_engine, shard_size=4)
    before = latest_manifest(LocalStorage(out))
    originals = snapshot(out / "processed" / "shards")
    summary = ingest.run_augment(str(out), ingest.local_engine)
    assert summary["manifest_key"] == "processed/manifest-000002.json"
    return out, before, latest_manifest(LocalStorage(out)), originals


def test_augment_tasks_cover_only_training_shards_with_melanoma(augmented):
    out, before, _, _ = augmented
    tasks = ingest.augment_tasks(str(out), before)
    assert tasks and all(t.source["split"] == "train" and t.source["labels"]["1"] > 0 for t in tasks)
    eligible = [s for s in before["shards"] if s["split"] == "train" and s["labels"]["1"] > 0]
    assert [t.source["key"] for t in tasks] == [s["key"] for s in eligible]


def test_augment_writes_two_copies_per_training_melanoma_and_leaves_val_test_alone(augmented):
    out, before, after, originals = augmented
    n_train_mel = before["counts"]["train"]["1"]
    assert n_train_mel > 0
    assert after["augmented_counts"]["train"] == {"0": 0, "1": 2 * n_train_mel}
    assert after["augmented_counts"]["val"] == after["augmented_counts"]["test"] == {"0": 0, "1": 0}
    assert after["counts"] == before["counts"]
    assert {
        k: v for k, v in snapshot(out / "processed" / "shards").items() if k in originals
    } == originals  # untouched
    augmented_records = all_records(out, after, kind="augmented")
    assert len(augmented_records) == 2 * n_train_mel
    assert all(r["split"] == "train" and r["label"] == 1 and r["augment_of"] for r in augmented_records)
    train_mel = {r["image_id"] for r in all_records(out, before) if r["split"] == "train" and r["label"] == 1}
    assert {r["augment_of"] for r in augmented_records} == train_mel
    assert after["augmentation"]["copies_per_melanoma"] == 2


def test_augment_is_seeded_and_a_rerun_does_nothing(augmented, tmp_path):
    out, before, after, _ = augmented
    entry = next(s for s in after["shards"] if s["kind"] == "augmented")
    source = next(s for s in before["shards"] if s["key"] == entry["augment_of"])
    again = ingest.augment_shard(ingest.AugmentTask(str(out), source))
    assert again == entry  # same bytes (sha256), same key: rewriting changed nothing
    files = snapshot(out)
    assert ingest.augment_tasks(str(out), after) == []
    assert ingest.run_augment(str(out), NoEngine())["manifest_key"] is None
    assert snapshot(out) == files


def test_augment_refuses_a_validation_shard(augmented):
    out, before, _, _ = augmented
    val = next(s for s in before["shards"] if s["split"] != "train")
    with pytest.raises(ValueError, match="only original training shards"):
        ingest.augment_shard(ingest.AugmentTask(str(out), val))
