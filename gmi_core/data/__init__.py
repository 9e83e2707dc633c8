"""Data files shipped with gmi_core: prompt sets and the interrogator vocabulary."""

from importlib import resources


def read_text(name: str) -> str:
    """A data file's text, found relative to this package (so it also works under a host's mangled import name)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
