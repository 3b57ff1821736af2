"""Evaluation: metrics with confidence intervals, calibration, clinical operating points and decision curves, and
where a model looks (Grad-CAM)."""
