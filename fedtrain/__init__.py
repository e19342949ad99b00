"""fedtrain: federated learning simulation on JAX."""
