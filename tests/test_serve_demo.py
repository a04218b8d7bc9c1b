"""The demo's serve stage: serve.yaml for the models and collection that exist, sample requests in-process."""

from __future__ import annotations

from _serve_models import save_clip, save_native, save_vlm
from mmstack.demo.pipeline import DemoContext


def test_serve_stage_writes_a_working_config(tmp_path, run_cli):
    from mmstack.demo import serve_stage
    from mmstack.index.builder import build_collection
    from mmstack.serve.config import load_serve_config
    from mmstack.world import generate_world

    save_clip(tmp_path / "models" / "clip")
    save_vlm(tmp_path / "models" / "vlm")
    save_native(tmp_path / "models" / "native")
    generate_world(tmp_path / "world" / "val", n=8, seed=1)
    build_collection(
        tmp_path / "index" / "db",
        [tmp_path / "world" / "val"],
        model=str(tmp_path / "models" / "clip"),
        text_model="none",
    )
    result = serve_stage.run(DemoContext(out=tmp_path, config={}), {})

    cfg = load_serve_config(tmp_path / "serve.yaml")
    assert set(cfg.models) == {"clip", "vlm", "native"} and cfg.models["clip"].path == str(tmp_path / "models" / "clip")
    assert cfg.collections["demo"].db == str(tmp_path / "index" / "db")
    assert cfg.host == "127.0.0.1" and cfg.media.file_roots == [str(tmp_path / "world")]
    assert result.metrics["left_out"] == ["vlm-rag"]
    for endpoint in ("embeddings", "chat", "images", "search", "rag"):
        assert result.metrics[f"{endpoint}_ms"] > 0, endpoint
    assert "mmstack serve --config" in result.html and "error" not in result.html
    check = run_cli("serve", "--config", tmp_path / "serve.yaml", "--check", "--json")
    assert check.code == 0 and check.json()["models"] == {"clip": "two_tower", "vlm": "bridge", "native": "native"}
    assert check.json()["collections"] == ["demo"]
