"""The server's config: which checkpoints and collections to serve, and the limits that protect it.

    host: 127.0.0.1            # loopback unless you mean to expose it
    port: 8000
    models:                    # served name -> checkpoint folder (the family comes from config.json)
      clip: models/clip
      vlm: {path: models/vlm, batching: {max_batch_size: 8}}
    collections:
      demo: {db: collections/demo, model: clip}
    security: {api_key_env: MMSTACK_API_KEY}
    media: {file_roots: [images/], allow_remote: false}

Relative paths are relative to the folder of the YAML file (so a config can travel with its models).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmstack.config import load_config, read_yaml
from mmstack.errors import ConfigError


@dataclass
class BatchingConfig:
    """How requests for one model are coalesced.

    Args:
        max_batch_size: most items run in one forward pass (1 turns batching off).
        max_wait_ms: how long the first item of a batch may wait for company: for requests already
            admitted but still preparing their items (decoding images). With none on the way a batch
            starts at once; under load the queue fills while the model runs, so batches stay full.
        max_queue: items admitted (waiting or running) per model; beyond it requests get 429 at once.
        timeout_s: default deadline of a request, from its arrival to its last byte.
        continuous: chat models only: requests join a running generation between decode steps and leave
            it when they finish (continuous batching); false runs each batch to its end before the next.
    """

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 60.0
    continuous: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"batching.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"batching.max_queue must be >= 1, got {self.max_queue}")
        if self.timeout_s <= 0:
            raise ConfigError(f"batching.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class ModelEntry:
    """One served checkpoint; ``batching`` overrides the server-wide settings for it."""

    path: str
    batching: BatchingConfig | None = None


@dataclass
class CollectionEntry:
    """One searchable collection; ``model`` names the served model whose embeddings it holds (optional)."""

    db: str
    model: str = ""


@dataclass
class MediaConfig:
    """Where images in requests may come from, and how big they may be.

    Args:
        max_image_bytes: largest encoded image (data URL payload, file, or download).
        max_image_pixels: largest decoded width * height (checked from the header before decoding).
        file_roots: folders that ``file://`` URLs may point into; empty forbids ``file://``.
        allow_remote: fetch ``http(s)://`` image URLs at all (off by default).
        remote_hosts: host names remote URLs may use (required when ``allow_remote``).
        remote_timeout_s: time limit for one download.
    """

    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    file_roots: list[str] = field(default_factory=list)
    allow_remote: bool = False
    remote_hosts: list[str] = field(default_factory=list)
    remote_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ConfigError("media.max_image_bytes and media.max_image_pixels must be > 0")
        if self.allow_remote and not self.remote_hosts:
            raise ConfigError(
                "media.allow_remote is true but media.remote_hosts is empty: list the hosts images may come from"
            )


@dataclass
class SecurityConfig:
    """API key and request limits.

    Args:
        api_key: the Bearer key clients must send (prefer ``api_key_env``: keys do not belong in files).
        api_key_env: environment variable holding the key; used when ``api_key`` is empty.
        max_body_bytes: largest request body; larger ones get 413 before they are read.
    """

    api_key: str = ""
    api_key_env: str = "MMSTACK_API_KEY"
    max_body_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0:
            raise ConfigError(f"security.max_body_bytes must be > 0, got {self.max_body_bytes}")

    def resolved_key(self) -> str:
        """The key in force: ``api_key``, else the environment variable, else "" (no auth)."""
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


@dataclass
class GenerationDefaults:
    """Defaults and caps for text generation requests (``temperature`` 0 is greedy decoding; OpenAI's
    default is 1)."""

    max_tokens: int = 64
    max_tokens_limit: int = 512
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.max_tokens <= self.max_tokens_limit:
            raise ConfigError("generation.max_tokens must be in 1..generation.max_tokens_limit")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"generation.temperature must be in 0..2, got {self.temperature}")


@dataclass
class ServeConfig:
    """Everything ``mmstack serve`` needs (see the module docstring for a YAML example)."""

    host: str = "127.0.0.1"
    port: int = 8000
    models: dict[str, ModelEntry] = field(default_factory=dict)
    collections: dict[str, CollectionEntry] = field(default_factory=dict)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    web: bool = True
    log_level: str = "info"
    threads: int = 0  # torch threads for the models (0: torch's default); 1 can be faster on a busy machine

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in [*self.models, *self.collections]:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ConfigError(f"served name {name!r} may only use letters, digits, '-', '_' and '.'")
        for name, entry in self.collections.items():
            if entry.model and entry.model not in self.models:
                raise ConfigError(f"collections.{name}.model={entry.model!r} is not one of the served models")

    def batching_for(self, name: str) -> BatchingConfig:
        entry = self.models.get(name)
        return entry.batching if entry is not None and entry.batching is not None else self.batching

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Accept the short forms ``models: {clip: PATH}`` and ``collections: {demo: DB}``."""
    data = dict(data)
    for key, field_name in (("models", "path"), ("collections", "db")):
        items = data.get(key)
        if isinstance(items, dict):
            data[key] = {k: {field_name: v} if isinstance(v, (str, Path)) else v for k, v in items.items()}
    return data


def load_serve_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | dict | None = None
) -> ServeConfig:
    """A ``ServeConfig`` from a YAML file (paths resolved against its folder), a dict, or defaults."""
    base = Path.cwd()
    if isinstance(source, (str, Path)):
        base = Path(source).resolve().parent
        source = read_yaml(source)
    cfg = load_config(ServeConfig, _normalise(source or {}), overrides)
    return resolve_paths(cfg, base)


def resolve_paths(cfg: ServeConfig, base: Path) -> ServeConfig:
    """Make model, collection and file-root paths absolute against ``base``."""

    def absolute(p: str) -> str:
        if "://" in p:  # e.g. a qdrant:// collection
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    models = {k: replace(v, path=absolute(v.path)) for k, v in cfg.models.items()}
    collections = {k: replace(v, db=absolute(v.db)) for k, v in cfg.collections.items()}
    media = replace(cfg.media, file_roots=[absolute(r) for r in cfg.media.file_roots])
    return replace(cfg, models=models, collections=collections, media=media)
