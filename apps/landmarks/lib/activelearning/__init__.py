"""Active learning strategies: ``least_confident`` (:mod:`lib.activelearning.least_confident`)."""

from lib.activelearning.least_confident import REDUCTIONS, LeastConfident

__all__ = ["REDUCTIONS", "LeastConfident"]
