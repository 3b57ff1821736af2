"""Features: the per-image store of a frozen backbone's outputs, and everything a fit needs prepared before it."""
