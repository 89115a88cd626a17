"""The LLM export: graph builder, decoder graph and its I/O, sidecars, chat template."""
