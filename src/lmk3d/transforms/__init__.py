"""See the package docstring of lmk3d."""
