"""Pure-math modality-gap measures (torch only): centroid gap, exact Fréchet distance, MIR.

See ``distances`` for the distances, ``mir`` for the MIR protocol and ``stats`` for
bootstrap intervals over image-text pairs.
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
from regap.gap.stats import (
    BootstrapCI,
    MIRInterval,
    PairTokens,
    StabilityRow,
    bootstrap_mir,
    bootstrap_over_groups,
    mir_stability_table,
    stability_table,
)

__all__ = [
    "DEFAULT_DTYPE",
    "MODES",
    "BootstrapCI",
    "LayerGap",
    "MIRInterval",
    "MIRResult",
    "PairTokens",
    "StabilityRow",
    "bootstrap_mir",
    "bootstrap_over_groups",
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
    "mir_stability_table",
    "norm_outlier_mask",
    "reference_fast_frechet",
    "reference_fast_frechet_from_stats",
    "replace_norm_outliers",
    "stability_table",
    "text_centric_scale",
    "trace_sqrt_product",
]
