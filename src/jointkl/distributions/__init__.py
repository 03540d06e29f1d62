"""jointkl.distributions."""
