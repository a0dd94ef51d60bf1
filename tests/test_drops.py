"""Drop scanning: layouts, quarantine reasons at scan time, and the accounting rule."""

from __future__ import annotations

import csv
import datetime
import json
from pathlib import Path

import pytest

from melanoma.drop_scan import DropError, DropScan, QuarantineEntry, detect_layout, scan_drop
from melanoma.drops import drop_date, list_drops
from melanoma.storage import LocalStorage

from badcorpus import SCAN_REASONS, build_bad_drop, jpeg_bytes, require_shared_data, synthetic_lesion

DROP = "drop-2024-05-01"


class CountingStorage(LocalStorage):
    """LocalStorage that records every key read and every listing."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []
        self.listings = 0

    def read_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().read_bytes(key)

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        self.listings += 1
        return super().list_objects(prefix)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("raw")
    return root, build_bad_drop(root, DROP, None)


@pytest.fixture(scope="module")
def scan(corpus) -> DropScan:
    root, _ = corpus
    return scan_drop(LocalStorage(root), DROP)


def entries_for(scan: DropScan, image_id: str) -> list[QuarantineEntry]:
    """Quarantine entries about ``image_id`` (by id, or by a key whose file stem is the id)."""
    return [
        e for e in scan.quarantined if e.item == image_id or Path(e.item).stem == image_id and "/" in e.item
    ]


def counted_inputs(drop: Path) -> int:
    """The accounting rule recomputed from the files: rows + image files - ids having both."""
    with open(drop / "HAM10000_metadata.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    row_ids = {row[1] for row in rows}
    files = [
        p
        for p in drop.rglob("*")
        if p.is_file() and p.suffix.lower() in (".jpg", ".png") and not p.name.endswith("_segmentation.png")
    ]
    paired = {p.stem for p in files} & row_ids
    return len(rows) + len(files) - len(paired)


def test_every_scan_time_reason_of_the_bad_corpus(corpus, scan):
    _, expected = corpus
    by_id = {item.image_id: item for item in scan.inputs}
    for image_id, outcome in expected.items():
        reasons = {e.reason for e in entries_for(scan, image_id)}
        if outcome in SCAN_REASONS:
            assert outcome in reasons, (image_id, outcome, reasons)
        else:
            # Everything else must reach the decode stage untouched.
            assert image_id in by_id and not reasons, (image_id, reasons)
    assert SCAN_REASONS <= set(expected.values())  # the corpus exercises every scan reason


def test_duplicates_keep_the_first_occurrence_unless_rows_conflict(scan):
    inputs = {item.image_id: item for item in scan.inputs}
    assert "dup_row" in inputs and "dup_file" in inputs
    assert inputs["dup_file"].image_key.endswith("HAM10000_images_part_1/dup_file.jpg")
    assert [e.item for e in entries_for(scan, "dup_file")] == [f"{DROP}/HAM10000_images_part_2/dup_file.jpg"]
    assert "dup_conflict" not in inputs
    assert len(entries_for(scan, "dup_conflict")) == 2  # one input per row, both quarantined


def test_accounting_invariant_holds_and_matches_an_independent_count(corpus, scan):
    root, expected = corpus
    assert scan.n_inputs == len(scan.inputs) + len(scan.quarantined)
    assert scan.n_inputs == counted_inputs(root / DROP)
    # One entry per input, and no input both accepted and quarantined.
    accepted = {item.image_id for item in scan.inputs}
    assert len(accepted) == len(scan.inputs)
    assert not accepted & {
        e.item
        for e in scan.quarantined
        if e.reason in ("missing-image", "image-id-path", "bad-metadata", "unknown-dx")
    }


def test_inputs_are_sorted_and_complete(scan):
    ids = [item.image_id for item in scan.inputs]
    assert ids == sorted(ids)
    good = {item.image_id: item for item in scan.inputs}["good_1"]
    assert good.dx == "mel" and good.label == 1 and good.age == 50.0 and good.sex == "female"
    assert good.localization == "back" and good.lesion_id == "HAM_good_1" and good.layout == "ham10000"
    assert good.source_drop == DROP
    assert good.image_key == f"{DROP}/HAM10000_images_part_2/good_1.jpg"
    assert good.mask_key == f"{DROP}/masks/good_1_segmentation.png"
    assert {item.image_id: item for item in scan.inputs}["conv_cmyk"].mask_key is None


def test_scan_reads_only_metadata_and_lists_once(corpus):
    root, _ = corpus
    storage = CountingStorage(root)
    scan_drop(storage, DROP)
    assert storage.reads == [f"{DROP}/HAM10000_metadata.csv"]
    assert storage.listings == 1


def test_quarantine_entry_to_json_round_trips(scan):
    entry = scan.quarantined[0]
    assert QuarantineEntry(**json.loads(json.dumps(entry.to_json()))) == entry
    assert set(entry.to_json()) == {"drop_id", "item", "reason", "detail"}


def test_scan_on_s3_matches_local(corpus, scan):
    moto = pytest.importorskip("moto")
    import boto3

    from melanoma.storage import S3Storage

    root, _ = corpus
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="raw")
        for path in (root / DROP).rglob("*"):
            if path.is_file():
                client.put_object(
                    Bucket="raw", Key=f"landing/{path.relative_to(root).as_posix()}", Body=path.read_bytes()
                )
        s3 = S3Storage("raw", "landing")
        s3._client = client
        assert list_drops(s3) == [DROP]
        assert scan_drop(s3, DROP) == scan


# --- ISIC layout -----------------------------------------------------------------------


def write_isic(drop: Path, image_id: str, diagnosis: str | None, *, image: bool = True, **clinical) -> None:
    drop.mkdir(parents=True, exist_ok=True)
    meta = {
        "clinical": {"diagnosis": diagnosis, "age_approx": 40, "sex": "male", **clinical},
        "acquisition": {},
    }
    (drop / f"{image_id}.json").write_text(json.dumps({"name": image_id, "meta": meta}))
    if image:
        (drop / f"{image_id}.jpg").write_bytes(jpeg_bytes(synthetic_lesion(64, 48, seed=1)))


def test_isic_layout_maps_diagnoses_and_quarantines_bad_json(tmp_path):
    drop = tmp_path / "isic-20240102"
    write_isic(drop, "ISIC_0000001", "melanoma")
    write_isic(drop, "ISIC_0000002", "nevus", lesion_id="IL_42")
    write_isic(drop, "ISIC_0000003", "solar lentigo")
    write_isic(drop, "ISIC_0000004", "atypical melanocytic proliferation")
    write_isic(drop, "ISIC_0000005", None)
    write_isic(drop, "ISIC_0000006", "nevus", image=False)
    (drop / "ISIC_0000007.json").write_text("{not json")
    (drop / "ISIC_0000007.jpg").write_bytes(b"x")
    (drop / "ISIC_0000008.json").write_text(json.dumps({"name": "ISIC_0000999", "meta": {}}))
    (drop / "sub").mkdir()
    (drop / "sub" / "ISIC_0000009.jpg").write_bytes(b"x")
    (drop / "ATTRIBUTION.txt").write_text("CC0")
    scan = scan_drop(LocalStorage(tmp_path), drop.name)
    assert scan.layout == "isic"
    inputs = {item.image_id: item for item in scan.inputs}
    assert set(inputs) == {"ISIC_0000001", "ISIC_0000002", "ISIC_0000003"}
    assert (inputs["ISIC_0000001"].dx, inputs["ISIC_0000001"].label) == ("mel", 1)
    assert inputs["ISIC_0000001"].lesion_id == "ISIC_0000001"  # one lesion per image by default
    assert inputs["ISIC_0000002"].lesion_id == "IL_42"
    assert inputs["ISIC_0000003"].dx == "bkl" and inputs["ISIC_0000003"].label == 0
    reasons = {e.item: e.reason for e in scan.quarantined}
    assert reasons == {
        "ISIC_0000004": "unknown-dx",
        "ISIC_0000005": "unknown-dx",
        "ISIC_0000006": "missing-image",
        "ISIC_0000007": "bad-metadata",  # its image belongs to that one input
        "ISIC_0000008": "bad-metadata",
        "isic-20240102/sub/ISIC_0000009.jpg": "missing-metadata",
    }
    assert scan.n_inputs == 9 == len(scan.inputs) + len(scan.quarantined)


def test_shared_isic_sample_scans_clean():
    sample = require_shared_data("isic_uda1_sample")
    storage = LocalStorage(sample.parent)
    scan = scan_drop(storage, sample.name)
    assert scan.layout == "isic" and not scan.quarantined
    assert scan.n_inputs == len(scan.inputs) == len(list(sample.glob("ISIC_*.json")))
    for item in scan.inputs:
        clinical = json.loads((sample / f"{item.image_id}.json").read_text())["meta"]["clinical"]
        assert item.label == (clinical["diagnosis"] == "melanoma")
        assert item.age == clinical.get("age_approx") and item.sex == clinical.get("sex")
        assert storage.exists(item.image_key)


# --- drops, dates, layouts -------------------------------------------------------------


def test_list_drops_returns_sorted_first_level_folders(tmp_path):
    for name in ("b-2024-02-01/x.csv", "a/sub/y.jpg", "_staging/z.jpg", "loose.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert list_drops(LocalStorage(tmp_path)) == ["a", "b-2024-02-01"]


@pytest.mark.parametrize(
    "drop_id, expected",
    [
        ("ham-2024-03-15", datetime.date(2024, 3, 15)),
        ("20240315_isic", datetime.date(2024, 3, 15)),
        ("batch7-20231231-v2", datetime.date(2023, 12, 31)),
        ("x20241399y", None),  # digits, not a date
        ("2024-13-01-then-20240102", datetime.date(2024, 1, 2)),
        ("ham10000", None),
    ],
)
def test_drop_date(drop_id, expected):
    assert drop_date(drop_id) == expected


def test_detect_layout_and_its_errors(tmp_path, corpus):
    root, _ = corpus
    assert detect_layout(LocalStorage(root), DROP) == "ham10000"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "readme.txt").write_text("nothing")
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "metadata.csv").write_text("image_id,dx\nISIC_1,nv\n")
    (tmp_path / "both" / "ISIC_1.json").write_text("{}")
    storage = LocalStorage(tmp_path)
    with pytest.raises(DropError, match="unknown drop layout"):
        detect_layout(storage, "odd")
    with pytest.raises(DropError, match="ambiguous"):
        scan_drop(storage, "both")
    with pytest.raises(DropError, match="empty or does not exist"):
        scan_drop(storage, "missing")
    with pytest.raises(DropError, match="invalid drop id"):
        scan_drop(storage, "../etc")
    with pytest.raises(DropError, match="unknown layout"):
        scan_drop(storage, "odd", layout="csv")


def test_shared_ham10000_scans_clean_with_masks():
    ham = require_shared_data("ham10000")
    scan = scan_drop(LocalStorage(ham.parent), ham.name)
    assert scan.layout == "ham10000" and not scan.quarantined and len(scan.inputs) == 10015
    assert all(item.mask_key for item in scan.inputs)
