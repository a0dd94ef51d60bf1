"""Issue #20, one test (or more) per finding: each failed on the code before the fix.

Real components throughout: files on disk, a moto S3 server over HTTP on 127.0.0.1, a real
out-of-memory in a subprocess with an address-space limit, a TCP endpoint that accepts and
never answers. The chaos suite (tests/test_chaos.py, ``make test-chaos``) injects the same
faults into whole runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from melanoma import drops as drops_mod
from melanoma import ingest, preprocess_chunk
from melanoma.drop_metadata import read_all
from melanoma.manifest import latest_manifest
from melanoma.storage import LocalStorage, ObjectRefused, S3Storage, StorageUnavailable, open_storage

from test_ingest import quarantine_lines, write_ham_drop

ROOT = Path(__file__).resolve().parents[1]
DROP = "ham-2026-02-01"


def ids(first: int, n: int) -> list[str]:
    return [f"ISIC_{i:07d}" for i in range(first, first + n)]


def check_accounting(out: Path, drop_id: str) -> dict:
    manifest = latest_manifest(LocalStorage(out))
    entry = manifest["accounting"][drop_id]
    assert entry["inputs"] == entry["written"] + entry["quarantined"], entry
    return entry


# --- 1. late files ------------------------------------------------------------------------------


def test_files_arriving_after_ingestion_are_reported_on_every_run_not_dropped_silently(tmp_path, caplog):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_ham_drop(raw, DROP, ids(1, 3))
    first = ingest.run_preprocess(str(raw), str(out), ingest.local_engine)
    assert first["inputs"] == 3 and first["late_files"] == {}
    write_ham_drop(raw, DROP, ids(1, 6))  # three more images (and masks); the CSV gains their rows

    with caplog.at_level(logging.WARNING, logger="melanoma.drops"):
        rerun = ingest.run_preprocess(str(raw), str(out), ingest.local_engine)
    assert rerun["inputs"] == 0 and rerun["manifest_key"] is None  # the drop stays as ingested...
    late = {f"{DROP}/images/{i}{suffix}" for i in ids(4, 3) for suffix in (".jpg", "_segmentation.png")}
    assert rerun["late_files"] == {
        DROP: {"added": 6, "changed": 1, "removed": 0}
    }  # ...and says loudly what it lacks
    report = json.loads((out / drops_mod.late_report_key(DROP)).read_text())
    assert set(report["added"]) == late and report["changed"] == [f"{DROP}/HAM10000_metadata.csv"]
    assert any(
        r.levelno == logging.WARNING and DROP in r.getMessage() and "NOT in the data set" in r.getMessage()
        for r in caplog.records
    )
    check_accounting(out, DROP)


def test_the_plan_task_reports_late_files_too(tmp_path, monkeypatch):
    """``plan`` runs on every run, also those that short-circuit before Spark."""
    from pipeline.airflow_ops import resolve_run

    raw, out = tmp_path / "raw", tmp_path / "data"
    write_ham_drop(raw, DROP, ids(1, 3))
    ingest.run_preprocess(str(raw), str(out), ingest.local_engine)
    write_ham_drop(raw, DROP, ids(1, 4))
    monkeypatch.setenv("MELANOMA_RAW_ROOT", str(raw))
    monkeypatch.setenv("MELANOMA_DATA_ROOT", str(out))
    run = resolve_run(
        {"drops": [DROP]},
        run_type="manual",
        run_id="manual__x",
        logical_date=None,
        interval_start=None,
        interval_end=None,
        run_after=None,
    )
    assert run["new_drops"] == [] and run["late_files"] == {DROP: {"added": 2, "changed": 1, "removed": 0}}


# --- 2. transient failures never quarantine -----------------------------------------------------

_OOM_SCRIPT = textwrap.dedent(
    """
    import json, re, resource, sys
    import cv2, numpy as np
    from melanoma.preprocess_chunk import decode_input

    rgb = np.zeros((5250, 7000, 3), np.uint8)
    rgb[::7] = 200  # a 7000x5250 PNG: 110 MB decoded, ~120 KB compressed
    data = cv2.imencode(".png", rgb)[1].tobytes()
    del rgb
    vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 40_000_000, resource.RLIM_INFINITY))  # no room for 110 MB
    try:
        image, notes, rejection = decode_input({"image_id": "big"}, data)
        print(json.dumps({"outcome": "quarantined" if rejection else "decoded", "rejection": rejection}))
    except MemoryError as error:
        print(json.dumps({"outcome": "raised", "error": type(error).__name__, "message": str(error)}))
    """
)


def test_running_out_of_memory_while_decoding_fails_the_task_instead_of_quarantining():
    """A real allocation failure inside OpenCV (address space capped in a subprocess)."""
    done = subprocess.run(
        [sys.executable, "-c", _OOM_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "raised" and result["error"] == "MemoryError", result


def test_io_errors_while_decoding_propagate(two_files_drop, monkeypatch):
    raw, out = two_files_drop
    plan = ingest.plan_drop(str(raw), str(out), DROP, {})

    def broken(data, size, **options):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(preprocess_chunk, "preprocess_image_bytes", broken)
    with pytest.raises(OSError):
        ingest.process_chunk(plan.tasks[0])


@pytest.fixture
def two_files_drop(tmp_path) -> tuple[Path, Path]:
    raw = tmp_path / "raw"
    write_ham_drop(raw, DROP, ids(1, 2))
    return raw, tmp_path / "out"


def test_quarantine_details_do_not_repeat_their_reason(two_files_drop):
    raw, out = two_files_drop
    (raw / DROP / "images" / "ISIC_0000001.jpg").write_bytes(b"")
    ingest.run_preprocess(str(raw), str(out), ingest.local_engine)
    [entry] = quarantine_lines(out, DROP)
    assert entry["reason"] == "empty-file" and not entry["detail"].startswith("empty-file"), entry


# --- 3. odd keys, odd drop ids --------------------------------------------------------------------


def test_odd_object_keys_on_s3_are_quarantined_and_the_run_completes(s3_bucket, s3_env, tmp_path):
    import boto3

    local = tmp_path / "raw"
    write_ham_drop(local, DROP, ids(1, 4))
    client = boto3.client("s3", endpoint_url=s3_env["MELANOMA_S3_ENDPOINT_URL"])
    for path in sorted((local / DROP).rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=s3_bucket, Key=f"raw/{path.relative_to(local).as_posix()}", Body=path.read_bytes()
            )
    jpeg = (local / DROP / "images" / "ISIC_0000001.jpg").read_bytes()
    odd = [
        f"raw/{DROP}/images//ISIC_0000009.jpg",
        f"raw/{DROP}/images/./ISIC_0000008.jpg",
        f"raw/{DROP}/x/../ISIC_0000007.jpg",
        f"raw/{DROP}/sub//HAM10000_metadata.csv",
    ]
    for key in odd:
        client.put_object(Bucket=s3_bucket, Key=key, Body=jpeg)

    summary = ingest.run_preprocess(f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/data", ingest.local_engine)
    assert (summary["inputs"], summary["written"], summary["quarantined"]) == (8, 4, 4)
    out = open_storage(f"s3://{s3_bucket}/data")
    entries = [json.loads(line) for line in out.read_bytes(ingest.quarantine_key(DROP)).decode().splitlines()]
    assert sorted((e["item"], e["reason"]) for e in entries) == sorted(
        (k.removeprefix("raw/"), "bad-key") for k in odd
    )


def test_a_local_folder_with_a_backslash_in_its_name_is_quarantined(two_files_drop):
    raw, out = two_files_drop
    odd = raw / DROP / "sub\\dir"
    odd.mkdir()
    (odd / "ISIC_0000005.jpg").write_bytes((raw / DROP / "images" / "ISIC_0000001.jpg").read_bytes())
    summary = ingest.run_preprocess(str(raw), str(out), ingest.local_engine)
    assert (summary["inputs"], summary["written"], summary["quarantined"]) == (3, 2, 1)
    assert [(e["item"], e["reason"]) for e in quarantine_lines(out, DROP)] == [
        (f"{DROP}/sub\\dir/ISIC_0000005.jpg", "bad-key")
    ]


def test_a_folder_whose_name_is_not_a_drop_id_is_not_listed(tmp_path, caplog):
    for name in ("ham-2026-01-01", "a,b-2026-01-02", "with space", "_staging"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.csv").write_text("x")
    with caplog.at_level(logging.WARNING, logger="melanoma.drops"):
        assert drops_mod.list_drops(LocalStorage(tmp_path)) == ["ham-2026-01-01"]
    assert "a,b-2026-01-02" in caplog.text and "with space" in caplog.text and "_staging" not in caplog.text


def test_drops_reach_spark_as_a_json_list():
    sys.path.insert(0, str(ROOT / "spark_jobs"))
    try:
        import preprocess as job
    finally:
        sys.path.remove(str(ROOT / "spark_jobs"))
    assert job.parse_drops('["a,b", "c"]') == ["a,b", "c"]  # never split inside an id
    assert job.parse_drops("a,b") == ["a", "b"]  # typed by hand
    dag_source = (ROOT / "pipeline" / "dag_parts.py").read_text()  # the preprocess task every DAG file wires
    assert "['new_drops'] | tojson" in dag_source and "join(',')" not in dag_source


# --- 4. a frozen object store -------------------------------------------------------------------


class FrozenEndpoint:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers (a hung store)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def frozen(monkeypatch):
    endpoint = FrozenEndpoint()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MELANOMA_S3_READ_TIMEOUT_S": "1",
        "MELANOMA_S3_CONNECT_TIMEOUT_S": "1",
        "MELANOMA_S3_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    endpoint.close()


def test_s3_client_has_bounded_configurable_timeouts_and_attempts(frozen):
    config = S3Storage("b", endpoint_url=frozen.url).client.meta.config
    assert (config.connect_timeout, config.read_timeout, config.retries["total_max_attempts"]) == (1, 1, 2)


def test_a_frozen_store_fails_the_read_with_a_clear_message(frozen):
    storage = S3Storage("bucket", "raw", endpoint_url=frozen.url)
    with pytest.raises(StorageUnavailable, match="did not answer GET 'd/x.jpg'.*task's retry resumes"):
        storage.read_bytes("d/x.jpg")
    assert len(frozen.connections) == 2  # MELANOMA_S3_MAX_ATTEMPTS, not botocore's default 5


def test_read_ahead_cancels_queued_reads_after_the_first_failure(frozen):
    """Before: every queued read of the chunk ran into the same dead store (256 images x 2 x attempts)."""
    storage = S3Storage("bucket", "raw", endpoint_url=frozen.url)
    items = [{"image_key": f"d/{i}.jpg", "mask_key": f"d/{i}_segmentation.png"} for i in range(200)]
    with pytest.raises(StorageUnavailable):
        for _ in preprocess_chunk.read_ahead(storage, items):
            pass
    # At most the reads in flight when the failure surfaced, and those the threads took meanwhile:
    # two waves of READ_AHEAD_THREADS reads, 2 attempts each; never the 400 reads queued.
    assert len(frozen.connections) <= 2 * ingest.READ_AHEAD_THREADS * 2, len(frozen.connections)


def test_the_scan_stops_reading_metadata_after_the_first_failure(frozen):
    """The ISIC layout reads one JSON per image: 300 queued GETs must not each wait out the timeouts."""
    storage = S3Storage("bucket", "raw", endpoint_url=frozen.url)
    with pytest.raises(StorageUnavailable):
        read_all(storage, [f"d/ISIC_{i:07d}.json" for i in range(300)])
    assert len(frozen.connections) <= 2 * 16 * 2, len(
        frozen.connections
    )  # two waves of 16 threads, 2 attempts


# --- 5. symlinks and leaked bytes ---------------------------------------------------------------


def test_a_symlink_leaving_a_local_root_is_refused_and_quarantined_without_leaking(two_files_drop, tmp_path):
    raw, out = two_files_drop
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:SECRET-CONTENT:/root:/bin/bash\n")
    (raw / DROP / "images" / "ISIC_0000002.jpg").unlink()
    (raw / DROP / "images" / "ISIC_0000002.jpg").symlink_to(secret)
    with pytest.raises(ObjectRefused, match="symlink leaving the storage root"):
        LocalStorage(raw).read_bytes(f"{DROP}/images/ISIC_0000002.jpg")

    summary = ingest.run_preprocess(str(raw), str(out), ingest.local_engine)
    assert (summary["written"], summary["quarantined"]) == (1, 1)
    [entry] = quarantine_lines(out, DROP)
    assert (entry["item"], entry["reason"]) == ("ISIC_0000002", "refused-object")
    everything = "".join(
        p.read_text(errors="replace")
        for p in out.rglob("*")
        if p.is_file() and p.suffix in (".json", ".jsonl")
    )
    assert "SECRET" not in everything and "root:x" not in everything


def test_a_local_root_never_writes_through_a_symlinked_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "runs").symlink_to(outside)
    with pytest.raises(ObjectRefused):
        LocalStorage(root).write_bytes("runs/x.json", b"{}")
    assert list(outside.iterdir()) == []


def test_quarantine_details_show_at_most_a_four_byte_signature():
    from melanoma.image_header import RejectedImage
    from melanoma.imaging import preprocess_image_bytes

    with pytest.raises(RejectedImage) as caught:
        preprocess_image_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    assert caught.value.reason == "not-an-image" and "0x726f6f74" in caught.value.message
    assert "root:" not in str(caught.value) and ":0:0" not in str(caught.value)


def test_a_weights_file_error_does_not_echo_the_files_bytes(tmp_path):
    from training.weights import TorchFileFormatError, read_torch_state_dict

    path = tmp_path / "weights.pth"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(TorchFileFormatError) as caught:
        read_torch_state_dict(path)
    assert "'r'" not in str(caught.value) and "root" not in str(caught.value), str(caught.value)


# --- 7. CSV formula injection -------------------------------------------------------------------

INJECTIONS = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]


def cells(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


@pytest.mark.parametrize("payload", INJECTIONS)
def test_predictions_csv_neutralises_formulas(payload):
    from training.predict import rows_to_csv

    row = {"image_id": "ISIC_1", "probability": 0.25, "localization": payload, "sex": payload, "age": -1.5}
    [back] = cells(rows_to_csv([row]))
    assert back["localization"] == back["sex"] == "'" + payload
    assert back["probability"] == "0.25" and back["age"] == "-1.5"  # numbers stay numbers


def test_lesion_focus_csv_neutralises_formulas():
    from training.lesion_focus import FOCUS_COLUMNS, focus_csv

    row = dict.fromkeys(FOCUS_COLUMNS, '=HYPERLINK("http://evil.example")')
    back = cells(focus_csv([row]))[0]
    assert all(value.startswith("'=") for value in back.values()), back


def test_the_product_writes_csv_through_one_helper():
    """One definition per fact: any new CSV writer must go through melanoma.csvout."""
    writers = []
    for folder in ("melanoma", "pipeline", "training", "spark_jobs", "dags", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if ("csv.writer(" in text or "csv.DictWriter(" in text) and path.name != "csvout.py":
                writers.append(path.relative_to(ROOT).as_posix())
    # synthetic.py writes a demo *input* drop (its own ids and codes), not a product output.
    assert writers == ["melanoma/synthetic.py"], writers
