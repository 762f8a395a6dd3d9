"""What the command-line entry points share: flag parsing that turns user errors into one line."""

import sys

from absl import flags

from jaxft.config import unknown_key_message, valid_keys


def fail(message: str):
    """Print `jaxft: error: message` and exit with status 2 (a user error, not a crash)."""
    print(f"jaxft: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl's parser, with locked-config typos turned into a one-line error instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections' answer to a key the locked config lacks
        valid = valid_keys()
        overrides = [a[len("--config."):].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        unknown = [key for key in overrides if key not in valid]
        fail(unknown_key_message(unknown[0], valid) if unknown else str(e))
