"""The Python API's docstring examples (jaxft/api.py, jaxft.config.from_recipe, jaxft.sweep.run) run as written,
from the repository root, sharing one temporary directory: finetune's run is the one load, generate and evaluate
use."""

import doctest
import logging

import pytest

import jaxft
from jaxft import api, config, plot
from jaxft.sweep import search
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("xla_cache")

# The order the examples run in: later ones use what earlier ones made.
ORDER = ["config.from_recipe", "api.setup_logging", "api.preview_data", "api.finetune", "RunResult.history",
         "RunResult.plot", "plot.figure", "RunResult.load", "api.load", "Tuned.generate", "Tuned.evaluate",
         "search.run"]


def _examples():
    finder = doctest.DocTestFinder()
    found = [t for module in (config, api, plot, search) for t in finder.find(module) if t.examples]
    found = [t for t in found if ".".join(t.name.split(".")[-2:]) in ORDER]
    return sorted(found, key=lambda t: ORDER.index(".".join(t.name.split(".")[-2:])))


def test_every_public_function_has_an_example():
    assert [".".join(t.name.split(".")[-2:]) for t in _examples()] == ORDER
    import inspect
    public = [f"{getattr(api, n).__module__.split('.')[-1]}.{n}" for n in api.__all__
              if inspect.isfunction(getattr(api, n))]  # from_recipe lives in jaxft/config.py
    public += [f"{cls.__name__}.{n}" for cls in (api.RunResult, api.Tuned) for n, f in vars(cls).items()
               if inspect.isfunction(f) and not n.startswith("_")]
    assert set(public) <= set(ORDER), set(public) - set(ORDER)
    assert set(api.__all__) <= set(dir(jaxft)) and jaxft.preview_data is api.preview_data


@pytest.mark.slow
def test_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    shared = {"tmp": tmp_path}
    logger = logging.getLogger("jaxft")
    level, propagate = logger.level, logger.propagate
    for test in _examples():
        module_names = set(test.globs)
        test.globs.update({k: v for k, v in shared.items() if k not in module_names})
        runner.run(test, clear_globs=False)
        shared.update({k: v for k, v in test.globs.items() if k not in module_names})  # what the example made
        # setup_logging's example leaves jaxft printing its progress, which the later examples would show as output.
        logger.handlers = [h for h in logger.handlers if not getattr(h, "_jaxft", False)]
        logger.setLevel(level)
        logger.propagate = propagate
    assert runner.summarize(verbose=False).failed == 0
