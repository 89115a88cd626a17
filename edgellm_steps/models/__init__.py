"""Per-architecture knowledge: one spec per family, and tiny real checkpoints made locally."""
