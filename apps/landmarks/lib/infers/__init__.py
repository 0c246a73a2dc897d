"""Infer tasks: :class:`LandmarkInferTask` (:mod:`lib.infers.task`) serves every detector."""

from lib.infers.task import LABEL_EXTENSIONS, LandmarkInferTask, SrStore, make_infer_task

__all__ = ["LABEL_EXTENSIONS", "LandmarkInferTask", "SrStore", "make_infer_task"]
