"""The RAG pipeline with fake retrievers and generators: fusion, prompts, citations, graceful degradation."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from mmstack.errors import ConfigError
from mmstack.rag import Hit, Pipeline, PipelineConfig, Query, Source
from mmstack.rag.citations import map_citations, parse_citations, strip_citations
from mmstack.rag.fusion import fuse_hits
from mmstack.rag.pipeline import NOTHING_RETRIEVED
from mmstack.rag.prompt import build_prompt

COLOURS = {"a": (200, 0, 0), "b": (0, 200, 0), "c": (0, 0, 200), "d": (200, 200, 0), "e": (0, 200, 200)}


def _image(item_id: str) -> Image.Image:
    return Image.new("RGB", (8, 8), COLOURS[item_id])


class ListRetriever:
    """Returns a fixed ranking; ``only_with_image`` makes it apply to image questions only."""

    def __init__(self, name: str, ids: list[str], only_with_image: bool = False) -> None:
        self.name, self.ids, self.only_with_image = name, ids, only_with_image
        self.calls = 0

    def applies(self, query: Query) -> bool:
        return query.has_image or not self.only_with_image

    def retrieve(self, query: Query, k: int) -> list[Hit]:
        self.calls += 1
        return [Hit(i, 1.0 / (r + 1), path=f"{i}.png", text=f"note of {i}") for r, i in enumerate(self.ids[:k])]


class BrokenRetriever:
    name = "broken"

    def retrieve(self, query: Query, k: int) -> list[Hit]:
        raise RuntimeError("index file is corrupt")


class EchoGenerator:
    """Answers with a fixed text and records what it was given."""

    def __init__(self, answer: str = "red [1]") -> None:
        self.answer = answer
        self.prompts: list[tuple[str, list[Image.Image]]] = []

    def generate(self, prompt: str, images) -> str:
        self.prompts.append((prompt, list(images)))
        return self.answer


def _pipeline(retrievers, generator=None, **cfg) -> Pipeline:
    return Pipeline(retrievers, generator or EchoGenerator(), config=PipelineConfig(**cfg), load_image=_load)


def _load(path: str) -> Image.Image:
    return _image(path.removesuffix(".png"))


# ------------------------------------------------------------------------------------------- fusion


def test_fusion_matches_a_hand_worked_example():
    # text: a b c ; image: c a ; cross: d c   (k = 60, ranks from 1)
    # a: 1/61 + 1/62 = 0.032522   c: 1/63 + 1/61 + 1/62 = 0.048522   b: 1/62 = 0.016129   d: 1/61
    lists = {
        "text": [Hit("a", 9.0), Hit("b", 8.0), Hit("c", 7.0)],
        "image": [Hit("c", 0.9), Hit("a", 0.8)],
        "cross": [Hit("d", 0.5), Hit("c", 0.4)],
    }
    fused = fuse_hits(lists, k=60)
    assert [s.id for s in fused] == ["c", "a", "d", "b"]
    expected = {"c": 1 / 63 + 1 / 61 + 1 / 62, "a": 1 / 61 + 1 / 62, "d": 1 / 61, "b": 1 / 62}
    for s in fused:
        assert s.score == pytest.approx(expected[s.id], abs=1e-9)
    by_id = {s.id: s for s in fused}
    assert by_id["c"].retrievers == {"text": 3, "image": 1, "cross": 2}
    assert by_id["b"].retrievers == {"text": 2}


def test_fusion_keeps_path_and_text_from_whichever_retriever_has_them():
    lists = {"text": [Hit("x", 1.0, text="a note")], "image": [Hit("x", 1.0, path="x.png")]}
    (src,) = fuse_hits(lists)
    assert (src.path, src.text) == ("x.png", "a note")


def test_pipeline_uses_the_fused_order_and_reports_retriever_ranks():
    # a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63
    pipe = _pipeline(
        [ListRetriever("text", ["a", "b", "c"]), ListRetriever("cross", ["c", "a", "d"])], top_k=4, context_k=2
    )
    result = pipe.ask("what colour?")
    assert [s.id for s in result.sources] == ["a", "c", "b", "d"]
    assert result.sources[1].retrievers == {"text": 3, "cross": 1}
    assert [s.number for s in result.sources] == [1, 2, 0, 0]  # only context_k sources enter the prompt


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_numbers_snippets_and_holds_images_in_placeholder_order():
    sources = [Source(i, 1.0, path=f"{i}.png", text=f"Exhibit {i} is in the north hall.") for i in ("a", "b", "c")]
    query_img = _image("e")
    prompt = build_prompt("Which exhibit is this?", sources, query_img, _load, max_images=2)
    lines = prompt.text.splitlines()
    assert lines[0] == "Sources:"
    assert lines[1] == "[1] Exhibit a is in the north hall. <image>"
    assert lines[2] == "[2] Exhibit b is in the north hall. <image>"
    assert lines[3] == "[3] Exhibit c is in the north hall."  # over max_images: text only
    assert lines[4:] == ["Question: <image> Which exhibit is this?", "Answer and cite the source number."]
    assert prompt.text.count("<image>") == len(prompt.images) == 3
    assert [im.getpixel((0, 0)) for im in prompt.images] == [COLOURS["a"], COLOURS["b"], COLOURS["e"]]
    assert [s.number for s in sources] == [1, 2, 3]
    assert [s.image_in_prompt for s in sources] == [True, True, False]


def test_prompt_strips_placeholder_text_from_snippets_and_survives_a_broken_image():
    sources = [Source("a", 1.0, path="missing.png", text="sneaky <image> text"), Source("b", 1.0, path="b.png")]
    warnings: list[str] = []

    def load(path: str) -> Image.Image:
        if path == "missing.png":
            raise OSError("no such file")
        return _load(path)

    prompt = build_prompt("q?", sources, None, load, max_images=3, warn=warnings.append)
    assert prompt.text.count("<image>") == len(prompt.images) == 1  # only b's image
    assert "[1] sneaky text" in prompt.text and "[2] <image>" in prompt.text
    assert len(warnings) == 1 and "missing.png" in warnings[0]


def test_generator_gets_the_prompt_and_images():
    gen = EchoGenerator()
    pipe = _pipeline([ListRetriever("text", ["a", "b"])], gen, context_k=2, max_images=2)
    pipe.ask("What colour is a?")
    ((text, images),) = gen.prompts
    assert text.startswith("Sources:\n[1] note of a <image>\n[2] note of b <image>\nQuestion: What colour is a?")
    assert [im.getpixel((0, 0)) for im in images] == [COLOURS["a"], COLOURS["b"]]


# ---------------------------------------------------------------------------------------- citations


def test_parse_and_strip_citations():
    assert parse_citations("red [2]") == [2]
    assert parse_citations("it is red [ 2 ] and blue [1, 3][2]") == [2, 1, 3]
    assert parse_citations("no sources") == []
    assert strip_citations("red [ 2 ] .") == "red."
    assert strip_citations("exhibit 17 [1][3]") == "exhibit 17"


def test_citations_map_to_the_right_items():
    gen = EchoGenerator("exhibit c [2] [7]")
    pipe = _pipeline([ListRetriever("text", ["a", "c", "b"])], gen, top_k=3, context_k=2)
    result = pipe.ask("Which exhibit shows a blue square?")
    assert result.answer == "exhibit c"
    assert result.citations == [2] and result.invalid_citations == [7]
    assert [s.id for s in result.cited] == ["c"]
    assert any("[7]" in w for w in result.warnings)
    out = result.to_dict()
    assert out["cited"] == ["c"] and out["sources"][1]["path"] == "c.png"


def test_map_citations_ignores_sources_outside_the_prompt():
    sources = [Source("a", 1.0, number=1), Source("b", 1.0, number=0)]
    assert map_citations([1, 2], sources) == ([1], [2])


# ------------------------------------------------------------------------------------- degradation


def test_a_failing_retriever_degrades_to_the_others_with_a_warning(caplog):
    good = ListRetriever("text", ["a", "b"])
    pipe = _pipeline([BrokenRetriever(), good])
    with caplog.at_level(logging.WARNING, logger="mmstack.rag"):
        result = pipe.ask("what?")
    assert [s.id for s in result.sources] == ["a", "b"]
    assert result.answer == "red" and result.message is None
    assert any("broken" in w and "index file is corrupt" in w for w in result.warnings)
    assert "broken" in caplog.text


def test_an_empty_retriever_degrades_with_a_warning():
    result = _pipeline([ListRetriever("image", []), ListRetriever("text", ["b"])]).ask("what?")
    assert [s.id for s in result.sources] == ["b"]
    assert any("'image' found nothing" in w for w in result.warnings)


def test_a_retriever_that_does_not_apply_is_skipped_silently():
    image_only = ListRetriever("image", ["c"], only_with_image=True)
    result = _pipeline([image_only, ListRetriever("text", ["a"])]).ask("text only")
    assert image_only.calls == 0 and result.warnings == []
    result = _pipeline([image_only, ListRetriever("text", ["a"])]).ask("this?", image=_image("d"))
    assert image_only.calls == 1 and {s.id for s in result.sources} == {"a", "c"}


def test_a_question_over_an_empty_collection_gets_a_clear_message():
    gen = EchoGenerator()
    result = _pipeline([ListRetriever("text", []), ListRetriever("cross", [])], gen).ask("anything?")
    assert result.message == NOTHING_RETRIEVED and "empty" in result.message
    assert result.answer == "" and result.sources == [] and gen.prompts == []


def test_config_is_validated():
    with pytest.raises(ConfigError, match="context_k"):
        PipelineConfig(top_k=2, context_k=3)
    with pytest.raises(ConfigError, match="unique"):
        Pipeline([ListRetriever("x", []), ListRetriever("x", [])])
