"""The external test sets (other clinics and devices): which drops, and their figures in quality.json."""

from __future__ import annotations

from benchmarks.quality_common import SHARED

#: External test sets (other clinics and devices) under ../shared/data, evaluated at the HAM
#: validation threshold and never used to train or choose anything; PH² has lesion masks.
EXTERNAL_DROPS = "ph2,isic_uda1_sample"
EXTERNAL_TARGET = {"ph2": {"auroc": 0.85, "sensitivity": 0.70}}


def external_specs(names: str) -> list[str]:
    """``RAW_ROOT::DROP_ID`` of each external drop named (comma-separated; empty or "none": none)."""
    drops = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    missing = [d for d in drops if not (SHARED / d).is_dir()]
    if missing:
        raise SystemExit(f"external drop(s) {missing} not found under {SHARED} (see README: ../shared/data)")
    return [f"{SHARED}::{d}" for d in drops]


def external_fields(metrics: dict, focus: dict) -> dict:
    """Per external drop: discrimination with CIs, the HAM-validation operating point there,
    the score shift against validation, what site calibration gives out of fold, lesion focus."""
    out = {}
    for name, block in (metrics.get("external") or {}).items():
        site = block.get("site_calibration") or {}
        shift = block.get("score_shift") or {}
        out[name] = {
            "n_images": block["n_images"],
            "n_melanoma": block["n_melanoma"],
            **{
                key: {
                    "value": block[key]["value"],
                    "ci_low": block[key]["ci_low"],
                    "ci_high": block[key]["ci_high"],
                }
                for key in ("auroc", "auprc", "sensitivity", "specificity")
            },
            "calibration": {k: block["calibration"][k] for k in ("brier", "ece")},
            "score_shift": {
                k: shift.get(k)
                for k in (
                    "shifted",
                    "ks_statistic",
                    "p_value",
                    "median_logit_shift",
                    "positive_rate",
                    "reference_positive_rate",
                )
            },
            "score_quantiles": block.get("score_quantiles"),
            "site_calibration": {
                k: site.get(k)
                for k in ("threshold", "threshold_ci", "held_out", "strategy", "skipped")
                if k in site
            },
            "lesion_focus": (focus.get(name) or {}).get("check"),
            "target": EXTERNAL_TARGET.get(name),
        }
        if name in EXTERNAL_TARGET:
            target = EXTERNAL_TARGET[name]
            out[name]["target_met"] = (
                block["auroc"]["value"] >= target["auroc"]
                and block["sensitivity"]["value"] >= target["sensitivity"]
            )
    return out
