"""The scoring DAG's plan: which inbox folders to score, where the scores go, with which model.

Imported at DAG parse time: nothing heavy here (storage listing only when the task runs).
"""

from __future__ import annotations

from airflow.sdk import Asset

from melanoma.settings import SCORE_SETTINGS
from pipeline.airflow_ops import PROJECT_ROOT, setting, storage_roots, under_data_root

__all__ = ["INBOX_ASSET", "SCORE_PARAM_DEFAULTS", "score_plan"]

#: An uploader announces a folder of new images under the inbox root with an event on this asset
#: (REST ``POST /api/v2/assets/events``, ``extra={"drop_id": "..."}``).
INBOX_ASSET = Asset(name="melanoma_inbox", uri="x-melanoma://inbox", group="melanoma")
SCORE_PARAM_DEFAULTS = {name: s.default for name, s in SCORE_SETTINGS.items()}


def inbox_root() -> str:
    """Variable ``melanoma_inbox_root`` / env ``MELANOMA_INBOX_ROOT``, else ``output/inbox`` here."""
    return setting("inbox_root", str(PROJECT_ROOT / "output" / "inbox"))


def score_plan(params: dict, event_drops: list[str]) -> dict:
    """The folders this run scores: the Param's, else the events', else every one not scored yet."""
    from melanoma.drops import is_valid_drop_id, unscored_drops
    from melanoma.storage import open_storage

    values = {**SCORE_PARAM_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    data_root, _ = storage_roots()
    inbox = inbox_root()
    scores = under_data_root(data_root, "scores")
    drops = list(values["inbox_drops"]) or list(event_drops)
    bad = [d for d in drops if not is_valid_drop_id(d)]
    if bad:
        raise ValueError(f"not valid inbox folder names: {bad}")
    if drops:
        missing = [d for d in drops if not open_storage(inbox).list_keys(f"{d}/")]
        if missing:
            raise ValueError(f"no such folder under the inbox root {inbox}: {missing}")
    else:
        drops = unscored_drops(open_storage(inbox), open_storage(scores))
    return {
        "inbox_root": inbox,
        "scores_root": scores,
        "data_root": data_root,
        "drops": drops,
        "model": values["model"],
    }
