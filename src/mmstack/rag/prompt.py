"""The RAG prompt: the question (with its own image, if any), then the sources numbered [1], [2] ..., each as
its text snippet followed by its image (an ``<image>`` placeholder), then the instruction to cite.

    Question: <image> Which exhibit is this?
    Sources:
    [1] Exhibit 17 belongs to the north hall. <image>
    [2] Exhibit 4 is kept in the east hall. <image>
    Answer and cite the source number.

The question comes first so that every source image's tokens can attend to what is asked (and to the query
image), as the bridge VLM learnt to read images in stage 2 (question before the image); each snippet comes
before its image so that the image's tokens can also attend to their own number and note. With the question
last, the tuned demo VLM read the colour or shape of a named exhibit's object at 0.50; question first, 0.85
(BENCHMARKS.md, session 18). A follow-up question in the same conversation (``render_question``) comes after
the images; training conversations (``mmstack.rag.training_data``) ask several questions about one set of
sources, so a model sees at inference exactly the layout it learnt.
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
    """The prompt text for ``snippets`` = (text, has_image) per source, numbered from 1, after the question."""
    q = clean_snippet(question, 2000)
    lines = [f"Question: {IMAGE_PLACEHOLDER} {q}" if query_image else f"Question: {q}", "Sources:"]
    for i, (text, has_image) in enumerate(snippets, start=1):
        parts = [f"[{i}]"] + ([text] if text else []) + ([IMAGE_PLACEHOLDER] if has_image else [])
        lines.append(" ".join(parts))
    if not snippets:
        lines.append(NO_SOURCES)
    lines.append(INSTRUCTION)
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
    sources that have one, and render the prompt (the query image first, then the source images).

    A source image that fails to load is left out with a warning (the source stays, as text only).
    """
    images: list[Image.Image] = [query_image] if query_image is not None else []  # placeholder order
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
    return Prompt(render_prompt(question, snippets, query_image is not None), images, list(sources))
