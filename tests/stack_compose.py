"""`docker compose` as the stack test runs it: the production file plus the local override, an .env
filled in as a user would. Shared by tests/test_stack.py and by `make stack-images`, which builds the
project's images ahead (CI runs it beside `make test`, so the stack test finds its images built).

    python tests/stack_compose.py build    # the project's images, with a throwaway .env
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "melanoma-stack-test"


def sh(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args[:6])} ... failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def write_env_file(path: Path) -> dict[str, str]:
    """.env.example with fresh secrets, as a user fills it in; fast retries for the fault tests."""
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (ROOT / "docker-compose.yaml").read_text()))
    for key in required:
        values[key] = values.get(key) or secrets.token_urlsafe(24)
    values["AIRFLOW_FERNET_KEY"] = base64.urlsafe_b64encode(os.urandom(32)).decode()
    values["DOCKER_GID"] = str(os.stat("/var/run/docker.sock").st_gid)
    values.update(
        MELANOMA_TASK_RETRIES="1", MELANOMA_TASK_RETRY_DELAY_S="5", LOCAL_HOSTNAME=socket.gethostname()
    )
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return values


def compose_command(env_file: Path) -> list[str]:
    return [
        "docker",
        "compose",
        "-p",
        PROJECT,
        "-f",
        "docker-compose.yaml",
        "-f",
        "docker/local/compose.local.yaml",
        "--env-file",
        str(env_file),
    ]


def build_images(env_file: Path) -> float:
    """The project's images from their Dockerfiles (cached layers reused); returns the seconds it took.

    No build argument depends on the .env's secrets, so images built with one .env are the images
    another would build: a build ahead of the test leaves the test's own build nothing to do.
    """
    started = time.monotonic()
    sh(*compose_command(env_file), "--profile", "build", "build", timeout=3600)
    return time.monotonic() - started


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        env_file = Path(folder) / "build.env"
        write_env_file(env_file)
        print(f"stack_compose: project images built in {build_images(env_file):.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
