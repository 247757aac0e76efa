"""What every result and checkpoint records about the software that made it."""

from __future__ import annotations

import platform
from importlib import metadata

_PACKAGES = ("torch", "transformers", "peft", "accelerate")


def versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Versions of loraflow, Python and `packages`, read from package metadata (no heavy imports)."""
    from loraflow import __version__

    found = {"loraflow": __version__, "python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
