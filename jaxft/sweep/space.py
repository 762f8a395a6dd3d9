"""The search space: which config keys a sweep varies, and over what.

Written as one string, entries separated by ';' (or new lines):

    optim.lr=loguniform(1e-5, 1e-2); peft.rank=choice(4, 8, 16, 32); peft.dropout=uniform(0, 0.2)

or returned by a `sweep_space()` function in the recipe (that string, or a dict {key: "distribution"}).
Distributions: uniform(low, high), loguniform(low, high), quniform(low, high, step), int(low, high[, step]),
logint(low, high), choice(a, b, ...). choice takes numbers, True/False, quoted strings or bare words
(`peft.method=choice(lora, qlora)`).

Every key is checked against the config schema, its type, and `jaxft.config.validate` at each end of its range
(each value of a choice) before any trial starts, so a typo or an impossible value costs nothing.
"""

import ast
import dataclasses
import difflib
import math

from jaxft.config import base_config, load_recipe_module, unknown_key_message, valid_keys, validate
from jaxft.errors import ConfigError

# name -> (least, most) number of arguments
DISTRIBUTIONS = {"uniform": (2, 2), "loguniform": (2, 2), "quniform": (3, 3), "int": (2, 3), "logint": (2, 2),
                 "choice": (1, None)}


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched key: `key=kind(*args)`."""

    key: str
    kind: str
    args: tuple

    def __str__(self):
        return f"{self.key}={self.kind}({', '.join(map(repr, self.args))})"

    def suggest(self, trial):
        """This dimension's value for an Optuna trial (the parameter is named by the config key)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.args))
        if self.kind in ("int", "logint"):
            low, high, *step = self.args
            return trial.suggest_int(self.key, low, high, step=step[0] if step else 1, log=self.kind == "logint")
        low, high, *step = self.args
        return trial.suggest_float(self.key, low, high, log=self.kind == "loguniform",
                                   step=step[0] if step else None)

    def grid(self) -> list:
        """The values a grid search tries: a choice's values, or every value of a stepped range."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind in ("int", "quniform"):
            low, high, *step = self.args
            step = step[0] if step else 1
            count = int(math.floor((high - low) / step + 1e-9)) + 1
            return [low + i * step for i in range(count)]
        raise ConfigError(f"sweep.sampler=grid needs a finite set of values for every key, but {self} is continuous; "
                          f"use choice(...), int(low, high[, step]) or quniform(low, high, step) for it.")

    def ends(self) -> list:
        """The values `check` validates: a choice's values, a range's two ends."""
        return list(self.args) if self.kind == "choice" else list(self.args[:2])


def parse(space) -> list[Dimension]:
    """The dimensions of a space given as a string (or a dict {key: "distribution(...)"}); ConfigError naming the
    entry that cannot be read."""
    if isinstance(space, dict):
        entries = [f"{key}={value}" for key, value in space.items()]
    elif isinstance(space, str):
        entries = [e.strip() for e in space.replace("\n", ";").split(";") if e.strip()]
    else:
        raise ConfigError(f"The search space must be a string or a dict, not {type(space).__name__}.")
    if not entries:
        raise ConfigError('The search space is empty: give --sweep.space "optim.lr=loguniform(1e-5,1e-2); ..." '
                          "or a sweep_space() function in the recipe.")
    dimensions = [_parse_entry(entry) for entry in entries]
    seen = set()
    for d in dimensions:
        if d.key in seen:
            raise ConfigError(f"sweep.space names {d.key} twice.")
        seen.add(d.key)
    return dimensions


def from_recipe(recipe: str):
    """The space a recipe file defines with `sweep_space()` (a string or a dict), or None if it defines none.
    `recipe` is what `--config` was given (a `:argument` after the path is ignored)."""
    space = getattr(load_recipe_module(recipe), "sweep_space", None)
    return space() if space else None


def _parse_entry(entry: str) -> Dimension:
    where = f"sweep.space entry {entry!r}"
    key, eq, text = entry.partition("=")
    key, text = key.strip(), text.strip()
    if not eq or not key or not text:
        raise ConfigError(f"{where}: write it as key=distribution(...), e.g. optim.lr=loguniform(1e-5, 1e-2).")
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        call = None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.keywords):
        raise ConfigError(f"{where}: {text!r} is not a distribution; use one of "
                          f"{', '.join(f'{d}(...)' for d in DISTRIBUTIONS)}.")
    kind = call.func.id
    if kind not in DISTRIBUTIONS:
        nearest = difflib.get_close_matches(kind, list(DISTRIBUTIONS), n=1)
        hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
        raise ConfigError(f"{where}: unknown distribution {kind!r}.{hint} Known: {', '.join(DISTRIBUTIONS)}.")
    args = tuple(_literal(node, where) for node in call.args)
    least, most = DISTRIBUTIONS[kind]
    if len(args) < least or (most is not None and len(args) > most):
        count = f"{least}" if least == most else f"{least} or {most}" if most else f"at least {least}"
        raise ConfigError(f"{where}: {kind} takes {count} arguments, got {len(args)}.")
    _check_bounds(kind, args, where)
    return Dimension(key, kind, args)


def _literal(node, where):
    if isinstance(node, ast.Name):  # a bare word: choice(lora, qlora)
        return node.id
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ConfigError(f"{where}: {ast.unparse(node)!r} is not a number, True/False or a string.") from None


def _check_bounds(kind, args, where):
    if kind == "choice":
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{where}: choice lists a value twice.")
        return
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind} takes numbers.")
    if kind in ("int", "logint") and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: {kind} takes whole numbers; use uniform/loguniform for fractional values.")
    low, high, *step = args
    if not low < high:
        raise ConfigError(f"{where}: the low end must be below the high end.")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"{where}: a log scale needs a low end > 0.")
    if step and step[0] <= 0:
        raise ConfigError(f"{where}: the step must be > 0.")


def check(dimensions: list[Dimension], config) -> None:
    """Each key exists in the schema, takes the dimension's type, and passes `validate` at each end of its range
    (every value of a choice) with the rest of `config` as it is; ConfigError naming the key otherwise."""
    valid = valid_keys()
    for d in dimensions:
        if d.key not in valid:
            raise ConfigError(f"sweep.space: {unknown_key_message(d.key, valid)}")
        _check_type(d, _field_type(d.key))
        for value in d.ends():
            try:
                validate(apply(config, {d.key: value}))
            except ConfigError as e:
                raise ConfigError(f"sweep.space {d}: at {d.key}={value!r}, {e}") from None


def _field_type(key):
    """The type the schema declares for `key` (a resolved config has lost its placeholders' types)."""
    *parents, name = key.split(".")
    node = base_config()
    for part in parents:
        node = node[part]
    return node.get_type(name)


def _check_type(d: Dimension, field_type) -> None:
    values = d.ends()
    if field_type is bool:
        ok = all(isinstance(v, bool) for v in values)
    elif field_type is int:
        ok = d.kind in ("int", "logint", "choice") and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in values)
    elif field_type is float:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    elif field_type is str:
        ok = d.kind == "choice" and all(isinstance(v, str) for v in values)
    else:
        ok = True
    if not ok:
        advice = {int: "int(low, high), logint(low, high) or choice of whole numbers", bool: "choice(True, False)",
                  str: "choice of strings", float: "numbers"}.get(field_type, "")
        raise ConfigError(f"sweep.space {d}: {d.key} is a {field_type.__name__}; use {advice}.")


def apply(config, params: dict):
    """A copy of `config` with each dotted key in `params` set (ml_collections' type checks apply: 2.5 is no
    `peft.rank`)."""
    config = config.copy_and_resolve_references()
    for key, value in params.items():
        *parents, name = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[name] = value
    return config
