"""Which attention kernel the HF models in a training run use.

transformers picks ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``) by default. On a CPU its
backward pass is slow for the encoders trained here: on the demo CLIP (head dim 32, 17 image and up to 48 text
tokens, batch 256, 2 cores, bf16) one forward + backward took 0.19 s per tower with ``sdpa`` and 0.07-0.10 s
with ``eager`` (plain matmul + softmax); forward-only time was the same. Causal decoder LMs gain nothing
(a 4-layer Llama, batch 32 x 200 tokens: bf16 0.28 s ``sdpa`` vs 0.22 s ``eager``, fp32 0.45 s both; a
6-layer one at 16 x 300: fp32 1.47 s vs 1.88 s). So ``train.attention: auto`` (the default) switches the HF
encoders of a run (every HF model whose type is not a causal LM, e.g. CLIP/SigLIP towers, a bridge's vision
tower) to ``eager`` when they train on a CPU, and leaves decoders, and everything on a GPU, alone. ``eager``
or ``sdpa`` sets every HF model. The switch is numerically the same attention and is not saved with
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


def is_causal_lm(module: nn.Module) -> bool:
    """Whether an HF model is of a causal-LM type (Llama, GPT-2, Qwen2 ...), whatever its head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(getattr(module, "config", None), "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


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
        if choice == "auto" and is_causal_lm(module):
            continue
        module.set_attn_implementation(impl)
        switched.append(type(module).__name__)
    return switched


def attention_of(model: nn.Module) -> set[str]:
    """The attention implementations the HF models inside ``model`` use now."""
    from transformers import PreTrainedModel

    return {m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)}
