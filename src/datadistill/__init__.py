"""datadistill: data distillation (Radosavovic et al., CVPR 2018) for object and keypoint detectors."""

from __future__ import annotations

__version__ = "0.1.0"
