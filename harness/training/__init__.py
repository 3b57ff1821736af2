"""Training: the one fit loop, the Keras Tuner machinery of a search, and the fine-tuning hypermodel."""
