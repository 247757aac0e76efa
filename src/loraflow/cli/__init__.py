"""The `loraflow` command line: thin parsers over the library API, one module per verb group.

Each verb imports the heavy library code only when it runs, so `loraflow --help`, `score` and
`report` start without importing torch. The top layer: nothing in the library imports it.
"""

from loraflow.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
