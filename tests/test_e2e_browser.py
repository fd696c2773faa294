"""End to end in a real browser: Debian's Chromium, driven by Playwright, against `streamlit run` on a free
local port with the real default model. Paste a passage, press Start, watch tokens cross τ, see the
verbatim-recall result, and check that an injected script payload is displayed inert.

The tests wait on state, not on time: a job is followed in the page and in the run store (MEMCORE_HOME/runs.db)
together, so a test fails as soon as its job stops moving (never claimed from the queue, no new step, ended
without the page showing it) and says where it stood, and a slow machine that keeps training only takes longer."""

import json
import os
import re
import shutil
import socket
import sqlite3
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


def _server_log(home: Path) -> Path:
    return home.parent / "server.log"  # next to the memcore home, not in it


def _log_tail(home: Path, chars: int = 2000) -> str:
    log = _server_log(home)
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no server log)"


def _start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, MEMCORE_HOME=str(home))
    env.pop("MEMCORE_APP_MODEL", None)
    # the server's output goes to a file (appended: a restarted server keeps the first one's lines), not to a pipe
    # nobody reads, which would block the server once it filled; failures quote its tail
    with open(_server_log(home), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
                                 "--server.port", str(port), "--server.headless", "true"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"the app server exited ({proc.returncode}):\n{_log_tail(home)}", pytrace=False)
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


# --- following a job in the page and in the run store ----------------------------------------------------------

LIVE = ("queued", "running")  # a job's store status while it is live
QUEUED_S = 60  # a job with nothing ahead of it is claimed within a second; this long in the queue means never
STALL_S = 300  # longest wait for the job's next change of state: loading the model, a step, the final check and save
LIMIT_S = 1200  # longest wait for a result at all, however steadily the job moves
END_S = 60  # longest the page may take to show the result once the store says the job has ended


def _query(home: Path, sql: str, args: tuple = ()) -> list[dict]:
    """Rows of the app's run store, read the way any other reader would (WAL: never in the server's way)."""
    if not (home / "runs.db").is_file():
        return []
    db = sqlite3.connect(home / "runs.db", timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql, args)]
    finally:
        db.close()


def _jobs(home: Path) -> list[dict]:
    return _query(home, "SELECT * FROM jobs ORDER BY created, rowid")


def _job_progress(home: Path, job: dict) -> list[tuple]:
    """(run id, run status, last step stored) of each run the job has started."""
    out = []
    for rid in json.loads(job["run_ids"]):
        if rid is None:
            continue
        run = _query(home, "SELECT status FROM runs WHERE id=?", (rid,))
        last = _query(home, "SELECT MAX(step) AS s FROM steps WHERE run_id=?", (rid,))
        out.append((rid, run[0]["status"] if run else None, last[0]["s"] if last else None))
    return out


def _state(page, home: Path, job_id: str | None = None) -> str:
    """Where the page and the store stand, for a failure message."""
    now = time.time()
    lines = [f"page: {page.url}"]
    try:
        for kind, sel in (("status", "[data-testid='stAlert']"), ("progress", "[data-testid='stProgress']"),
                          ("run", "p:has-text('tokens above τ')")):
            lines += [f"  {kind}: {t.strip()[:200]}" for t in page.locator(sel).all_inner_texts()]
        start = page.get_by_role("button", name="Start")
        lines.append(f"  Start button: {'enabled' if start.count() and start.is_enabled() else 'missing or disabled'}; "
                     f"'Result' shown: {page.get_by_text('Result', exact=True).count() > 0}")
    except Exception as e:  # the page itself is gone
        lines.append(f"  (page unreadable: {e})")
    lines.append("store jobs (oldest first):")
    for j in _jobs(home):
        ago = {k: f"{now - j[k]:.0f} s ago" for k in ("created", "started", "finished", "heartbeat") if j[k]}
        lines.append(f"  {'*' if j['id'] == job_id else ' '}{j['id']} {j['status']} {ago} error={j['error']!r} "
                     f"runs (id, status, last step)={_job_progress(home, j)}")
    lines.append("server log, last lines:\n" + _log_tail(home))
    return "\n".join(lines)


def _start(page, home: Path, button=None) -> str:
    """Press Start (or `button`) and return the id of the job it queued: the one the page's URL names next."""
    known = {j["id"] for j in _jobs(home)}
    (button or page.get_by_role("button", name="Start")).click()
    deadline = time.time() + 60
    while time.time() < deadline:
        m = re.search(r"[?&]job=(\w+)", page.url)
        if m and m.group(1) not in known:
            return m.group(1)
        page.wait_for_timeout(200)
    pytest.fail(f"the click queued no job within 60 s\n{_state(page, home)}", pytrace=False)


def _spec(home: Path, job_id: str) -> dict:
    """The settings the job trains with (its first run's RunSpec as a dict): what the page committed on Start."""
    (job,) = _query(home, "SELECT specs FROM jobs WHERE id=?", (job_id,))
    return json.loads(job["specs"])[0]


def _wait_for_result(page, home: Path, job_id: str, each=None) -> None:
    """Wait until the page shows the job's Result. Fails as soon as the job is stuck: in the queue with nothing
    ahead of it, without a change of state (status, a run started, a new step) for STALL_S, or ended in the store
    without the page showing it. `each()` is called between polls (to sample the live view)."""
    result = page.get_by_text("Result", exact=True)
    start = time.time()
    seen, since = None, start
    while not result.count():
        now = time.time()
        (job,) = [j for j in _jobs(home) if j["id"] == job_id] or [None]
        if job is None:
            pytest.fail(f"job {job_id} is not in the store\n{_state(page, home, job_id)}", pytrace=False)
        state = (job["status"], _job_progress(home, job))
        if state != seen:
            seen, since = state, now
        ahead = [j for j in _jobs(home) if j["status"] in LIVE and j["id"] != job_id and j["created"] <= job["created"]]
        why = None
        if job["status"] == "queued" and not ahead and now - since > QUEUED_S:
            why = f"the job never started: queued for {now - since:.0f} s with no job ahead of it"
        elif job["status"] not in LIVE and now - (job["finished"] or since) > END_S:
            why = (f"the job ended ({job['status']}) {now - (job['finished'] or since):.0f} s ago but the page never "
                   "showed its result")
        elif now - since > STALL_S:
            why = f"the job made no progress for {now - since:.0f} s"
        elif now - start > LIMIT_S:
            why = f"no result after {now - start:.0f} s (the job was still moving: a very slow machine?)"
        if why:
            pytest.fail(f"{why}\n{_state(page, home, job_id)}", pytrace=False)
        if each is not None:
            each()
        page.wait_for_timeout(200)
    (job,) = [j for j in _jobs(home) if j["id"] == job_id]
    assert job["status"] == "done", f"the job ended {job['status']}: {job['error']}\n{_state(page, home, job_id)}"


def _paste(page, server, text: str) -> None:
    """Open the app and paste `text` as the passage, committed (Ctrl+Enter): the page counts its tokens."""
    page.goto(server)
    page.get_by_label("Passage").wait_for(timeout=90_000)
    page.get_by_label("Passage").fill(text)
    page.keyboard.press("Control+Enter")
    page.get_by_text(re.compile(r"\d+ target tokens")).wait_for(timeout=60_000)


def test_paste_start_watch_tokens_cross_and_recall_verbatim(server, home):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        elsewhere: list[str] = []  # every asset is served by the app itself: it must work offline (favicon included)
        page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith(
            (server.rstrip("/"), "data:", "blob:", "about:")) else None)
        _paste(page, server, PASSAGE + "\n" + PAYLOAD)
        job_id = _start(page, home)
        assert _spec(home, job_id)["data"]["text"] == PASSAGE + "\n" + PAYLOAD, "Start took another passage"

        above: list[int] = []  # "k/N tokens above τ" as the live view shows it

        def sample() -> None:
            for text in page.locator("p").filter(has_text="tokens above τ").all_inner_texts():
                m = re.search(r"(\d+)/(\d+) tokens above τ", text)
                if m and (not above or above[-1] != int(m.group(1))):
                    above.append(int(m.group(1)))

        _wait_for_result(page, home, job_id, each=sample)
        page.wait_for_timeout(1000)
        # tokens moved past τ while we watched, and the run ends recalled
        assert len(above) >= 3 and above[-1] > above[0], above
        recalled = page.locator("[data-testid='stMetric']").filter(has_text="Recalled verbatim")
        assert "yes" in recalled.inner_text()
        # the payload is on the page as text, and nothing ran
        tokens_text = page.locator(".mc-tokens").first.inner_text()
        assert "<script>alert('pwned')</script>" in tokens_text.replace("\u21b5", "")
        assert dialogs == []
        assert elsewhere == [], elsewhere
        assert page.evaluate("document.querySelectorAll('.mc-tokens script, .mc-tokens img').length") == 0
        browser.close()


FIELD = ROOT / "tests" / "field"
SHOTS = os.environ.get("MEMCORE_SCREENSHOTS")  # a folder to keep the screenshots in, for a person to look at


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def _train_to_result(page, server, home: Path, text: str) -> None:
    _paste(page, server, text)
    job_id = _start(page, home)
    assert _spec(home, job_id)["data"]["text"] == text, "Start took another passage than the one pasted"
    _wait_for_result(page, home, job_id)
    page.wait_for_timeout(1000)


def test_cjk_and_emoji_show_as_characters_and_special_token_strings_as_text(server, home):
    from playwright.sync_api import sync_playwright

    cjk = (FIELD / "cjk_emoji.txt").read_text(encoding="utf-8")
    special = (FIELD / "special_tokens.txt").read_text(encoding="utf-8")
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2600})
        _train_to_result(page, server, home, cjk)
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

        _train_to_result(page, server, home, special)
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
            _paste(page, url, PASSAGE)
            page.get_by_role("spinbutton", name="Step budget").fill("40")
            page.keyboard.press("Enter")
            page.get_by_text("Stop as soon as it is recalled verbatim").click()
            job_id = _start(page, home)
            train = _spec(home, job_id)["train"]
            assert (train["max_steps"], train["stop_when_recalled"]) == (40, False), train
            page.get_by_text(re.compile(r"step [3-9]\d*/40")).first.wait_for(timeout=STALL_S * 1000)
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
            _wait_for_result(page, home, _start(page, home, resume))
            if SHOTS:
                page.screenshot(path=str(Path(SHOTS) / "resumed.png"), full_page=True)
            browser.close()
        store = Store(home)
        (run,) = store.runs()
        assert run["status"] == "completed" and run["summary"].steps == 40 and step > 0
        assert [s.step for s in store.steps(run["id"])] == list(range(41))
    finally:
        _stop_server(proc)


def test_a_phonebook_jsonl_uploads_and_trains_the_paper_bypass(server, home, tmp_path):
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
        job_id = _start(page, home)
        spec = _spec(home, job_id)
        assert (spec["adapter"]["kind"], spec["train"]["max_steps"], len(spec["data"]["pairs"])) == ("bypass", 4, 3)
        _wait_for_result(page, home, job_id)
        page.wait_for_timeout(1000)
        p_eff = page.locator("[data-testid='stMetric']").filter(has_text="P_eff").inner_text()
        assert "9,216" in p_eff  # rank 8 x 2 x 576: the bypass, not LoRA
        # the adapter's download comes last in the result (its zip is built after the metrics): wait for it
        page.get_by_text("memcore bypass").first.wait_for(timeout=60_000)
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "jsonl_bypass.png"), full_page=True)
        browser.close()
