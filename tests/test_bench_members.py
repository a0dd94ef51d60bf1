"""A finished run can join a benchmark ensemble after its checkpoints folder was pruned."""

from __future__ import annotations

import json

from benchmarks.quality_ensemble import member_summary


def _finished_run(root, *, with_state: bool):
    model = root / "model"
    (model / "checkpoints").mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps(
            {"seed": 1, "fine_tune_blocks": 11, "target": "dx", "train_flips": 4, "max_train_seconds": 3000}
        )
    )
    history = {
        "phase1": {"val_auroc": [0.80, 0.82], "epoch_seconds": [1.0, 3.0]},
        "phase2": {"val_auroc": [0.85, 0.90, 0.88], "epoch_seconds": [150.0, 160.0, 170.0]},
    }
    (model / "history.json").write_text(json.dumps(history))
    if with_state:
        (model / "checkpoints" / "state.json").write_text(json.dumps({"stop_reason": "time budget"}))
    return root


def test_member_summary_reads_the_stop_reason_and_says_when_checkpoints_are_gone(tmp_path):
    kept = member_summary(_finished_run(tmp_path / "kept", with_state=True))
    pruned = member_summary(_finished_run(tmp_path / "pruned", with_state=False))
    assert kept["phase2_stop_reason"] == "time budget"
    assert pruned["phase2_stop_reason"] == "not recorded: checkpoints pruned"
    assert pruned["phases"]["phase2"] == {
        "epochs": 3,
        "best_val_auroc": 0.90,
        "mean_epoch_seconds": 160.0,
        "train_seconds": 480.0,
    }
    assert pruned["seed"] == 1 and pruned["budget_seconds"] == 3000
