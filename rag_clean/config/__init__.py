"""Configuration decided before a run starts: the model registry, layered settings with provenance, the
run plan built from both, and where the data and storage roots are."""
