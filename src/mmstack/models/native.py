"""The native multimodal model (Emu3-style): one decoder-only transformer over text tokens and image codes.

    model = mmstack.load("models/native")
    img = model.generate("a large red circle at the top left", output_modality="image").outputs[0]
    text = model.generate(img, output_modality="text").outputs[0]

Images and clip frames become discrete codes of a VQ tokenizer (``mmstack.models.vq``); text, codes and
structural tokens share one vocabulary and one sequence (``mmstack.processing.native_tokens`` documents the
layout). The trunk is an HF ``LlamaModel`` (tiny config); a learned modality-type embedding (text / image /
video) is added to the token embeddings. The output is one shared head over the whole vocabulary (as Emu3)
or one head per modality (``head: per_modality``): a text head and an image head that each speak only their
group of the vocabulary; which one speaks is fixed by the current input token (inside an image block the
image head, elsewhere the text head), so the routing needs no look-ahead at generation time.

The checkpoint folder holds the decoder weights, its caption tokenizer (``tokenizer/``) and a copy of the VQ
tokenizer (``vq/``), so loading it is enough to caption and to draw. The VQ tokenizer is not a parameter of
the decoder (it is trained first and frozen) and is kept out of the module tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmstack.config import from_dict, to_dict
from mmstack.errors import ConfigError, ModelError
from mmstack.models.vq import VQModel, read_meta
from mmstack.processing.native_tokens import NativeVocab
from mmstack.utils.atomic import atomic_dir, atomic_write_json, atomic_write_text

FAMILY = "native"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


@dataclass
class NativeConfig:
    """Architecture of the decoder (the vocabulary comes from the tokenizers, see ``NativeVocab``).

    ``intermediate_size`` None means 8/3 of ``hidden_size`` rounded up to a multiple of 32 (LLaMA's ratio).
    ``block_positions`` adds a learned embedding of each image token's place in its block (row and column,
    as in Parti's 2-D position embeddings), so the model need not infer the 2-D layout from 1-D positions
    that shift with the caption length.
    ``init_std`` None means ``hidden_size ** -0.5`` (unit-scale activations): GPT-2's 0.02, tuned for widths
    of 768 and more, leaves tiny decoders near chance for far longer (on the micro colour-captioning run,
    100 steps reach 1.0 accuracy with 1/sqrt(d) and stay at chance with 0.02).
    ``code_init: codebook`` starts the image codes' embeddings and output rows from the VQ codebook (its
    principal components, see ``code_features``), so codes that look alike start alike; on the demo world
    the image-token loss after 150 steps fell from 1.38 (random rows) to 1.03.
    """

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    intermediate_size: int | None = None
    max_positions: int = 1024
    head: Literal["shared", "per_modality"] = "shared"
    modality_embeddings: bool = True
    block_positions: bool = True
    rope_theta: float = 10000.0
    dropout: float = 0.0
    init_std: float | None = None
    code_init: Literal["random", "codebook"] = "codebook"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"native.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.heads or (self.hidden_size // self.heads) % 2:
            raise ConfigError(
                f"native.hidden_size={self.hidden_size} must split into native.heads={self.heads} heads of even size"
            )
        kv = self.kv_heads or self.heads
        if self.heads % kv:
            raise ConfigError(f"native.heads={self.heads} must be a multiple of native.kv_heads={kv}")
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(self.hidden_size * 8 / 3 / 32)
        if self.init_std is None:
            self.init_std = round(self.hidden_size**-0.5, 6)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"native.dropout must be in [0, 1), got {self.dropout}")
        if self.code_init not in ("random", "codebook"):
            raise ConfigError(f"native.code_init must be random or codebook, got {self.code_init!r}")

    def llama(self, vocab_size: int):
        """The HF ``LlamaConfig`` of the trunk."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads,
            max_position_embeddings=self.max_positions,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            attention_dropout=self.dropout,
            initializer_range=self.init_std,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
        )


@dataclass
class NativeOutput:
    """``logits`` (B, L, V) float32 over the whole vocabulary (-inf outside the speaking head's group with
    per-modality heads), or (N, V) at the N positions a ``logits_mask`` selects; ``hidden`` (B, L, D);
    ``past_key_values`` when ``use_cache``."""

    logits: torch.Tensor
    hidden: torch.Tensor
    past_key_values: Any = None


class NativeModel(nn.Module):
    """The decoder over the unified vocabulary, with its tokenizers attached.

    Args:
        config: the decoder architecture.
        vocab: offsets of the unified vocabulary.
        tokenizer: the caption tokenizer (``PreTrainedTokenizerFast``; its ids are the text ids).
        vq: the VQ image tokenizer (frozen; not registered as a submodule).
    """

    def __init__(
        self, config: NativeConfig, vocab: NativeVocab, tokenizer: Any = None, vq: VQModel | None = None
    ) -> None:
        super().__init__()
        from transformers import LlamaModel

        self.config, self.vocab = config, vocab
        self.backbone = LlamaModel(config.llama(vocab.size))
        d = config.hidden_size
        self.type_embed = nn.Embedding(3, d) if config.modality_embeddings else None
        self.block_embed = nn.Embedding(vocab.image_len, d) if config.block_positions else None
        if config.head == "shared":
            self.head = nn.Linear(d, vocab.size, bias=False)
        else:
            self.register_buffer("text_ids", vocab.text_group(), persistent=False)
            self.register_buffer("image_ids", vocab.image_group(), persistent=False)
            self.heads = nn.ModuleDict(
                {
                    "text": nn.Linear(d, len(self.text_ids), bias=False),
                    "image": nn.Linear(d, len(self.image_ids), bias=False),
                }
            )
        heads = list(self.heads.values()) if config.head != "shared" else [self.head]
        for module in [self.type_embed, self.block_embed, *heads]:
            if module is not None:
                nn.init.normal_(module.weight, std=config.init_std)
        if config.code_init == "codebook" and vq is not None:
            self.init_code_embeddings(vq.quantizer.codebook)
        self.tokenizer = tokenizer
        object.__setattr__(self, "vq", vq)  # frozen, trained apart: not a submodule, not in state_dict
        self.card: dict[str, Any] = {}

    @torch.no_grad()
    def init_code_embeddings(self, codebook: torch.Tensor) -> None:
        """Start the image codes' input embeddings and output rows from the VQ codebook's geometry.

        Random rows make every one of thousands of codes a fresh symbol the decoder must learn from its own
        few occurrences; rows that follow the code vectors (patch pixels, see ``code_features``) let what is
        learnt about one code (its colour, its edge) transfer at once to the codes that look like it.
        """
        feats = code_features(codebook, self.config.hidden_size, self.config.init_std)  # (K, D)
        off = self.vocab.code_offset
        self.backbone.embed_tokens.weight[off:] = feats
        if self.config.head == "shared":
            self.head.weight[off:] = feats
        else:
            self.heads["image"].weight[2:] = feats  # the image group is <eoi>, <eol>, then the codes

    # ------------------------------------------------------------------------------------- forward

    def embed(
        self,
        input_ids: torch.Tensor,
        modality_types: torch.Tensor | None = None,
        block_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings plus modality-type and in-block position embeddings, (B, L, D)."""
        x = self.backbone.embed_tokens(input_ids)
        if self.type_embed is not None:
            types = self.vocab.modality_types(input_ids) if modality_types is None else modality_types
            x = x + self.type_embed(types)
        if self.block_embed is not None:
            pos = self.vocab.block_positions(input_ids) if block_positions is None else block_positions
            x = x + self.block_embed(pos.clamp_min(0)) * (pos >= 0).unsqueeze(-1).to(x.dtype)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        modality_types: torch.Tensor | None = None,
        block_positions: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> NativeOutput:
        """Logits for the token after each position of ``input_ids`` (B, L).

        ``modality_types`` and ``block_positions`` default to those read from ``input_ids``; incremental
        decoding passes them, since they depend on the blocks opened earlier in the sequence.
        ``logits_mask`` (B, L) bool computes the head only where it is True (logits (N, V) for the N selected
        positions, as HF's ``logits_to_keep``): training needs logits only where a target follows, and the
        head over thousands of codes is a large share of a small decoder's step.
        """
        if int(input_ids.max()) >= self.vocab.size or int(input_ids.min()) < 0:
            raise ModelError(
                f"token ids must lie in [0, {self.vocab.size}), got {int(input_ids.min())}..{int(input_ids.max())}"
            )
        out = self.backbone(
            inputs_embeds=self.embed(input_ids, modality_types, block_positions),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        keep = slice(None) if logits_mask is None else logits_mask
        return NativeOutput(self.head_logits(hidden[keep], input_ids[keep]), hidden, out.past_key_values)

    def head_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits (..., V) from hidden states (..., D) and the inputs (...) that route
        the heads."""
        if self.config.head == "shared":
            return self.head(hidden).float()
        image_state = self.vocab.next_is_image(input_ids)[..., None]  # (..., 1)
        out = hidden.new_full((*hidden.shape[:-1], self.vocab.size), float("-inf"), dtype=torch.float32)
        out[..., self.text_ids] = self.heads["text"](hidden).float().masked_fill(image_state, float("-inf"))
        out[..., self.image_ids] = self.heads["image"](hidden).float().masked_fill(~image_state, float("-inf"))
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------- processing

    def encode_text(self, text: str) -> torch.Tensor:
        """Caption token ids of ``text`` without <bos>/<eos> (1-D long)."""
        self._need("tokenizer")
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def decode_text(self, ids: torch.Tensor | list[int]) -> str:
        """Text of caption token ids (special and non-text ids dropped)."""
        self._need("tokenizer")
        ids = [int(i) for i in ids if 3 < int(i) < self.vocab.n_text]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def image_codes(self, images: Any) -> torch.Tensor:
        """VQ codes (B, h, w) of images (PIL images, paths, uint8 arrays or a (B, 3, H, W) tensor in [0, 1])."""
        self._need("vq")
        from mmstack.models.native_generate import to_pixels

        return self.vq.encode(to_pixels(images, self.vq.config.image_size))

    def _need(self, what: str) -> None:
        if getattr(self, what) is None:
            raise ModelError(f"this native model has no {what}; load a checkpoint saved by `mmstack train native`")

    # ----------------------------------------------------------------------------------- generation

    def generate(self, inputs: Any, output_modality: str = "text", **options: Any):
        """Caption images or clips (``output_modality="text"``), draw images or clips from prompts
        (``"image"`` / ``"video"``). See ``mmstack.models.native_generate.generate`` for the options
        (guidance scale, top-k, temperature, constrained decoding, KV cache, frames, seed)."""
        from mmstack.models.native_generate import generate

        return generate(self, inputs, output_modality, **options)

    # ------------------------------------------------------------------------------------------ io

    def save_pretrained(self, path: str | Path, card: dict[str, Any] | None = None) -> None:
        """Write config.json (family ``native``), model.safetensors, tokenizer/, vq/ and a README card."""
        from safetensors.torch import save_file

        from mmstack import __version__

        self._need("tokenizer")
        self._need("vq")
        if card is not None:
            self.card = card
        meta = {
            "family": FAMILY,
            "format_version": FORMAT_VERSION,
            "mmstack_version": __version__,
            "model": to_dict(self.config),
            "vocab": self.vocab.to_dict(),
            "card": self.card,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(Path(path)) as tmp:
            atomic_write_json(tmp / "config.json", meta)
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "family": FAMILY})
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            self.vq.save_pretrained(tmp / "vq")
            atomic_write_text(tmp / "README.md", _card_text(self, Path(path).name))

    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> NativeModel:
        """Load a folder written by ``save_pretrained`` (eval mode)."""
        from safetensors.torch import load_file
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        meta = read_meta(path, FAMILY)
        config = from_dict(NativeConfig, meta.get("model", {}), f"{path}/config.json:model")
        vocab = NativeVocab(**meta["vocab"])
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"))
        model = cls(config, vocab, tokenizer, VQModel.from_pretrained(path / "vq"))
        try:
            model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        except (RuntimeError, OSError) as err:
            raise ModelError(f"{path}/{WEIGHTS_FILE} does not match its config.json ({err}); re-save it") from None
        model.card = meta.get("card", {}) or {}
        return model.eval()


def code_features(codebook: torch.Tensor, dim: int, std: float) -> torch.Tensor:
    """(K, dim) rows with the geometry of the VQ code vectors (K, C): their principal components (centred),
    scaled so the mean row norm is that of a ``normal(0, std)`` row; dimensions past the codebook's rank are
    zero (random ones would blur the geometry the rows are meant to carry)."""
    x = codebook.detach().float().cpu()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # principal directions, (min(K, C), C)
    k = min(dim, vh.shape[0])
    feats = torch.zeros(len(x), dim)
    feats[:, :k] = x @ vh[:k].T  # (K, k)
    return feats * (std * dim**0.5 / feats.norm(dim=1).mean().clamp_min(1e-8))


def _card_text(model: NativeModel, name: str) -> str:
    c, v = model.config, model.vocab
    lines = [
        f"# {name}",
        "",
        f"mmstack native model: a {c.layers}-layer, {c.hidden_size}-wide LLaMA decoder over {v.size} tokens "
        f"({v.n_text} text, 6 structural, {v.n_codes} image codes; {v.grid}x{v.grid} codes per image), "
        f"{c.head} output head, {model.num_parameters() / 1e6:.2f}M parameters.",
        "",
        "Layout: `<bos> caption <boi> rows with <eol> <eoi> <eos>` (generation), "
        "`<bos> <boi> ... <eoi> caption <eos>` (captioning).",
    ]
    for section in ("training", "metrics"):
        if model.card.get(section):
            lines += ["", f"## {section.title()}", ""]
            lines += [f"- {k}: {val}" for k, val in model.card[section].items()]
    return "\n".join([*lines, ""])
