"""Artifact analysis and object discovery for vit_registers models (Darcet et al. 2024; Siméoni et al. 2021).

Token norms and high-norm outliers, neighbour similarity, attention maps of CLS and registers, PCA of patch
features, LOST boxes and CorLoc, and the matplotlib figures shown by the CLI and the Space.

The figure functions are imported from `figures` on first use, so that the computations (corloc, find-register-neurons,
`vit_registers.interventions`) do not import matplotlib.
"""

from .._lazy import lazy_names
from .attention import (
    AttentionMaps,
    AverageAttention,
    attention_flow,
    attention_maps,
    dataset_average_maps,
    maps_from_weights,
    top_mass_mask,
    upsample,
)
from .corloc import CorLocResult, DatasetError, evaluate_corloc, read_box_dataset
from .images import (
    ImageError,
    PreparedImage,
    load_image,
    prepare_image,
    prepare_with_processor,
    target_short_side,
    to_rgb,
)
from .loading import ModelLoadError, default_device, load_model
from .lost import LostResult, box_iou, capture_qkv, connected_component, corloc, lost, lost_boxes, lost_features
from .neighbors import input_patch_embeddings, neighbor_similarity, similarity_by_label
from .norms import group_norms, layer_norms, norm_stats_per_layer, patch_norm_map, token_norms
from .outliers import (
    OutlierVerdict,
    first_separating_layer,
    outlier_fraction,
    outlier_mask,
    outlier_threshold,
    outlier_verdict,
    percentile_threshold,
    rule_thresholds,
    separation_ratios,
    sigma_threshold,
)
from .pca import foreground_mask, pca, pca_rgb, whitened_first_component
from .pipeline import ImageAnalysis, LayerOutliers, analyze_batch, judge_outliers, label_outliers, layer_outliers
from .tokens import TokenLayout, run_model

__getattr__, __dir__ = lazy_names(
    __name__, {"figures": ["attention_figure", "lost_figure", "norm_figure", "pca_figure", "save_figure"]}
)

__all__ = [
    "AttentionMaps",
    "AverageAttention",
    "CorLocResult",
    "DatasetError",
    "ImageAnalysis",
    "LayerOutliers",
    "OutlierVerdict",
    "ImageError",
    "LostResult",
    "ModelLoadError",
    "default_device",
    "load_model",
    "PreparedImage",
    "TokenLayout",
    "analyze_batch",
    "attention_figure",
    "attention_flow",
    "attention_maps",
    "box_iou",
    "capture_qkv",
    "connected_component",
    "corloc",
    "dataset_average_maps",
    "evaluate_corloc",
    "first_separating_layer",
    "foreground_mask",
    "group_norms",
    "input_patch_embeddings",
    "judge_outliers",
    "label_outliers",
    "layer_outliers",
    "layer_norms",
    "load_image",
    "lost",
    "lost_boxes",
    "lost_features",
    "lost_figure",
    "maps_from_weights",
    "neighbor_similarity",
    "norm_figure",
    "norm_stats_per_layer",
    "outlier_fraction",
    "outlier_mask",
    "outlier_threshold",
    "outlier_verdict",
    "patch_norm_map",
    "pca",
    "pca_figure",
    "pca_rgb",
    "percentile_threshold",
    "prepare_image",
    "prepare_with_processor",
    "read_box_dataset",
    "rule_thresholds",
    "run_model",
    "save_figure",
    "separation_ratios",
    "sigma_threshold",
    "target_short_side",
    "similarity_by_label",
    "to_rgb",
    "token_norms",
    "top_mass_mask",
    "upsample",
    "whitened_first_component",
]
