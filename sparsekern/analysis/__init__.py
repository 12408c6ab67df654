"""Analysis of sparse training: gradient flow, the layers of a model, comparisons of solutions, and the
statistics of paired comparisons over seeds."""
from .gradient_flow import GradNorm, grad_norm
from .layers import layer_weights, masks_of, prunable_layers
from .solutions import (
                        Evaluation,
                        InterpolationCurve,
                        PredictionComparison,
                        WeightDistance,
                        compare_predictions,
                        disagreement,
                        ensemble_accuracy,
                        evaluate,
                        interpolate,
                        interpolation_curve,
                        js_divergence,
                        predict_log_proba,
                        recompute_bn_stats,
                        weight_distance,
)

__all__ = ["GradNorm", "grad_norm", "Evaluation", "InterpolationCurve", "PredictionComparison", "WeightDistance",
           "compare_predictions", "disagreement", "ensemble_accuracy", "evaluate", "interpolate",
           "interpolation_curve", "js_divergence", "layer_weights", "masks_of", "predict_log_proba",
           "prunable_layers", "recompute_bn_stats", "weight_distance"]
