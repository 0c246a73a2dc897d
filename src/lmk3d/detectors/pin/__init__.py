"""``pin``: the Patch-based Iterative Network (Li et al., MICCAI 2018); the method is described in
:mod:`lmk3d.detectors.pin.detector`."""

from __future__ import annotations

from lmk3d.detectors.pin.config import PROFILES, PinConfig
from lmk3d.detectors.pin.detector import PinDetector
from lmk3d.detectors.pin.sampling import PinImage, canonical_frame, extract_patches, plane_offsets, update_step
from lmk3d.detectors.pin.stages import PinIterate, PinStart, PinUnit, build_net, level_name
from lmk3d.detectors.pin.training import reachable, resolve_settings, training_params

__all__ = ["PROFILES", "PinConfig", "PinDetector", "PinImage", "PinIterate", "PinStart", "PinUnit", "build_net",
           "canonical_frame", "extract_patches", "level_name", "plane_offsets", "reachable", "resolve_settings",
           "training_params", "update_step"]
