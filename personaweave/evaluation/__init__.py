"""Evaluation: metrics, the persona classifier, text signals and the evaluation harness."""

from personaweave.evaluation.classifier import PersonaClassifier, classifier_accuracy, train_persona_classifier
from personaweave.evaluation.metrics import distinct_n, example_similarity, load_trait_metrics, perplexity

__all__ = [
    "PersonaClassifier",
    "classifier_accuracy",
    "distinct_n",
    "example_similarity",
    "load_trait_metrics",
    "perplexity",
    "train_persona_classifier",
]
