"""What a resumed run may change: the config a checkpoint was written under against the one resuming it.

A checkpoint keeps its run's resolved config. Rerunning the command with other values resumes under
them, and for most keys that would quietly train something else than either config describes: another
learning rate reshapes the rest of the schedule, another step count stretches it, another batch size
or data setting reads other batches. Those changes are refused, each named with its old and new value,
unless `resume.allow_changes` lists the key. Keys about how the run is watched, saved, evaluated or laid
out on devices (`HOW_NOT_WHAT`) change nothing that is trained and are accepted, and logged.
"""

import json
import logging
import pathlib

from jaxft.errors import ConfigError

log = logging.getLogger("jaxft")

# Sections and keys that change how a run is logged, evaluated, saved, exported or executed, not what it
# trains: the same checkpoint continues to the same parameters under any of their values.
HOW_NOT_WHAT = ("eval.", "checkpoint.", "export.", "mesh.", "resume.", "train.log_every_steps",
                "train.progress_bar", "data.prefetch", "data.cache", "model.remat", "model.layer_loop",
                "model.attention", "model.loss_chunk", "peft.kernel")


def resolved(config) -> dict:
    """The config as plain JSON values, as a checkpoint keeps it."""
    return json.loads(config.to_json_best_effort())


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def allowed_changes(config) -> set[str]:
    """`resume.allow_changes` as a set of dotted keys."""
    return {k.strip() for k in (config.resume.allow_changes or "").split(",") if k.strip()}


def check(saved: dict | None, step: int | None, config) -> None:
    """Refuse (ConfigError) a resume of the checkpoint at `step`, written under `saved`, whose config changes
    what is trained, naming each such key with its old and new value; log the changes that are accepted."""
    if saved is None:  # a checkpoint from before configs were kept
        return
    old, new = flat(saved), flat(resolved(config))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    allowed = allowed_changes(config)
    refused = [k for k in changed if not k.startswith(HOW_NOT_WHAT) and k not in allowed]
    if refused:
        listing = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        raise ConfigError(f"This workdir's checkpoint (step {step}) was trained under another config, and resuming "
                          f"would change what is trained: {listing}. Rerun with the values it was started with, use "
                          f"a new --workdir, or accept the change with --config.resume.allow_changes="
                          f"{','.join(refused)}.")
    if changed:
        log.info("Resuming from step %d with changed settings: %s", step,
                 "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))


def saved_config(checkpoints_dir) -> tuple[dict | None, int | None]:
    """(config, step) of the newest checkpoint under `checkpoints_dir` whose record can be read, before any
    model is loaded: orbax keeps the JSON record as `<step>/meta/metadata`. (None, None) when there is none."""
    directory = pathlib.Path(checkpoints_dir)
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True) \
        if directory.is_dir() else []
    for step in steps:
        try:
            meta = json.loads((directory / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            continue  # damaged: the restore reports it and falls back (jaxft/checkpoint.py)
        return meta.get("config"), step
    return None, None


def write_start_config(workdir, config) -> pathlib.Path:
    """This start's resolved config: `config.json` for the first start of a workdir, `config.<k>.json` for the
    k-th with other settings, so a resume never overwrites the record of the earlier ones."""
    workdir = pathlib.Path(workdir)
    text = config.to_json_best_effort(indent=2) + "\n"
    path, newest, k = workdir / "config.json", None, 1
    while path.exists():
        newest, k = path, k + 1
        path = workdir / f"config.{k}.json"
    if newest is not None and newest.read_text() == text:
        return newest  # started again as before: nothing new to record
    path.write_text(text)
    return path
