"""Weighted mixtures of data sets: a deterministic interleaving of any sequences.

Two ways to say how much of each source goes in:

- **repeat factors** (``length=None``): source ``i`` contributes ``round(factor_i * len_i)`` items, so a
  factor of 2 shows every item twice and 0.5 a seeded half (LLaVA-style "repeat this set N times").
- **weights** (``length=L``): ``L`` items in all, split in proportion to the weights (exact counts by
  largest remainder), e.g. visual : text-only = 1 : 3.

Within a source, items come from seeded permutations (every item once before any repeats). Sources are
spread evenly over the whole order rather than in blocks: each source's items sit at evenly spaced
positions (with a seeded phase), so every prefix holds each source within one or two items of its share;
that keeps proportions right even when training stops mid-epoch. Same parts and seed, same order; use
``seed + epoch`` for a fresh order each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

import numpy as np

from mmstack.errors import ConfigError

T = TypeVar("T")


class Mixture(Sequence[T], Generic[T]):
    """Interleave ``parts = [(sequence, factor), ...]`` deterministically (see the module docstring).

    Args:
        parts: sequences (anything with ``len`` and integer indexing) with a repeat factor or weight.
        seed: fixes the item order within sources and the phase of each source.
        length: total length; when given, factors are weights, otherwise repeat factors.
        shuffle: permute items within each source (``False`` keeps each source's own order).
    """

    def __init__(
        self,
        parts: Sequence[tuple[Sequence[T], float]],
        seed: int = 0,
        length: int | None = None,
        shuffle: bool = True,
    ) -> None:
        self.datasets = [ds for ds, _ in parts]
        factors = [float(f) for _, f in parts]
        _check(self.datasets, factors, length)
        self.seed, self.shuffle = seed, shuffle
        self.counts = _weighted_counts(factors, length) if length is not None else self._repeat_counts(factors)
        rngs = [np.random.default_rng([seed, i]) for i in range(len(parts))]
        items = [self._draw(len(ds), c, rng) for ds, c, rng in zip(self.datasets, self.counts, rngs, strict=True)]
        keys = [
            (np.arange(c) + (rng.random() if shuffle else 0.5)) / max(c, 1)
            for c, rng in zip(self.counts, rngs, strict=True)
        ]
        order = np.argsort(np.concatenate(keys), kind="stable")  # ties: the earlier source first
        self._source = np.repeat(np.arange(len(parts)), self.counts)[order]
        self._index = np.concatenate(items).astype(np.int64)[order]

    def _repeat_counts(self, factors: list[float]) -> list[int]:
        return [round(f * len(ds)) for ds, f in zip(self.datasets, factors, strict=True)]

    def _draw(self, n: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` indices into a source of ``n`` items: whole passes, then part of one more."""
        passes = [rng.permutation(n) if self.shuffle else np.arange(n) for _ in range(math.ceil(count / n) if n else 0)]
        return np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._source)

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        source, index = self.locate(i)
        return self.datasets[source][index]

    def __iter__(self) -> Iterator[T]:
        for source, index in zip(self._source.tolist(), self._index.tolist(), strict=True):
            yield self.datasets[source][index]

    def locate(self, i: int) -> tuple[int, int]:
        """``(source number, index in that source)`` of mixture item ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"mixture index {i} out of range for length {len(self)}")
        return int(self._source[i]), int(self._index[i])

    def sources(self) -> np.ndarray:
        """The source number of every item, in order (for checking proportions)."""
        return self._source.copy()


def _check(datasets: list[Sequence[Any]], factors: list[float], length: int | None) -> None:
    if not datasets:
        raise ConfigError("a mixture needs at least one (dataset, weight) part")
    for i, (ds, f) in enumerate(zip(datasets, factors, strict=True)):
        if not math.isfinite(f) or f < 0:
            raise ConfigError(f"mixture part {i}: weight/repeat factor must be finite and >= 0, got {f}")
        if f > 0 and len(ds) == 0:
            raise ConfigError(f"mixture part {i} is empty but has weight {f}; drop it or give it data")
    if sum(factors) <= 0:
        raise ConfigError(f"mixture weights sum to zero ({factors}); give at least one part a positive weight")
    if length is not None and length < 0:
        raise ConfigError(f"mixture length must be >= 0, got {length}")


def _weighted_counts(weights: list[float], length: int) -> list[int]:
    """Split ``length`` in proportion to ``weights`` exactly (largest remainder, ties to the earlier part)."""
    quotas = [length * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: length - sum(counts)]:
        counts[i] += 1
    return counts
