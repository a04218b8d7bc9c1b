"""The bridge processor: labels, expansion, padding, errors; dynamic resolution, tiling, frame sampling."""

from __future__ import annotations

import pytest
import torch

from _bridge_helpers import qa, solid, tiny_model
from mmstack.errors import ConfigError, DataError
from mmstack.processing.bridge_processor import IGNORE_INDEX, BridgeProcessor, train_chat_tokenizer
from mmstack.processing.dynamic_resolution import dynamic_size, select_grid, tile_views
from mmstack.processing.video import sample_frame_indices


@pytest.fixture(scope="module")
def model():
    return tiny_model(select="full")  # 32 px, patch 8, CLS kept: 17 tokens per image


def _words(proc: BridgeProcessor, ids) -> list[str]:
    return proc.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_labels_cover_answers_and_end_tokens_only(model):
    proc = model.processor
    turns = qa("What colour is the star?", "red") + qa("How many objects are there?", "2", image=False)
    batch = proc([turns], [solid("red")])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    labelled = _words(proc, ids[labels != IGNORE_INDEX])
    assert labelled == ["red", "<|endoftext|>", "2", "<|endoftext|>"]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    n_image = int((ids == proc.image_token_id).sum())
    assert n_image == 17 == model.tokens_per_view(32, 32)
    image_pos = (ids == proc.image_token_id).nonzero().flatten()
    assert image_pos.tolist() == list(range(int(image_pos[0]), int(image_pos[0]) + 17))  # one contiguous block
    assert (labels[image_pos] == IGNORE_INDEX).all()


def test_mixed_batch_padding_masks_and_positions(model):
    from mmstack.models.bridge import positions_from_mask

    proc = model.processor
    convs = [qa("What colour is the star?", "red"), qa("How many?", "2", image=False)]
    images = [solid("red"), None]
    right = proc(convs, images, padding_side="right")
    left = proc(convs, images, padding_side="left")
    lengths = right["attention_mask"].sum(1)
    assert lengths[0] > lengths[1]
    short = int(lengths[1])
    assert right["attention_mask"][1, :short].all() and not right["attention_mask"][1, short:].any()
    assert (right["labels"][1, short:] == IGNORE_INDEX).all()
    assert (right["input_ids"][1, short:] == proc.pad_token_id).all()
    width = right["input_ids"].shape[1]
    assert not left["attention_mask"][1, : width - short].any()
    assert torch.equal(left["input_ids"][1, width - short :], right["input_ids"][1, :short])
    pos = positions_from_mask(left["attention_mask"])
    assert pos[1, width - short :].tolist() == list(range(short))
    assert right["pixel_values"].shape == (1, 3, 32, 32)  # only the row with an image contributes pixels
    with torch.no_grad():  # the text-only row's logits do not depend on padding side
        a = model(right["input_ids"], right["attention_mask"], right["pixel_values"]).logits[1, :short]
        b = model(left["input_ids"], left["attention_mask"], left["pixel_values"]).logits[1, width - short :]
    assert torch.allclose(a, b, atol=1e-5)


def test_generation_prompt_ends_with_the_assistant_tag(model):
    proc = model.processor
    batch = proc.prompts(["What colour is the star?"], [solid("red")])
    assert "labels" not in batch
    assert _words(proc, batch["input_ids"][0][-2:]) == ["assistant", ":"]


def test_image_placement_after_text_moves_the_visual_block_behind_the_question(model):
    from dataclasses import replace

    from mmstack.processing.bridge_processor import placeholders_after_text

    assert placeholders_after_text("<image>\nWhat colour?") == "What colour?\n<image>"
    assert placeholders_after_text("<image> <video>\nCompare them.") == "Compare them.\n<image>\n<video>"
    rag = "[1] Exhibit 17. <image>\nQuestion: which exhibit?"
    assert placeholders_after_text(rag) == rag  # placeholders inside the text stay beside their snippet
    assert placeholders_after_text("<image>\n") == "<image>\n"  # nothing to move behind
    assert placeholders_after_text("no visuals") == "no visuals"
    after = BridgeProcessor(model.processor.tokenizer, replace(model.processor.config, image_placement="after_text"))
    turns = qa("What colour is the star?", "red")
    first, last = model.processor([turns], [solid("red")]), after([turns], [solid("red")])
    image_id = after.image_token_id
    for batch in (first, last):
        assert int((batch["input_ids"][0] == image_id).sum()) == 17
    answer = (last["labels"][0] != IGNORE_INDEX).nonzero().flatten()
    image_pos = (last["input_ids"][0] == image_id).nonzero().flatten()
    question = (first["input_ids"][0] == image_id).nonzero().flatten()
    assert _words(after, [last["input_ids"][0][image_pos[0] - 1]]) == ["?"]  # the question, then the image
    assert int(question[-1]) < int(answer[0]) and int(image_pos[-1]) < int(answer[0])
    assert int(image_pos[0]) > int(question[0])  # moved later than where the text had it
    assert _words(after, last["labels"][0][answer]) == ["red", "<|endoftext|>"]  # answers still labelled
    with pytest.raises(ConfigError, match="image_placement must be"):
        replace(model.processor.config, image_placement="middle")


def test_template_that_splits_an_answer_token_fails():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mmstack.processing.tokenizer import wrap_tokenizer

    tok = Tokenizer(
        models.WordLevel({"<pad>": 0, "<unk>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(" USER", behavior="isolated")  # never splits at "ASSISTANT: "
    wrapped = wrap_tokenizer(tok, 64)
    wrapped.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    proc = BridgeProcessor(wrapped)
    with pytest.raises(DataError, match="does not tokenize as expected"):
        proc.encode_turns(qa("What colour is the star?", "red"), name="sample 7")


def test_placeholder_that_is_not_one_token_fails():
    from mmstack.processing.tokenizer import train_caption_tokenizer

    plain = train_caption_tokenizer(["image video what colour"])
    with pytest.raises(ConfigError, match="special token"):
        BridgeProcessor(plain)


def test_bad_conversations_and_image_counts_fail(model):
    proc = model.processor
    with pytest.raises(DataError, match="alternate"):
        proc.encode_turns([{"from": "gpt", "value": "red"}, {"from": "human", "value": "hi"}])
    with pytest.raises(DataError, match="role"):
        proc.encode_turns([{"from": "robot", "value": "red"}])
    tpl = proc.encode_turns(qa("What colour is the star?", "red"))
    with pytest.raises(DataError, match="1 <image> and 0 <video> placeholders but 2 images"):
        proc.expand(tpl, [17, 17])
    with pytest.raises(DataError, match="1 <image> and 0 <video> placeholders but 0 images"):
        proc([qa("What colour is the star?", "red")], [None])


def test_truncation_errors_name_the_sample():
    model = tiny_model(max_length=12)
    tpl = model.processor.encode_turns(qa("What colour is the star?", "red"))
    with pytest.raises(DataError, match=r"sample 3: .*would cut an image"):
        model.processor.expand(tpl, [17], name="sample 3")
    model = tiny_model(max_length=24)
    with pytest.raises(DataError, match="no assistant token is left"):
        model.processor.expand(tpl, [17], name="sample 3")
    ids, _ = model.processor.expand(tpl, [17], train=False)  # inference never truncates
    assert len(ids) > 24


def test_processor_round_trips(model, tmp_path):
    model.processor.save_pretrained(tmp_path)
    back = BridgeProcessor.from_pretrained(tmp_path)
    turns = qa("What colour is the star?", "red")
    assert back.config == model.processor.config
    assert back.encode_turns(turns) == model.processor.encode_turns(turns)


def test_world_tokenizer_keeps_placeholders_single():
    tok = train_chat_tokenizer(["a red circle", "What colour is the circle?"])
    for t in ("<image>", "<video>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1


@pytest.mark.parametrize(
    ("size", "max_tokens", "min_tokens", "expected"),
    [
        ((64, 64), 64, 1, (64, 64)),  # already aligned and within budget
        ((128, 64), 32, 1, (64, 32)),  # scaled down, 2:1 kept, exactly 32 patches
        ((8, 8), 64, 4, (16, 16)),  # scaled up to the minimum
        ((70, 30), 256, 1, (72, 32)),  # rounded to the patch grid
        ((1000, 100), 40, 1, (160, 16)),  # 10:1 kept, exactly 40 patches
        ((10000, 10), 40, 1, (320, 8)),  # one side clamped at a patch: the other is trimmed to the budget
    ],
)
def test_dynamic_size_keeps_aspect_aligns_and_caps_tokens(size, max_tokens, min_tokens, expected):
    w, h = dynamic_size(*size, patch_size=8, max_tokens=max_tokens, min_tokens=min_tokens)
    assert (w, h) == expected
    assert w % 8 == 0 and h % 8 == 0 and min_tokens <= (w // 8) * (h // 8) <= max_tokens


def test_dynamic_resolution_token_counts_follow_the_image():
    model = tiny_model(image_mode="dynamic", max_image_tokens=32, min_image_tokens=4)
    proc = model.processor
    wide = proc.image_views(solid("red", 128, 64))
    assert tuple(wide.shape[-2:]) == (32, 64)
    assert proc.image_tokens(wide) == 4 * 8 + 1 == model.encode_images([wide]).shape[0]
    tall = proc.image_views(solid("red", 20, 60))
    assert tall.shape[-1] < tall.shape[-2]


def test_anyres_grid_and_views():
    assert select_grid(128, 64, base=32, max_tiles=8) == (4, 2)
    assert select_grid(64, 64, base=32, max_tiles=4) == (2, 2)
    assert select_grid(30, 30, base=32, max_tiles=4) == (1, 1)
    views = tile_views(solid("red", 128, 64), base=32, max_tiles=8)
    assert len(views) == 1 + 8 and all(v.size == (32, 32) for v in views)
    assert len(tile_views(solid("red", 20, 20), base=32, max_tiles=4)) == 1
    model = tiny_model(image_mode="anyres", max_tiles=4)
    v = model.processor.image_views(solid("red", 64, 64))
    assert v.shape == (5, 3, 32, 32) and model.processor.image_tokens(v) == 5 * 17


def test_frame_sampling_spreads_over_the_clip():
    assert sample_frame_indices(8, 4) == [1, 3, 5, 7]
    assert sample_frame_indices(8, 1) == [4]
    assert sample_frame_indices(3, 4) == [0, 1, 1, 2]
    with pytest.raises(ConfigError):
        sample_frame_indices(8, 0)
