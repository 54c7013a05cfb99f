"""Pure-math modality-gap measures (torch only): centroid gap, exact Fréchet distance, MIR.

See ``distances`` for the distances and ``mir`` for the MIR protocol. Measuring a model
(hidden-state collection, bootstrap intervals over pairs, stability tables) lives in
``collect``, ``measure`` and ``run``, which add numpy and the model layer.
"""

from regap.gap.distances import (
    DEFAULT_DTYPE,
    centroid_gap,
    check_tokens,
    cosine_centroid_distance,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    matrix_sqrt_psd,
    reference_fast_frechet,
    reference_fast_frechet_from_stats,
    text_centric_scale,
    trace_sqrt_product,
)
from regap.gap.mir import (
    MODES,
    LayerGap,
    MIRResult,
    layer_gap,
    layer_zero_report,
    mir,
    mir_per_layer,
    norm_outlier_mask,
    replace_norm_outliers,
)

__all__ = [
    "DEFAULT_DTYPE",
    "MODES",
    "LayerGap",
    "MIRResult",
    "centroid_gap",
    "check_tokens",
    "cosine_centroid_distance",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "layer_gap",
    "layer_zero_report",
    "matrix_sqrt_psd",
    "mir",
    "mir_per_layer",
    "norm_outlier_mask",
    "reference_fast_frechet",
    "reference_fast_frechet_from_stats",
    "replace_norm_outliers",
    "text_centric_scale",
    "trace_sqrt_product",
]
