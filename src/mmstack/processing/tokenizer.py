"""A small caption tokenizer trained with HF ``tokenizers`` and wrapped as ``PreTrainedTokenizerFast``.

Every sequence is ``<|startoftext|> tokens <|endoftext|>`` (as CLIP), padded with ``<pad>`` (id 0).
The end token's id is 3, never 2: HF's ``CLIPTextModel`` treats ``eos_token_id == 2`` as a legacy config
and pools at the largest token id instead of the first end token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from mmstack.errors import ConfigError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0, 1, 2, 3


def train_caption_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    kind: Literal["wordlevel", "bpe"] = "wordlevel",
    max_length: int = 32,
    min_frequency: int = 1,
    lowercase: bool = True,
):
    """Train a tokenizer on ``texts`` and return it as a ``transformers.PreTrainedTokenizerFast``.

    Args:
        texts: training captions.
        vocab_size: largest vocabulary, special tokens included (a word-level vocabulary may be smaller).
        kind: ``"wordlevel"`` (one id per word: tiny, exact for a closed vocabulary such as the shapes world)
            or ``"bpe"`` (byte-level BPE: no unknown words).
        max_length: the model's context length, stored as ``model_max_length``.
        min_frequency: words (or merges) seen fewer times are left out.
        lowercase: lower-case text before splitting.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind not in ("wordlevel", "bpe"):
        raise ConfigError(f"tokenizer kind must be 'wordlevel' or 'bpe', got {kind!r}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"tokenizer vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    if max_length < 3:
        raise ConfigError(f"tokenizer max_length must be >= 3 (start, a token, end), got {max_length}")
    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
        )
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    else:
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.decoder = decoders.ByteLevel()
    if lowercase:
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError("cannot train a caption tokenizer on no texts: pass at least one caption")
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    return wrap_tokenizer(tok, max_length)


def wrap_tokenizer(tok, max_length: int):
    """Wrap a ``tokenizers.Tokenizer`` with our special tokens as ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
