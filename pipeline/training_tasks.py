"""The training CLI's steps (train, evaluate, gradcam, report) as Airflow tasks: one step, one task.

Each task runs ``python -m training <step> ...`` with arguments rendered from ``plan``'s XCom
(and ``evaluate``'s threshold), so the UI's "Rendered Template" shows exactly what ran. The
runner decides what the task *is*:

- ``local`` (the embedded default): :class:`TrainingSubprocessOperator`, a subprocess of the
  worker's Python whose output streams into the task log;
- ``docker``: :class:`TrainingContainerOperator`, a ``DockerOperator``: the container is the task,
  so its log streams into the task log as it runs and ``on_kill`` (a cleared, failed-over or
  timed-out task) stops the container instead of leaving a 12-hour training running.

Either way the CLI's last ``RESULT {json}`` line is the task's XCom. The runner is read from the
environment (``MELANOMA_RUNNER``) when the DAG is parsed, because it decides the task's type;
the image, Docker URL, network and extra hosts are read when the task runs (Variables first).
Imported at DAG parse time: nothing heavy here.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import logging
import os
from typing import Any

from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import BaseOperator

from pipeline.airflow_ops import parse_result, run_cli_locally, setting, storage_env, tracking_env

__all__ = [
    "STEPS",
    "training_steps",
    "training_args",
    "training_task",
    "TrainingSubprocessOperator",
    "TrainingContainerOperator",
]

log = logging.getLogger(__name__)
STEPS = ("train", "evaluate", "gradcam", "report", "promote", "score")
RUNNERS = ("local", "docker")


def _args_expression(step: str) -> str:
    """Jinja expression of the step's CLI arguments from ``plan``'s (and ``evaluate``'s) XCom."""
    threshold = "ti.xcom_pull(task_ids='evaluate')" if step in ("gradcam", "report", "promote") else "None"
    return f"training_args({step!r}, ti.xcom_pull(task_ids='plan'), {threshold})"


def training_args(step: str, run: dict, threshold: dict | None = None) -> list[str]:
    """The training CLI's arguments for one step of the run ``plan`` resolved (a DAG macro)."""
    if step == "score":  # melanoma_score: the inbox folders plan chose, with the model it names
        return [
            "score",
            *("--inbox-root", run["inbox_root"], "--scores-root", run["scores_root"]),
            *("--drops", json.dumps(run["drops"]), "--model", run["model"], "--data-root", run["data_root"]),
        ]
    roots = ["--processed-root", run["data_root"], "--run-root", run["run_root"]]
    as_of = ["--as-of", run["as_of"]] if run.get("as_of") else []
    if run.get("manifest_version"):  # a run pinned to one manifest (melanoma_train): exactly that one
        as_of += ["--manifest-version", str(run["manifest_version"])]
    if step == "train":
        return ["train", *roots, "--config", json.dumps(run["train_config"], sort_keys=True)]
    if step == "evaluate":
        args = [
            "evaluate",
            *roots,
            "--strategy",
            run["threshold_strategy"],
            "--target-sensitivity",
            str(run["target_sensitivity"]),
            "--n-boot",
            str(run["n_boot"]),
            "--pooling",
            run["score_pooling"],
            # Runs recorded before the setting: off.
            *(["--test-time-augmentation"] if run.get("test_time_augmentation") else []),
            *as_of,
        ]
        for external in run["external"]:
            args += ["--external", external]
        return args
    if threshold is None:
        raise ValueError(f"the {step} step needs evaluate's threshold (its XCom) and got none")
    if step == "gradcam":
        return ["gradcam", *roots, "--threshold", json.dumps(threshold, sort_keys=True), *as_of]
    if step == "report":
        return ["report", "--run-root", run["run_root"], "--threshold", json.dumps(threshold, sort_keys=True)]
    if step == "promote":
        gate = ["--min-val-auroc", str(run["promote_min_val_auroc"]), "--margin", str(run["promote_margin"])]
        return ["promote", *roots, "--threshold", json.dumps(threshold, sort_keys=True), *gate, *as_of]
    raise ValueError(f"unknown training step {step!r}: one of {STEPS}")


#: The DAG's ``user_defined_macros``: the argument templates call :func:`training_args`.
MACROS = {"training_args": training_args}


def _rendered_args(value: Any) -> list[str]:
    """A rendered argument template (Jinja renders the list as its literal), or a list given directly."""
    return list(ast.literal_eval(value) if isinstance(value, str) else value)


def _publish(step: str, result: dict, context) -> dict:
    """The step's result as XCom; ``report`` also pushes the link the plugin's extra link opens."""
    if step == "report":
        context["ti"].xcom_push(key="report_url", value=result["report_uri"])
        log.info("report: %s", result["report_uri"])
    if step == "promote":
        verdict = "promoted to champion" if result["promoted"] else "rejected"
        log.info("%s v%s %s: %s", result["model"], result["version"], verdict, "; ".join(result["reasons"]))
    return result


class TrainingSubprocessOperator(BaseOperator):
    """One training-CLI step as a subprocess of this worker's Python (the ``local`` runner)."""

    template_fields = ("cli_args",)

    def __init__(self, *, step: str, **kwargs):
        super().__init__(**kwargs)
        self.step = step
        self.cli_args = "{{ %s }}" % _args_expression(step)

    def execute(self, context):
        result = run_cli_locally(
            _rendered_args(self.cli_args), {**storage_env(), **tracking_env()}, log=self.log.info
        )
        return _publish(self.step, result, context)


def _extra_hosts(text: str) -> dict[str, str] | None:
    """``"minio:127.0.0.1,db:10.0.0.5"`` -> ``{"minio": "127.0.0.1", ...}`` (host-to-address pairs)."""
    pairs = [item.strip() for item in text.split(",") if item.strip()]
    bad = [p for p in pairs if ":" not in p]
    if bad:
        raise ValueError(f"melanoma_docker_extra_hosts: {bad} are not host:address pairs")
    return dict(p.split(":", 1) for p in pairs) or None


class TrainingContainerOperator(DockerOperator):
    """One training-CLI step in the training image (the ``docker`` runner): the container is the task."""

    def __init__(self, *, step: str, **kwargs):
        super().__init__(
            image=os.environ.get("MELANOMA_TRAINING_IMAGE", "melanoma-training:latest"),
            # Rendered to a list literal, which DockerOperator.format_command turns back into a list.
            command="{{ ['python', '-m', 'training'] + %s }}" % _args_expression(step),
            do_xcom_push=True,
            xcom_all=False,  # the last line is the CLI's RESULT line
            mount_tmp_dir=False,
            # The log is in the task log already; a stopped container would only pile up.
            auto_remove="force",
            **kwargs,
        )
        self.step = step

    def execute(self, context):
        # Read when the task runs (Variables, env), never at parse time; credentials stay out of
        # the rendered fields: DockerOperator keeps private_environment out of them.
        self.image = setting("training_image", self.image)
        self.docker_url = setting("docker_url", self.docker_url or "unix://var/run/docker.sock")
        self.network_mode = setting("docker_network", self.network_mode or "bridge")
        self.extra_hosts = _extra_hosts(setting("docker_extra_hosts", ""))
        self.environment = {**(self.environment or {}), "MELANOMA_RUNNER": "docker"}
        # `docker ps --filter label=melanoma.step` finds a run's training containers.
        self.labels = {"melanoma.step": self.step, "melanoma.dag_run": str(context["run_id"])}
        self._private_environment = {**self._private_environment, **storage_env(), **tracking_env()}
        return _publish(self.step, parse_result(str(super().execute(context) or "")), context)


def training_task(step: str, **kwargs) -> BaseOperator:
    """The task of one training step, of the type the runner (``MELANOMA_RUNNER``, parse time) asks for."""
    runner = os.environ.get("MELANOMA_RUNNER", "local")
    if runner not in RUNNERS:
        raise ValueError(f"MELANOMA_RUNNER={runner!r}: use one of {RUNNERS}")
    operator = TrainingContainerOperator if runner == "docker" else TrainingSubprocessOperator
    return operator(task_id=step, step=step, **kwargs)


#: The model's steps in a training run, in order, with the longest each may take.
TRAINING_STEPS = {
    "train": dt.timedelta(hours=12),
    "evaluate": dt.timedelta(hours=2),
    "gradcam": dt.timedelta(hours=2),
    "report": dt.timedelta(minutes=30),
    "promote": dt.timedelta(hours=1),
}


def training_steps() -> tuple[BaseOperator, BaseOperator]:
    """train >> evaluate >> gradcam >> report >> promote as tasks (inside a DAG); returns (first, last)."""
    tasks = [training_task(step, execution_timeout=timeout) for step, timeout in TRAINING_STEPS.items()]
    for upstream, downstream in zip(tasks, tasks[1:]):
        upstream >> downstream
    return tasks[0], tasks[-1]
