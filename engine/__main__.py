"""``python -m engine``: the command line (:mod:`engine.cli`)."""

from .cli import main

main()
