"""A micro shapes world and an untrained micro bridge VLM (world tokenizer, 32 px) for the alignment tests.

Built once per test process under pytest's base temp folder; every alignment test module shares them.
"""

from __future__ import annotations

from pathlib import Path

from mmstack.config import configs_dir, load_config


def micro_world_and_vlm(tmp_path_factory) -> tuple[Path, Path]:
    """``(world, vlm)``: a 24-scene world (48 preference pairs) and a fresh llava-micro bridge checkpoint."""
    from mmstack.train.llava import LlavaRecipeConfig, _tokenizer_texts, build_model
    from mmstack.utils.seeding import seed_everything
    from mmstack.world import generate_world

    base = tmp_path_factory.getbasetemp() / "align-micro"
    world, vlm = base / "world", base / "vlm"
    if not (world / "scenes.jsonl").is_file():
        generate_world(world, n=24, seed=0, split="train", image_size=32)
    if not (vlm / "config.json").is_file():
        # HF's small init (not the recipe's unit scale): an untrained LM then stays near the identity, so its
        # last hidden state still tells inputs apart, as a trained VLM's does, and 16-step micro runs can learn
        # (at unit scale the random layers blur them: reward accuracy 0.62 instead of 0.87 after 16 steps).
        overrides = [f"data.train={world}", "model.text.config.initializer_range=0.02"]
        cfg = load_config(LlavaRecipeConfig, configs_dir() / "llava-micro.yaml", overrides=overrides)
        seed_everything(0)
        build_model(cfg, _tokenizer_texts(cfg)).save_pretrained(vlm)
    return world, vlm
