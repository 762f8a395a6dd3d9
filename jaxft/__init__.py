"""jaxft: fine-tune pretrained Hugging Face models in JAX.

The Python API (jaxft/api.py): `from_recipe`, `preview_data`, `finetune`, `load` (then `.generate`, `.evaluate`),
`setup_logging`; `jaxft.sweep.run` searches hyperparameters and `jaxft.plot.figure` draws runs' curves.
Importing jaxft alone does not start JAX.
"""

__version__ = "0.1.0"

_API = ("DataPreview", "RunResult", "Tuned", "finetune", "from_recipe", "load", "preview_data", "setup_logging")


_SUBMODULES = ("sweep", "plot")  # jaxft.sweep.run(...), jaxft.plot.figure(...) without importing them first


def __getattr__(name):
    if name in _API:
        from jaxft import api
        return getattr(api, name)
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"jaxft.{name}")
    raise AttributeError(f"module 'jaxft' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, *_SUBMODULES])
