"""The multimodal reward model: the bridge VLM with a scalar head (LLaVA-RLHF, TRL's reward modelling).

    image + prompt + answer -> BridgeModel (vision tower, connector, decoder) -> hidden states (B, T, D)
    -> linear head -> a score per position (B, T); the reward is the score of the last non-padding token
       (+ likelihood_scale * the answer's log-likelihood under the model's own LM head, ``likelihood``)

The likelihood term (on by default; a learned scale starting at 1) is the VLM's own judgement of the answer, as
DPO's implicit reward is: the demo VLM prefers the right description to one with a swapped shape 97-100% of the time
by likelihood, while a head on the last token, trained with Bradley-Terry on 6,000 pairs, scored those pairs at
chance (0.48-0.55) and all pairs 0.919; with the term, 0.986 (BENCHMARKS.md, session 19). Callers pass
``answer_mask`` (which tokens are the answer: ``labels != -100`` of a processor batch, a rollout's response) to
get ``rewards``; ``values`` need no mask.

The same class serves as PPO's value model (TRL initialises the critic from the reward model): its
per-position scores are the values. It is built from a trained bridge checkpoint (``from_bridge``), so it
starts out seeing images as well as the VLM does; the LM's next-token head is unused, and frozen when it
is not tied to the input embeddings (so every trainable parameter gets a gradient).

Checkpoints are folders like the bridge's: ``config.json`` (family ``reward``, the bridge config),
``model.safetensors``, the bridge processor and a model card; ``mmstack.load(path)`` returns a ``RewardModel``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmstack.config import from_dict, to_dict
from mmstack.errors import ModelError
from mmstack.models.bridge import (
    BridgeConfig,
    BridgeModel,
    PixelInput,
    _quiet_transformers,
    count_parameters,
    lm_parts,
    load_checkpoint_weights,
    positions_from_mask,
    read_checkpoint_config,
    write_checkpoint,
)

FAMILY = "reward"


@dataclass
class RewardOutput:
    """``rewards`` (B,): each answer's reward; ``values`` (B, T): the head's score at every position."""

    values: torch.Tensor
    scores: torch.Tensor | None = None

    @property
    def rewards(self) -> torch.Tensor:
        if self.scores is None:
            raise ModelError(
                "this reward model adds the answer's log-likelihood to its score: pass answer_mask (which "
                "tokens are the answer, e.g. labels != -100 of a processor batch) to get rewards"
            )
        return self.scores


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left, right and no padding): (B, T) -> (B,)."""
    t = attention_mask.shape[1]
    return (t - 1) - attention_mask.flip(-1).long().argmax(-1)


class RewardModel(nn.Module):
    """A bridge VLM whose output is a scalar per position instead of next-token logits.

    Args:
        vlm: the bridge model (its ``processor`` is used to encode inputs and is saved with the weights).
        likelihood: add ``likelihood_scale`` (learned, from 1) times the answer's summed token log-probs.
    """

    def __init__(self, vlm: BridgeModel, likelihood: bool = True) -> None:
        super().__init__()
        self.vlm = vlm
        self.likelihood_scale = nn.Parameter(torch.tensor(1.0)) if likelihood else None
        self.score = nn.Linear(vlm.text_dim, 1)
        # A small head keeps the initial rewards near zero, so early Bradley-Terry gradients are balanced.
        nn.init.normal_(self.score.weight, std=1.0 / (vlm.text_dim + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)
        _, embed, head = lm_parts(vlm.language_model)
        if head is not None and head.weight is not embed.weight:
            head.weight.requires_grad_(False)

    @classmethod
    def from_bridge(cls, path_or_model: str | Path | BridgeModel, likelihood: bool = True) -> RewardModel:
        """A reward model on top of a trained bridge VLM (a checkpoint folder or a model); the head is new."""
        vlm = path_or_model if isinstance(path_or_model, BridgeModel) else BridgeModel.from_pretrained(path_or_model)
        return cls(vlm, likelihood)

    @property
    def likelihood(self) -> bool:
        """Whether the reward adds the answer's log-likelihood (saved in the checkpoint's config)."""
        return self.likelihood_scale is not None

    @property
    def processor(self) -> Any:
        return self.vlm.processor

    @property
    def config(self) -> BridgeConfig:
        return self.vlm.config

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: PixelInput = None,
        video_values: PixelInput = None,
    ) -> torch.Tensor:
        """The decoder's last hidden states with the visual tokens in place: (B, T, D)."""
        embeds = self.vlm.embed(input_ids, pixel_values, video_values)
        decoder, _, _ = lm_parts(self.vlm.language_model)
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: PixelInput = None,
        video_values: PixelInput = None,
        answer_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> RewardOutput:
        """Scores of a batch (padding on either side); ``answer_mask`` (B, T) marks the answer tokens (needed
        for ``rewards`` when ``likelihood`` is on). Extra keys of a processor batch (labels) are ignored."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, video_values)
        values = self.score(hidden).squeeze(-1).float()  # (B, T)
        rows = torch.arange(values.shape[0], device=values.device)
        scores = values[rows, last_token_index(attention_mask)]
        if self.likelihood_scale is not None:
            if answer_mask is None:
                return RewardOutput(values=values)
            scores = scores + self.likelihood_scale * self.answer_logp(hidden, input_ids, answer_mask.bool())
        return RewardOutput(values=values, scores=scores)

    def answer_logp(self, hidden: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """Sum over each row's answer tokens of log p(token | everything before it): (B,). Only the positions
        that predict an answer token go through the LM head."""
        _, _, head = lm_parts(self.vlm.language_model)
        target = answer_mask[:, 1:]  # position t - 1 predicts token t
        logits = head(hidden[:, :-1][target]).float()
        logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:][target].unsqueeze(-1)).squeeze(-1)
        rows = target.nonzero()[:, 0]
        return torch.zeros(input_ids.shape[0], device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)

    @torch.inference_mode()
    def score_texts(self, prompts: list[str], answers: list[str], images: list[Any] | None = None) -> torch.Tensor:
        """Rewards (N,) of ``answers`` to ``prompts`` about ``images`` (PIL images or None), in one batch."""
        proc = self.processor
        if proc is None:
            raise ModelError("this reward model has no processor attached; load it from a checkpoint folder")
        images = images or [None] * len(prompts)
        convs = [
            [{"from": "human", "value": _with_image(p, img is not None)}, {"from": "gpt", "value": a}]
            for p, a, img in zip(prompts, answers, images, strict=True)
        ]
        batch = proc(convs, images=images, padding_side="right", train=False)
        return self(**batch, answer_mask=batch["labels"] != -100).rewards

    # ---------------------------------------------------------------------------------- save/load

    def save_pretrained(self, path: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (family ``reward``), ``model.safetensors``, the processor and a model card."""
        if hasattr(self.vlm.language_model, "get_base_model"):
            raise ModelError("merge the LoRA adapters (merge_lora) before saving the reward model")
        config = {"family": FAMILY, "bridge": to_dict(self.vlm.config), "likelihood": self.likelihood}
        return write_checkpoint(self, path, config, self.processor, model_card(self, card or {}))

    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> RewardModel:
        """Load a reward checkpoint folder written by ``save_pretrained``."""

        path = Path(path)
        raw = read_checkpoint_config(path, "a reward checkpoint folder (mmstack train reward --out)")
        if raw.get("family") != FAMILY:
            raise ModelError(
                f"{path} holds a {raw.get('family')!r} checkpoint, not a reward model; "
                "train one with `mmstack train reward`"
            )
        cfg = from_dict(BridgeConfig, raw.get("bridge"), where=f"{path / 'config.json'}: bridge")
        with _quiet_transformers():
            model = cls(BridgeModel(cfg), likelihood=bool(raw.get("likelihood", False)))
        model.vlm.processor = load_checkpoint_weights(model, path)
        return model.eval()


# -------------------------------------------------------------------------------------------- helpers


def _with_image(prompt: str, has_image: bool) -> str:
    """The prompt as the processor's generation template writes it (``<image>`` line first)."""
    return f"<image>\n{prompt}" if has_image and "<image>" not in prompt else prompt


def model_card(model: RewardModel, card: dict[str, Any]) -> str:
    """A short README: what the model scores, its size, how it was trained and its eval numbers."""
    lines = [
        "# mmstack multimodal reward model",
        "",
        "A bridge VLM with a scalar head on the last non-padding token"
        + (" plus a learned multiple of the answer's log-likelihood" if model.likelihood else "")
        + ",",
        "trained with the Bradley-Terry loss on preference pairs (image, prompt, chosen, rejected).",
        "",
        f"- language model: `{model.config.text.get('model_type')}` (hidden {model.vlm.text_dim})",
        f"- parameters: {count_parameters(model):,}",
        "",
        "Load with `mmstack.load(path)`; score pairs with `mmstack eval reward --model PATH --data DIR`.",
    ]
    for title, key in (("Training", "training"), ("Evaluation", "eval")):
        if card.get(key):
            lines += ["", f"## {title}", "", "```json", json.dumps(card[key], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"
