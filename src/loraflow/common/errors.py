"""The one exception type the CLI turns into a clean one-line error."""

from __future__ import annotations


class LoraFlowError(Exception):
    """A problem with user input (a file, an option, a mismatch) that deserves a one-line message.

    The message must name the problem and, where there is one, the offending file.
    """
