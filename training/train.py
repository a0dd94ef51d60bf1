"""Two-phase training of the melanoma classifier, resumable from object storage: the whole run.

Phase 1 trains the head with the backbone frozen. Because a frozen backbone maps each image
to the same pooled features every epoch, the features are computed once (augmented copies
included: augmentation is offline, the copies are stored images) and the head trains on
them: the same model, at a fraction of the cost (``feature_cache=False`` runs the frozen
backbone every epoch instead, for comparison).

Phase 2 unfreezes the last ``fine_tune_blocks`` backbone blocks (BatchNorm stays frozen, which
in Keras 3 also keeps it in inference mode) and fine-tunes them with the head at a lower
learning rate. Everything before those blocks is frozen and deterministic, so its output for a
stored image never changes: with ``fine_tune_cache=True`` (default) that activation (the
single tensor feeding the first unfrozen block) is computed once per image and phase 2
trains the tail ``cut -> probability`` on it. That is the same computation as running the
whole network with those blocks unfrozen, at the cost of the tail only. The exported
``model.keras`` is always the full image -> probability network (the tail shares its layers).

Targets: ``target="melanoma"`` (default, the seed's) trains a binary sigmoid head with
class-weighted binary cross-entropy; ``target="dx"`` trains on the seven diagnoses (softmax
cross-entropy, melanoma and non-melanoma classes weighted like the binary loss) and the model
still outputs the melanoma probability (N, 1) through ``melanoma_logit`` + sigmoid.

Both phases measure validation AUROC on the melanoma probability after every epoch (exact,
scikit-learn), stop early on it (patience 10 by default) and restore the best weights; phase 2
starts from phase 1's weights and keeps them if no fine-tuning epoch beats them. After every
epoch the trained weights, the optimizer state and the early-stopping state go to
``<run_root>/model/checkpoints/``; a rerun of the same run continues from the next epoch.
With ``fine_tune_interpolation`` a < 1 the exported weights are (1 - a) x phase 1's + a x phase
2's (:mod:`training.weight_interpolation`).

The parts live in their own modules: :mod:`training.config` (settings),
:mod:`training.checkpoints`, :mod:`training.activation_cache`, :mod:`training.variants`,
:mod:`training.phases`, :mod:`training.weight_interpolation` and :mod:`training.cpu_turns`; this
one runs them in order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import keras

from melanoma.manifest import require_manifest
from melanoma.storage import Storage, open_storage
from training.activation_cache import training_caches
from training.checkpoints import CHECKPOINTS, check_resumable, read_state
from training.config import TrainConfig
from training.cpu_turns import CpuTurns
from training.data import DX_CLASSES, SplitArrays, class_weights, load_arrays, target_class_weights
from training.ensemble import build_ensemble
from training.machine import numerics
from training.model import build_classifier, weights_provenance
from training.model_io import load_model, load_weights_bytes, save_model
from training.phases import train_phase1, train_phase2
from training.weight_interpolation import interpolate_weights

# TrainConfig and CpuTurns are also imported from here by the DAG's tests and the benchmarks.
__all__ = ["CpuTurns", "TrainConfig", "ensemble_members", "run_ensemble_training", "run_training"]

log = logging.getLogger(__name__)


def _load_data(cfg: TrainConfig) -> tuple[Storage, dict, SplitArrays, SplitArrays]:
    """The manifest's training and validation images, checked to be usable for early stopping."""
    storage = open_storage(cfg.processed_root)
    manifest = require_manifest(storage, as_of=cfg.as_of, version=cfg.manifest_version)
    train = load_arrays(storage, manifest, "train", augmented=True, limit=cfg.limit_train)
    val = load_arrays(storage, manifest, "val", limit=cfg.limit_val)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"manifest v{manifest['version']} has {len(train)} training and {len(val)} validation images: need both"
        )
    if val.labels.min() == val.labels.max():
        raise ValueError(
            "the validation split holds one class only: AUROC (the early-stopping signal) is undefined"
        )
    train.targets(cfg.target)  # a diagnosis outside DX_CLASSES fails here, before any training
    return storage, manifest, train, val


def _resume_state(cfg: TrainConfig, run: Storage) -> dict | None:
    """The checkpoint state to go on from; a run stopped on its time budget is reopened on request."""
    state = read_state(run)
    if (
        cfg.continue_after_budget
        and state
        and state["done"]
        and str(state.get("stop_reason") or "").startswith("time budget")
    ):
        log.info(
            "phase %d stopped on its time budget after epoch %d (%s); continuing it",
            state["phase"],
            state["epoch"] + 1,
            state["stop_reason"],
        )
        state = {**state, "done": False}
    return state


def _train_phases(
    model,
    cfg: TrainConfig,
    run: Storage,
    storage: Storage,
    manifest: dict,
    train: SplitArrays,
    val: SplitArrays,
    weights: dict,
    state: dict | None,
    deadline: float | None,
) -> tuple[dict, dict, float]:
    """Both phases, each resumed or skipped as the state says; returns (history, stop reasons, cache seconds)."""
    phase1_done = bool(state) and (state["phase"] == 2 or state["done"])
    phase2_done = bool(state) and state["phase"] == 2 and state["done"]
    cache_started, waited_before_cache = time.perf_counter(), CpuTurns.waited
    cache = training_caches(
        model, cfg, run, train, val, need_pooled=not phase1_done, need_cut=not phase2_done
    )
    cache_seconds = time.perf_counter() - cache_started - (CpuTurns.waited - waited_before_cache)
    stream_phase2 = cfg.fine_tune_epochs > 0 and not cfg.fine_tune_cache and cfg.limit_train is None
    if stream_phase2 and (cfg.feature_cache or phase1_done):
        train.images = None  # phase 2 streams the shards; nothing else needs the training images in memory
    history: dict[str, dict] = {}
    stop_reason: dict[str, str | None] = {}
    if not phase1_done:
        resume = state if state and state["phase"] == 1 else None
        final = train_phase1(model, cfg, run, train, val, weights, resume, cache, deadline)
        history["phase1"], stop_reason["phase1"] = final["history"], final.get("stop_reason")
    else:
        load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase1-final.weights.h5"))
        history["phase1"] = json.loads(run.read_bytes(f"{CHECKPOINTS}/phase1-history.json"))
        if state["phase"] == 1:
            log.info("phase 1 already finished in a previous attempt; reusing its weights")
    if cfg.fine_tune_epochs > 0:
        if phase2_done:
            load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase2-final.weights.h5"))
            history["phase2"], stop_reason["phase2"] = state["history"], state.get("stop_reason")
        else:
            resume = state if state and state["phase"] == 2 else None
            final = train_phase2(
                model, cfg, run, storage, manifest, train, val, weights, resume, cache, deadline
            )
            history["phase2"], stop_reason["phase2"] = final["history"], final.get("stop_reason")
    return history, stop_reason, cache_seconds


def _interpolate_with_phase1(model, run: Storage, alpha: float) -> None:
    """The model (phase 2's best weights) moved to (1 - alpha) * phase 1's final weights + alpha * its own."""
    end = model.get_weights()
    load_weights_bytes(model, run.read_bytes(f"{CHECKPOINTS}/phase1-final.weights.h5"))
    interpolate_weights(model, model.get_weights(), end, alpha)
    log.info("exported weights: %.2f x phase 2's + %.2f x phase 1's (WiSE-FT)", alpha, 1.0 - alpha)


def _export(
    model, cfg: TrainConfig, run: Storage, manifest: dict, train: SplitArrays, val: SplitArrays, history: dict
) -> dict:
    """model.keras, history.json, config.json and provenance.json of a finished run; returns the provenance."""
    save_model(model, run, "model/model.keras")
    provenance = weights_provenance(model)
    run.write_bytes("model/history.json", json.dumps(history, indent=2).encode())
    run.write_bytes("model/config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str).encode())
    run.write_bytes(
        "model/provenance.json",
        json.dumps(
            {
                **provenance,
                "manifest_version": manifest["version"],
                "preprocessing": manifest.get("preprocessing"),
                "train_images": len(train),
                "val_images": len(val),
                "target": cfg.target,
                "fine_tune_interpolation": cfg.fine_tune_interpolation,
                "machine": numerics(),
                "classes": list(DX_CLASSES) if cfg.target == "dx" else ["other", "melanoma"],
            },
            indent=2,
        ).encode(),
    )
    return provenance


def run_training(cfg: TrainConfig) -> dict:
    """Train (or resume) one run; writes model.keras, history.json, config.json, provenance.json."""
    if cfg.ensemble_size > 1 or cfg.ensemble_colour_mix:
        return run_ensemble_training(cfg)
    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    run = open_storage(cfg.run_root)
    storage, manifest, train, val = _load_data(cfg)
    binary_weights = class_weights(train.labels, cfg.class_weight)
    weights = target_class_weights(binary_weights, cfg.target)
    model = build_classifier(cfg.backbone, cfg.weights, classes=DX_CLASSES if cfg.target == "dx" else None)
    check_resumable(run, cfg)
    log.info(
        "manifest v%s, %d train (%d melanoma incl. augmented), %d val; target %s; class weights %s; backbone %s weights %s",
        manifest["version"],
        len(train),
        int(train.labels.sum()),
        len(val),
        cfg.target,
        binary_weights,
        cfg.backbone,
        cfg.weights,
    )
    waited_before = CpuTurns.waited
    # Seconds spent waiting for the CPU lock do not count against the budget (see CpuTurns).
    deadline = started + cfg.max_train_seconds + waited_before if cfg.max_train_seconds else None
    history, stop_reason, cache_seconds = _train_phases(
        model, cfg, run, storage, manifest, train, val, weights, _resume_state(cfg, run), deadline
    )
    if cfg.fine_tune_interpolation < 1.0:
        _interpolate_with_phase1(model, run, cfg.fine_tune_interpolation)
    provenance = _export(model, cfg, run, manifest, train, val, history)
    best = {phase: max(h.get("val_auroc", [float("nan")]) or [float("nan")]) for phase, h in history.items()}
    return {
        "model_uri": run.uri("model/model.keras"),
        "manifest_version": manifest["version"],
        "backbone": cfg.backbone,
        "target": cfg.target,
        "weights": provenance,
        "best_val_auroc": best,
        "epochs_run": {phase: len(h.get("loss", [])) for phase, h in history.items()},
        "stop_reason": stop_reason,
        "train_seconds": round(time.perf_counter() - started, 1),
        "cache_seconds": round(cache_seconds, 1),
        "cpu_lock_wait_seconds": round(CpuTurns.waited - waited_before, 1),
    }


def ensemble_members(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) of each member: seeds ``seed..seed+n-1`` (``seed-<s>``), then with
    ``ensemble_colour_mix`` the same seeds again with colour jitter on (``seed-<s>-jitter``)."""
    seeds = range(cfg.seed, cfg.seed + cfg.ensemble_size)
    kinds = [("", cfg.train_colour_jitter)] + ([("-jitter", True)] if cfg.ensemble_colour_mix else [])
    return [
        (
            f"seed-{seed}{suffix}",
            dataclasses.replace(
                cfg, seed=seed, train_colour_jitter=jitter, ensemble_size=1, ensemble_colour_mix=False
            ),
        )
        for suffix, jitter in kinds
        for seed in seeds
    ]


def run_ensemble_training(cfg: TrainConfig) -> dict:
    """Train (or resume) every member of :func:`ensemble_members`, then export their ensemble.

    Each member is :func:`run_training` under ``<run_root>/members/<name>`` (each resumes on its
    own); a time budget is shared out as the members go (each gets an equal share of what is
    left). ``model/model.keras`` is :func:`training.ensemble.build_ensemble` of the members;
    ``model/history.json`` and ``provenance.json`` list them.
    """
    started = time.perf_counter()
    run = open_storage(cfg.run_root)
    specs = ensemble_members(cfg)
    members = []
    for index, (name, spec) in enumerate(specs):
        budget = None
        if cfg.max_train_seconds:
            budget = max(0.0, cfg.max_train_seconds - (time.perf_counter() - started)) / (len(specs) - index)
        member_cfg = dataclasses.replace(spec, run_root=run.uri(f"members/{name}"), max_train_seconds=budget)
        log.info("ensemble member %d/%d (%s) under %s", index + 1, len(specs), name, member_cfg.run_root)
        members.append(run_training(member_cfg))
    save_model(
        build_ensemble([load_model(member["model_uri"]) for member in members]), run, "model/model.keras"
    )
    by_member = {name: member for (name, _), member in zip(specs, members)}
    run.write_bytes("model/config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str).encode())
    run.write_bytes(
        "model/history.json",
        json.dumps({name: member["best_val_auroc"] for name, member in by_member.items()}, indent=2).encode(),
    )
    run.write_bytes(
        "model/provenance.json",
        json.dumps(
            {
                "ensemble_of": {name: member["model_uri"] for name, member in by_member.items()},
                "members": {name: member["weights"] for name, member in by_member.items()},
            },
            indent=2,
        ).encode(),
    )
    return {
        "model_uri": run.uri("model/model.keras"),
        "manifest_version": members[0]["manifest_version"],
        "backbone": cfg.backbone,
        "target": cfg.target,
        "ensemble_size": cfg.ensemble_size,
        "ensemble_colour_mix": cfg.ensemble_colour_mix,
        "members": {
            name: {
                key: member[key]
                for key in ("model_uri", "best_val_auroc", "epochs_run", "stop_reason", "train_seconds")
            }
            for name, member in by_member.items()
        },
        "train_seconds": round(time.perf_counter() - started, 1),
        "cpu_lock_wait_seconds": round(sum(member["cpu_lock_wait_seconds"] for member in members), 1),
    }
