"""Model stage: backbone factory (with the offline weights policy), head factory, and assembling both into one model."""

from harness.models.backbones import build_backbone, weights_status  # noqa: F401
from harness.models.heads import assemble, build_head  # noqa: F401
