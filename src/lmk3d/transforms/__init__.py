"""Landmark-aware transforms: working grids (orientation + resampling), intensity, heatmaps."""
