"""The web page in headless Chromium (Debian's package, driven by Playwright): a search and a chat.

``make test`` installs chromium first (the ``test-deps`` target); run alone without it, the test is
skipped, except in CI where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

from _serve_models import save_clip, save_native, save_vlm

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARGS += ["--disable-component-update", "--disable-sync"]
KEY = "web-key"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test-deps` installs Debian's chromium")
        pytest.skip("chromium is not installed (make test-deps)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from mmstack.index.builder import build_collection
    from mmstack.models.bridge import BridgeModel
    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config
    from mmstack.serve.runner import LiveServer
    from mmstack.world import generate_world

    root = tmp_path_factory.mktemp("web")
    generate_world(root / "world", n=12, seed=5)
    save_clip(root / "clip")
    save_vlm(root / "vlm")
    save_native(root / "native")
    build_collection(root / "db", [root / "world"], model=str(root / "clip"), text_model="none")
    cfg = load_serve_config(
        {
            "models": {"clip": str(root / "clip"), "vlm": str(root / "vlm"), "native": str(root / "native")},
            "collections": {"world": {"db": str(root / "db"), "model": "clip"}},
            "security": {"api_key": KEY},
            "generation": {"temperature": 0.0, "max_tokens": 8},
        }
    )
    with LiveServer(create_app(cfg)) as live:  # every model loaded from the config (mmstack.load)
        live.root = root
        live.vlm = BridgeModel.from_pretrained(root / "vlm")
        yield live


def test_search_and_chat_in_the_browser(browser, site, tmp_path):
    import json

    from mmstack.data.images import load_image
    from mmstack.models.bridge_generate import GenerationConfig, generate_text

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(site.url + "/")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # "change": stores the key and lists models and collections
    page.wait_for_selector("#search-collection option[value=world]", state="attached", timeout=10_000)

    # A text search shows a grid of hits with pictures and scores.
    page.fill("#search-query", "a red circle")
    page.fill("#search-top-k", "6")
    page.click("#search-button")
    page.wait_for_selector("#search-results .hit >> nth=5", timeout=10_000)
    assert page.locator("#search-results .hit").count() == 6
    assert page.locator("#search-results .hit img").first.get_attribute("src").startswith("data:image/png")

    # An image search: the uploaded picture finds itself first.
    first = json.loads((site.root / "world" / "pairs.jsonl").read_text().splitlines()[3])
    image_path = site.root / "world" / first["image"]
    page.fill("#search-query", "")
    page.set_input_files("#search-image", str(image_path))
    page.click("#search-button")
    page.wait_for_function(
        "cap => document.querySelector('#search-results .hit .caption')?.textContent === cap",
        arg=first["caption"],
        timeout=10_000,
    )

    shots = [tmp_path / "web-search.png", tmp_path / "web-chat.png"]
    page.screenshot(path=str(shots[0]), full_page=True)

    # A chat about an uploaded image, streamed into the page; the answer is the model's own.
    page.click("button.tab[data-panel=chat]")
    page.set_input_files("#chat-image", str(image_path))
    page.fill("#chat-input", "what colour is the circle ?")
    page.click("#chat-send")
    page.wait_for_function("() => !document.querySelector('#chat-send').disabled", timeout=15_000)
    answer = page.locator("#chat-log .msg.assistant .text").last.text_content().strip()
    turns = [{"from": "human", "value": "what colour is the circle ?\n<image>"}]
    want = generate_text(site.vlm, [turns], images=[load_image(image_path)], config=GenerationConfig(max_new_tokens=8))
    assert answer == want[0] and answer
    assert page.locator("#chat-log .msg.user img").count() == 1
    assert page.locator("#chat-image").is_disabled()  # one image per conversation
    assert page.text_content("#status") == "" and not errors

    page.screenshot(path=str(shots[1]), full_page=True)

    # The generate panel draws images with the native model.
    page.click("button.tab[data-panel=generate]")
    page.fill("#gen-prompt", "a red circle at the top left")
    page.fill("#gen-n", "2")
    page.click("#gen-button")
    page.wait_for_selector("#gen-results .hit img >> nth=1", timeout=15_000)
    assert page.locator("#gen-results img").first.get_attribute("src").startswith("data:image/png;base64,")
    shots.append(tmp_path / "web-generate.png")
    page.screenshot(path=str(shots[2]), full_page=True)
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5_000
        if os.environ.get("MMSTACK_SCREENSHOTS"):  # a folder to keep copies in, to look at
            shutil.copy(shot, os.environ["MMSTACK_SCREENSHOTS"])
    page.close()
