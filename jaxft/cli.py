"""What the command-line entry points share: flag parsing that turns user errors into one line, and the way a
command reports them."""

import logging
import sys

from absl import flags

from jaxft.config import unknown_key_message, valid_keys
from jaxft.errors import JaxftError
from jaxft.preemption import EXIT_PREEMPTED, Preempted


def fail(message: str):
    """Print `jaxft: error: message` and exit with status 2 (a user error, not a crash)."""
    print(f"jaxft: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_command(body) -> None:
    """Run `body()` as a jaxft command: jaxft's progress logged at INFO, a user error (`JaxftError`) printed as one
    line with exit status 2, a stop request (SIGTERM/SIGINT after a checkpoint) as exit status 75 (EX_TEMPFAIL:
    run the same command again to resume)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("jaxft").setLevel(logging.INFO)
    try:
        body()
    except Preempted as e:  # not an error: the job is asked to stop, and resumes when started again
        print(f"jaxft: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except JaxftError as e:
        fail(f"{type(e).__name__}: {e}")


def parse_flags(argv):
    """absl's parser, with locked-config typos turned into a one-line error instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections' answer to a key the locked config lacks
        check_override_keys(argv, "config", valid_keys())
        fail(str(e))


def check_override_keys(argv, flag: str, valid) -> None:
    """Fail with one line for a `--<flag>.<key>` on the command line that `valid` lacks. A config dict flag
    (`config_flags.DEFINE_config_dict`) reads its overrides when it is defined: check before defining it."""
    overrides = [a[len(f"--{flag}."):].split("=")[0] for a in argv[1:] if a.startswith(f"--{flag}.")]
    unknown = [key for key in overrides if key not in valid]
    if unknown:
        fail(unknown_key_message(unknown[0], valid).replace("config key", f"{flag} key"))
