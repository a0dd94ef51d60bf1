"""One command line for the training runtime: ``python -m training <command>``.

The same CLI runs as a local subprocess (embedded default) and inside the training
container (``DockerOperator``). Every command ends by printing one line
``RESULT {json}``: the small result the Airflow task pushes to XCom.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from melanoma.settings import RESULT_PREFIX, SETTINGS, THRESHOLD_STRATEGIES


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _json_names(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError("expected a JSON list of folder names")
    return value


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train (or resume) a run's model")
    train.add_argument("--processed-root", required=True)
    train.add_argument("--run-root", required=True)
    train.add_argument("--config", type=_json_arg, default={}, help="JSON object of TrainConfig fields")


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="metrics on val/test, threshold chosen on val")
    evaluate.add_argument("--processed-root", required=True)
    evaluate.add_argument("--run-root", required=True)
    evaluate.add_argument(
        "--strategy", default=SETTINGS["threshold_strategy"].default, choices=THRESHOLD_STRATEGIES
    )
    evaluate.add_argument("--target-sensitivity", type=float, default=SETTINGS["target_sensitivity"].default)
    evaluate.add_argument("--n-boot", type=int, default=SETTINGS["n_boot"].default)
    evaluate.add_argument(
        "--pooling",
        default="lesion",
        choices=["lesion", "none"],
        help="lesion: score each image by its lesion's pooled score (mean logit of its images)",
    )
    evaluate.add_argument(
        "--test-time-augmentation",
        action="store_true",
        help=SETTINGS["test_time_augmentation"].description,
    )
    evaluate.add_argument("--as-of", default=None)
    evaluate.add_argument(
        "--manifest-version", type=int, default=None, help="exactly this manifest (wins over --as-of)"
    )
    evaluate.add_argument("--external", action="append", default=[], help="RAW_ROOT::DROP_ID, repeatable")


def _add_gradcam(commands) -> None:
    gradcam = commands.add_parser("gradcam", help="Grad-CAM heatmaps and lesion focus on the test split")
    gradcam.add_argument("--processed-root", required=True)
    gradcam.add_argument("--run-root", required=True)
    gradcam.add_argument(
        "--threshold", type=_json_arg, required=True, help="the evaluate step's XCom payload"
    )
    gradcam.add_argument("--as-of", default=None)
    gradcam.add_argument(
        "--manifest-version", type=int, default=None, help="exactly this manifest (wins over --as-of)"
    )
    gradcam.add_argument("--layer", default=None)
    gradcam.add_argument("--plusplus", action="store_true")


def _add_report(commands) -> None:
    report = commands.add_parser("report", help="one self-contained report.html for the run")
    report.add_argument("--run-root", required=True)
    report.add_argument("--threshold", type=_json_arg, required=True)


def _add_promote(commands) -> None:
    promote = commands.add_parser(
        "promote", help="register the run's model; make it champion only if it passes the gate"
    )
    promote.add_argument("--processed-root", required=True)
    promote.add_argument("--run-root", required=True)
    promote.add_argument(
        "--threshold", type=_json_arg, required=True, help="the evaluate step's XCom payload"
    )
    promote.add_argument(
        "--min-val-auroc", type=float, default=SETTINGS["promote_min_val_auroc"].default, help="the floor"
    )
    promote.add_argument(
        "--margin",
        type=float,
        default=SETTINGS["promote_margin"].default,
        help="over the champion's val AUROC",
    )
    promote.add_argument("--as-of", default=None)
    promote.add_argument(
        "--manifest-version", type=int, default=None, help="exactly this manifest (wins over --as-of)"
    )


def _add_store(command) -> None:
    """Where the registry is: the same two options for every command that reads it."""
    command.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else --data-root's"
    )
    command.add_argument("--data-root", default="output/data", help="the embedded store's data root")


def _add_registry(commands) -> None:
    registry = commands.add_parser("registry", help="list the registered models; force-promote; roll back")
    registry.add_argument("action", choices=["list", "force-promote", "rollback"])
    registry.add_argument("--version", type=int, default=None, help="the model version to make champion")
    registry.add_argument("--reason", default="", help="kept in the registry's audit tags")
    _add_store(registry)


def _add_score(commands) -> None:
    score = commands.add_parser(
        "score", help="score new images of inbox folders with the champion (or a model)"
    )
    score.add_argument(
        "--inbox-root", required=True, help="folder or URI whose subfolders are drops of new images"
    )
    score.add_argument("--scores-root", required=True, help="scores go to <scores root>/<drop>/")
    score.add_argument(
        "--drops", type=_json_names, default=None, help="JSON list; default: every unscored folder"
    )
    score.add_argument(
        "--model", default="champion", help="as predict's --model (a run's model.keras, or registered)"
    )
    _add_store(score)


def _add_ensemble(commands) -> None:
    ensemble = commands.add_parser(
        "ensemble", help="one model averaging the melanoma logits of trained models"
    )
    ensemble.add_argument(
        "--member",
        action="append",
        required=True,
        help="path or URI of a member's model.keras, repeatable (2 or more)",
    )
    ensemble.add_argument("--output", required=True, help="path or URI of the ensemble's model.keras")


def _add_predict(commands) -> None:
    predict = commands.add_parser("predict", help="score a folder of images with a trained model")
    predict.add_argument(
        "--model",
        required=True,
        help="champion, models:/melanoma-classifier@<alias> or /<version>, or a path or URI of model.keras",
    )
    _add_store(predict)
    predict.add_argument(
        "--input", required=True, help="folder or URI of images (bare, or a drop in either layout)"
    )
    predict.add_argument("--output", required=True, help="folder or URI for predictions.csv")
    predict.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold; default: the run's own (chosen on validation), or --site's",
    )
    predict.add_argument(
        "--site", default=None, help="use the threshold calibrated for this site (calibrate-site)"
    )
    predict.add_argument("--overlays", action="store_true", help="also write a Grad-CAM overlay per image")
    predict.add_argument(
        "--lesions",
        default=None,
        help="CSV with image_id,lesion_id (e.g. HAM10000_metadata.csv): pool the scores per lesion, as evaluate does",
    )


def _add_calibrate_site(commands) -> None:
    site = commands.add_parser(
        "calibrate-site", help="re-choose the run's threshold on a labelled drop of a new site"
    )
    site.add_argument("--processed-root", required=True)
    site.add_argument("--run-root", required=True)
    site.add_argument("--site", required=True, help="a name for the site (letters, digits, _ . -)")
    site.add_argument(
        "--labelled-drop",
        required=True,
        help="RAW_ROOT::DROP_ID of labelled images from that site (either layout)",
    )
    site.add_argument("--strategy", default=None, choices=THRESHOLD_STRATEGIES, help="default: the run's own")
    site.add_argument("--target-sensitivity", type=float, default=0.85)
    site.add_argument("--n-boot", type=int, default=1000)
    site.add_argument("--as-of", default=None)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training`` parser; each subcommand's arguments come from its ``_add_<command>``."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (
        _add_train,
        _add_evaluate,
        _add_gradcam,
        _add_report,
        _add_promote,
        _add_registry,
        _add_score,
        _add_ensemble,
        _add_predict,
        _add_calibrate_site,
    ):
        add_command(commands)
    return parser


def run(args: argparse.Namespace) -> dict:
    # Each command imports its own module here, deliberately: most load Keras and TensorFlow
    # (seconds), which ``--help``, a bad argument and ``report`` should not wait for.
    if args.command == "train":
        from training.train import TrainConfig, run_training

        config = TrainConfig.from_dict(
            {"processed_root": args.processed_root, "run_root": args.run_root, **args.config}
        )
        return run_training(config)
    if args.command == "evaluate":
        from training.tasks import evaluate_run

        return evaluate_run(
            args.processed_root,
            args.run_root,
            strategy=args.strategy,
            target_sensitivity=args.target_sensitivity,
            n_boot=args.n_boot,
            as_of=args.as_of,
            external=args.external,
            pooling=args.pooling,
            manifest_version=args.manifest_version,
            test_time_augmentation=args.test_time_augmentation,
        )
    if args.command == "gradcam":
        from training.tasks import gradcam_run

        return gradcam_run(
            args.processed_root,
            args.run_root,
            args.threshold,
            as_of=args.as_of,
            layer_name=args.layer,
            plusplus=args.plusplus,
            manifest_version=args.manifest_version,
        )
    if args.command == "report":
        from training.tasks import report_run

        return report_run(args.run_root, args.threshold)
    if args.command == "promote":
        return _promote(args)
    if args.command == "registry":
        return _registry(args)
    if args.command == "score":
        return _score(args)
    if args.command == "ensemble":
        from training.ensemble import save_ensemble

        return save_ensemble(args.member, args.output)
    if args.command == "predict":
        return _predict(args)
    if args.command == "calibrate-site":
        from training.tasks import calibrate_site_run

        return calibrate_site_run(
            args.processed_root,
            args.run_root,
            args.site,
            args.labelled_drop,
            strategy=args.strategy,
            target_sensitivity=args.target_sensitivity,
            n_boot=args.n_boot,
            as_of=args.as_of,
        )
    raise AssertionError(args.command)


def _store(args: argparse.Namespace) -> str:
    """The registry's store: --tracking-uri, MLFLOW_TRACKING_URI, else the embedded one of --data-root."""
    from training.tracking import store_of_data_root

    return args.tracking_uri or store_of_data_root(args.data_root)


def _model_to_score(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(model file URI, registry name or None)``: a registered model resolves to its run's file."""
    if args.model != "champion" and not args.model.startswith("models:/"):
        return args.model, None
    from training.registry import resolve_registered

    return resolve_registered(args.model, _store(args))


def _predict(args: argparse.Namespace) -> dict:
    from training.predict import predict_folder, read_lesion_map

    lesion_of = read_lesion_map(args.lesions) if args.lesions else None
    model_uri, model_name = _model_to_score(args)
    # The interactive command: progress bars on a terminal (log lines elsewhere).
    return predict_folder(
        model_uri,
        args.input,
        args.output,
        threshold=args.threshold,
        overlays=args.overlays,
        lesion_of=lesion_of,
        site=args.site,
        bar=True,
        model_name=model_name,
    )


def _promote(args: argparse.Namespace) -> dict:
    from training.registry import promote_run
    from training.tasks import report_run

    decision = promote_run(
        args.processed_root,
        args.run_root,
        args.threshold,
        min_val_auroc=args.min_val_auroc,
        margin=args.margin,
        as_of=args.as_of,
        manifest_version=args.manifest_version,
    )
    report_run(args.run_root, args.threshold)  # the report shows the decision now
    _record("report", args.run_root, {})  # and so does the tracked copy
    return decision


def _score(args: argparse.Namespace) -> dict:
    from melanoma.drops import unscored_drops
    from melanoma.storage import open_storage
    from training.scoring import score_drops

    drops = args.drops
    if drops is None:
        drops = unscored_drops(open_storage(args.inbox_root), open_storage(args.scores_root))
    if not drops:
        return {"model": None, "scores_root": args.scores_root, "drops": {}}
    model_uri, model_name = _model_to_score(args)
    return score_drops(args.inbox_root, args.scores_root, drops, model_uri, model_name or model_uri)


def _registry(args: argparse.Namespace) -> dict:
    from training import registry

    uri = _store(args)
    if args.action == "list":
        return {"tracking_uri": uri, "versions": registry.registry_versions(uri)}
    if args.version is None:
        raise ValueError(f"registry {args.action} needs --version")
    if args.action == "force-promote":
        return registry.force_promote(uri, args.version, args.reason)
    return registry.rollback(uri, args.version, args.reason)


def _record(step: str, run_root: str, result: dict) -> dict:
    """Add the step's outputs to the run's MLflow run (training.tracking)."""
    from training.tracking import record_step

    return record_step(step, run_root, result)


#: The steps of a pipeline run whose outputs go to the tracking store.
TRACKED = ("train", "evaluate", "gradcam", "report")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Log lines (progress, warnings such as a score shift) go to stderr; stdout keeps the RESULT line.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        result = run(args)
        if args.command in TRACKED:
            result = {**result, "tracking": _record(args.command, args.run_root, result)}
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Expected failures (bad data, missing inputs) get one clear line, not a stack trace.
        print(f"error: {args.command}: {error}", file=sys.stderr)
        return 2
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
