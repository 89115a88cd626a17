"""Verification: running exports on the CPU and comparing them with transformers."""
