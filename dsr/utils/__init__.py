"""Small helpers shared across entry points."""
