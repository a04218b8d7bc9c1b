"""mmstack.eval: retrieval, zero-shot and classification metrics and their runners."""

from mmstack.eval.classification import classification_report, format_classification_report
from mmstack.eval.grid import retrieval_grid_png
from mmstack.eval.retrieval import evaluate_retrieval, retrieval_metrics
from mmstack.eval.zeroshot import evaluate_zeroshot

__all__ = [
    "classification_report",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "format_classification_report",
    "retrieval_grid_png",
    "retrieval_metrics",
]
