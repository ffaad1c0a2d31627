"""Errors that ``dqrm`` reports in one line, without a traceback: the input is wrong, not the program."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work (unsupported value, or settings that contradict each other); names the argument."""
