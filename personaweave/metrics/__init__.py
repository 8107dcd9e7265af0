"""Local `evaluate` metric modules (loadable offline by path)."""

import os

TRAIT_METRICS_PATH = os.path.join(os.path.dirname(__file__), "trait_metrics", "trait_metrics.py")


def load_trait_metrics():
    import evaluate

    return evaluate.load(TRAIT_METRICS_PATH)
