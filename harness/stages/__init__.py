"""Stages of a study, one module each: search (with the final model), fine-tuning, final model, floor, nested
estimate, source audit, ensembles and champions. Their order is `harness.study.plan`."""
