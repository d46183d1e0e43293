"""The ``weightdiff`` console script: the Rust command line, run in-process."""

import signal
import sys


def main() -> None:
    """Runs ``weightdiff`` with ``sys.argv`` and exits with its status (SPEC §5)."""
    from . import _native

    # The command installs its own SIGINT/SIGTERM handlers once a run has opened its
    # models (a clean stop, exit 130/143); before that, Ctrl-C must end the process as it
    # ends the binary, not wait for Python's handler that never runs while Rust works.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_native.run_cli(["weightdiff", *sys.argv[1:]]))
