"""The native model's unified vocabulary and sequence layouts: text tokens, structural tokens, image codes.

One id space (``NativeVocab``)::

    [0, n_text)                   text tokens of the caption tokenizer (0 <pad>, 1 <unk>, 2 <bos>, 3 <eos>)
    n_text + 0 ... n_text + 5     <boi> <eoi> <eol> <sep> <bov> <eov>
    n_text + 6 ...                image codes 0 ... n_codes - 1 of the VQ tokenizer

An image of h x w codes is ``<boi> row_1 <eol> row_2 <eol> ... row_h <eol> <eoi>`` (Emu3's end-of-row
tokens make the 2-D shape explicit); a clip is ``<bov> image <sep> image <sep> ... image <eov>``.
Training sequences (``build_sequence``)::

    text -> image    <bos> caption <boi> ... <eoi>              loss on the image block
    image -> text    <bos> <boi> ... <eoi> caption <eos>        loss on the caption and <eos>
    text -> video    <bos> caption <bov> ... <eov>              loss on the clip block
    video -> text    <bos> <bov> ... <eov> caption <eos>        loss on the caption and <eos>

A generated block ends the sequence (its closing token is the stop token), so what follows ``<eoi>`` is
always a caption: with an ``<eos>`` there too, the model would have to tell the two tasks apart from how
the sequence began.

Condition dropout replaces the caption by nothing (``<bos> <boi> ...``): the unconditional branch that
classifier-free guidance subtracts. Every token has a modality type (text 0, image 1, video 2) for the
model's type embeddings, and every target belongs to one output group: the image group (codes, <eol>,
<eoi>) follows exactly the inputs <boi>, <eol> and codes; everything else is the text group. That rule lets
per-modality heads know which head speaks next from the inputs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmstack.errors import ConfigError

TEXT, IMAGE, VIDEO = 0, 1, 2
MODALITIES = ("text", "image", "video")
STRUCTURAL = ("boi", "eoi", "eol", "sep", "bov", "eov")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # the caption tokenizer's special tokens (processing.tokenizer)
TASKS = ("t2i", "i2t", "t2v", "v2t")


class LayoutError(ValueError):
    """A token sequence does not follow the image/clip layout (e.g. an unconstrained generation)."""


@dataclass(frozen=True)
class NativeVocab:
    """Offsets of the unified vocabulary.

    Args:
        n_text: size of the caption tokenizer's vocabulary (its ids are kept as they are).
        n_codes: codebook size of the VQ tokenizer.
        grid: codes per side of one image (h = w = grid).
    """

    n_text: int
    n_codes: int
    grid: int

    def __post_init__(self) -> None:
        if self.n_text <= EOS_ID or self.n_codes < 2 or self.grid < 1:
            raise ConfigError(f"bad native vocabulary: n_text={self.n_text}, n_codes={self.n_codes}, grid={self.grid}")

    @property
    def boi(self) -> int:
        return self.n_text

    @property
    def eoi(self) -> int:
        return self.n_text + 1

    @property
    def eol(self) -> int:
        return self.n_text + 2

    @property
    def sep(self) -> int:
        return self.n_text + 3

    @property
    def bov(self) -> int:
        return self.n_text + 4

    @property
    def eov(self) -> int:
        return self.n_text + 5

    @property
    def code_offset(self) -> int:
        return self.n_text + len(STRUCTURAL)

    @property
    def size(self) -> int:
        """Total vocabulary size."""
        return self.code_offset + self.n_codes

    @property
    def image_len(self) -> int:
        """Tokens of one image block, <boi> and <eoi> included."""
        return self.grid * (self.grid + 1) + 2

    def to_dict(self) -> dict[str, int]:
        return {"n_text": self.n_text, "n_codes": self.n_codes, "grid": self.grid}

    # ------------------------------------------------------------------------------------- groups

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.code_offset

    def image_group(self) -> torch.Tensor:
        """Ids the image head speaks (codes, <eol>, <eoi>), ascending."""
        return torch.cat([torch.tensor([self.eoi, self.eol]), torch.arange(self.code_offset, self.size)])

    def text_group(self) -> torch.Tensor:
        """Ids the text head speaks (everything outside the image group), ascending."""
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[self.image_group()] = False
        return torch.nonzero(keep).flatten()

    def next_is_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether the token after each input belongs to the image group (inside an image block)."""
        return self.is_code(ids) | (ids == self.boi) | (ids == self.eol)

    def modality_types(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality type of every token of ``ids`` (B, L): video inside <bov>..<eov>, image inside
        <boi>..<eoi> (both inclusive), text elsewhere."""
        opened = torch.cumsum((ids == self.bov).long(), -1)
        closed = torch.cumsum((ids == self.eov).long(), -1) - (ids == self.eov).long()
        in_video = opened > closed
        opened = torch.cumsum((ids == self.boi).long(), -1)
        closed = torch.cumsum((ids == self.eoi).long(), -1) - (ids == self.eoi).long()
        in_image = opened > closed
        types = torch.full_like(ids, TEXT)
        types[in_image] = IMAGE
        types[in_video] = VIDEO
        return types

    def block_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Offset of every token inside its image block (``<boi>`` 0, the codes and ``<eol>`` of row r at
        ``1 + r * (w + 1) + c``, ``<eoi>`` last) and -1 outside blocks; (B, L). Gives image tokens their 2-D
        place whatever the length of the caption before them."""
        idx = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        last_boi = torch.cummax(torch.where(ids == self.boi, idx, torch.full_like(idx, -1)), dim=-1).values
        offset = idx - last_boi
        inside = (last_boi >= 0) & (offset < self.image_len) & (self.modality_types(ids) != TEXT)
        return torch.where(inside, offset, torch.full_like(offset, -1))

    # ------------------------------------------------------------------------------------- layout

    def image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """``<boi> rows with <eol> <eoi>`` of one image's codes (h, w)."""
        if tuple(codes.shape) != (self.grid, self.grid):
            raise ConfigError(f"image codes must be ({self.grid}, {self.grid}), got {tuple(codes.shape)}")
        rows = torch.cat([codes.long() + self.code_offset, torch.full((self.grid, 1), self.eol)], 1)  # (h, w + 1)
        return torch.cat([torch.tensor([self.boi]), rows.flatten(), torch.tensor([self.eoi])])

    def video_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """``<bov> image <sep> image ... <eov>`` of a clip's codes (T, h, w)."""
        parts = [torch.tensor([self.bov])]
        for t, codes in enumerate(frames):
            if t:
                parts.append(torch.tensor([self.sep]))
            parts.append(self.image_tokens(codes))
        parts.append(torch.tensor([self.eov]))
        return torch.cat(parts)

    def parse_image(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Codes (h, w) of an image block (``<boi>`` ... ``<eoi>``); raises ``LayoutError`` if malformed."""
        ids = torch.as_tensor(ids).long().flatten()
        if len(ids) != self.image_len or int(ids[0]) != self.boi or int(ids[-1]) != self.eoi:
            raise LayoutError(
                f"an image block is <boi> {self.grid} rows <eoi> ({self.image_len} tokens), got {len(ids)}"
            )
        rows = ids[1:-1].view(self.grid, self.grid + 1)  # (h, w + 1)
        if not bool((rows[:, -1] == self.eol).all()):
            raise LayoutError("a row of the image block does not end with <eol>")
        codes = rows[:, :-1]
        if not bool(self.is_code(codes).all()):
            raise LayoutError("a non-code token sits inside the image block")
        return codes - self.code_offset

    def parse_video(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Codes (T, h, w) of a clip block (``<bov>`` ... ``<eov>``); raises ``LayoutError`` if malformed."""
        ids = torch.as_tensor(ids).long().flatten()
        n = len(ids) - 2
        step = self.image_len + 1
        if n < self.image_len or int(ids[0]) != self.bov or int(ids[-1]) != self.eov or (n + 1) % step:
            raise LayoutError(f"a clip block is <bov> images separated by <sep> <eov>, got {len(ids)} tokens")
        frames = []
        for t in range((n + 1) // step):
            start = 1 + t * step
            if t and int(ids[start - 1]) != self.sep:
                raise LayoutError(f"frame {t} is not preceded by <sep>")
            frames.append(self.parse_image(ids[start : start + self.image_len]))
        return torch.stack(frames)

    def build_sequence(
        self,
        task: str,
        caption: torch.Tensor,
        visual: torch.Tensor,
        drop_condition: bool = False,
        train_visual: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training sequence and its target mask (True where the token is predicted and trained).

        Args:
            task: ``t2i``, ``i2t``, ``t2v`` or ``v2t``.
            caption: caption token ids without <bos>/<eos> (1-D).
            visual: codes (h, w) for images, (T, h, w) for clips.
            drop_condition: for t2i/t2v, leave the caption out (the unconditional branch of guidance).
            train_visual: for i2t/v2t, train the image/clip block too: it is an unconditional image (the
                same prefix as a dropped-condition t2i example), so guidance's unconditional branch and the
                image structure get extra signal from tokens the forward pass computes anyway.
        """
        if task not in TASKS:
            raise ConfigError(f"unknown native task {task!r}; known: {', '.join(TASKS)}")
        block = self.image_tokens(visual) if task in ("t2i", "i2t") else self.video_tokens(visual)
        bos, eos = torch.tensor([BOS_ID]), torch.tensor([EOS_ID])
        caption = caption.long()
        if task in ("t2i", "t2v"):
            cond = caption[:0] if drop_condition else caption
            ids = torch.cat([bos, cond, block])
            n_prompt = 1 + len(cond)
        else:
            ids = torch.cat([bos, block, caption, eos])
            n_prompt = 1 if train_visual else 1 + len(block)
        target = torch.zeros(len(ids), dtype=torch.bool)
        target[n_prompt:] = True
        return ids, target

    def generation_prompt(self, task: str, caption: torch.Tensor | None = None, visual: torch.Tensor | None = None):
        """The prompt ids of inference: ``<bos> caption`` (t2i/t2v; no caption: unconditional) or
        ``<bos> block`` (i2t/v2t, followed by the caption the model writes)."""
        bos = torch.tensor([BOS_ID])
        if task in ("t2i", "t2v"):
            return torch.cat([bos, (caption if caption is not None else torch.empty(0)).long()])
        if visual is None:
            raise ConfigError(f"task {task} needs the image or clip codes")
        block = self.image_tokens(visual) if task == "i2t" else self.video_tokens(visual)
        return torch.cat([bos, block])
