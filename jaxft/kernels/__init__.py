"""Pallas kernels, each with an XLA reference beside it and a custom VJP (DESIGN.md, Kernels)."""
