"""Which precision a run really uses: bf16 autocast only where the hardware computes bf16 natively.

On a CPU without AVX512-BF16 or AMX (e.g. an AVX2-only laptop or cloud core) PyTorch emulates bf16 matmuls,
about 8x slower than fp32 (measured on a 2-core AVX2 EPYC: a 4352 x 128 @ 128 x 512 matmul took 10.2 ms in
fp32 and 88.6 ms in bf16). A recipe that asks for ``bf16`` for speed then runs many times slower, so there
it falls back to fp32 with a warning; ``MMSTACK_BF16=force`` keeps bf16 anyway (e.g. to check numerics).
"""

from __future__ import annotations

import os
import platform

import torch

from mmstack.utils.progress import console

_warned: set[str] = set()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True when ``device`` computes bf16 matmuls natively (CUDA with bf16, or an x86 CPU with AVX512-BF16 /
    AMX). Other CPUs (AVX2-only x86, and ARM, where PyTorch's CPU bf16 kernels vary) count as emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # other accelerators: trust the recipe
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def effective_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``precision`` itself, except ``bf16`` on a device without native bf16, which becomes ``fp32``
    (warned once per process) unless ``MMSTACK_BF16=force``."""
    if precision != "bf16" or native_bf16(device) or os.environ.get("MMSTACK_BF16", "").lower() == "force":
        return precision
    key = torch.device(device).type
    if key not in _warned:
        _warned.add(key)
        console.print(
            f"[yellow]warning:[/] precision bf16 asked for, but this {key.upper()} has no native bf16 "
            "(AVX512-BF16/AMX): emulated bf16 is ~8x slower, so this run uses fp32; "
            "set MMSTACK_BF16=force to keep bf16"
        )
    return "fp32"
