"""``python -m weightdiff``: the same as the ``weightdiff`` command."""

from ._cli import main

main()
