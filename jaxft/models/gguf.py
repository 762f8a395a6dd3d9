"""Models in GGUF form (llama.cpp's file format): `model.path` may name a `.gguf` file.

jaxft reads Hugging Face directories (config.json + safetensors), so a GGUF is turned into one, once:
transformers' GGUF loader dequantises its weights to float32 and builds its tokenizer, and the result is
written to a cache directory (`dequantised_dir`) that everything else reads as an ordinary model directory.

- Where: `$JAXFT_CACHE/gguf/<name>-<key>/`, else `$XDG_CACHE_HOME/jaxft/gguf/...`, else
  `~/.cache/jaxft/gguf/...`. The key hashes the file's size, modification time and its first and last MiB, so
  a changed file converts again and a second run with the same file reuses the copy (the log says which).
- Atomic: the copy is written to a temporary directory beside it and renamed into place, so an interrupted
  conversion leaves no directory that passes for a finished one; of two processes converting the same file at
  once, the first rename wins and the other discards its copy.
- Multi-host: every process converts into its own cache, as it would any local file. Hosts rarely share a
  disk, so making process 0 convert for the others would need one; converting on each host costs the same
  wall time, in parallel, and needs nothing shared.
- dtype: float32 always. Dequantised values (a scale times a small integer, plus an offset) are exact in
  float32 and not in bfloat16; loading casts each tensor to `model.param_dtype` as it is read, so the copy does
  not depend on run settings and one copy serves every run. The price is disk and the conversion's memory:
  4 bytes per parameter.

Needs `torch` and `gguf` (transformers' loader is written in torch); a missing one is a ModelLoadError that
says what to install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxft.errors import ModelLoadError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
SUFFIX = ".gguf"
_FORMAT = 1  # bump when the converted directory's layout changes, so old copies are not reused
_PROBE = 1 << 20  # bytes hashed from each end of the file
_PROVENANCE = "jaxft_gguf.json"
# GGUF names an architecture as llama.cpp does; transformers loads a few under another model_type.
_HF_MODEL_TYPE = {"gemma3": "gemma3_text"}
_reported: set[Path] = set()  # copies whose reuse this process has logged (the model path resolves several times)


def is_gguf(path) -> bool:
    """Whether `path` is meant as a GGUF file: named `*.gguf`, or an existing file that starts with GGUF's magic."""
    if str(path).lower().endswith(SUFFIX):
        return True
    return os.path.isfile(path) and _starts_with_magic(Path(path))


def dequantised_dir(path) -> Path:
    """The Hugging Face directory converted from the GGUF file at `path`: the cached copy, or a new one."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist; set model.path to an existing .gguf file or "
                             f"a Hugging Face model directory")
    architecture = read_architecture(source)
    target = cache_root() / f"{_safe_name(source.stem)}-{cache_key(source)}"
    if target.is_dir():
        if target not in _reported:
            log.info("GGUF %s: reusing its dequantised copy in %s", source, target)
            _reported.add(target)
        return target
    _check_supported(source, architecture)
    start = time.perf_counter()
    log.info("GGUF %s (%s): dequantising it to float32 into %s (once; later runs reuse it)", source, architecture,
             target)
    _convert_atomically(source, target)
    _reported.add(target)
    log.info("GGUF %s: dequantised in %.1f s", source, time.perf_counter() - start)
    return target


# ---------------------------------------------------------------------------
# Cache


def cache_root() -> Path:
    """Where dequantised copies go: `$JAXFT_CACHE/gguf`, else `$XDG_CACHE_HOME/jaxft/gguf`, else
    `~/.cache/jaxft/gguf`."""
    if os.environ.get("JAXFT_CACHE"):
        return Path(os.environ["JAXFT_CACHE"]).expanduser() / "gguf"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxft" / "gguf"


def cache_key(source: Path) -> str:
    """The file's identity: size, modification time and its first and last MiB, hashed. Cheap for a file of
    many GB (hashing all of it would cost seconds each time the path resolves); a file changed in place gets a
    new mtime, a different file of the same size a different header or tail."""
    stat = source.stat()
    digest = hashlib.sha256(f"{_FORMAT}:{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with open(source, "rb") as f:
        digest.update(f.read(_PROBE))
        f.seek(max(stat.st_size - _PROBE, 0))
        digest.update(f.read(_PROBE))
    return digest.hexdigest()[:16]


def _safe_name(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "model"


def _convert_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _convert(source, scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real failure
                raise
            log.info("GGUF %s: another process finished converting first; using its copy", source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------
# Header: enough of GGUF to refuse a file before paying for torch and the conversion


class _CorruptHeader(Exception):
    """The metadata ends early or holds a value type GGUF does not define."""


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size
_STRING, _ARRAY = 8, 9


def read_architecture(source: Path) -> str:
    """`general.architecture` from the file's metadata; ModelLoadError when the file is not GGUF or its
    metadata is cut short. Skips other values without decoding them (a vocabulary is 100k+ strings)."""
    with open(source, "rb") as f:
        magic = f.read(4)
        if magic != MAGIC:
            raise ModelLoadError(f"{source} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); point "
                                 f"model.path at a .gguf model file or a Hugging Face model directory")
        try:
            version, _, kv_count = struct.unpack("<IQQ", _read(f, 20))
            if version < 2:
                raise ModelLoadError(f"{source} is GGUF version {version}; transformers reads versions 2 and 3: "
                                     f"convert it again with a current llama.cpp")
            for _ in range(kv_count):
                key = _read(f, _u64(f)).decode("utf-8", "replace")
                (kind,) = struct.unpack("<I", _read(f, 4))
                if key == "general.architecture" and kind == _STRING:
                    return _read(f, _u64(f)).decode("utf-8", "replace")
                _skip_value(f, kind)
        except (_CorruptHeader, struct.error) as e:
            raise ModelLoadError(f"{source} cannot be read as GGUF ({e}); the file is corrupt or incomplete: "
                                 f"download or convert it again") from None
    raise ModelLoadError(f"{source} has no general.architecture in its metadata, so its model is unknown; convert "
                         f"it again with a current llama.cpp")


def _read(f, n: int) -> bytes:
    # Checked against the file's size first: a corrupt length field could ask for exabytes.
    if n > os.fstat(f.fileno()).st_size - f.tell():
        raise _CorruptHeader(f"the file ends inside its metadata (at byte {f.tell()} it asks for {n} more)")
    return f.read(n)


def _u64(f) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _skip_value(f, kind: int) -> None:
    if kind in _SCALAR_BYTES:
        _read(f, _SCALAR_BYTES[kind])
    elif kind == _STRING:
        f.seek(_u64(f), os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = struct.unpack("<IQ", _read(f, 12))
        if item in _SCALAR_BYTES:
            f.seek(_SCALAR_BYTES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise _CorruptHeader(f"unknown metadata value type {kind}")


def _starts_with_magic(source: Path) -> bool:
    try:
        with open(source, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _check_supported(source: Path, architecture: str) -> None:
    from jaxft.models import FAMILIES

    if _HF_MODEL_TYPE.get(architecture, architecture) not in FAMILIES:
        raise ModelLoadError(f"{source} holds a {architecture!r} model; jaxft trains {', '.join(sorted(FAMILIES))} "
                             f"(GGUF names them the same way)")


# ---------------------------------------------------------------------------
# Conversion (transformers' GGUF loader)


def _conversion_libraries(source: Path):
    missing = []
    for name in ("gguf", "torch"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModelLoadError(f"reading {source} needs {' and '.join(missing)} (transformers dequantises GGUF files "
                             f"with them): pip install {' '.join(missing)}")
    import torch
    import transformers

    return torch, transformers


def _convert(source: Path, out: Path) -> None:
    """Dequantise `source` with transformers and write it to `out` as config.json, float32 model.safetensors,
    generation_config.json and the tokenizer's files."""
    torch, transformers = _conversion_libraries(source)
    where = dict(pretrained_model_name_or_path=str(source.parent), gguf_file=source.name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
    except Exception as e:  # transformers raises ValueError, struct.error, KeyError, ... for files it cannot read
        raise _transformers_error(source, e) from None
    # transformers refuses to save_pretrained a GGUF-loaded model ("not serializable"), so the parts are written
    # here: the weights as they are, the config without its GGUF quantisation entry (the weights are plain now).
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.architectures = [type(model).__name__]  # a GGUF-built config has none; vLLM and exports read it
    tensors = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # HF files hold a tied head once, as the embedding
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = source.stat()
    (out / _PROVENANCE).write_text(json.dumps(dict(
        source=str(source.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns, dtype="float32",
        transformers=transformers.__version__), indent=2) + "\n")


def _transformers_error(source: Path, error: Exception) -> ModelLoadError:
    message = f"{type(error).__name__}: {error}"
    if "is not supported" in str(error):
        return ModelLoadError(f"{source}: transformers' GGUF loader cannot read this model ({message}); convert "
                              f"the original Hugging Face checkpoint instead, or use a GGUF of a supported model")
    return ModelLoadError(f"{source} cannot be dequantised by transformers' GGUF loader ({message}); the file is "
                          f"corrupt or incomplete, or holds tensors transformers does not read: download or "
                          f"convert it again")
