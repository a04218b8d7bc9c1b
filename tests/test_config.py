"""Typed configs: unknown keys, type coercion, overrides, nested dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mmstack.config import load_config, parse_overrides
from mmstack.errors import ConfigError


@dataclass
class Inner:
    depth: int = 2
    width: int = 64

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"model.depth must be >= 1, got {self.depth}")


@dataclass
class Outer:
    model: Inner = field(default_factory=Inner)
    lr: float = 1e-3
    name: str = "x"
    sizes: tuple[int, ...] = (32, 64)
    mode: str | None = None


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 3\nlr: 0.01\n")
    cfg = load_config(Outer, path, overrides=["model.width=128", "--lr", "2e-4", "sizes=[16, 32, 48]"])
    assert cfg.model.depth == 3 and cfg.model.width == 128
    assert cfg.lr == pytest.approx(2e-4)
    assert cfg.sizes == (16, 32, 48)


def test_typo_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'dpeth'.*did you mean 'depth'"):
        load_config(Outer, {"model": {"dpeth": 3}})


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"model.depth must be an integer"):
        load_config(Outer, {"model": {"depth": "deep"}})


def test_post_init_rule():
    with pytest.raises(ConfigError, match="depth must be >= 1"):
        load_config(Outer, {"model": {"depth": 0}})


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_override_without_value():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["model.depth"])
