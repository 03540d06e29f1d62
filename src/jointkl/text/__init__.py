"""jointkl.text."""
