"""Analysis of sparse training: gradient flow and comparisons of solutions."""
from .gradient_flow import GradNorm, grad_norm
from .solutions import (InterpolationCurve, PredictionComparison, WeightDistance, compare_predictions, disagreement,
                        ensemble_accuracy, evaluate, interpolate, interpolation_curve, js_divergence, layer_weights,
                        predict_log_proba, recompute_bn_stats, weight_distance)

__all__ = ["GradNorm", "grad_norm", "InterpolationCurve", "PredictionComparison", "WeightDistance",
           "compare_predictions", "disagreement", "ensemble_accuracy", "evaluate", "interpolate",
           "interpolation_curve", "js_divergence", "layer_weights", "predict_log_proba", "recompute_bn_stats",
           "weight_distance"]
