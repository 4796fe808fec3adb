"""Protects the page of `shotdistill serve` (issue 18 item 4) in a real browser: Debian's headless
Chromium, driven by Playwright, against the real server on loopback over a tiny export. A person
starts a story, submits two shots (the second while the first is generating), and sees both shots'
frames arrive, play and fill the strip; latency and FPS are numbers, the mp4 link downloads the
story, and the server's errors (WebSocket and HTTP) show in the status line."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import RunningServer, make_tiny_export
from PIL import Image
from playwright.sync_api import sync_playwright

from distill.data.video import decode_all
from serve.app import create_app
from serve.frames import encode_jpeg
from serve.sessions import Limits, load_models, new_generator

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GLOBAL = "a red circle and a blue square"
SHOTS = ["wide a red circle moves left", "close-up the blue square stays still"]
TIMEOUT_MS = 120_000  # a whole shot on a loaded 2-core machine, with margin

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium; .ci/run does)"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_models(make_tiny_export(tmp_path_factory.mktemp("page"), frames=6))


@pytest.fixture(scope="module")
def server(models):
    with RunningServer(create_app(models, Limits())) as running:
        yield running


@pytest.fixture
def page():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 860})
        errors = []
        page.on("pageerror", lambda e: errors.append(e))
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()
    assert not errors, f"the page raised: {errors}"


def start_story(page, server, global_prompt: str):
    """Open the page, type the story prompt, press Start; the POST /sessions response."""
    page.goto(server.url)
    page.fill("#global-prompt", global_prompt)
    with page.expect_response(lambda r: r.url.endswith("/sessions") and r.request.method == "POST") as created:
        page.click("#start")
    return created.value


def expected_last_frame(models, prompts) -> np.ndarray:
    """The story's last frame as the server makes it (default seed 0), JPEG-encoded alike and decoded."""
    gen = new_generator(models, GLOBAL, 0)
    for prompt in prompts:
        frames = [f for chunk in gen.next_shot(prompt) for f in chunk]
    return np.asarray(Image.open(io.BytesIO(encode_jpeg(frames[-1]))).convert("RGB"))


def canvas_pixels(page, selector: str) -> np.ndarray:
    """uint8 [H, W, 3] of what a canvas shows."""
    data = page.evaluate("""(sel) => { const c = document.querySelector(sel);
        const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        return {w: c.width, h: c.height, px: Array.from(px)}; }""",
                         selector)
    return np.array(data["px"], np.uint8).reshape(data["h"], data["w"], 4)[..., :3]


def test_a_person_directs_a_two_shot_story(page, server, models, tmp_path):
    response = start_story(page, server, GLOBAL)
    assert response.status == 201
    video = response.json()["video"]
    page.wait_for_selector("#next-shot:enabled")

    # The second shot is typed and submitted while the first is in flight (in one browser task, so
    # the first cannot have ended): the page queues it and sends it when shot 0's shot_end arrives.
    queued = page.evaluate("""(shots) => {
        const prompt = document.querySelector("#shot-prompt"), next = document.querySelector("#next-shot");
        prompt.value = shots[0]; next.click();
        prompt.value = shots[1]; next.click();
        return document.querySelector("#queue").textContent; }""", SHOTS)
    assert SHOTS[1] in queued and SHOTS[0] not in queued

    page.wait_for_selector("#strip .shot[data-shot='1']:not(.running)")
    shots = page.query_selector_all("#strip .shot")
    assert [s.get_attribute("data-shot") for s in shots] == ["0", "1"]
    assert [int(s.get_attribute("data-frames")) for s in shots] == [video["frames"]] * 2
    assert [s.query_selector(".caption").text_content() for s in shots] == [f"1. {SHOTS[0]}", f"2. {SHOTS[1]}"]
    assert all(s.query_selector(".count").text_content().startswith(f"{video['frames']} frames · ") for s in shots)
    assert "error" not in page.get_attribute("#status", "class")

    # The player shows every frame at the video's fps; the last one is the story's last frame.
    page.wait_for_function("(n) => Number(document.querySelector('#player').dataset.shown) === n",
                           arg=2 * video["frames"])
    shown = canvas_pixels(page, "#player")
    assert shown.shape == (video["height"], video["width"], 3)
    differs = int(np.abs(shown.astype(int) - expected_last_frame(models, SHOTS)).max())
    # 0 here (Chromium and Pillow both decode with libjpeg-turbo); 2 leaves room for another decoder's rounding
    assert differs <= 2, f"the player's last frame differs from the story's by up to {differs}/255"

    assert float(page.text_content("#latency")) > 0
    assert float(page.text_content("#fps")) > 0

    href = page.get_attribute("#download", "href")
    mp4 = httpx.get(server.url + href, trust_env=False, timeout=60)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    (tmp_path / "story.mp4").write_bytes(mp4.content)
    assert decode_all(tmp_path / "story.mp4").shape == (2 * video["frames"], video["height"], video["width"], 3)

    # An empty shot prompt is the server's to refuse; its one-line error shows, and the story goes on.
    page.click("#next-shot")
    page.wait_for_selector("#status.error")
    assert page.text_content("#status") == "shot: prompt: shot prompt is empty: every shot needs a description"
    assert not page.is_disabled("#next-shot")

    # A new story replaces this one: the strip empties and the old session is deleted on the server.
    old = response.json()["session"]
    second = start_story(page, server, GLOBAL)
    assert second.status == 201
    page.wait_for_selector("#next-shot:enabled")
    assert page.query_selector_all("#strip .shot") == []
    assert httpx.get(f"{server.url}/sessions/{old}", trust_env=False).status_code == 404

    # The server ending the session (here a DELETE; an idle timeout alike) closes the socket with 4404.
    assert httpx.delete(f"{server.url}/sessions/{second.json()['session']}", trust_env=False).status_code == 204
    page.wait_for_selector("#status.error")
    assert page.text_content("#status") == ("the server ended this story: session ended (deleted or idle); "
                                            "start a new story.")
    assert page.is_disabled("#next-shot")


def test_an_http_error_names_its_field(page, server):
    response = start_story(page, server, "x" * (Limits().max_prompt_chars + 1))  # the server fixture's limits
    assert 400 <= response.status < 500
    error = response.json()["error"]
    page.wait_for_selector("#status.error")
    assert page.text_content("#status") == f"start: {error['field']}: {error['message']}"
    assert error["field"] == "global_prompt" and page.is_disabled("#next-shot")


def test_a_failed_shot_holds_the_queue_until_it_is_sent_again(page, server, models):
    response = start_story(page, server, GLOBAL)
    page.wait_for_selector("#next-shot:enabled")
    # The model fails in the first shot's second chunk (as in test_serve.py's failure test), once.
    stream = server.server.config.app.state.manager.sessions[response.json()["session"]].generator.stream
    calls, real = [], stream.next_chunk

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated device failure")
        return real(*args)

    stream.next_chunk = fail_second
    page.evaluate("""(shots) => {
        const prompt = document.querySelector("#shot-prompt"), next = document.querySelector("#next-shot");
        prompt.value = shots[0]; next.click();
        prompt.value = shots[1]; next.click(); }""", SHOTS)
    page.wait_for_selector("#status.error")
    assert page.text_content("#status") == "shot: shot 0 failed in the model: simulated device failure"
    failed = page.query_selector("#strip .shot.failed")
    # one chunk arrived (PatchCodec: a chunk's latent frames are its video frames)
    assert int(failed.get_attribute("data-frames")) == models.student.settings.chunk_frames
    assert failed.get_attribute("data-shot") is None
    assert page.input_value("#shot-prompt") == SHOTS[0]
    assert page.text_content("#queue") == f"1 shot held until the refused shot is sent again: “{SHOTS[1]}”"

    page.click("#next-shot")  # resend the failed shot; the held one follows it
    page.wait_for_selector("#strip .shot[data-shot='1']:not(.running)")
    kept = page.query_selector_all("#strip .shot:not(.failed)")
    assert [s.query_selector(".caption").text_content() for s in kept] == [f"1. {SHOTS[0]}", f"2. {SHOTS[1]}"]
    assert page.text_content("#queue") == "" and "error" not in page.get_attribute("#status", "class")
