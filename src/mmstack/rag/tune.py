"""RAG adaptation of a bridge VLM: teach a trained checkpoint the RAG prompt (numbered snippets with one image
each, answers that cite ``[n]``) on conversations from ``mmstack.rag.training_data``.

    summary = tune_for_rag("runs/vlm/model", "runs/vlm-rag", RagTuneConfig())

A world-trained VLM has a word-level vocabulary without the knowledge base's words ("exhibit", "hall",
"[", numbers ...): those are added to its tokenizer as whole words and the LM's embeddings grow to match
(new rows start at the old rows' mean plus noise at their spread, so that no two new words start alike).
Training uses the shared trainer and the llava recipe's task (next-token loss on the answer only); the vision
tower stays frozen by default. The result is a normal bridge checkpoint (``BridgeModel.from_pretrained``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmstack.config import to_dict
from mmstack.errors import ConfigError
from mmstack.processing.bridge_processor import IMAGE_TOKEN, VIDEO_TOKEN
from mmstack.rag.pipeline import PipelineConfig
from mmstack.rag.training_data import RagExample, RagTrainingSet, build_training_set, world_vocabulary
from mmstack.train.trainer import TrainConfig
from mmstack.utils.progress import console

_PUNCT_ONLY = re.compile(r"^\W+$")


@dataclass
class RagTuneConfig:
    """What ``tune_for_rag`` trains on and how.

    Args:
        n_examples: training conversations (fresh knowledge bases from ``seed``).
        turns: questions per conversation (the first with the sources, then follow-ups about them).
        seed: data seed; keep it apart from the evaluation seeds.
        context_k: sources per prompt (match the pipeline's ``context_k``).
        p_first: how often the right record is source [1] (a good retriever puts it first).
        text_only: share of conversations with notes only (cheap; they teach the in-context lookup).
        text_steps, text_batch: an optional first phase on notes-only conversations (0 steps: none).
        described: notes-only conversations say in words what each exhibit shows and ask lookups, facts and
            attributes too (``training_data.described_note``), not only halls. With ``text_steps`` 800 of 64
            this is what taught the demo VLM to copy exhibit numbers (answer accuracy 0.56 -> 0.81, lookups
            0.00 -> 0.70; without the text phase 0.59; BENCHMARKS.md, session 18).
        train_vision: also train the vision tower (slower; usually not needed).
        split_digits: read unknown numbers digit by digit (``split_numbers_into_digits``); off: on the demo VLM
            (1,200 steps, world RAG seed 0, 100 questions) it gave answer accuracy 0.53 against 0.54 for whole
            number words, exhibit numbers uncopied either way (BENCHMARKS.md, session 12).
        train: optimiser settings for the shared trainer.
    """

    n_examples: int = 3000
    turns: int = 4
    seed: int = 1000
    context_k: int = PipelineConfig.context_k  # tune as the pipeline asks
    p_first: float = 0.5
    text_only: float = 0.5
    text_steps: int = 0
    text_batch: int = 64
    described: bool = True
    train_vision: bool = False
    split_digits: bool = False
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-3, warmup_steps=20, max_steps=300, batch_size=16, weight_decay=0.0)
    )

    def __post_init__(self) -> None:
        if self.n_examples < 1 or self.context_k < 1 or self.turns < 1 or self.text_batch < 1:
            raise ConfigError("rag tune n_examples, turns, context_k and text_batch must be >= 1")
        if self.text_steps < 0:
            raise ConfigError(f"rag tune text_steps must be >= 0; got {self.text_steps}")
        for name in ("p_first", "text_only"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"rag tune {name} must be in [0, 1]; got {getattr(self, name)}")


# ------------------------------------------------------------------------------------- vocabulary


def unknown_words(tokenizer: Any, texts: list[str]) -> list[str]:
    """Words of ``texts`` (as the tokenizer splits them) that it maps to its unknown token, in first-seen order."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    backend = tokenizer.backend_tokenizer
    seen: dict[str, None] = {}
    for text in texts:
        text = text.replace(IMAGE_TOKEN, " ").replace(VIDEO_TOKEN, " ")
        norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(norm):
            if word not in seen and _reads_as_unknown(tokenizer, backend, word, unk):
                seen[word] = None
    return list(seen)


def _reads_as_unknown(tokenizer: Any, backend: Any, word: str, unk: int) -> bool:
    """Whether ``word`` (one pre-tokenized word) maps to the unknown token: not an added token, and its
    model pieces (one for a word-level vocabulary, several for digits read one by one) include ``unk``."""
    if tokenizer.convert_tokens_to_ids(word) != unk:
        return False
    return any(t.id == unk for t in backend.model.tokenize(word))


def extend_vocabulary(model: Any, texts: list[str], split_digits: bool = False) -> list[str]:
    """Add the words of ``texts`` that the model's tokenizer does not know; grow the LM embeddings to match.

    Words are added whole (a number never matches inside a longer number); punctuation may touch its
    neighbours ("[2]"). With ``split_digits`` a word-level tokenizer first learns to read unknown numbers
    digit by digit (``split_numbers_into_digits``), so "17" is "1" "##7", not one of 99 rare words.
    Returns the added words (digit pieces included).
    """
    from tokenizers import AddedToken

    tok = model.processor.tokenizer
    old = len(tok)
    pieces = split_numbers_into_digits(tok) if split_digits else []
    words = unknown_words(tok, texts)
    if not words and not pieces:
        return []
    if words:
        tok.add_tokens([AddedToken(w, single_word=not _PUNCT_ONLY.match(w), normalized=True) for w in words])
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers logs its mean resizing at length
    try:
        lm = model.language_model
        rows = lm.get_input_embeddings().weight.shape[0]  # may exceed the tokenizer (a padded vocabulary)
        size = max(len(tok), rows)
        if size > rows:
            lm.resize_token_embeddings(size, mean_resizing=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    _spread_new_rows(lm, min(old, rows))
    model.config.text["vocab_size"] = size  # so from_pretrained rebuilds the grown LM
    return pieces + words


def split_numbers_into_digits(tokenizer: Any) -> list[str]:
    """Make a word-level tokenizer read the numbers it does not know digit by digit, as BERT's WordPiece
    does: "17" becomes "1" "##7" and decodes back to "17". Returns the digit pieces added to its vocabulary
    (ids after every existing one; the caller grows the embeddings).

    A copy task over numbers then needs 20 frequent pieces instead of one rare word per number: the RAG
    answer "exhibit 17" is learnt from every exhibit number, not from the few prompts that name 17. Known
    words keep their ids and their single token (WordPiece matches a whole word first). Any other tokenizer
    (BPE, a pretrained LM's) is left alone: it has its own way with numbers.
    """
    from tokenizers import models

    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.model, models.WordLevel):
        return []
    # The added tokens (<image> ...) join the model's vocabulary under their own ids: tokenizers numbers the
    # next added token after the model's vocabulary size, which must therefore count every id in use.
    vocab = backend.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        return []  # ids with gaps: growing it safely is not this function's job
    pieces = [p for p in [*"0123456789", *(f"##{d}" for d in "0123456789")] if p not in vocab]
    for piece in pieces:
        vocab[piece] = len(vocab)
    backend.model = models.WordPiece(vocab, unk_token=tokenizer.unk_token, max_input_chars_per_word=100)
    return pieces


@torch.no_grad()
def _spread_new_rows(lm: Any, old: int) -> None:
    """Give the embedding rows from ``old`` on distinct values: the old rows' mean plus noise at their
    per-dimension spread. transformers' ``mean_resizing`` samples with 1e-9 of the old covariance, so every
    new word starts as the same vector; new words that must be told apart in context (exhibit 17 vs 71) then
    stay alike for thousands of steps. An untied output head gets the same treatment."""
    layers = [lm.get_input_embeddings()]
    head = lm.get_output_embeddings()
    if head is not None and head.weight is not layers[0].weight:
        layers.append(head)
    for layer in layers:
        w = layer.weight
        ref = w[:old].float()
        noise = torch.randn(w.shape[0] - old, w.shape[1], generator=torch.Generator().manual_seed(old))
        w[old:] = (ref.mean(0) + noise * ref.std(0)).to(w.dtype)


# ---------------------------------------------------------------------------------------- batches


class RagBatches:
    """A ``BatchSource`` of RAG conversations: tokenised once, pixels normalised once, several images each."""

    def __init__(self, data: RagTrainingSet, proc: Any) -> None:
        from mmstack.processing.image import normalize, stack_uint8, to_uint8

        self.proc = proc
        self.examples: list[RagExample] = data.examples
        self.templates = [proc.encode_turns(ex.turns(), name=f"rag example {i}") for i, ex in enumerate(data.examples)]
        cfg = proc.config.image
        uint8 = [to_uint8(img, cfg) for img in data.images]
        self.pixels = normalize(stack_uint8(uint8), cfg) if uint8 else None  # (N, 3, H, W)
        self.per_image = proc.tokens_per_view(*cfg.size)
        self.longest = max(len(t.input_ids) + t.n_images * (self.per_image - 1) for t in self.templates)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        rows, images = [], []
        for i in indices.tolist():
            ex, tpl = self.examples[i], self.templates[i]
            rows.append(self.proc.expand(tpl, [self.per_image] * len(ex.images), train=True, name=f"rag example {i}"))
            images.extend(ex.images)
        batch: dict[str, Any] = self.proc.pad(rows, "right")
        batch["pixel_values"] = self.pixels[images] if images else None  # (n_images, 3, H, W), placeholder order
        batch["video_values"] = None
        return batch


# ------------------------------------------------------------------------------------------- tune


def _fit_max_length(model: Any, longest: int) -> None:
    """Raise the processor's training ``max_length`` to the longest RAG conversation (RAG prompts hold
    several images, so they outgrow single-image limits); refuse when the LM has too few positions."""
    proc_cfg = model.processor.config
    limit = getattr(model.language_model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ConfigError(f"RAG conversations reach {longest} tokens but the LM has {limit} positions; lower context_k")
    proc_cfg.max_length = max(proc_cfg.max_length, longest)


def _fit(model: Any, data: RagTrainingSet, train: TrainConfig, run_dir: Path, run_config: dict[str, Any]) -> Any:
    """One training phase with the shared trainer and the llava recipe's task."""
    from mmstack.train.llava import LlavaTask
    from mmstack.train.trainer import Trainer

    batches = RagBatches(data, model.processor)
    _fit_max_length(model, batches.longest)
    trainer = Trainer(LlavaTask(model, lr=train.lr), batches, train, run_dir, run_config=run_config)
    with torch.enable_grad():  # a caller may have turned gradients off (inference CLIs do)
        return trainer.fit()


def tune_for_rag(base: str | Path, out: str | Path, cfg: RagTuneConfig | None = None) -> dict[str, Any]:
    """Fine-tune the bridge checkpoint ``base`` on RAG conversations; save the result to ``out``/model.

    With ``text_steps`` > 0 a first phase trains on notes-only conversations (``out``/run-text), then the
    main phase on the multimodal mixture (``out``/run).
    """
    from mmstack.models.bridge import BridgeModel
    from mmstack.utils.seeding import seed_everything

    cfg = cfg or RagTuneConfig()
    out = Path(out)
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    model = BridgeModel.from_pretrained(base).train()
    data = build_training_set(
        cfg.n_examples,
        cfg.seed,
        cfg.context_k,
        cfg.turns,
        p_first=cfg.p_first,
        text_only=cfg.text_only,
        described=cfg.described,
    )
    notes = None
    if cfg.text_steps:
        n_notes = cfg.text_steps * cfg.text_batch // 2  # each seen about twice
        notes = build_training_set(
            n_notes, cfg.seed + 1, cfg.context_k, cfg.turns, text_only=1.0, described=cfg.described
        )
    texts = world_vocabulary() + [t["value"] for d in (data, notes) if d for ex in d.examples for t in ex.turns()]
    added = extend_vocabulary(model, texts, split_digits=cfg.split_digits)
    model.set_trainable(vision=cfg.train_vision, connector=True, language=True)
    run_config = {"rag_tune": to_dict(cfg), "base": str(base)}
    prepare_s = time.perf_counter() - t0
    console.print(f"rag tune: {len(data.examples)} conversations, {len(data.images)} images, {len(added)} new words")
    seconds, phases = 0.0, {}
    if notes is not None:
        text_train = replace(cfg.train, max_steps=cfg.text_steps, batch_size=cfg.text_batch)
        phases["text"] = _fit(model, notes, text_train, out / "run-text", {**run_config, "phase": "text"})
        seconds += phases["text"].seconds
    phases["main"] = _fit(model, data, cfg.train, out / "run", run_config)
    seconds += phases["main"].seconds
    model.eval()
    result = {
        "base": str(base),
        "steps": {name: summary.steps for name, summary in phases.items()},
        "train_s": round(seconds, 2),
        "prepare_s": round(prepare_s, 2),
        "examples": len(data.examples) + (len(notes.examples) if notes else 0),
        "added_words": len(added),
        "final_loss": phases["main"].final_loss,
    }
    model.save_pretrained(out / "model", card={"training": {**run_config, "summary": result}})
    return {**result, "model": str(out / "model")}
