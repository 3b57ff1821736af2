"""The MLflow run tree: its schema (kinds, tags, prefixes), runs that never stay RUNNING, and the model registry."""
