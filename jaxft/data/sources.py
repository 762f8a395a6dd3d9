"""Where rows come from: local files or a hub dataset, read through `datasets`.

`data.train` / `data.eval` name a file (`.jsonl`, `.json`, `.csv`, `.parquet`,
`.arrow`), a glob of such files, a directory written by `save_to_disk`, or a hub
id (with `data.hub_config` and a split). Every row is tagged with where it came
from, so an error can name the file and row.

datasets' own error for a malformed file names neither (pyarrow reports "JSON
parse error ... in row 1" of some block, or a bare `ValueError`); when a JSON
file fails to load, `diagnose_json_lines` re-reads it with the standard library
to find the first bad line and say what is wrong with it.
"""

import dataclasses
import glob
import json
import os
import pathlib
import re

import datasets

from jaxft.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved `data.train`/`data.eval` value."""

    spec: str  # what the config said
    kind: str  # a builder name from BUILDERS, "disk" (save_to_disk) or "hub"
    files: tuple[str, ...] = ()  # local files in read order (empty for "disk" and "hub")

    def where(self, file_index: int, row: int) -> str:
        """'file:line' for JSON lines (1-based, blank lines counted), else 'file row N' or 'hub-id row N'."""
        if not self.files:
            return f"{self.spec} row {row + 1}"
        path = self.files[file_index]
        if self.kind == "json" and not _is_json_array(path):
            return f"{path}:{_line_of_row(path, row)}"
        return f"{path} row {row + 1}"

    def stamp(self) -> list:
        """What identifies this source's content for caching: paths, sizes and modification times."""
        if not self.files:
            return [self.kind, self.spec]
        return [self.kind] + [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in self.files]


def resolve(spec: str) -> Source:
    """A Source for `spec`; DataError if it is neither a readable local path nor a hub id."""
    path = pathlib.Path(spec)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return Source(spec, "disk")
        raise DataError(f"{spec!r} is a directory but not one written by `datasets.save_to_disk`; "
                        f"give a file or a glob such as '{spec.rstrip('/')}/*.jsonl'.")
    if path.is_file():
        return Source(spec, _builder(spec), (str(path),))
    if glob.has_magic(spec):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise DataError(f"The pattern {spec!r} matches no files; check the directory and the file "
                            f"extension in data.train / data.eval.")
        kinds = {_builder(f) for f in files}
        if len(kinds) > 1:
            raise DataError(f"The pattern {spec!r} matches files of different types ({sorted(kinds)}); "
                            f"narrow it to one type.")
        return Source(spec, kinds.pop(), tuple(files))
    if _HUB_ID.match(spec) and path.suffix.lower() not in BUILDERS:
        return Source(spec, "hub")
    raise DataError(f"Data file {spec!r} does not exist (and is not a hub dataset id); check the path in "
                    f"data.train / data.eval: a file, a glob, a save_to_disk directory or a hub id.")


def _builder(path: str) -> str:
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use one of {sorted(BUILDERS)}.")
    return BUILDERS[suffix]


def load(source: Source, *, split: str, hub_config: str | None, streaming: bool):
    """One `datasets.Dataset` (or `IterableDataset` when streaming) per file, in order.

    Part i holds the rows of `source.files[i]` in file order, so a row's place in its
    part is its row in the file (encode.row_batches counts them for error messages).
    """
    datasets.disable_progress_bars()  # one bar per file and split; the data report says what was read
    if source.kind == "hub":
        return [_nonempty(_load_hub(source, split, hub_config, streaming), source.spec)]
    if source.kind == "disk":
        ds = datasets.load_from_disk(source.spec)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source.spec} has splits {sorted(ds)}, not {split!r}.")
            ds = ds[split]
        return [_nonempty(ds.to_iterable_dataset() if streaming else ds, source.spec)]
    parts = []
    for path in source.files:
        if os.path.getsize(path) == 0:
            raise DataError(f"Data file {path!r} is empty; give a file with at least one row (or leave it out "
                            f"of the glob).")
        parts.append(_nonempty(_load_file(source.kind, path, streaming), path))
    return parts


def _load_file(kind: str, path: str, streaming: bool):
    try:
        return datasets.load_dataset(kind, data_files=path, split="train", streaming=streaming)
    except Exception as e:  # datasets wraps pyarrow's and pandas' errors in many types
        raise unreadable(Source(path, kind, (path,)), 0, e) from e


def _load_hub(source: Source, split: str, hub_config: str | None, streaming: bool):
    try:
        return datasets.load_dataset(source.spec, hub_config, split=split, streaming=streaming)
    except Exception as e:
        raise DataError(f"Cannot load hub dataset {source.spec!r} (config {hub_config!r}, split {split!r}): "
                        f"{type(e).__name__}: {_cause(e)}. Is the hub reachable, and the id spelt right?") from e


def _nonempty(ds, where: str):
    if not isinstance(ds, datasets.IterableDataset) and len(ds) == 0:
        raise DataError(f"Data source {where!r} has no rows; give data with at least one row.")
    return ds


def _cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e)[:300]


# ----------------------------------------------------------------------------- diagnosis


def unreadable(source: Source, file_index: int, error: Exception) -> DataError:
    """The DataError for a file datasets failed to load or iterate: the first bad line where it can be found.

    Raises that error itself when the diagnosis finds the line; returns a general one otherwise.
    """
    if source.files:
        path = source.files[file_index]
        if source.kind in ("json", "csv"):
            _check_utf8_lines(path)
        if source.kind == "json":
            diagnose_json_lines(path)
        return DataError(f"{path}: cannot be read as {source.kind} ({type(error).__name__}: {_cause(error)}); check "
                         f"that it is a valid {source.kind} file, or give it the extension of its real type.")
    return DataError(f"{source.spec}: cannot be read ({type(error).__name__}: {_cause(error)}).")


def _check_utf8_lines(path: str) -> None:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, line_no, e) from e


def _not_utf8(path: str, line_no: int, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8.")


def diagnose_json_lines(path: str) -> None:
    """Raise DataError at the first line of a JSON-lines file that is not a usable row; return if all are.

    Usable: UTF-8, valid JSON, an object, and each field of the same JSON type on every row
    (pyarrow needs one type per column; null is allowed anywhere).
    """
    if _is_json_array(path):
        return
    field_types: dict[str, tuple[str, int]] = {}
    rows = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, line_no, e) from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno}); fix or delete that "
                                f"line (a .jsonl file holds one JSON object per line).") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: a row must be a JSON object, got {type(row).__name__}; write each "
                                f"line as {{\"field\": value, ...}}.")
            rows += 1
            for key, value in row.items():
                kind = _json_type(value)
                if kind == "null":
                    continue
                first = field_types.setdefault(key, (kind, line_no))
                if first[0] != kind:
                    raise DataError(f"{path}:{line_no}: field '{key}' is {kind} here but {first[0]} at line "
                                    f"{first[1]}; a field must have one type in every row.")
    if rows == 0:
        raise DataError(f"Data file {path!r} has no rows; give a file with at least one JSON object per line.")


def _json_type(value) -> str:
    for kind, types in (("null", type(None)), ("bool", bool), ("number", (int, float)), ("string", str),
                        ("list", list), ("object", dict)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _is_json_array(path: str) -> bool:
    """A .json file holding one array of rows (a .jsonl file never does: its first line may itself be an array,
    a bad row to be named as such)."""
    if path.lower().endswith(".jsonl"):
        return False
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"["


def _line_of_row(path: str, row: int) -> int:
    """1-based line number of the `row`-th (0-based) non-blank line: datasets skips blank lines."""
    seen = -1
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return line_no
    return row + 1
