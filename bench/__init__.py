"""Benchmarks run by hand, as modules from the checkout's root: ``.venv/bin/python -m bench.<name>`` (see common.py)."""
