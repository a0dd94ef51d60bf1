"""Experiment: phase-2 regularisation on the quality benchmark's cached activations.

    python research/2026-11-model-selection/experiment_phase2.py --name NAME [--mixup ALPHA] [--weight-decay WD] [--epochs N]

Starts from a benchmark run's phase-1 weights and its cached activations at the input of
the last ``--fine-tune-blocks`` blocks (``--run``, default ``benchmarks/work/quality/runs/bench``,
written by ``make bench-quality`` with that many blocks), trains phase 2 like the benchmark
(dx target, lr 3e-4, x0.3 after 2 epochs without a better val AUROC, 4 flip variants,
class-weighted), optionally with mixup of
the cached activations (manifold mixup at the cut) and AdamW weight decay, and keeps every
epoch's weights so that averages over epoch windows (stochastic weight averaging, one model)
can be scored afterwards. Only the VALIDATION split is scored: this is where a choice is made.
Writes ``research/2026-11-model-selection/results/experiment_phase2-NAME.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent  # research/2026-11-model-selection
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WORK = ROOT / "benchmarks" / "work" / "quality"
FLIP_CACHES = ("train", "train-flip1", "train-flip2", "train-flip3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--mixup", type=float, default=0.0, help="Beta(alpha, alpha) mixing of cached activations; 0: off")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay; 0: Adam")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", default=str(WORK / "runs" / "bench"), help="the bench-quality run whose weights and caches to start from")
    parser.add_argument("--fine-tune-blocks", type=int, default=5, help="as in that run (its cache sits at these blocks' input)")
    args = parser.parse_args(argv)

    import keras
    from sklearn.metrics import average_precision_score, roc_auc_score

    from melanoma.manifest import latest_manifest
    from melanoma.storage import open_storage
    from training.data import DX_CLASSES, class_weights, load_arrays, target_class_weights
    from training.model import build_classifier, unfreeze_last_blocks
    from training.train import _load_weights_bytes, epoch_order, fine_tune_cut

    keras.utils.set_random_seed(args.seed)
    model = build_classifier("efficientnet_lite0", "imagenet", classes=DX_CLASSES)
    start = fine_tune_cut(model, args.fine_tune_blocks)
    checkpoints = Path(args.run) / "model" / "checkpoints"
    caches = {name: checkpoints / f"features-{name}-{start._keras_history.operation.name}.npy" for name in (*FLIP_CACHES, "val")}
    needed = [checkpoints / "phase1-final.weights.h5", *caches.values()]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        parser.error(f"{args.run} is not a finished 4-flip bench-quality run with {args.fine_tune_blocks} fine-tuned blocks; "
                     f"missing {missing}")
    storage = open_storage(str(WORK / "data"))
    manifest = latest_manifest(storage)
    train = load_arrays(storage, manifest, "train", augmented=True)
    val = load_arrays(storage, manifest, "val")
    train_y = train.targets("dx")
    val_y = val.labels.astype(np.float64)
    weights = target_class_weights(class_weights(train.labels, "balanced"), "dx")
    sample_weight = np.array([weights[int(c)] for c in train_y], np.float32)
    train.images = val.images = None

    _load_weights_bytes(model, needed[0].read_bytes())
    unfreeze_last_blocks(model, args.fine_tune_blocks)
    trainee = keras.Model(start, model.get_layer("dx_logits").output)
    scorer = keras.Model(start, model.output)
    if args.weight_decay:
        optimizer = keras.optimizers.AdamW(args.learning_rate, weight_decay=args.weight_decay, beta_1=0.9, beta_2=0.999)
    else:
        optimizer = keras.optimizers.Adam(args.learning_rate, beta_1=0.9, beta_2=0.999)
    trainee.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))

    variants = [np.load(caches[name], allow_pickle=False) for name in FLIP_CACHES]
    val_x = np.load(caches["val"], allow_pickle=False).astype(np.float32)
    one_hot = np.eye(len(DX_CLASSES), dtype=np.float32)[train_y]
    rng = np.random.default_rng([args.seed, 77])

    def score() -> dict:
        p = scorer.predict(val_x, batch_size=64, verbose=0).reshape(-1)
        return {"auroc": float(roc_auc_score(val_y, p)), "auprc": float(average_precision_score(val_y, p))}

    snapshots, history = [], []
    best, wait = score()["auroc"], 0
    print(f"start: val AUROC {best:.4f}", flush=True)
    for epoch in range(args.epochs):
        started = time.perf_counter()
        order = epoch_order(len(train_y), args.seed, 2, epoch)
        x = variants[epoch % 4][order].astype(np.float32)
        y, w = one_hot[order], sample_weight[order]
        if args.mixup:
            lam = rng.beta(args.mixup, args.mixup, size=len(x)).astype(np.float32)
            lam = np.maximum(lam, 1 - lam)  # the first sample dominates: its flip variant and label stay the main signal
            partner = rng.permutation(len(x))
            x = lam.reshape(-1, 1, 1, 1) * x + (1 - lam.reshape(-1, 1, 1, 1)) * x[partner]
            y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
            w = lam * w + (1 - lam) * w[partner]
        result = trainee.fit(x, y, sample_weight=w, batch_size=32, epochs=1, shuffle=False, verbose=0)
        metrics = score()
        snapshots.append([np.array(v) for v in trainee.get_weights()])
        improved = metrics["auroc"] > best
        best, wait = (metrics["auroc"], 0) if improved else (best, wait + 1)
        lr = float(np.asarray(trainee.optimizer.learning_rate))
        if not improved and wait % 2 == 0:
            trainee.optimizer.learning_rate.assign(lr * 0.3)
        history.append({"epoch": epoch + 1, "loss": float(result.history["loss"][-1]), "lr": lr, **metrics,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(history[-1]), flush=True)

    # Stochastic weight averaging: the mean of the weights of epochs first..last (1-based).
    current = trainee.get_weights()
    averages = []
    best_epoch = max(history, key=lambda h: h["auroc"])["epoch"]
    windows = sorted({(first, last) for last in {best_epoch, args.epochs} for first in range(1, last - 1)})
    for first, last in windows:
        trainee.set_weights([np.mean([s[i] for s in snapshots[first - 1 : last]], axis=0) for i in range(len(current))])
        averages.append({"first": first, "last": last, **score()})
    trainee.set_weights(current)
    averages.sort(key=lambda a: -a["auroc"])
    result = {"experiment": "phase2-regularisation", "name": args.name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "settings": vars(args), "history": history, "best_single": max(history, key=lambda h: h["auroc"]),
              "best_averages": averages[:10],
              "averages_to_last_epoch": sorted((a for a in averages if a["last"] == args.epochs), key=lambda a: a["first"])}
    out = HERE / "results" / f"experiment_phase2-{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"best_single": result["best_single"], "best_averages": averages[:5]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
