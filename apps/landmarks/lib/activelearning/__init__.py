"""Active-learning strategies beyond MONAI Label's stock ``random`` and ``first``: e.g. the unlabelled
image the current model is least sure of, from its per-landmark scores (issue 7).
"""
