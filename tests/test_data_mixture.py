"""Weighted mixtures: exact proportions, even spreading, repeats, determinism, and clear config errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmstack.data.mixture import Mixture
from mmstack.errors import ConfigError


def test_weights_give_exact_proportions_spread_evenly():
    visual, text = [f"v{i}" for i in range(50)], [f"t{i}" for i in range(70)]
    mix = Mixture([(visual, 1), (text, 3)], seed=0, length=400)
    assert len(mix) == 400 and mix.counts == [100, 300]
    sources = mix.sources()
    prefix_share = np.cumsum(sources == 0) / np.arange(1, 401)
    # every prefix holds each source within about one item of its share
    assert np.all(np.abs(np.cumsum(sources == 0) - np.arange(1, 401) * 0.25) <= 2)
    assert abs(prefix_share[39] - 0.25) <= 0.05
    items = list(mix)
    counts = Counter(items)
    assert all(counts[v] == 2 for v in visual)  # 100 draws over 50 items: two full passes
    assert sorted(counts[t] for t in text) == [4] * 50 + [5] * 20  # 300 = 4 full passes + 20 more
    assert mix[0] == items[0] and mix[-1] == items[-1] and mix[10:13] == items[10:13]


def test_repeat_factors():
    a, b = list(range(10)), list(range(100, 104))
    mix = Mixture([(a, 1), (b, 2.5)], seed=3)
    assert mix.counts == [10, 10]
    counts = Counter(mix)
    assert all(counts[x] == 1 for x in a)
    assert sorted(counts[x] for x in b) == [2, 2, 3, 3]
    half = Mixture([(a, 0.5)], seed=1)
    assert len(half) == 5 and len(set(half)) == 5


def test_deterministic_per_seed_and_order_kept_without_shuffle():
    parts = [(range(30), 1), ("abcdefghij", 2)]
    assert list(Mixture(parts, seed=7)) == list(Mixture(parts, seed=7))
    assert list(Mixture(parts, seed=7)) != list(Mixture(parts, seed=8))
    plain = list(Mixture(parts, seed=0, shuffle=False))
    assert [x for x in plain if isinstance(x, int)] == list(range(30))
    assert "".join(x for x in plain if isinstance(x, str)) == "abcdefghij" * 2
    assert Mixture(parts, seed=0).locate(0)[0] in (0, 1)


def test_bad_mixtures_raise_config_errors():
    with pytest.raises(ConfigError, match="at least one"):
        Mixture([])
    with pytest.raises(ConfigError, match="part 1: weight/repeat factor must be finite and >= 0, got -1"):
        Mixture([([1], 1), ([2], -1)])
    with pytest.raises(ConfigError, match="part 0 is empty but has weight 2"):
        Mixture([([], 2)])
    with pytest.raises(ConfigError, match="sum to zero"):
        Mixture([([1], 0)])
    with pytest.raises(IndexError):
        Mixture([([1, 2], 1)])[5]
