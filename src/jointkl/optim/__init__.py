"""jointkl.optim."""
