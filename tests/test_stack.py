"""The production stack for real: every image built from the project's Dockerfiles, `docker compose up`,
the DAG triggered through Airflow's REST API and run in the containers, then torn down.

`make test-stack` installs and starts the Docker engine (docker/local/engine.sh), builds the local
stand-ins for the public base images (docker/local/base-images.sh), then runs this file. The stack is
docker-compose.yaml as users run it plus docker/local/compose.local.yaml (host network, 127.0.0.1 only,
an S3-compatible server for MinIO, two Spark workers). What is asserted, the way a user would check it:
every task succeeds; preprocess and augment ran as applications of the standalone master with
executors on both workers; train, evaluate, gradcam and report ran in containers of the training image
that Airflow started; the bucket holds the manifest, shards, model, metrics and report; the UI's report
link opens the report. Then faults: a Spark worker killed during preprocess and the training container
killed during training; both runs still finish, every input accounted for. Nothing is left running.

Without a Docker engine it skips with the reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest

from ham_drop import metadata_csv, metadata_rows, pick_images, upload_images
from stack_compose import PROJECT, ROOT, build_images, compose_command, sh, write_env_file

pytestmark = pytest.mark.stack

DAG_ID = "melanoma_pipeline"
API = "http://127.0.0.1:8080"
S3_URL = "http://127.0.0.1:9000"
SPARK_MASTER_UI = "http://127.0.0.1:8090"
SPARK_WORKER_UIS = {"spark-worker": "http://127.0.0.1:8091", "spark-worker-2": "http://127.0.0.1:8092"}
BUCKET = "melanoma"
TRAINING_IMAGE = "melanoma-training:0.1.0"
TRAINING_STEPS = {"train", "evaluate", "gradcam", "report", "promote"}
MLFLOW = "http://127.0.0.1:5000"
OUTPUT = ROOT / "output" / "stack"
# Quick Params: the head only, few images, few resamples; the stack's behaviour, not the model's quality.
QUICK = {"recipe": "quick", "epochs": 40, "max_train_images": 300, "n_boot": 100}


def docker_available() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return f"no Docker engine answers ({done.stderr.strip()[:200]})"
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        return "no docker compose v2 plugin"
    return None


class Stack:
    """`docker compose` on the production file plus the local override, with the test's own .env."""

    def __init__(self, env_file: Path, values: dict[str, str]):
        self.env_file, self.values = env_file, values
        self.base = compose_command(env_file)
        self.token: str | None = None

    def compose(self, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.base, *args, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    # -- the REST API ------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{API}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def login(self) -> None:
        status, body = self.request(
            "POST",
            "/auth/token",
            {
                "username": self.values["AIRFLOW_ADMIN_USERNAME"],
                "password": self.values["AIRFLOW_ADMIN_PASSWORD"],
            },
        )
        assert status == 201, f"login failed: {status} {body}"
        self.token = body["access_token"]

    def task_instances(self, run_id: str) -> dict[str, dict]:
        status, body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        assert status == 200, body
        return {ti["task_id"]: ti for ti in body["task_instances"]}

    def task_log(self, run_id: str, task_id: str, try_number: int) -> str:
        status, body = self.request(
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}?full_content=true",
        )
        if status != 200:
            return f"(no log: {status} {body})"
        content = body.get("content", body) if isinstance(body, dict) else body
        if isinstance(content, list):
            return "\n".join(
                c.get("event", json.dumps(c)) if isinstance(c, dict) else str(c) for c in content
            )
        return str(content)

    def xcom(self, run_id: str, task_id: str, key: str = "return_value", missing_ok: bool = False):
        status, body = self.request(
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}?deserialize=true",
        )
        if missing_ok and status == 404:
            return None
        assert status == 200, (status, body)
        return body["value"]

    def run_prefix(self, run_id: str, missing_ok: bool = False) -> str | None:
        """The run's folder in the bucket, as the plan task resolved it (``data/runs/<run key>``)."""
        plan = self.xcom(run_id, "plan", missing_ok=missing_ok)
        return plan and plan["run_root"].removeprefix(f"s3://{BUCKET}/")

    def trigger(self, run_id: str, logical_date: str, conf: dict) -> None:
        status, body = self.request(
            "POST",
            f"/api/v2/dags/{DAG_ID}/dagRuns",
            {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf},
        )
        assert status == 200, f"trigger refused: {status} {body}"

    def wait_for_run(
        self, run_id: str, timeout: float, *, allow_retry: set[str] = frozenset(), during=None
    ) -> dict[str, dict]:
        """Poll until the run ends; a failed task (or a retry nobody expects) fails at once with its log."""
        deadline = time.monotonic() + timeout
        while True:
            tis = self.task_instances(run_id)
            for task_id, ti in tis.items():
                bad = ti["state"] in ("failed", "upstream_failed") or (
                    ti["state"] == "up_for_retry" and task_id not in allow_retry
                )
                if bad:
                    raise AssertionError(
                        f"task {task_id} is {ti['state']} (try {ti['try_number']}):\n"
                        f"{self.task_log(run_id, task_id, max(ti['try_number'], 1))[-6000:]}"
                    )
            status, run = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            assert status == 200, run
            if run["state"] in ("success", "failed"):
                assert run["state"] == "success", (
                    f"run {run_id} failed: {json.dumps(tis, default=str)[:3000]}"
                )
                return tis
            if during is not None:
                during(tis)
            if time.monotonic() > deadline:
                pending = {t: ti["state"] for t, ti in tis.items() if ti["state"] != "success"}
                raise AssertionError(
                    f"run {run_id} not finished after {timeout:.0f} s; unfinished tasks: {pending}"
                )
            time.sleep(2)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def bucket_keys(s3, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def read_json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def upload_drop(s3, ham10000_dir: Path, drop_id: str, chosen: list[dict]) -> None:
    upload_images(s3, BUCKET, f"raw/{drop_id}", ham10000_dir, chosen)
    s3.put_object(Bucket=BUCKET, Key=f"raw/{drop_id}/HAM10000_metadata.csv", Body=metadata_csv(chosen))


class ContainerStarts:
    """Starts of containers labelled ``melanoma.step`` (what the training operator sets), watched live:
    the engine keeps only its last 256 events, and health checks alone fill that within minutes."""

    def __enter__(self):
        self.process = subprocess.Popen(
            [
                "docker",
                "events",
                "--filter",
                "type=container",
                "--filter",
                "event=start",
                "--filter",
                "label=melanoma.step",
                "--format",
                "{{json .}}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()

    def seen(self) -> list[dict]:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return [json.loads(line)["Actor"]["Attributes"] for line in out.splitlines() if line.strip()]


def leftover_containers() -> list[str]:
    listed = sh(
        "docker",
        "ps",
        "-a",
        "--filter",
        f"label=com.docker.compose.project={PROJECT}",
        "--format",
        "{{.Names}}",
    ).stdout.split()
    listed += sh(
        "docker", "ps", "-a", "--filter", "label=melanoma.step", "--format", "{{.Names}}"
    ).stdout.split()
    return listed


@pytest.fixture(scope="module")
def figures():
    """Timings and sizes measured by this file, for BENCHMARKS.md (output/stack/figures.json)."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    values: dict = {}
    yield values
    (OUTPUT / "figures.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, figures, ham10000_dir):
    reason = docker_available()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}; `make test-stack` installs and starts the engine")
        pytest.skip(f"{reason}; `make test-stack` installs and starts the engine")
    env_file = tmp_path_factory.mktemp("stack") / "stack.env"
    stack = Stack(env_file, write_env_file(env_file))
    stack.compose(
        "down", "-v", "--remove-orphans", "--timeout", "10", check=False
    )  # a previous run's leftovers
    # Seconds: cold, or near nothing after `make stack-images` (CI builds ahead, beside `make test`).
    figures["build_seconds"] = round(build_images(env_file), 1)
    figures["image_sizes_mb"] = {
        image: round(int(sh("docker", "image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6)
        for image in (
            "melanoma-airflow:0.1.0",
            "melanoma-spark:0.1.0",
            TRAINING_IMAGE,
            "melanoma-mlflow:0.1.0",
        )
    }
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--wait", "--wait-timeout", "600", timeout=900)
        figures["start_to_healthy_seconds"] = round(time.monotonic() - started, 1)
        stack.login()
        yield stack
    finally:
        (OUTPUT / "compose.log").write_text(
            stack.compose("logs", "--no-color", "--timestamps", check=False).stdout[-2_000_000:]
        )
        # MELANOMA_STACK_KEEP=1 (debugging only) leaves the stack up. Not a `return` in
        # `finally`, which would swallow the exception that brought us here.
        if os.environ.get("MELANOMA_STACK_KEEP") != "1":
            stack.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
            left = leftover_containers()
            assert not left, f"containers left behind: {left}"


@pytest.fixture(scope="module")
def s3(stack):
    return boto3.client(
        "s3",
        endpoint_url=S3_URL,
        region_name="us-east-1",
        aws_access_key_id=stack.values["MINIO_ROOT_USER"],
        aws_secret_access_key=stack.values["MINIO_ROOT_PASSWORD"],
    )


@pytest.fixture(scope="module")
def dag_ready(stack):
    def served():
        status, _ = stack.request("GET", f"/api/v2/dags/{DAG_ID}")
        if status != 200:
            _, errors = stack.request("GET", "/api/v2/importErrors")
            assert not (isinstance(errors, dict) and errors.get("import_errors")), errors
        return status == 200

    wait_until(served, 300, f"the dag-processor to serve {DAG_ID}", poll=3)
    status, body = stack.request(
        "PATCH", f"/api/v2/dags/{DAG_ID}?update_mask=is_paused", {"is_paused": False}
    )
    assert status == 200 and body["is_paused"] is False, (status, body)


def test_the_dag_runs_end_to_end_in_the_stack(stack, s3, dag_ready, ham10000_dir, figures):
    rows = metadata_rows(ham10000_dir)
    chosen = pick_images(rows, n_melanoma=90, n_other=210)
    drop_id, run_id = "ham-2026-01-01", "stack_clean"
    upload_drop(s3, ham10000_dir, drop_id, chosen)

    started = time.monotonic()
    with ContainerStarts() as starts:
        stack.trigger(run_id, "2026-01-01T00:00:00Z", {"drops": [drop_id], **QUICK})
        tis = stack.wait_for_run(run_id, timeout=1500)
        started_containers = starts.seen()
    figures["clean_run_seconds"] = round(time.monotonic() - started, 1)
    assert {t: ti["state"] for t, ti in tis.items()} == {t: "success" for t in tis}, tis
    assert set(tis) == {"plan", "has_new_drops", "preprocess", "augment", *TRAINING_STEPS}

    # Spark: both jobs were applications of the standalone master, with executors on both workers.
    master = get_json(f"{SPARK_MASTER_UI}/json/")
    apps = {app["name"]: app["id"] for app in master["completedapps"]}
    assert {"melanoma-preprocess", "melanoma-augment"} <= set(apps), master["completedapps"]
    assert len(master["workers"]) == 2 and all(w["state"] == "ALIVE" for w in master["workers"]), master[
        "workers"
    ]
    for worker, url in SPARK_WORKER_UIS.items():
        ran = {e["appid"] for e in get_json(f"{url}/json/")["finishedexecutors"]}
        assert apps["melanoma-preprocess"] in ran, f"no preprocess executor on {worker}: {ran}"

    # Training: each step in a container of the training image that Airflow started, none left.
    assert {c["melanoma.step"] for c in started_containers} == TRAINING_STEPS, started_containers
    assert {c["image"] for c in started_containers} == {TRAINING_IMAGE}, started_containers
    assert all(c["melanoma.dag_run"] == run_id for c in started_containers)
    assert not sh("docker", "ps", "-a", "--filter", "label=melanoma.step", "-q").stdout.strip()

    # The bucket holds every output.
    keys = set(bucket_keys(s3, "data/"))
    manifests = sorted(k for k in keys if k.startswith("data/processed/manifest-"))
    assert manifests, sorted(keys)[:50]
    manifest = read_json(s3, manifests[-1])
    accounting = manifest["accounting"][drop_id]
    assert accounting["inputs"] == len(chosen) == accounting["written"] + accounting["quarantined"]
    assert all(f"data/{shard['key']}" in keys for shard in manifest["shards"])
    run_prefix = stack.run_prefix(run_id)
    for key in (
        "model/model.keras",
        "eval/metrics.json",
        "eval/predictions.csv",
        "gradcam/gradcam_summary.json",
        "report.html",
    ):
        assert f"{run_prefix}/{key}" in keys, key
    # The threshold travelled by XCom from evaluate to gradcam.
    threshold = stack.xcom(run_id, "evaluate")
    assert threshold["chosen_on"] == "val"
    assert read_json(s3, f"{run_prefix}/gradcam/gradcam_summary.json")["threshold"] == threshold["threshold"]

    # The report link the plugin builds opens the report.
    status, links = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/report/links")
    assert status == 200 and links["extra_links"].get("Melanoma report"), (status, links)
    with urllib.request.urlopen(links["extra_links"]["Melanoma report"], timeout=30) as response:
        page = response.read().decode()
        assert response.status == 200 and response.headers.get_content_type() == "text/html"
    assert "<html" in page.lower() and "melanoma" in page.lower()
    (OUTPUT / "report.html").write_text(page)
    check_tracked(s3, stack, run_id, run_prefix, page)


def check_tracked(s3, stack: Stack, run_id: str, run_prefix: str, page: str) -> None:
    """The run is in the MLflow server (Postgres), its model registered, the decision everywhere."""
    from mlflow import MlflowClient

    decision = stack.xcom(run_id, "promote")
    assert read_json(s3, f"{run_prefix}/promotion.json") == decision
    assert decision["tracking_uri"] == "http://mlflow:5000" and "Registry: melanoma-classifier" in page
    client = MlflowClient(MLFLOW)
    tracked = client.get_run(decision["mlflow_run_id"])
    assert {"val.auroc", "test.auroc.ci_low", "phase1.val_auroc"} <= set(tracked.data.metrics)
    assert tracked.data.tags["promotion"].endswith(f"v{decision['version']}")
    version = client.get_model_version("melanoma-classifier", str(decision["version"]))
    assert version.tags["promotion"] == ("promoted" if decision["promoted"] else "rejected")
    # Artifacts went through the server into the bucket.
    assert any(key.endswith("model/model.keras") for key in bucket_keys(s3, "mlflow/")), (
        "no model in s3://melanoma/mlflow"
    )


def drop_shards(manifest: dict, drop_id: str) -> dict[str, tuple]:
    """The drop's preprocessed shards as the manifest records them (augment adds its own later)."""
    return {
        s["key"]: (s["sha256"], s["count"], s["labels"])
        for s in manifest["shards"]
        if s["drop"] == drop_id and s["kind"] == "original"
    }


def undisturbed_preprocess(stack: Stack, drop_id: str, logical_date: str, processed: Path) -> dict:
    """The preprocess job on this machine (local[2]) over the drop in the bucket; its manifest."""
    from test_spark_jobs import spark_submit

    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage

    s3_env = {
        "MELANOMA_S3_ENDPOINT_URL": S3_URL,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": stack.values["MINIO_ROOT_USER"],
        "AWS_SECRET_ACCESS_KEY": stack.values["MINIO_ROOT_PASSWORD"],
    }
    spark_submit(
        "preprocess",
        "--raw-root",
        f"s3://{BUCKET}/raw",
        "--processed-root",
        str(processed),
        "--drops",
        json.dumps([drop_id]),
        "--logical-date",
        logical_date,
        env=s3_env,
    )
    return latest_manifest(open_storage(str(processed)))


def test_a_killed_spark_worker_and_a_killed_training_container_are_recovered(
    stack, s3, dag_ready, ham10000_dir, figures, tmp_path
):
    rows = metadata_rows(ham10000_dir)
    first = {r["lesion_id"] for r in pick_images(rows, n_melanoma=90, n_other=210)}
    chosen = pick_images(rows, n_melanoma=150, n_other=450, skip_lesions=first)
    drop_id, run_id = "ham-2026-01-02", "stack_faults"
    upload_drop(s3, ham10000_dir, drop_id, chosen)
    done: dict[str, float] = {}

    def inject(tis: dict[str, dict]) -> None:
        if "spark" not in done and tis.get("preprocess", {}).get("state") == "running":
            # Kill one worker once the preprocess application has executors on both.
            master = get_json(f"{SPARK_MASTER_UI}/json/")
            app = next((a for a in master["activeapps"] if a["name"] == "melanoma-preprocess"), None)
            running = app and all(
                any(e["appid"] == app["id"] for e in get_json(f"{url}/json/")["executors"])
                for url in SPARK_WORKER_UIS.values()
            )
            if running:
                sh("docker", "kill", stack.container("spark-worker-2"))
                done["spark"] = time.monotonic()
        if "train" not in done and tis.get("train", {}).get("state") == "running":
            # Kill the training container once it has checkpointed an epoch in the bucket.
            try:
                state = read_json(s3, f"{run_prefix}/model/checkpoints/state.json")
            except s3.exceptions.NoSuchKey:
                return
            if state.get("epoch", -1) >= 0 and not state.get("done"):
                (container,) = sh(
                    "docker", "ps", "-q", "--filter", "label=melanoma.step=train"
                ).stdout.split()
                sh("docker", "kill", container)
                done["train"] = time.monotonic()
                done["killed_after_epoch"] = state["epoch"] + 1

    started = time.monotonic()
    stack.trigger(run_id, "2026-01-02T00:00:00Z", {"drops": [drop_id], **QUICK})
    run_prefix = wait_until(lambda: stack.run_prefix(run_id, missing_ok=True), 600, "the plan task's XCom")
    tis = stack.wait_for_run(run_id, timeout=2400, allow_retry={"train"}, during=inject)
    figures["fault_run_seconds"] = round(time.monotonic() - started, 1)
    assert "spark" in done, "the preprocess job ended before a worker could be killed"
    assert "train" in done, "training ended before its container could be killed"

    # Spark: the job finished on the surviving worker; every input is accounted for.
    assert tis["preprocess"]["try_number"] == 1, "a lost executor is Spark's to recover, not a task retry"
    manifest = read_json(s3, sorted(k for k in bucket_keys(s3, "data/processed/manifest-"))[-1])
    accounting = manifest["accounting"][drop_id]
    assert accounting["inputs"] == len(chosen) == accounting["written"] + accounting["quarantined"], (
        accounting
    )
    # The same drop through the same job, undisturbed (spark-submit local[2] here, raw from the bucket):
    # the lost executor's tasks were recomputed into exactly the shards an undisturbed run writes.
    reference = undisturbed_preprocess(stack, drop_id, "2026-01-02", tmp_path / "reference")
    assert reference["accounting"][drop_id] == accounting
    assert drop_shards(manifest, drop_id) == drop_shards(reference, drop_id)

    # Training: the retry resumed from the checkpoint in the bucket instead of starting over.
    assert tis["train"]["try_number"] == 2, tis["train"]
    retry_log = stack.task_log(run_id, "train", 2)
    (OUTPUT / "train-retry.log").write_text(retry_log)
    assert "phase 1 epoch 1/" not in retry_log, "the retry trained phase 1 from its first epoch again"
    epochs = [int(n) for n in re.findall(r"phase 1 epoch (\d+)/", retry_log)]
    assert not epochs or epochs[0] > done["killed_after_epoch"], (epochs, done)
    history = read_json(s3, f"{run_prefix}/model/history.json")
    assert history, "no training history after the retry"
    figures["faults"] = {
        "spark_worker_killed": True,
        "training_container_killed_after_epoch": done["killed_after_epoch"],
    }


def browser():
    """Headless Debian chromium through Selenium, able to reach 127.0.0.1 only (no other name resolves)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail(
            "chromium and chromium-driver are needed (apt-get install chromium chromium-driver; make test-stack does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--proxy-server=http://127.0.0.1:1",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.implicitly_wait(15)
    return chrome


def first_element(chrome, by: str, value: str, keep, result=lambda element: element):
    """``result`` of the first element found by (by, value) that ``keep`` accepts, else None.

    The UI re-renders while it loads: an element found a moment ago can be gone (stale) by the
    time it is read. That is a "not yet", not a failure: None, so ``wait_until`` polls again.
    """
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return next((result(e) for e in chrome.find_elements(by, value) if keep(e)), None)
    except StaleElementReferenceException:
        return None


class TriggerForm:
    """The trigger dialog of Airflow 3's UI: Params in collapsible sections, one input per Param."""

    def __init__(self, chrome):
        self.chrome = chrome

    def shown(self, xpath: str):
        from selenium.webdriver.common.by import By

        return wait_until(
            lambda: first_element(self.chrome, By.XPATH, xpath, lambda e: e.is_displayed()),
            30,
            f"an element {xpath} on the page",
        )

    def section(self, title: str) -> None:
        button = self.shown(f"//button[@data-part='item-trigger'][normalize-space(.)='{title}']")
        if button.get_attribute("aria-expanded") != "true":
            button.click()

    def see(self, text: str):
        return self.shown(f'//*[contains(normalize-space(text()), "{text}")]')

    def field(self, param: str):
        return self.shown(f"//input[@name='element_{param}']")

    @staticmethod
    def type(element, value: str) -> None:
        from selenium.webdriver.common.keys import Keys

        # Separate calls: a modifier in send_keys stays pressed for the rest of that call.
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(value)
        element.send_keys(Keys.TAB)


def test_a_user_triggers_a_run_from_the_ui_and_opens_its_report(stack, s3, dag_ready, ham10000_dir):
    """Login, the trigger form (Params with descriptions; a value below its minimum refused), a run, the report link."""
    from selenium.webdriver.common.by import By

    rows = metadata_rows(ham10000_dir)
    taken = {r["lesion_id"] for r in pick_images(rows, n_melanoma=90, n_other=210)}
    taken |= {r["lesion_id"] for r in pick_images(rows, n_melanoma=150, n_other=450, skip_lesions=taken)}
    upload_drop(
        s3, ham10000_dir, "ham-2026-12-01", pick_images(rows, n_melanoma=40, n_other=80, skip_lesions=taken)
    )
    _, before = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")
    known = {r["dag_run_id"] for r in before["dag_runs"]}

    chrome = browser()
    try:
        chrome.get(f"{API}/")
        chrome.find_element(By.NAME, "username").send_keys(stack.values["AIRFLOW_ADMIN_USERNAME"])
        chrome.find_element(By.NAME, "password").send_keys(stack.values["AIRFLOW_ADMIN_PASSWORD"])
        chrome.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_until(lambda: "/auth/login" not in chrome.current_url, 60, "the login to go through")
        chrome.get(f"{API}/dags/{DAG_ID}")
        chrome.find_element(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click()
        form = TriggerForm(chrome)
        # Each section of Params opens on its title; each Param shows its title and description.
        form.section("Training")
        form.see("Epochs (phase 1)")
        form.see("Phase 1 (frozen backbone) epoch budget")
        epochs = form.field("epochs")
        form.type(epochs, "0")  # below the Param's minimum (1): the form refuses it and puts the minimum back
        wait_until(lambda: epochs.get_attribute("value") == "1", 30, "the form to refuse epochs=0")
        chrome.execute_script("arguments[0].scrollIntoView()", epochs)
        chrome.save_screenshot(str(OUTPUT / "trigger-form.png"))
        form.type(epochs, "40")
        # The default recipe (best) without its phase 2: the stack's behaviour, not the model's quality.
        form.type(form.field("fine_tune_epochs"), "0")
        form.section("Data")
        form.see("Training images (cap)")
        form.type(form.field("max_train_images"), "300")
        form.section("Evaluation")
        form.see("How evaluate picks the threshold")
        form.type(form.field("n_boot"), "100")
        form.section("Model")
        form.see("Backbone")
        form.shown("//*[@role='dialog']//button[normalize-space(.)='Trigger']").click()

        def new_run():
            _, runs = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")
            fresh = [
                r for r in runs["dag_runs"] if r["dag_run_id"] not in known and r["run_type"] == "manual"
            ]
            return fresh[0] if fresh else None

        run = wait_until(new_run, 60, "the run the form triggered")
        conf = run["conf"]
        # The recipe left empty: the deployment's (best unless MELANOMA_RECIPE says otherwise).
        assert (conf.get("recipe"), conf["epochs"], conf["fine_tune_epochs"]) == (None, 40, 0), conf
        assert (conf["max_train_images"], conf["n_boot"]) == (300, 100), conf
        stack.wait_for_run(run["dag_run_id"], timeout=1500)

        # The report task's "Melanoma report" extra link, as the UI shows it, opens the report.
        # (Airflow 3's UI lists a task's extra links on its Details tab.)
        chrome.get(f"{API}/dags/{DAG_ID}/runs/{run['dag_run_id']}/tasks/report/details")
        # The href is read in the same poll as the text: the element itself may go stale after.
        href = wait_until(
            lambda: first_element(
                chrome,
                By.TAG_NAME,
                "a",
                lambda a: "Melanoma report" in a.text,
                lambda a: a.get_attribute("href"),
            ),
            60,
            "the Melanoma report link on the report task's Details tab",
        )
        chrome.get(href)
        assert "melanoma" in chrome.page_source.lower() and "<html" in chrome.page_source.lower()
        chrome.save_screenshot(str(OUTPUT / "report.png"))
    finally:
        chrome.save_screenshot(str(OUTPUT / "last-page.png"))
        (OUTPUT / "last-page.html").write_text(chrome.page_source)
        chrome.quit()
