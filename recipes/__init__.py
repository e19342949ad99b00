"""Experiment recipes: ml_collections configs, one per task x algorithm."""
