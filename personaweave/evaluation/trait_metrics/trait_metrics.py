"""Trait regression metrics as an `evaluate` module: MAE, Pearson per trait, share within 0.1.

Loaded offline from this file: `evaluate.load(personaweave.evaluation.trait_metrics.TRAIT_METRICS_PATH)`.
Targets may hold NaN where a trait is unknown (e.g. the essays label five of the ten).
"""

import datasets
import evaluate
import numpy as np

TRAITS = ("extraversion", "agreeableness", "conscientiousness", "neuroticism", "openness",
          "humor", "empathy", "formality", "enthusiasm", "supportiveness")


class TraitMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="MAE, per-trait Pearson r and the share of traits within a tolerance of the target.",
            citation="",
            inputs_description="predictions, references: lists of 10 floats in [0, 1] (NaN = unknown).",
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float32")),
                "references": datasets.Sequence(datasets.Value("float32")),
            }),
        )

    def _compute(self, predictions, references, tolerance: float = 0.1):
        pred = np.asarray(predictions, dtype=float)
        ref = np.asarray(references, dtype=float)
        known = np.isfinite(ref)
        err = np.abs(pred - np.where(known, ref, 0.0)) - 1e-6  # inputs arrive as float32
        out = {"mae": float((err[known] + 1e-6).mean()) if known.any() else float("nan"),
               "within_tolerance": float((err[known] <= tolerance).mean()) if known.any() else float("nan")}
        for i, trait in enumerate(TRAITS[: pred.shape[1]]):
            rows = known[:, i]
            if rows.sum() > 2 and np.std(ref[rows, i]) > 0 and np.std(pred[rows, i]) > 0:
                out[f"pearson_{trait}"] = float(np.corrcoef(pred[rows, i], ref[rows, i])[0, 1])
        return out
