"""The web app end to end in a real browser: Playwright for Python driving Debian's chromium (no browser download).

Drops a text file on the page (a message, no job), uploads the bundled GRID clip, ticks the person, picks candidate
3, unticks one part, runs, waits for the result, downloads anonymized.mp4 and checks it against the input; fails if
the page asks for anything outside the app's own server. A screenshot of each step goes to the test's temporary
directory (and to $KEEPR_WEBAPP_SCREENSHOTS when set: that is how docs/webapp/*.png are made).

Chromium: /usr/bin/chromium; when missing and running as root, installed with apt-get (package ``chromium``);
otherwise the test is skipped naming the package, except under CI=true where a missing browser fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing(why: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: the browser test must run)")
    pytest.skip(why)


def _apt_install() -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)


@pytest.fixture(scope="session")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright for Python is not installed (pip install -r requirements.txt)")
    if not Path(CHROMIUM).exists() and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install()
    if not Path(CHROMIUM).exists():
        _missing("chromium is not installed: apt-get install -y --no-install-recommends chromium (Debian package "
                 "'chromium')")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tiny_models, tmp_path):
    """The app on the tiny models, served by uvicorn on a free localhost port, in a thread."""
    import uvicorn

    from webapp.app import create_app
    from webapp.config import DEMO_BANNER, AppConfig, infer_settings

    settings = infer_settings([str(tiny_models["config"])], ["--coverage.upsample", "0", "--coverage.identity",
                                                            "false"])
    config = AppConfig(settings=settings, work_dir=tmp_path / "jobs", banner=DEMO_BANNER, port=_free_port())
    app = create_app(config)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}", config
    srv.should_exit = True
    thread.join(30)


@pytest.mark.slow
def test_browser_end_to_end(chromium, server, tmp_path, media_dir):
    from playwright.sync_api import expect, sync_playwright

    from anonymizer.video import audio_packets, count_frames, probe_video

    base, config = server
    src = media_dir / "videos" / "bbaf2n.mpg"
    shots = [tmp_path / "screenshots"]
    if os.environ.get("KEEPR_WEBAPP_SCREENSHOTS"):
        shots.append(Path(os.environ["KEEPR_WEBAPP_SCREENSHOTS"]))
    for d in shots:
        d.mkdir(parents=True, exist_ok=True)
    outside, failed = [], []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1000, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)  # 2 shared cores: be patient with the page, strict with the result
        expect.set_options(timeout=30_000)

        def guard(route):
            if route.request.url.startswith(base + "/") or route.request.url.startswith("data:"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        own = (base + "/", "data:", "blob:")
        page.on("request", lambda r: None if r.url.startswith(own) else outside.append(r.url))
        page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}"))
        page.on("pageerror", lambda e: failed.append(f"page error: {e}"))

        def shot(name: str, selector: str) -> None:
            data = page.locator(selector).screenshot()
            for d in shots:
                (d / name).write_bytes(data)

        page.goto(base + "/")
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner")).to_contain_text("tiny")

        shot("0-start.png", "body")
        # A file dropped on the page that is no video: a message, no stack trace, no job.
        page.evaluate("""() => {
            const dt = new DataTransfer();
            dt.items.add(new File(['not a video'], 'notes.mp4', {type: 'video/mp4'}));
            document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                                                  cancelable: true}));
        }""")
        expect(page.locator("#error")).to_contain_text("not a video")
        assert "Traceback" not in page.locator("#error").inner_text()
        assert list(config.work_dir.iterdir()) == []
        # 1. Upload (file picker); the MPEG-1 original becomes playable as an H.264 copy.
        page.set_input_files("#file-input", str(src))
        person = page.locator('#persons input[data-person="0"]')
        expect(person).to_be_attached(timeout=180_000)
        assert "/original" in (page.locator("#original").get_attribute("src") or "")
        page.wait_for_function("document.querySelector('#original').readyState >= 2", timeout=30_000)
        assert page.evaluate("document.querySelector('#original').duration") == pytest.approx(3.0, abs=0.1)
        shot("1-upload.png", "#step-upload")

        # 2. Faces found: one person, 0.00 - 2.96 s; tick them (untick, tick again).
        expect(page.locator("#persons .person")).to_have_count(1)
        expect(page.locator("#persons .person .when")).to_contain_text("0.00 s")
        person.uncheck()
        expect(page.locator('[data-vperson="0"]')).to_have_count(0)
        expect(page.locator("#run")).to_be_disabled()
        person.check()
        expect(person).to_be_checked()
        shot("2-faces.png", "#step-faces")

        # 3. Virtual faces: pick candidate 3, untick part 2.
        cell = page.locator('[data-vperson="0"] [data-candidate="3"]')
        expect(page.locator('[data-vperson="0"] .cell')).to_have_count(9)
        cell.click()
        expect(page.locator('[data-vperson="0"] [data-candidate="3"][aria-pressed="true"]')).to_be_visible(
            timeout=120_000)
        expect(page.locator('[data-vperson="0"] [data-candidate="3"]')).to_be_enabled(timeout=120_000)
        expect(page.locator('[data-vperson="0"] .chosen-text')).to_contain_text("Candidate 3")
        page.wait_for_function("[...document.querySelectorAll('#virtual img')].every(i => i.complete && "
                               "i.naturalWidth > 0)")
        part = page.locator('#parts input[data-part="2"]')
        expect(part).to_be_checked()
        part.uncheck()
        checked_parts = page.eval_on_selector_all("#parts input:checked", "es => es.map(e => +e.value)")
        assert checked_parts == [1, 5]
        shot("3-virtual-faces.png", "#step-virtual")

        # 4. Run, watch the progress, wait for the result.
        page.click("#run")
        expect(page.locator("#step-result")).to_be_visible()
        expect(page.locator("#render-text")).to_contain_text(re.compile(r"Frames [1-9]\d*/75 .* left"),
                                                             timeout=120_000)
        shot("4-rendering.png", "#step-result")
        expect(page.locator("#result")).to_be_visible(timeout=300_000)
        for v in ("#result-original", "#result-video"):  # the same instant in both, for the screenshot
            page.wait_for_function(f"document.querySelector('{v}').readyState >= 2", timeout=30_000)
            page.eval_on_selector(v, "v => new Promise(ok => { v.onseeked = () => ok(); v.currentTime = 1.2; })")
        shot("5-result.png", "#step-result")
        page.screenshot(path=str(shots[0] / "page.png"), full_page=True)

        with page.expect_download() as dl:
            page.click("#download-video")
        out = tmp_path / "anonymized.mp4"
        dl.value.save_as(out)
        with page.expect_download() as dl:
            page.click("#download-report")
        report = tmp_path / "report.json"
        dl.value.save_as(report)
        job_id = page.evaluate("S.id")
        browser.close()

    assert not outside, f"the page requested something outside its server: {outside}"
    assert not [f for f in failed if "page error" in f], failed

    i, o = probe_video(src), probe_video(out)
    assert (o.width, o.height, o.codec) == (i.width, i.height, "h264")
    assert o.fps == i.fps
    assert count_frames(out) == count_frames(src) == 75
    assert audio_packets(out) == audio_packets(src)
    rep = json.loads(report.read_text())
    assert rep["settings"]["swap"]["parts"] == [1, 5]
    assert rep["persons"]["anonymized"][0]["virtual_face"]["chosen"] == 3
    for n in ("0-start.png", "1-upload.png", "2-faces.png", "3-virtual-faces.png", "4-rendering.png", "5-result.png"):
        assert (tmp_path / "screenshots" / n).stat().st_size > 1000
    assert (config.work_dir / job_id / "result" / "anonymized.mp4").is_file()
