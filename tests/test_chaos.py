"""Fault injection (``make test-chaos``): real faults in real components, then recovery.

Each scenario injects one fault into a real run, lets it fail the way the task would, removes
the fault, reruns (what Airflow's retry does) and then checks the whole processed store:

- every input accounted for: ``inputs == written + quarantined`` per drop, the index and the
  quarantine file agreeing with the manifest;
- no corrupt object: every shard the manifest lists is read back and checked (sha256, count);
- no orphan object: every shard object under ``processed/shards`` is listed by the manifest,
  and no temporary file is left on a local root;
- the run completes after recovery.

Faults, each at a deterministic point (a request count, a worker seen running, the first checkpoint):

- object store down: a TCP proxy in front of a moto S3 server on 127.0.0.1 closes its
  connections and stops listening (connection refused) in the middle of a ``spark-submit``
  preprocess job;
- object store frozen: the proxy keeps accepting but never answers, mid-run;
- training killed: ``python -m training train`` gets SIGKILL after its first checkpoint;
- Spark worker killed: a Python worker forked by the Spark worker daemon gets SIGKILL while it
  runs a task (seen running in /proc);
- disk full: the local processed root is a 2 MB tmpfs (real ENOSPC), grown after the failure.

Figures (fault, detected by, seconds from injection to the failing exit) are appended to
``output/chaos/figures.jsonl`` for BENCHMARKS.md. No assert depends on timing: the only time
limits are generous hang guards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from melanoma import ingest
from melanoma.manifest import latest_manifest, read_verified_shard
from melanoma.spark_settings import submit_conf
from melanoma.storage import LocalStorage, Storage, open_storage

from test_ingest import write_ham_drop

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
DROP = "ham-2026-03-01"
FIGURES = ROOT / "output" / "chaos" / "figures.jsonl"
HANG_GUARD_S = 600  # a run that neither finishes nor fails in 10 min is a hang, not slowness
# A store that does not answer must fail a call within seconds here (production: ~80 s).
FAST_FAIL = {
    "MELANOMA_S3_CONNECT_TIMEOUT_S": "1",
    "MELANOMA_S3_READ_TIMEOUT_S": "2",
    "MELANOMA_S3_MAX_ATTEMPTS": "2",
}


def record(**figures) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with open(FIGURES, "a") as out:
        out.write(
            json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}, sort_keys=True)
            + "\n"
        )


# --- the checks every scenario ends with ----------------------------------------------------------


def assert_consistent(out: Storage, expected_inputs: dict[str, int], local_root: Path | None = None) -> dict:
    """Every input accounted for, no corrupt and no orphan object; returns the manifest."""
    manifest = latest_manifest(out)
    assert manifest is not None, "no manifest: the run did not complete"
    for drop_id, n_inputs in expected_inputs.items():
        entry = manifest["accounting"][drop_id]
        assert entry["inputs"] == n_inputs == entry["written"] + entry["quarantined"], entry
        assert len(json.loads(out.read_bytes(ingest.index_key(drop_id)))) == entry["written"]
        assert (
            len(out.read_bytes(ingest.quarantine_key(drop_id)).decode().splitlines()) == entry["quarantined"]
        )
    for shard in manifest["shards"]:
        read_verified_shard(out, shard)  # raises on a checksum or count mismatch
    on_store = set(out.list_keys("processed/shards"))
    assert on_store == {s["key"] for s in manifest["shards"]}, (
        f"orphans: {sorted(on_store - {s['key'] for s in manifest['shards']})}"
    )
    if local_root is not None:
        leftovers = [p for p in local_root.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
        assert leftovers == [], leftovers
    return manifest


# --- a TCP proxy that can take the object store down or freeze it --------------------------------


class ChaosProxy:
    """Forwards 127.0.0.1:<port> to an upstream port; ``fault_after(n, mode)`` injects a fault at
    the n-th HTTP request: ``down`` (connections reset, port closed) or ``frozen`` (connections
    accepted and held, nothing forwarded). ``restore()`` forwards again on the same port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.mode, self.requests, self.injected_at = "forward", 0, None
        self._trigger: tuple[int, str] | None = None
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.port = 0
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self.port = self._listener.getsockname()[1]
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        listener = self._listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self.mode != "down":
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(client)
            if self.mode == "frozen":
                continue  # held open, never read: a store that accepts and never answers
            upstream = socket.create_connection(self.upstream)
            self._conns.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if from_client and data:
                    self._count(data.count(b" HTTP/1.1\r\n"))
                while self.mode == "frozen":
                    time.sleep(0.05)  # hold: neither forward nor close
                if not data or self.mode != "forward":
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def _count(self, n: int) -> None:
        with self._lock:
            self.requests += n
            trigger = self._trigger
            if trigger and self.requests >= trigger[0]:
                self._trigger = None
                self._inject(trigger[1])

    def fault_after(self, n_requests: int, mode: str) -> None:
        self._trigger = (self.requests + n_requests, mode)

    def _inject(self, mode: str) -> None:
        self.injected_at = time.monotonic()
        self.mode = mode
        if mode == "down":
            self._listener.close()
            for conn in self._conns:
                try:
                    conn.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )  # RST
                    conn.close()
                except OSError:
                    pass

    def restore(self) -> None:
        previous, self.mode = self.mode, "forward"
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except OSError:
                    pass
            self._conns = []
        if previous == "down":
            self._listen()

    def close(self) -> None:
        self.mode = "down"
        self._listener.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def store(s3_server, s3_env, s3_bucket, tmp_path):
    """A drop of 48 images uploaded to moto, and a chaos proxy in front of moto."""
    import boto3

    local = tmp_path / "raw"
    write_ham_drop(local, DROP, [f"ISIC_{i:07d}" for i in range(48)])
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in sorted((local / DROP).rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=s3_bucket, Key=f"raw/{path.relative_to(local).as_posix()}", Body=path.read_bytes()
            )
    proxy = ChaosProxy(int(s3_server.rsplit(":", 1)[1]))
    env = {**os.environ, **s3_env, **FAST_FAIL, "MELANOMA_S3_ENDPOINT_URL": proxy.url}
    yield {"raw": f"s3://{s3_bucket}/raw", "out": f"s3://{s3_bucket}/data", "proxy": proxy, "env": env}
    proxy.close()


# --- runners: the real jobs, as the tasks run them -----------------------------------------------


def spark_preprocess(
    raw: str, out: str, env: dict, *, master: str = "local[2]", on_start=None
) -> tuple[subprocess.CompletedProcess, float]:
    """``spark-submit spark_jobs/preprocess.py`` (the DAG's settings); ``on_start(process)`` runs while it does."""
    venv_bin = Path(sys.executable).parent
    full_env = {**env, "SPARK_LOCAL_IP": "127.0.0.1", "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"}
    command = [
        "spark-submit",
        "--master",
        master,
        *[arg for key, value in submit_conf(sys.executable).items() for arg in ("--conf", f"{key}={value}")],
        str(ROOT / "spark_jobs" / "preprocess.py"),
        "--raw-root",
        raw,
        "--processed-root",
        out,
        "--shard-size",
        "8",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    if on_start is not None:
        on_start(process)
    try:
        process.wait(timeout=HANG_GUARD_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    ended = time.monotonic()
    reader.join(timeout=30)
    return subprocess.CompletedProcess(command, process.returncode, "".join(output)), ended


_DRIVER = "import json, sys; from melanoma import ingest; print(json.dumps(ingest.run_preprocess(sys.argv[1], sys.argv[2], lambda: ingest.local_engine(2), shard_size=8)))"


def driver_preprocess(raw: str, out: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """The same driver and executor code in one process (two executor threads): quick to start."""
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, raw, out],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=HANG_GUARD_S,
    )
    return done, time.monotonic()


# --- scenarios ------------------------------------------------------------------------------------


def test_object_store_down_mid_job_fails_the_spark_job_and_the_rerun_completes(store):
    proxy = store["proxy"]
    proxy.fault_after(30, "down")  # past the scan (list, metadata), inside the chunks' reads and writes
    failed, ended = spark_preprocess(store["raw"], store["out"], store["env"])
    assert failed.returncode != 0, failed.stdout[-3000:]
    assert "StorageUnavailable" in failed.stdout and "did not answer" in failed.stdout, failed.stdout[-4000:]
    detect_s = ended - proxy.injected_at
    assert (
        latest_manifest(open_storage(store["out"])) is None
        or DROP not in latest_manifest(open_storage(store["out"]))["drops"]
    )

    proxy.restore()
    recovered, _ = spark_preprocess(store["raw"], store["out"], store["env"])
    assert recovered.returncode == 0, recovered.stdout[-4000:]
    assert_consistent(open_storage(store["out"]), {DROP: 48})
    record(
        fault="object store down (connections reset, port closed)",
        component="spark-submit preprocess, local[2], moto S3",
        detected_by="StorageUnavailable (EndpointConnectionError), job exit != 0",
        seconds_to_detect=round(detect_s, 1),
        recovered=True,
        inputs=48,
    )


def test_object_store_frozen_mid_run_fails_within_the_timeouts_and_the_rerun_completes(store):
    proxy = store["proxy"]
    proxy.fault_after(30, "frozen")
    failed, ended = driver_preprocess(store["raw"], store["out"], store["env"])
    assert failed.returncode != 0, failed.stdout[-2000:]
    assert "StorageUnavailable" in failed.stderr and "ReadTimeoutError" in failed.stderr, failed.stderr[
        -4000:
    ]
    detect_s = ended - proxy.injected_at

    proxy.restore()
    recovered, _ = driver_preprocess(store["raw"], store["out"], store["env"])
    assert recovered.returncode == 0, recovered.stderr[-4000:]
    assert_consistent(open_storage(store["out"]), {DROP: 48})
    record(
        fault="object store frozen (accepts, never answers)",
        component="preprocess driver + executor code, moto S3",
        detected_by=f"StorageUnavailable (ReadTimeoutError) after {FAST_FAIL['MELANOMA_S3_MAX_ATTEMPTS']} attempts x "
        f"{FAST_FAIL['MELANOMA_S3_READ_TIMEOUT_S']} s read timeout, queued reads cancelled",
        seconds_to_detect=round(detect_s, 1),
        recovered=True,
        inputs=48,
    )


def _busy_workers() -> list[int]:
    """Python workers forked by Spark's worker daemon (melanoma.spark_daemon) that are running
    (state R): a worker in the middle of a task, not one idling between tasks."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        procs[int(entry.name)] = (cmdline, fields[0], int(fields[1]))
    daemons = {pid for pid, (cmdline, _, _) in procs.items() if "melanoma.spark_daemon" in cmdline}
    return [pid for pid, (_, state, ppid) in procs.items() if ppid in daemons and state == "R"]


def write_large_drop(raw: Path, n_images: int) -> None:
    """A HAM10000-layout drop of 1000x750 PNGs: a PNG is decoded in full, so each task takes a while."""
    from badcorpus import COLUMNS, png_bytes, synthetic_lesion

    images = raw / DROP / "images"
    images.mkdir(parents=True)
    rows = [COLUMNS]
    for index in range(n_images):
        image_id = f"ISIC_{index:07d}"
        rgb = synthetic_lesion(1000, 750, seed=index)
        (images / f"{image_id}.png").write_bytes(png_bytes(rgb[:, :, ::-1]))
        rows.append(
            [f"HAM_{index}", image_id, "mel" if index % 3 == 0 else "nv", "histo", "50", "female", "back"]
        )
    (raw / DROP / "HAM10000_metadata.csv").write_text("".join(",".join(row) + "\n" for row in rows))


def test_spark_worker_killed_mid_task_and_the_rerun_completes(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_large_drop(raw, 96)  # 12 tasks of 8 images on local[2]
    killed: dict = {}

    def kill_a_busy_worker(process: subprocess.Popen) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline and process.poll() is None:
            busy = _busy_workers()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.update(pid=busy[0], at=time.monotonic())
                return
            time.sleep(0.005)

    first, ended = spark_preprocess(str(raw), str(out), dict(os.environ), on_start=kill_a_busy_worker)
    assert killed, f"no Spark Python worker was seen running a task:\n{first.stdout[-3000:]}"
    if first.returncode == 0:
        # The worker finished its task between the look and the kill: nothing was lost either.
        assert_consistent(LocalStorage(out), {DROP: 96}, out)
    else:
        assert "Python worker exited unexpectedly" in first.stdout or "Lost task" in first.stdout, (
            first.stdout[-4000:]
        )
        assert latest_manifest(LocalStorage(out)) is None  # nothing committed by the failed job
        second, _ = spark_preprocess(str(raw), str(out), dict(os.environ))
        assert second.returncode == 0, second.stdout[-4000:]
        assert_consistent(LocalStorage(out), {DROP: 96}, out)
    record(
        fault="SIGKILL to a Spark Python worker running a task",
        component="spark-submit preprocess, local[2]",
        detected_by="task failure 'Python worker exited unexpectedly', job exit != 0"
        if first.returncode
        else "none (the task had just ended)",
        seconds_to_detect=round(ended - killed["at"], 1) if first.returncode else None,
        recovered=True,
        inputs=96,
    )


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs (root only): writes beyond it fail with ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        message = f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full scenario needs root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_on_the_local_root_fails_cleanly_and_the_rerun_completes(tmp_path, small_disk):
    raw, out = tmp_path / "raw", small_disk / "data"
    write_ham_drop(raw, DROP, [f"ISIC_{i:07d}" for i in range(48)])  # ~8 MB of shards for a 2 MB disk
    started = time.monotonic()
    failed, ended = driver_preprocess(str(raw), str(out), dict(os.environ))
    assert failed.returncode != 0 and "No space left on device" in failed.stderr, failed.stderr[-3000:]
    assert latest_manifest(LocalStorage(out)) is None
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []  # a failed write removes its temporary file

    grown = subprocess.run(
        ["mount", "-o", "remount,size=64m", str(small_disk)], capture_output=True, text=True
    )
    assert grown.returncode == 0, grown.stderr
    recovered, _ = driver_preprocess(str(raw), str(out), dict(os.environ))
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert_consistent(LocalStorage(out), {DROP: 48}, out)
    record(
        fault="disk full (2 MB tmpfs as the local data root)",
        component="preprocess driver + executor code, local root",
        detected_by="OSError ENOSPC from the shard write, run exit != 0, temporary file removed",
        seconds_to_detect=round(ended - started, 1),
        recovered=True,
        inputs=48,
    )


def test_training_killed_after_its_first_checkpoint_resumes_and_completes(tmp_path):
    from melanoma.synthetic import write_drop

    raw, data = tmp_path / "raw", tmp_path / "data"
    write_drop(raw, n_images=60, seed=3, drop_id=DROP, id_prefix="CHA")
    summary = ingest.run_preprocess(str(raw), str(data), ingest.local_engine)
    assert summary["inputs"] == summary["written"] + summary["quarantined"]
    run_root = data / "runs" / "chaos"
    config = {"epochs": 2, "feature_cache": False, "patience": 10}
    command = [
        sys.executable,
        "-m",
        "training",
        "train",
        "--processed-root",
        str(data),
        "--run-root",
        str(run_root),
        "--config",
        json.dumps(config),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    state = run_root / "model" / "checkpoints" / "state.json"
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and first.poll() is None and not state.exists():
        time.sleep(0.05)
    assert first.poll() is None, (
        "training ended before it could be killed:\n" + first.communicate()[0][-3000:]
    )
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed_at = json.loads(state.read_text())
    assert not killed_at["done"] and not (run_root / "model" / "model.keras").exists()

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert "resuming phase 1" in second.stderr, second.stderr[
        -3000:
    ]  # a log line: stderr (stdout: the RESULT)
    final = json.loads(state.read_text())
    assert (
        final["done"]
        and len(json.loads((run_root / "model" / "history.json").read_text())["phase1"]["val_auroc"]) == 2
    )
    import zipfile

    with zipfile.ZipFile(run_root / "model" / "model.keras") as archive:
        assert archive.testzip() is None  # not a torn write
    assert [p for p in run_root.rglob("*") if p.name.endswith(".tmp")] == []
    assert_consistent(
        LocalStorage(data), {DROP: summary["inputs"]}, data
    )  # training never touches processed/
    record(
        fault="SIGKILL to `python -m training train` after its first checkpoint",
        component="training CLI subprocess (EfficientNet-Lite0)",
        detected_by="exit by signal (the task fails at once; its retry resumes)",
        seconds_to_detect=None,
        recovered=True,
        resumed_after_epoch=killed_at["epoch"] + 1,
        inputs=summary["inputs"],
    )
