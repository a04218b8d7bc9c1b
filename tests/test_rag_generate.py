"""The bridge VLM as the RAG generator (multi-image prompts) and the RAG adaptation of a checkpoint."""

from __future__ import annotations

import pytest
import torch

from _bridge_helpers import solid, tiny_model
from mmstack.errors import ModelError
from mmstack.models.bridge import BridgeModel
from mmstack.processing.bridge_processor import IGNORE_INDEX
from mmstack.rag.generators import BridgeGenerator
from mmstack.rag.training_data import build_training_set, world_vocabulary
from mmstack.rag.tune import RagBatches, RagTuneConfig, extend_vocabulary, tune_for_rag, unknown_words
from mmstack.train.trainer import TrainConfig

PROMPT = "Sources:\n[1] red <image>\n[2] blue <image>\nQuestion: What colour is the star?\nAnswer and cite the source number."


def test_multi_image_prompt_expands_every_placeholder():
    gen = BridgeGenerator(tiny_model(), max_new_tokens=4)
    batch = gen.encode([PROMPT], [[solid("red"), solid("blue")]])
    per_image = gen.model.processor.tokens_per_view(32, 32)
    assert int((batch["input_ids"] == gen.model.config.image_token_id).sum()) == 2 * per_image
    assert len(batch["pixel_values"]) == 2
    with pytest.raises(Exception, match="placeholder"):
        gen.encode([PROMPT], [[solid("red")]])


def test_batched_generation_equals_one_prompt_at_a_time():
    gen = BridgeGenerator(tiny_model(seed=1), max_new_tokens=6)
    prompts = [
        PROMPT,
        "Question: <image> which?\nSources:\n[1] green <image>\nAnswer and cite the source number.",
        "hi",
    ]
    images = [[solid("red"), solid("blue")], [solid("yellow"), solid("green")], []]
    batched = gen.generate_batch(prompts, images)
    assert batched == [gen.generate(p, imgs) for p, imgs in zip(prompts, images, strict=True)]
    # the images reach the model: other pixels, other logits
    a = gen.model(**gen.encode([PROMPT], [[solid("red"), solid("blue")]])).logits
    b = gen.model(**gen.encode([PROMPT], [[solid("blue"), solid("red")]])).logits
    assert not torch.allclose(a, b)


def test_too_long_a_prompt_fails_with_the_numbers():
    model = tiny_model()
    model.language_model.config.max_position_embeddings = 40
    with pytest.raises(ModelError, match="max_images"):
        BridgeGenerator(model).encode([PROMPT], [[solid("red"), solid("blue")]])


def test_extend_vocabulary_adds_whole_words_and_survives_save_load(tmp_path):
    model = tiny_model()
    tok = model.processor.tokenizer
    texts = ["Exhibit 17 belongs to the north hall. [2]", *world_vocabulary()]
    assert "17" in unknown_words(tok, texts) and "<image>" not in unknown_words(tok, texts)
    added = extend_vocabulary(model, texts)
    assert {"exhibit", "17", "[", "north"} <= set(added)
    ids = tok("exhibit 17 [17] 170", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:5] == ["exhibit", "17", "[", "17", "]"]
    assert ids[-1] == tok.unk_token_id  # "170" is not "17" + "0"
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(tok)
    model.save_pretrained(tmp_path / "m")
    loaded = BridgeModel.from_pretrained(tmp_path / "m")
    assert loaded.processor.tokenizer("exhibit 17", add_special_tokens=False)["input_ids"] == ids[:2]
    gen_a, gen_b = BridgeGenerator(model.eval(), 5), BridgeGenerator(loaded, 5)
    assert gen_a.generate(PROMPT, [solid("red"), solid("blue")]) == gen_b.generate(
        PROMPT, [solid("red"), solid("blue")]
    )


def test_split_digits_reads_numbers_piece_by_piece_and_decodes_them_whole(tmp_path):
    model = tiny_model()
    tok = model.processor.tokenizer
    before = {w: tok.convert_tokens_to_ids(w) for w in ("red", "<image>", "<video>", "circle")}
    texts = ["Exhibit 17 belongs to the north hall. [2]", *world_vocabulary()]
    added = extend_vocabulary(model, texts, split_digits=True)
    assert {"##0", "##9", "exhibit", "north"} <= set(added)
    assert not any(w.isdigit() and len(w) > 1 for w in added)  # no number is a word of its own
    text = "exhibit 17 [2] 170 red <image>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["exhibit", "1"] and pieces[2] == "##7" and pieces[6:9] == ["1", "##7", "##0"]
    assert tok.unk_token_id not in ids and len(set(ids)) == len(set(pieces))  # one id per piece, none shared
    assert {w: tok.convert_tokens_to_ids(w) for w in before} == before  # known words keep their ids
    assert max(ids) < model.language_model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.processor.decode(ids).startswith("exhibit 17 [ 2 ] 170 red")
    model.save_pretrained(tmp_path / "m")
    loaded = BridgeModel.from_pretrained(tmp_path / "m")
    assert loaded.processor.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert extend_vocabulary(loaded, [text], split_digits=True) == []  # nothing left: the split is saved with it


def test_new_words_start_distinct_and_old_rows_stay():
    # transformers' mean resizing gives every new word (nearly) the same vector; exhibit 17 and exhibit 71
    # must start apart for the model to learn to tell them apart in context
    model = tiny_model()
    emb = model.language_model.get_input_embeddings().weight
    old_rows = emb.detach().clone()
    extend_vocabulary(model, world_vocabulary())
    emb = model.language_model.get_input_embeddings().weight.detach()
    assert torch.equal(emb[: len(old_rows)], old_rows)
    new = emb[len(old_rows) :]
    assert len(new) > 50
    gaps = torch.cdist(new, new)[~torch.eye(len(new), dtype=torch.bool)]
    old_gaps = torch.cdist(old_rows, old_rows)[~torch.eye(len(old_rows), dtype=torch.bool)]
    assert gaps.min() > 0.5 * old_gaps.median()  # as far apart as the trained words are, none a copy
    assert torch.allclose(new.mean(0), old_rows.mean(0), atol=3 * float(old_rows.std(0).max()) / len(new) ** 0.5)


def test_rag_batches_label_only_the_cited_answer():
    model = tiny_model()
    data = build_training_set(6, seed=5, context_k=2, turns=3, n_records=10, image_size=32)
    extend_vocabulary(model, [t["value"] for ex in data.examples for t in ex.turns()])
    batches = RagBatches(data, model.processor)
    batch = batches.batch(torch.arange(6))
    n_images = sum(len(ex.images) for ex in data.examples)
    assert batch["pixel_values"].shape[0] == n_images
    per_image = model.processor.tokens_per_view(32, 32)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == n_images * per_image
    for row, ex in zip(batch["labels"], data.examples, strict=True):
        answers = model.processor.decode(row[row != IGNORE_INDEX])  # every gpt turn, end tokens skipped
        assert answers.replace(" ", "") == "".join(t["value"] for t in ex.turns()[1::2]).replace(" ", "")
    assert model(**batch).loss.isfinite()


def test_tune_for_rag_end_to_end(tmp_path):
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    train = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=3, batch_size=4, log_every=1)
    cfg = RagTuneConfig(n_examples=12, context_k=2, turns=2, text_steps=2, text_batch=4, train=train)
    summary = tune_for_rag(tmp_path / "base", tmp_path / "tuned", cfg)
    assert summary["steps"] == {"text": 2, "main": 3} and summary["added_words"] > 50
    assert (tmp_path / "tuned" / "run-text" / "metrics.jsonl").is_file()
    tuned = BridgeModel.from_pretrained(summary["model"])
    frozen = dict(base.vision_tower.named_parameters())
    for name, p in tuned.vision_tower.named_parameters():
        assert torch.equal(p, frozen[name]), name  # the vision tower stays frozen by default
    assert isinstance(BridgeGenerator(tuned, 4).generate(PROMPT, [solid("red"), solid("blue")]), str)


def test_training_conversations_are_written_for_a_recipe(tmp_path):
    import json

    from mmstack.rag.training_data import write_training_conversations

    summary = write_training_conversations(tmp_path / "rag-train", n_examples=10, seed=3, context_k=2, image_size=32)
    records = json.loads((tmp_path / "rag-train" / "conversations.json").read_text())
    assert len(records) == summary["n_examples"] == 10
    for rec in records:
        turns = rec["conversations"]
        assert sum(t["value"].count("<image>") for t in turns[::2]) == len(rec["images"]) >= 2
        assert turns[0]["value"].startswith("Sources:\n[1] ") and len(turns) == 8
        assert all((tmp_path / "rag-train" / p).is_file() for p in rec["images"])
        assert all(t["value"].startswith("[") for t in turns[1::2]) and len(rec["kinds"]) == 4
    again = tmp_path / "again"
    write_training_conversations(again, n_examples=10, seed=3, context_k=2, image_size=32)
    assert (again / "conversations.json").read_text() == (tmp_path / "rag-train" / "conversations.json").read_text()


def test_rag_tuning_raises_the_training_length_to_fit_several_images(tmp_path):
    from mmstack.rag.tune import _fit_max_length

    model = tiny_model(max_length=64)
    data = build_training_set(4, seed=1, context_k=3, n_records=8, image_size=32)
    extend_vocabulary(model, [t["value"] for ex in data.examples for t in ex.turns()])
    batches = RagBatches(data, model.processor)
    assert batches.longest > 64
    _fit_max_length(model, batches.longest)
    assert model.processor.config.max_length == batches.longest
    batch = batches.batch(torch.arange(4))  # nothing truncated: every answer keeps its tokens
    assert int((batch["labels"] != IGNORE_INDEX).sum(1).min()) >= 4
    model.language_model.config.max_position_embeddings = 32
    with pytest.raises(Exception, match="context_k"):
        _fit_max_length(model, batches.longest)


def test_text_only_conversations_teach_lookup_without_images():
    model = tiny_model()
    data = build_training_set(8, seed=2, context_k=3, turns=2, n_records=10, image_size=32, text_only=1.0)
    assert data.images == [] and all(k == "note" for ex in data.examples for k in ex.kinds)
    first = data.examples[0].turns()[0]["value"]
    assert "<image>" not in first and first.startswith("Sources:\n[1] ")
    extend_vocabulary(model, [t["value"] for ex in data.examples for t in ex.turns()])
    batch = RagBatches(data, model.processor).batch(torch.arange(8))
    assert batch["pixel_values"] is None and model(**batch).loss.isfinite()


def test_described_notes_say_what_each_exhibit_shows_and_ask_lookups_by_content():
    data = build_training_set(
        40, seed=3, context_k=3, turns=3, n_records=12, image_size=32, text_only=1.0, described=True
    )
    assert data.images == []
    kinds = {k for ex in data.examples for k in ex.kinds}
    assert "image" not in kinds and {"lookup", "fact", "attribute", "note"} <= kinds
    lookups = 0
    for ex in data.examples:
        prompt = ex.turns()[0]["value"]
        sources = [line for line in prompt.splitlines() if line.startswith("[")]
        assert len(sources) == 3 and all(" It shows a" in s for s in sources)
        for question, answer in zip(ex.turns()[0::2], ex.turns()[1::2], strict=True):
            line = question["value"].splitlines()[-2]  # the question, before the instruction to cite
            if line.startswith("Question: Which exhibit shows"):
                cited = int(answer["value"][1])  # "[2] exhibit 17": the number copied from source [2]
                thing = line.removeprefix("Question: Which exhibit shows ").rstrip("?")
                source = sources[cited - 1]
                assert thing in source and answer["value"].split()[-1] in source.split(".")[0].split()
                lookups += 1
    assert lookups >= 5
