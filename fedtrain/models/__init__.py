"""Flax nnx models of the standard federated tasks."""
