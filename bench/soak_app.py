"""Soak: a long run watched in a real browser. Server memory, page refresh rate and training speed, per minute.

    python bench/soak_app.py [--tokens 1000] [--steps 1000] [--layers paper] [--after-minutes 3] [--out soak.json]

A teacher leaves the Memorize page open while a long passage trains. This starts `streamlit run` on a scratch
memcore home (the converted default model is linked in), opens the page in Debian's Chromium through
Playwright, pastes a passage of exactly --tokens tokens, sets the step budget (full budget, no early stop)
and presses Start. Every minute it records:

- the server's RSS (the Streamlit process; the training process is reported apart),
- page refreshes per second (changes of the progress line, which shows the elapsed time to 0.1 s) and token
  view updates per second (changes of the token view), counted in the page by a MutationObserver,
- training steps per second, read from the run store,
- CPU use (cores busy, from each process's CPU time) of the server, the training process and the browser,
  to see what watching takes from training on a machine that runs all three.

When the run is done (or --max-minutes pass) it closes the page and measures steps per second for
--after-minutes with no page open, on the same run: the ratio is what watching costs. With --cli-steps N it
then trains the same passage with the same settings through `memcore train` for N steps, the baseline for the
app's speed (app s/step with the page open / CLI s/step). Run it on an otherwise idle machine: it times things.

    python bench/soak_app.py --tokens 300 --steps 60 --max-minutes 6 --after-minutes 0 --cli-steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MEMCORE_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")

OBSERVER = """
() => {
  window.__mc = {progress: 0, tokens: 0, lastProgress: '', lastTokens: ''};
  const tick = () => {
    const bar = [...document.querySelectorAll('[data-testid="stProgress"]')].map(e => e.innerText).join('|');
    if (bar && bar !== window.__mc.lastProgress) { window.__mc.progress += 1; window.__mc.lastProgress = bar; }
    const tv = document.querySelector('.mc-tokens');
    const t = tv ? tv.innerHTML : '';
    if (t && t !== window.__mc.lastTokens) { window.__mc.tokens += 1; window.__mc.lastTokens = t; }
  };
  new MutationObserver(tick).observe(document.body, {subtree: true, childList: true, characterData: true, \
attributes: true});
}
"""


def _cpu_seconds(server: Any) -> dict[str, float]:
    """CPU seconds used so far by the Streamlit server, its training process, and every Chromium process."""
    import psutil

    def used(p: Any) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    kids = server.children(recursive=True)
    browser = [p for p in psutil.process_iter(["name"]) if "chrom" in (p.info["name"] or "").lower()
               or "headless_shell" in (p.info["name"] or "")]
    return {"server": used(server), "trainer": sum(used(k) for k in kids), "browser": sum(used(b) for b in browser)}


def _passage(n_tokens: int, model_dir: Path) -> str:
    """Exactly n_tokens tokens of the shipped passages (repeated if they run out), decoded back to text."""
    from transformers import AutoTokenizer

    from memcore.data import encode_text, list_samples, read_sample

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "\n\n".join(read_sample(s) for s in list_samples())
    ids = encode_text(tok, text)
    while len(ids) < n_tokens:
        ids = ids + ids
    out = tok.decode(ids[:n_tokens])
    assert len(encode_text(tok, out)) == n_tokens or abs(len(encode_text(tok, out)) - n_tokens) <= 2
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_state(home: Path) -> tuple[int, str | None]:
    db = sqlite3.connect(home / "runs.db", timeout=30)
    try:
        row = db.execute("SELECT steps, status FROM runs ORDER BY created DESC LIMIT 1").fetchone()
    finally:
        db.close()
    return (row[0] or 0, row[1]) if row else (0, None)


def _step_seconds(home: Path, newest: bool) -> list[float]:
    """Seconds each step took in the oldest (the app's) or newest (the CLI's) run, by the run's own clock."""
    db = sqlite3.connect(home / "runs.db", timeout=30)
    try:
        order = "DESC" if newest else "ASC"
        run = db.execute(f"SELECT id FROM runs ORDER BY created {order} LIMIT 1").fetchone()[0]
        t = [r[0] for r in db.execute("SELECT elapsed FROM steps WHERE run_id = ? ORDER BY step", (run,))]
    finally:
        db.close()
    return [b - a for a, b in zip(t, t[1:])]


def _spec_differences(home: Path) -> dict[str, tuple]:
    """Settings (flattened run specs) in which the app's run (oldest) and the CLI's (newest) differ."""
    def flat(d: dict, pre: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    db = sqlite3.connect(home / "runs.db", timeout=30)
    try:
        specs = [flat(json.loads(r[0])) for r in db.execute("SELECT spec FROM runs ORDER BY created")]
    finally:
        db.close()
    a, b = specs[0], specs[-1]
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and "text" not in k}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--layers", default="paper")
    ap.add_argument("--lr", default="0.01")
    ap.add_argument("--method", default="sft",
                    help="sft trains every step; memft-ot skips updates once every token is above τ")
    ap.add_argument("--max-minutes", type=float, default=90)
    ap.add_argument("--after-minutes", type=float, default=3, help="minutes measured with the page closed, at the end")
    ap.add_argument("--interval", type=float, default=60, help="seconds between samples")
    ap.add_argument("--out", default=None, help="write the samples as JSON")
    ap.add_argument("--screenshot", default=None, help="save a full-page screenshot at the end of the watched part")
    ap.add_argument("--cli-steps", type=int, default=0,
                    help="then time `memcore train` on the same passage for this many steps")
    args = ap.parse_args()

    import psutil
    from playwright.sync_api import sync_playwright

    from memcore.home import default_model_dir

    model_dir = default_model_dir()
    home = Path(tempfile.mkdtemp(prefix="memcore-soak-"))
    (home / "models").symlink_to(model_dir.parent, target_is_directory=True)
    passage = _passage(args.tokens, model_dir)
    port = _free_port()
    env = dict(os.environ, MEMCORE_HOME=str(home))
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
                               "--server.port", str(port), "--server.headless", "true"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(server.pid)
    samples: list[dict] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 3000})
            deadline = time.time() + 120
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(1)
            page.get_by_label("Passage").wait_for(timeout=120_000)
            page.get_by_label("Passage").fill(passage)
            page.keyboard.press("Control+Enter")
            page.get_by_role("textbox", name="Layers").fill(args.layers)
            page.keyboard.press("Enter")
            page.get_by_role("spinbutton", name="Step budget").fill(str(args.steps))
            page.keyboard.press("Enter")
            page.get_by_text("Stop as soon as it is recalled verbatim").click()
            page.get_by_label("Method", exact=True).click()  # the selectbox opens a list of options
            page.get_by_role("option", name=args.method, exact=True).click()
            lr = page.get_by_role("slider", name="Learning rate")
            for _ in range(20):  # the select slider moves one choice per key press
                if args.lr in lr.get_attribute("aria-valuetext") or "":
                    break
                lr.press("ArrowRight")
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Start").click()
            page.evaluate(OBSERVER)
            print(f"soak: {args.tokens} tokens, {args.steps} steps, {args.method}, layers {args.layers}, "
                  f"server pid {server.pid}, home {home}", flush=True)
            print(f"{'min':>5} {'server MB':>9} {'trainer MB':>10} {'refresh/s':>9} {'tokens/s':>8} {'steps':>6} "
                  f"{'steps/s':>7}  cores busy: server trainer browser", flush=True)
            t0 = time.time()
            last = {"t": t0, "progress": 0, "tokens": 0, "step": 0, "cpu": _cpu_seconds(proc)}
            while time.time() - t0 < args.max_minutes * 60:
                time.sleep(args.interval)
                now = time.time()
                counts = page.evaluate("() => window.__mc")
                step, status = _run_state(home)
                rss = proc.memory_info().rss / 2**20
                child = sum(c.memory_info().rss for c in proc.children(recursive=True)) / 2**20
                dt = now - last["t"]
                row = {"minute": round((now - t0) / 60, 2), "server_mb": round(rss, 1), "trainer_mb": round(child, 1),
                       "refresh_per_s": round((counts["progress"] - last["progress"]) / dt, 2),
                       "token_view_per_s": round((counts["tokens"] - last["tokens"]) / dt, 2), "step": step,
                       "steps_per_s": round((step - last["step"]) / dt, 3), "page": True}
                cpu = _cpu_seconds(proc)
                row.update({f"{k}_cores": round((cpu[k] - last["cpu"][k]) / dt, 2) for k in cpu})
                samples.append(row)
                print(f"{row['minute']:>5} {row['server_mb']:>9} {row['trainer_mb']:>10} {row['refresh_per_s']:>9} "
                      f"{row['token_view_per_s']:>8} {step:>6} {row['steps_per_s']:>7}  {row['server_cores']:>18} "
                      f"{row['trainer_cores']:>7} {row['browser_cores']:>7}", flush=True)
                last = {"t": now, "progress": counts["progress"], "tokens": counts["tokens"], "step": step, "cpu": cpu}
                if status not in ("running", "queued", None) or step >= args.steps - 1:
                    break
            if args.screenshot:
                page.screenshot(path=args.screenshot, full_page=True)
            page.close()
            browser.close()
        # the same run, nobody watching (if it is still training)
        step0, status = _run_state(home)
        t_closed = time.time()
        if status == "running" and args.after_minutes > 0:
            time.sleep(args.after_minutes * 60)
            step1, _ = _run_state(home)
            closed = (step1 - step0) / (time.time() - t_closed)
            samples.append({"minute": None, "server_mb": round(proc.memory_info().rss / 2**20, 1),
                            "steps_per_s": round(closed, 3), "page": False})
            print(f"no page: {closed:.3f} steps/s over {args.after_minutes:g} min", flush=True)
        watched = [s for s in samples if s["page"]]
        if watched:
            first, peak = watched[0]["server_mb"], max(s["server_mb"] for s in watched)
            rates = [s["refresh_per_s"] for s in watched]
            print(f"server RSS: first sample {first:.0f} MB, peak {peak:.0f} MB, growth {peak - first:+.0f} MB; "
                  f"refreshes/s min {min(rates):.2f}, median {sorted(rates)[len(rates) // 2]:.2f}", flush=True)
            with_page = sorted(s["steps_per_s"] for s in watched[1:] or watched)[len(watched[1:] or watched) // 2]
            without = [s["steps_per_s"] for s in samples if not s["page"]]
            if without and without[0] > 0:
                print(f"steps/s with the page open (median) {with_page:.3f} vs closed {without[0]:.3f}: "
                      f"watching costs {without[0] / with_page:.2f}x", flush=True)
        if args.cli_steps:
            for c in proc.children(recursive=True):  # nothing else running: the CLI gets the machine the app had
                c.kill()
            server.kill()
            server.wait(timeout=30)
            text = home / "passage.txt"
            text.write_text(passage, encoding="utf-8")
            cli = subprocess.run([sys.executable, "-m", "memcore.cli", "train", "--text-file", str(text),
                                  "--layers", args.layers, "--lr", args.lr, "--method", args.method,
                                  "--max-steps", str(args.cli_steps), "--full-budget", "--json"],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
            if cli.returncode != 0:
                raise SystemExit(f"memcore train failed:\n{cli.stderr[-2000:]}")
            # both by the runs' own clocks, median step after two warm-up steps
            watched_to = max((s["step"] for s in watched), default=0)  # steps trained while the page was open
            app_steps = _step_seconds(home, newest=False)[2:watched_to]
            cli_steps = _step_seconds(home, newest=True)[2:]
            app_s, cli_s = _median(app_steps), _median(cli_steps)
            differ = _spec_differences(home)
            if differ:
                print(f"the app's run and the CLI's differ in: {differ}", flush=True)
            third = max(1, len(app_steps) // 3)
            samples.append({"minute": None, "cli_s_per_step": cli_s, "app_s_per_step": app_s, "page": False})
            print(f"app with the page open {app_s:.3f} s/step (first third {_median(app_steps[:third]):.3f}, last "
                  f"third {_median(app_steps[-third:]):.3f}) vs memcore train {cli_s:.3f} s/step: "
                  f"ratio {app_s / cli_s:.2f}x", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "samples": samples}, indent=1))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        for c in psutil.Process().children(recursive=True):
            c.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
