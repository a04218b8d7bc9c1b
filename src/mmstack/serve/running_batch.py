"""The rows of a running generation on one KV cache, which rows join and leave between decode steps.

Every row's cache is right-aligned: the columns of the cache end with each row's last fed token and
start with left padding (attention mask 0). A newcomer is prefilled on its own (``prefill``) and merged in
(``add``) by left-padding whichever cache is shorter and stacking the rows; a finished row is dropped
(``keep``) and the columns that only padding still uses are cut. Each row keeps its own position, so a
row sees exactly its own tokens at its own positions, as if it ran alone (tested against
``bridge_generate.generate_text``).

Works with language models whose cache is HF's plain ``DynamicLayer`` per layer (Llama, Qwen2 without
sliding windows, GPT-2-like models...); ``supports_model`` says whether a model qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmstack.errors import ModelError


def supports_model(model: Any) -> bool:
    """True when the model's language model uses a plain growing KV cache that rows can join."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.language_model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class Prefilled:
    """Newcomers after their prefill: next-token logits (B, V), cache, mask (B, T), positions (B,)."""

    logits: torch.Tensor
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor


class RunningBatch:
    """One KV cache shared by the rows of a running generation (see the module docstring).

    The cache is copied as little as possible: rows that leave are only noted (``keep``) and dropped
    when the cache is next copied anyway, by a join or before the next decode step.

    Args:
        model: a ``BridgeModel`` (``prefill`` and ``decode`` with a KV cache).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.language_model.config
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 where the cache holds a real token
        self.positions: torch.Tensor | None = None  # (B,) position of each row's last fed token
        self.logits: torch.Tensor | None = None  # (B, V) each row's next-token logits
        self._rows: torch.Tensor | None = None  # cache rows still in use, when rows left since the last copy

    def __len__(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Any = None) -> Prefilled:
        """Run left-padded prompts (B, T) once; nothing changes in the batch until ``add``."""
        logits, cache = self.model.prefill(input_ids, attention_mask, pixel_values)
        _check_layers(cache)
        positions = attention_mask.long().sum(-1) - 1
        return Prefilled(logits, cache, attention_mask.long(), positions)

    def add(self, new: Prefilled) -> None:
        """Append the prefilled rows after the running ones (their row indices follow the existing ones)."""
        if self.mask is None:
            self.cache, self.mask, self.positions, self.logits = new.cache, new.mask, new.positions, new.logits
            return
        old_width, width = self.mask.shape[1], max(self.mask.shape[1], new.mask.shape[1])
        n_old = len(self)
        for layer, fresh in zip(self.cache.layers, new.cache.layers, strict=True):
            for name in ("keys", "values"):
                old, add = self._live(getattr(layer, name)), getattr(fresh, name)
                b, h, _, d = add.shape
                merged = add.new_zeros(n_old + b, h, width, d)  # (B0 + B1, H, width, D), right-aligned rows
                merged[:n_old, :, width - old_width :] = old
                merged[n_old:, :, width - add.shape[2] :] = add
                setattr(layer, name, merged)
        self._rows = None
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(new.mask, width)])
        self.positions = torch.cat([self.positions, new.positions])
        self.logits = torch.cat([self.logits, new.logits])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) and the columns they use; the cache follows lazily."""
        if not rows:
            self.cache = self.mask = self.positions = self.logits = self._rows = None
            return
        if rows == list(range(len(self))):
            return
        assert self.mask is not None and self.positions is not None and self.logits is not None
        index = torch.tensor(rows, dtype=torch.long)
        self._rows = index if self._rows is None else self._rows[index]
        mask = self.mask[index]
        start = int((mask.sum(0) > 0).long().argmax())  # first column any kept row uses
        self.mask = mask[:, start:]
        self.positions, self.logits = self.positions[index], self.logits[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's chosen token (B,); returns and keeps the next logits (B, V)."""
        assert self.mask is not None and self.positions is not None
        if self._rows is not None or self.cache.get_seq_length() != self.mask.shape[1]:
            for layer in self.cache.layers:
                layer.keys, layer.values = self._live(layer.keys), self._live(layer.values)
            self._rows = None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        self.positions = self.positions + 1
        self.logits = self.model.decode(tokens, self.cache, self.mask, self.positions)
        return self.logits

    def _live(self, t: torch.Tensor) -> torch.Tensor:
        """The rows and columns of a cache tensor (B_cache, H, T_cache, D) still in use: (B, H, T, D)."""
        assert self.mask is not None
        t = t[:, :, t.shape[2] - self.mask.shape[1] :]
        return t if self._rows is None else t[self._rows]


def _check_layers(cache: Any) -> None:
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ModelError(
            "continuous batching needs a language model with a plain KV cache (no sliding window); "
            "set batching.continuous: false for this model"
        )


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a (B, T) mask on the left to (B, width)."""
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
