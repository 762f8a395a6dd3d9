"""Host allocator settings (jaxft/host.py), probed in a fresh interpreter whose JAX has no threads yet."""

import platform
import subprocess
import sys

import pytest

_PROBE = "from jaxft.host import tune_malloc; print(tune_malloc())"


def _probe(env_extra, monkeypatch):
    for key, value in env_extra.items():
        monkeypatch.setenv(key, value)
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("JAXFT_KEEP_MALLOC", raising=False)
    assert _probe({}, monkeypatch) == "True"


def test_tune_malloc_opt_out(monkeypatch):
    assert _probe({"JAXFT_KEEP_MALLOC": "1"}, monkeypatch) == "False"
