"""Errors that are the user's to fix: a bad flag, a malformed file, an unusable checkpoint.

Every message says what is wrong and what to do, naming the file and line, the flag or the config
field.  Scripts started through `training.cli.entry_point` print such an error as one line on stderr
and exit with status 2 (no traceback); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave cannot be used; the message says what and what to do."""


class DataError(UserError, ValueError):
    """Malformed input data; the message names the file and line."""


class ConfigError(UserError, ValueError):
    """A configuration value out of range or inconsistent with another.

    `field` is the config field (e.g. `lr`, `lora_r`); library code names fields, and the CLI layer
    (`training.cli`) rewrites the message with the flag that sets the field."""

    def __init__(self, field: str, message: str):
        self.field, self.detail = field, message
        super().__init__(f"{field}: {message}")


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that is missing, truncated, corrupted or does not fit the model."""
