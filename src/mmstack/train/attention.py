"""Which attention kernel the HF models in a training run use.

transformers picks ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``) by default. On a CPU its
backward pass is slow for the short sequences and small heads trained here: ``train.attention: auto`` (the
default) switches every HF model of a run to ``eager`` (plain matmul + softmax) when it trains on a CPU, and
leaves everything on a GPU alone. Measured on 2 CPU cores, fp32, one forward + backward (BENCHMARKS.md):

- the demo CLIP towers (head dim 32, 17 image and up to 48 text tokens, batch 256): 0.19 s a tower with
  ``sdpa``, 0.07-0.10 s with ``eager`` (session 3);
- the native demo decoder (4 layers, 192 wide, 64 rows of ~110 tokens with padding): 1.13 s -> 0.64 s eager,
  and 0.80 s -> 0.42 s with ``train.compile`` (session 25: ``sdpa``'s CPU backward took ~100 ms a layer,
  13x its forward); the demo VLM's compiled stage 2 (a 4-layer, 128-wide Llama) steps 1.85x faster.

(A plain ``LlamaModel`` timed alone had shown parity, which is why decoders kept ``sdpa`` until session 25.)
Eager attention holds a (batch, heads, L, L) weight tensor, so for long sequences choose ``sdpa``;
``eager`` or ``sdpa`` sets every HF model. The switch is numerically the same attention and is not saved with
checkpoints.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

AttentionChoice = Literal["auto", "eager", "sdpa"]
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "eager", "sdpa")


def resolve_attention(choice: str, model: nn.Module) -> str | None:
    """The implementation to set (``eager``/``sdpa``), or None to keep the models' own choice."""
    if choice != "auto":
        return choice
    param = next(model.parameters(), None)
    on_cpu = param is None or param.device.type == "cpu"
    return "eager" if on_cpu else None


def set_attention(model: nn.Module, choice: str) -> list[str]:
    """Set the attention of every HF model inside ``model`` (``auto``: see the module docstring).

    Returns the class names of the HF models that were switched (empty when nothing changed).
    """
    from transformers import PreTrainedModel

    impl = resolve_attention(choice, model)
    if impl is None:
        return []
    switched = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(module, PreTrainedModel) or getattr(config, "_attn_implementation", impl) == impl:
            continue
        module.set_attn_implementation(impl)
        switched.append(type(module).__name__)
    return switched


def attention_of(model: nn.Module) -> set[str]:
    """The attention implementations the HF models inside ``model`` use now."""
    from transformers import PreTrainedModel

    return {m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)}
