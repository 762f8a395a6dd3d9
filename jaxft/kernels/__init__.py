"""Pallas kernels, each with an XLA reference beside it, a custom VJP and a dispatch
(`kernel="auto"|"pallas"|"xla"`)."""
