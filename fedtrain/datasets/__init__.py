"""Standard federated datasets."""
