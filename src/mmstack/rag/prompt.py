"""The RAG prompt: the sources numbered [1], [2] ..., each as its text snippet followed by its image (an
``<image>`` placeholder), then the question (with its own image first, if any) and the instruction to cite.

    Sources:
    [1] Exhibit 17 belongs to the north hall. <image>
    [2] Exhibit 4 is kept in the east hall. <image>
    Question: <image> Which exhibit is this?
    Answer and cite the source number.

Each snippet comes before its image so that the image's tokens can attend to their own number and note,
and the question comes last, as a follow-up question in the same conversation does (``render_question``):
training conversations (``mmstack.rag.training_data``) ask several questions about one set of sources,
and a model sees at inference exactly the layout it learnt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from mmstack.rag.types import Prompt, Source

IMAGE_PLACEHOLDER = "<image>"
INSTRUCTION = "Answer and cite the source number."
NO_SOURCES = "No sources."


def clean_snippet(text: str | None, max_chars: int = 400) -> str:
    """One line of at most ``max_chars`` characters, with any ``<image>`` placeholder text removed."""
    if not text:
        return ""
    line = " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())
    return line if len(line) <= max_chars else line[: max_chars - 3].rstrip() + "..."


def render_question(question: str, query_image: bool = False) -> str:
    """The question part of a prompt (also a follow-up turn): the question and the instruction to cite."""
    q = clean_snippet(question, 2000)
    return f"Question: {IMAGE_PLACEHOLDER} {q}\n{INSTRUCTION}" if query_image else f"Question: {q}\n{INSTRUCTION}"


def render_prompt(question: str, snippets: Sequence[tuple[str, bool]], query_image: bool) -> str:
    """The prompt text for ``snippets`` = (text, has_image) per source, numbered from 1."""
    lines = ["Sources:"]
    for i, (text, has_image) in enumerate(snippets, start=1):
        parts = [f"[{i}]"] + ([text] if text else []) + ([IMAGE_PLACEHOLDER] if has_image else [])
        lines.append(" ".join(parts))
    if not snippets:
        lines.append(NO_SOURCES)
    lines.append(render_question(question, query_image))
    return "\n".join(lines)


def build_prompt(
    question: str,
    sources: Sequence[Source],
    query_image: Image.Image | None = None,
    load: Callable[[str], Image.Image] | None = None,
    max_images: int = 3,
    max_snippet_chars: int = 400,
    warn: Callable[[str], None] | None = None,
) -> Prompt:
    """Number ``sources`` from 1 (setting ``Source.number``), load the images of the first ``max_images``
    sources that have one, and render the prompt (source images first, then the query image).

    A source image that fails to load is left out with a warning (the source stays, as text only).
    """
    images: list[Image.Image] = []
    snippets = []
    n_source_images = 0
    for i, src in enumerate(sources, start=1):
        src.number = i
        img = None
        if src.path and load is not None and n_source_images < max_images:
            try:
                img = load(src.path)
            except Exception as err:  # a broken file must not sink the question
                if warn is not None:
                    warn(f"source [{i}] {src.id}: image {src.path} could not be loaded ({err}); using its text only")
        src.image_in_prompt = img is not None
        if img is not None:
            images.append(img)
            n_source_images += 1
        snippets.append((clean_snippet(src.text, max_snippet_chars), img is not None))
    if query_image is not None:
        images.append(query_image)  # its placeholder comes after the sources'
    return Prompt(render_prompt(question, snippets, query_image is not None), images, list(sources))
