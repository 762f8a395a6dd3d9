"""Shared test settings. Tests run on CPU; JAX is imported by the test modules after this."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jaxft" / "assets" / "quickstart"
