"""End to end in a real browser: Debian's Chromium, driven by Playwright, against `streamlit run` on a free
local port with the real default model. Paste a passage, press Start, watch tokens cross τ, see the
verbatim-recall result, and check that an injected script payload is displayed inert."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MEMCORE_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
PASSAGE = ("The keeper of the tide tables wrote every high water in green ink and every low water in red, "
           "and on the night of the great storm he ran out of both.")
PAYLOAD = "<script>alert('pwned')</script> <img src=x onerror=alert(1)>"


def _browser_available() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).is_file()


if not _browser_available():
    if os.environ.get("CI"):
        pytest.fail(f"CI needs Chromium at {CHROMIUM} and the playwright package for the browser test", pytrace=False)
    pytest.skip("no Chromium/playwright here (install: apt-get install chromium; pip install playwright)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, MEMCORE_HOME=str(home))
    env.pop("MEMCORE_APP_MODEL", None)
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
                             "--server.port", str(port), "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read().decode()[-2000:])
            time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}/"


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def server(home):
    proc, url = _start_server(home)
    yield url
    _stop_server(proc)


def test_paste_start_watch_tokens_cross_and_recall_verbatim(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(server)
        page.get_by_label("Passage").wait_for(timeout=90_000)
        page.get_by_label("Passage").fill(PASSAGE + "\n" + PAYLOAD)
        page.keyboard.press("Control+Enter")
        page.get_by_text(re.compile(r"\d+ target tokens")).wait_for(timeout=60_000)
        page.get_by_role("button", name="Start").click()

        above: list[int] = []  # "k/N tokens above τ" as the live view shows it
        deadline = time.time() + 300
        while time.time() < deadline:
            for text in page.locator("p").filter(has_text="tokens above τ").all_inner_texts():
                m = re.search(r"(\d+)/(\d+) tokens above τ", text)
                if m and (not above or above[-1] != int(m.group(1))):
                    above.append(int(m.group(1)))
            if page.get_by_text("Result", exact=True).count():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no result within the time limit; tokens above τ seen: {above}")
        page.wait_for_timeout(1000)
        # tokens moved past τ while we watched, and the run ends recalled
        assert len(above) >= 3 and above[-1] > above[0], above
        recalled = page.locator("[data-testid='stMetric']").filter(has_text="Recalled verbatim")
        assert "yes" in recalled.inner_text()
        # the payload is on the page as text, and nothing ran
        tokens_text = page.locator(".mc-tokens").first.inner_text()
        assert "<script>alert('pwned')</script>" in tokens_text.replace("\u21b5", "")
        assert dialogs == []
        assert page.evaluate("document.querySelectorAll('.mc-tokens script, .mc-tokens img').length") == 0
        browser.close()


FIELD = ROOT / "tests" / "field"
SHOTS = os.environ.get("MEMCORE_SCREENSHOTS")  # a folder to keep the screenshots in, for a person to look at


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def _train_to_result(page, server, text: str) -> None:
    page.goto(server)
    page.get_by_label("Passage").wait_for(timeout=90_000)
    page.get_by_label("Passage").fill(text)
    page.keyboard.press("Control+Enter")
    page.get_by_text(re.compile(r"\d+ target tokens")).wait_for(timeout=60_000)
    page.get_by_role("button", name="Start").click()
    page.get_by_text("Result", exact=True).wait_for(timeout=300_000)
    page.wait_for_timeout(1000)


def test_cjk_and_emoji_show_as_characters_and_special_token_strings_as_text(server):
    from playwright.sync_api import sync_playwright

    cjk = (FIELD / "cjk_emoji.txt").read_text(encoding="utf-8")
    special = (FIELD / "special_tokens.txt").read_text(encoding="utf-8")
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2600})
        _train_to_result(page, server, cjk)
        tokens = page.locator(".mc-tokens").first
        shown = tokens.inner_text()
        assert "\ufffd" not in shown and "春眠不觉晓" in shown.replace("\u207a", "")
        cont = page.locator(".mc-tokens .mc-cont")
        assert cont.count() > 20 and "bytes" in cont.first.get_attribute("title")
        # the live view, the generation diff and the legend: not one replacement character anywhere on the page
        assert "\ufffd" not in page.locator("section.stMain, [data-testid='stMain']").first.inner_text()
        assert "yes" in page.locator("[data-testid='stMetric']").filter(has_text="Recalled verbatim").inner_text()
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "cjk_emoji.png"), full_page=True)

        _train_to_result(page, server, special)
        assert "yes" in page.locator("[data-testid='stMetric']").filter(has_text="Recalled verbatim").inner_text()
        assert "<|im_end|>" in page.locator(".mc-tokens").first.inner_text()
        assert page.locator(".mc-mismatch").count() == 0 and page.locator(".mc-match").count() > 30
        assert page.get_by_text("disagree").count() == 0
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "special_tokens.png"), full_page=True)
        browser.close()


def test_a_spreadsheet_csv_uploads_on_the_memory_law_page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2600})
        page.goto(server)
        page.get_by_role("link", name="Memory law").click()
        page.locator("input[type=file]").first.set_input_files(str(FIELD / "law_excel_semicolon.csv"))
        # the upload is the one fitted
        page.get_by_text(re.compile(r"16 points · R² 0\.99")).first.wait_for(timeout=60_000)
        assert page.get_by_text("lacks column").count() == 0
        page.get_by_text("What if").wait_for(timeout=60_000)
        page.wait_for_timeout(2000)  # let the charts draw
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "law_csv.png"), full_page=True)
        browser.close()


def test_a_killed_server_leaves_its_job_interrupted_and_resumable(home):
    """SIGKILL the server mid-run, start it again: the job shows as interrupted, the run resumes from the Runs page."""
    from playwright.sync_api import sync_playwright

    from memcore.store import Store

    proc, url = _start_server(home)
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(url)
            page.get_by_label("Passage").wait_for(timeout=90_000)
            page.get_by_label("Passage").fill(PASSAGE)
            page.keyboard.press("Control+Enter")
            page.get_by_role("spinbutton", name="Step budget").fill("40")
            page.keyboard.press("Enter")
            page.get_by_text("Stop as soon as it is recalled verbatim").click()
            page.wait_for_timeout(500)
            page.get_by_role("button", name="Start").click()
            page.get_by_text(re.compile(r"step [3-9]\d*/40")).first.wait_for(timeout=120_000)
            job_url = page.url
            proc.kill()  # SIGKILL: no chance to clean up
            proc.wait()
            browser.close()
        store = Store(home)
        deadline = time.time() + 30
        # the orphaned trainer stops after its step, saves, then marks its run interrupted and exits: the run passes
        # through "stopped" on the way, so wait for the end state rather than for "running" to end
        while store.runs()[0]["status"] != "interrupted" and time.time() < deadline:
            time.sleep(0.5)
        (run,) = store.runs()
        assert run["status"] == "interrupted", run["status"]
        store.close()

        proc, url = _start_server(home)
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(url + "?" + job_url.split("?", 1)[1])
            page.get_by_text("This job was interrupted").wait_for(timeout=90_000)
            page.get_by_role("link", name="Open it on the Runs page").click()
            resume = page.get_by_role("button", name=re.compile(r"Resume from step \d+"))
            resume.wait_for(timeout=60_000)
            step = int(re.search(r"\d+", resume.inner_text()).group())
            resume.click()
            page.get_by_text("Result", exact=True).wait_for(timeout=300_000)
            if SHOTS:
                page.screenshot(path=str(Path(SHOTS) / "resumed.png"), full_page=True)
            browser.close()
        store = Store(home)
        (run,) = store.runs()
        assert run["status"] == "completed" and run["summary"].steps == 40 and step > 0
        assert [s.step for s in store.steps(run["id"])] == list(range(41))
    finally:
        _stop_server(proc)


def test_a_phonebook_jsonl_uploads_and_trains_the_paper_bypass(server, tmp_path):
    from playwright.sync_api import sync_playwright

    f = tmp_path / "phonebook.jsonl"
    f.write_text('{"query": "Ada Berg:", "target": " 4155550123"}\n{"query": "Wen Xu:", "target": " 2125550187"}\n'
                 '{"query": "Olga Novak:", "target": " 3125550142"}\n')
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2600})
        page.goto(server)
        page.get_by_label("Passage").wait_for(timeout=90_000)
        page.get_by_text("JSONL", exact=True).click()
        page.locator("input[type=file]").first.set_input_files(str(f))
        page.get_by_text(re.compile(r"phonebook layout \(query → target\): 3 samples")).wait_for(timeout=60_000)
        page.get_by_text("the paper's MLP bypass").click()
        page.get_by_label("Step budget").fill("4")
        page.keyboard.press("Enter")
        page.get_by_text(re.compile(r"\d+ target tokens")).wait_for(timeout=60_000)
        page.get_by_role("button", name="Start").click()
        page.get_by_text("Result", exact=True).wait_for(timeout=300_000)
        page.wait_for_timeout(1000)
        p_eff = page.locator("[data-testid='stMetric']").filter(has_text="P_eff").inner_text()
        assert "9,216" in p_eff  # rank 8 x 2 x 576: the bypass, not LoRA
        assert page.get_by_text("memcore bypass").count() >= 1
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "jsonl_bypass.png"), full_page=True)
        browser.close()
