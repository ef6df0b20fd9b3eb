"""Views of a trained autoencoder, as matplotlib figures (``convae show`` saves one as PNG,
``convae report`` puts all of them in one HTML file).

    registry.py    every view by name (REGISTRY), the context views draw from, render_view
    common.py      drawing helpers, image sampling and checks, save_figure
    filters.py     first-layer filters          maps.py        feature maps by depth
    patches.py     top-activating patches       maximize.py    activation maximization
    receptive.py   receptive-field growth       training.py    reconstructions, training curves
    embedding.py   PCA and t-SNE of the code    probe.py       probe accuracy by layer
    outliers.py    worst reconstructed images   interpolate.py between two images' codes
    neighbors.py   similar images as a grid (convae neighbors)

Each view has a function that computes its numbers (``top_patches``, ``maximize_activation``,
``receptive_field_table``, ``embed`` ...) and one that draws them (``*_figure``), so tests and
reports can check the numbers the pictures show. Views that do not apply to a model (feature
maps of the dense autoencoder, whose layers are vectors) raise :class:`ViewNotApplicable`
saying why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

#: The views' names, in the report's order (torch-free, for the command line's choices).
VIEWS: tuple[str, ...] = (
    "curves", "recon", "outliers", "filters", "receptive", "maps", "patches", "maximize", "embedding", "interpolate",
    "probe", "depth",
)  # fmt: skip

if TYPE_CHECKING:
    from .common import (
        OUTSIDE,
        ViewNotApplicable,
        check_images,
        figure_png,
        hierarchy_layers,
        patch_layers,
        sample_indices,
        save_figure,
        view_layers,
    )
    from .depth import depth_figure, depth_rows, layer_depth
    from .embedding import embed, embedding_figure, layer_features
    from .filters import filters_figure, first_layer_weights
    from .interpolate import Interpolation, interpolate_codes, interpolation_figure
    from .maps import feature_maps, feature_maps_figure
    from .maximize import Maximized, maximize_activation, maximize_figure
    from .neighbors import neighbors_figure
    from .outliers import Outliers, outliers_figure, worst_reconstructed
    from .patches import LayerPatches, Patch, crop_patch, patches_figure, top_patches
    from .probe import load_probe_results, probe_figure
    from .receptive import receptive_field_figure, receptive_field_table
    from .registry import REGISTRY, Shown, View, ViewContext, draw, render_view
    from .training import curves_figure, reconstruction_figure

__all__ = [
    "OUTSIDE",
    "REGISTRY",
    "VIEWS",
    "Interpolation",
    "LayerPatches",
    "Maximized",
    "Outliers",
    "Patch",
    "Shown",
    "View",
    "ViewContext",
    "ViewNotApplicable",
    "check_images",
    "crop_patch",
    "curves_figure",
    "depth_figure",
    "depth_rows",
    "draw",
    "embed",
    "embedding_figure",
    "feature_maps",
    "feature_maps_figure",
    "figure_png",
    "filters_figure",
    "first_layer_weights",
    "hierarchy_layers",
    "interpolate_codes",
    "interpolation_figure",
    "layer_depth",
    "layer_features",
    "load_probe_results",
    "maximize_activation",
    "maximize_figure",
    "neighbors_figure",
    "outliers_figure",
    "patch_layers",
    "patches_figure",
    "probe_figure",
    "receptive_field_figure",
    "receptive_field_table",
    "reconstruction_figure",
    "render_view",
    "sample_indices",
    "save_figure",
    "top_patches",
    "view_layers",
    "worst_reconstructed",
]

_EXPORTS = {
    "OUTSIDE": ".common",
    "ViewNotApplicable": ".common",
    "check_images": ".common",
    "crop_patch": ".patches",
    "figure_png": ".common",
    "hierarchy_layers": ".common",
    "patch_layers": ".common",
    "sample_indices": ".common",
    "save_figure": ".common",
    "view_layers": ".common",
    "depth_figure": ".depth",
    "depth_rows": ".depth",
    "layer_depth": ".depth",
    "embed": ".embedding",
    "embedding_figure": ".embedding",
    "layer_features": ".embedding",
    "filters_figure": ".filters",
    "first_layer_weights": ".filters",
    "feature_maps": ".maps",
    "feature_maps_figure": ".maps",
    "Interpolation": ".interpolate",
    "interpolate_codes": ".interpolate",
    "interpolation_figure": ".interpolate",
    "neighbors_figure": ".neighbors",
    "Outliers": ".outliers",
    "outliers_figure": ".outliers",
    "worst_reconstructed": ".outliers",
    "Maximized": ".maximize",
    "maximize_activation": ".maximize",
    "maximize_figure": ".maximize",
    "LayerPatches": ".patches",
    "Patch": ".patches",
    "patches_figure": ".patches",
    "top_patches": ".patches",
    "load_probe_results": ".probe",
    "probe_figure": ".probe",
    "receptive_field_figure": ".receptive",
    "receptive_field_table": ".receptive",
    "REGISTRY": ".registry",
    "Shown": ".registry",
    "View": ".registry",
    "ViewContext": ".registry",
    "draw": ".registry",
    "render_view": ".registry",
    "curves_figure": ".training",
    "reconstruction_figure": ".training",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS, globals())
