"""One exception type per domain. Messages name the input (file, line, field) and the fix.

The CLI prints an ``MmstackError`` as one line and exits non-zero; anything else is a bug.
"""

from __future__ import annotations


class MmstackError(Exception):
    """Base class for errors caused by user input (files, configs, requests), not by bugs."""


class ConfigError(MmstackError):
    """A config file, preset or override is invalid (unknown key, wrong type, broken rule)."""


class DataError(MmstackError):
    """A data file or record is missing, malformed or unreadable."""


class ImageError(DataError):
    """An image cannot be decoded, is truncated, or is too large."""


class ModelError(MmstackError):
    """A checkpoint is missing, of the wrong family, or does not match its inputs."""


class CollectionError(MmstackError):
    """A collection (vector store) is missing, corrupt or built with another model."""


class ServeError(MmstackError):
    """A server request or configuration is invalid."""
