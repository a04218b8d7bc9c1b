"""Regional compilation for training: ``torch.compile`` on each repeated block of a model.

``train.compile: true`` compiles every layer of every ``nn.ModuleList`` of same-class blocks (a decoder's
or a vision tower's layers) with dynamic shapes, as PyTorch's "regional compilation" recipe does: the layers
share one compiled graph, so the compile costs one block's worth of time (about 25-40 s on 2 CPU cores for a
LLaMA layer, forward and backward) and batches of any length reuse it. Inductor fuses the element-wise work
around the matmuls (RMSNorm, rotary embeddings, SwiGLU, residual adds) that eager mode runs as separate
memory-bound kernels; on 2 CPU cores that made a step of the demo VLM's stage 2 (a 4-layer, 128-wide LLaMA)
1.12x faster and one of the native decoder 1.22x (BENCHMARKS.md, session 23). The rest of the model
(embeddings, connectors, heads, losses) stays eager, so data-dependent code (``<image>`` scattering, masks)
never breaks a graph.

On a CPU, inductor builds C++ kernels: where no C++ compiler is found, ``compiled_blocks`` warns and trains
eagerly (same results, only slower), so a recipe that asks for compilation still runs anywhere.

Compilation is undone when training ends (``compiled_blocks`` is a context manager): evaluation, generation
with a KV cache and saving see the eager model. State dicts are unchanged (``nn.Module.compile`` does not wrap).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from torch import nn


@cache
def cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with, or None where there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler (or fails to import) when none is found
        return None


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The items of every ``nn.ModuleList`` in ``model`` whose items share one class (a stack of layers)."""
    blocks: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len({type(m) for m in module}) != 1:
            continue
        blocks.extend(m for m in module if not isinstance(m, nn.ModuleList | nn.ModuleDict))
    return blocks


@contextmanager
def compiled_blocks(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Compile ``model``'s repeated blocks for the body of the ``with`` (yields how many); restore eager after."""
    if enabled and _on_cpu(model) and cpp_compiler() is None:
        warnings.warn("train.compile: no C++ compiler found for torch.compile; training eagerly", stacklevel=3)
        enabled = False
    blocks = repeated_blocks(model) if enabled else []
    for block in blocks:
        block.compile(dynamic=True)
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: calls go to forward again


def _on_cpu(model: nn.Module) -> bool:
    return next((p.device.type == "cpu" for p in model.parameters()), True)
