"""AppTest tests of every page: widgets, validation, a tiny-model run from Start to results, replay, delete."""

import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "streamlit_app.py")
XSS = "Hello <script>alert('pwned')</script> and <img src=x onerror=alert(1)> end."


@pytest.fixture
def app_env(home, tiny_model_dir, monkeypatch):
    """The app on a fresh store, with the tiny model as its default so runs take a second."""
    monkeypatch.setenv("MEMCORE_APP_MODEL", str(tiny_model_dir))
    st.cache_resource.clear()
    st.cache_data.clear()
    yield home
    from common import get_worker

    get_worker().close()
    st.cache_resource.clear()


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    return at


def _html(at: AppTest) -> str:
    return "\n".join(str(e.proto.body) for e in at.get("html"))


def _parse(markup: str) -> tuple[set[str], str]:
    """(tag names, visible text) of an HTML fragment, as a browser would build them."""
    from html.parser import HTMLParser

    class P(HTMLParser):
        tags: set[str] = set()
        text: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.tags.update(f"{tag}[{k}]" for k, _ in attrs)

        def handle_data(self, data):
            self.text.append(data)

    p = P()
    p.tags, p.text = set(), []
    p.feed(markup)
    return p.tags, "".join(p.text)


def _wait_for_job(at: AppTest, timeout: float = 120) -> None:
    from common import get_worker

    w = get_worker()
    deadline = time.time() + timeout
    while time.time() < deadline and any(j["status"] in ("queued", "running") for j in w.store.jobs()):
        time.sleep(0.3)
    assert not w.live_jobs(), "job did not finish"
    at.run()


def test_memorize_page_has_its_controls(app_env):
    at = _app()
    assert at.radio(key="source").options == ["Paste", "Upload", "Sample", "PhoneBook", "Random tokens", "JSONL"]
    assert (at.radio(key="adapter").options == ["LoRA (PEFT)", "the paper's MLP bypass"]
            and at.radio(key="adapter").value == "lora")
    assert at.slider(key="tau").value == 0.5
    assert at.selectbox(key="method").value == "memft-ot"
    assert at.number_input(key="rank").value == 8
    assert at.button(key="start").label.endswith("Start")
    from memcore.config import DEFAULT_PROMPT

    assert at.text_area(key="prompt").value == DEFAULT_PROMPT  # same prompt as the CLI, trailing newline included
    assert not at.exception


def test_memorize_form_starts_at_the_spec_defaults_and_builds_the_default_spec(app_env, tiny_model_dir):
    """The form's defaults are the spec dataclasses' (memcore.specs.default), so an untouched form asks for the
    same run as `memcore train --text ...` with no other flag."""
    from common import get_worker

    from memcore.specs import default, run_spec

    at = _app()
    assert at.number_input(key="rank").value == default("rank") and at.slider(key="tau").value == default("tau")
    assert float(at.text_input(key="lr").value) == default("lr")
    assert at.number_input(key="seed").value == default("seed")
    assert at.number_input(key="max_steps").value == default("max_steps")
    assert at.number_input(key="dropout").value == default("dropout")
    assert at.selectbox(key="method").value == default("method") and at.selectbox(key="quant").value == default("quant")
    assert at.selectbox(key="targets").value == default("targets") and at.text_input(key="layers").value == "all"
    assert at.checkbox(key="stop_when_recalled").value == default("stop_when_recalled")
    assert at.checkbox(key="until_converged").value is (default("until") == "converged")
    at.text_area(key="passage").input("Defaults all the way down.").run()
    at.button(key="start").click().run()
    jobs = get_worker().store.jobs()
    assert len(jobs) == 1
    job = get_worker().find(jobs[0]["id"])
    assert job.specs == [run_spec({"text": "Defaults all the way down.", "model": str(tiny_model_dir)})]
    get_worker().stop(job)
    _wait_for_job(at)


def test_a_jobs_spec_fills_the_form_back():
    from inputs import form_state

    from memcore.specs import run_spec

    spec = run_spec({"pairs": (("Q:", " 1"), ("R:", " 2")), "adapter": "bypass", "layers": "3,5", "rank": 2,
                     "lr": 1e-2, "until": "converged", "prompt": None})
    state = form_state(spec, compare=True)
    assert state["source"] == "Paste" and state["passage"] == " 1\n 2"  # the uploaded file is gone: its targets
    assert state["layers_bypass"] == "3,5" and "layers" not in state and state["adapter"] == "bypass"
    assert (state["rank"], state["lr"], state["until_converged"], state["prompt"]) == (2, "0.01", True, "")
    assert form_state(run_spec({"text": "x", "lr": 3e-2}), compare=False)["lr"] == "0.03"  # any value, typed
    assert state["method"] == "memft-ot"  # a compare job's link leaves the Method box at its default, not sft


@pytest.mark.parametrize("setup, message", [
    (lambda at: None, "empty"),
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.text_input(key="layers").input("99").run(), "layer 99 does not exist"),
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.text_input(key="layers").input("x,y").run(), "layers must be"),
    (lambda at: at.text_area(key="passage").input("word " * 3000).run(), "the app memorizes at most 2,048"),
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.text_input(key="lr").input("fast").run(), "The learning rate must be a number such as 2e-3"),
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.text_input(key="lr").input("5").run(), "The learning rate must be between 1e-06 and 1; got 5."),
    # a number box out of its bounds reaches the page (Streamlit alone would keep it and train the last valid value)
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.number_input(key="rank").set_value(0).run(), "Rank must be from 1 to 1,024; got 0"),
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.number_input(key="max_steps").set_value(10_000_000).run(),
     "Step budget must be from 1 to 10,000; got 10,000,000"),
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.number_input(key="dropout").set_value(0.95).run(), "Adapter dropout must be from 0.0 to 0.9; got 0.95"),
    # several at once are all named, so that fixing one does not reveal the next
    (lambda at: at.text_area(key="passage").input("some words here").run()
     and at.number_input(key="rank").set_value(0).run() and at.text_input(key="lr").input("5").run(),
     "The learning rate must be between 1e-06 and 1; got 5. Rank must be from 1 to 1,024; got 0."),
])
def test_impossible_settings_are_refused_before_a_run_starts(app_env, setup, message):
    from common import get_worker

    at = _app()
    setup(at)
    at.button(key="start").click().run()
    errors = " ".join(e.value for e in at.error)
    assert message in errors
    assert get_worker().store.jobs() == []


def test_a_hub_model_that_cannot_be_reached_is_named_at_once_and_not_started(app_env, hub_unreachable):
    """Offline, a hub id in the Model box answers within seconds (a minute of retries greyed the page before)."""
    from common import get_worker

    at = _app()
    at.text_input(key="model").input("someone/no-such-model").run(timeout=20)  # before any passage: said at once
    assert not at.exception
    left, right = at.columns[0], at.columns[1]  # the form's two columns: text on the left, model and settings right
    said = [e.value for e in right.error]
    assert len(said) == 1 and "cannot load model 'someone/no-such-model'" in said[0], said  # under the Model box
    assert "hub is unreachable (offline?)" in said[0] and not left.error
    at.text_area(key="passage").input("some words here").run(timeout=20)
    assert [e.value for e in at.error] == said  # once, not again beside the passage
    at.text_input(key="lr").input("fast").run(timeout=20)  # a second problem is named beside it, not instead
    assert any("learning rate" in e.value.lower() for e in at.columns[1].error)
    at.button(key="start").click().run(timeout=20)
    start = next(e.value for e in at.error if e.value.startswith("Cannot start"))
    assert "cannot load model 'someone/no-such-model'" in start and "learning rate" in start.lower(), start
    assert get_worker().store.jobs() == []


def test_a_tiny_run_finishes_and_its_results_appear_with_user_text_inert(app_env):
    at = _app()
    at.text_area(key="passage").input(XSS).run()
    at.number_input(key="max_steps").set_value(3).run()
    at.text_input(key="lr").input("5e-2").run()
    assert "target tokens" in " ".join(c.value for c in at.caption)
    at.button(key="start").click().run()
    assert not at.exception
    _wait_for_job(at)
    tags, text = _parse(_html(at))
    assert "<script>alert('pwned')</script>" in text and "<img src=x onerror=alert(1)>" in text  # shown literally
    assert "script" not in tags and "img" not in tags and not any("onerror" in t for t in tags)  # and never as markup
    assert "Result" in [s.value for s in at.subheader]
    labels = [m.label for m in at.metric]
    assert {"Recalled verbatim", "Steps", "ΔL (nats/token)", "P_eff", "Bits stored", "Bits / parameter"} <= set(labels)
    steps = next(m.value for m in at.metric if m.label == "Steps")
    assert steps == "3"
    assert not at.exception


def test_random_tokens_train_with_the_paper_bypass(app_env):
    from common import get_worker

    at = _app()
    at.radio(key="source").set_value("JSONL").run()
    at.button(key="start").click().run()
    assert "choose a JSONL file" in " ".join(e.value for e in at.error) and get_worker().store.jobs() == []
    at.radio(key="source").set_value("Random tokens").run()
    at.number_input(key="random_tokens").set_value(12).run()
    at.radio(key="adapter").set_value("bypass").run()
    assert at.number_input(key="alpha").disabled and at.selectbox(key="targets").disabled
    # the bypass is one layer's adapter: the field says which
    assert at.text_input(key="layers_bypass").value == "paper"
    at.number_input(key="dropout").set_value(0.1).run()
    at.checkbox(key="until_converged").check().run()
    assert "**12 target tokens**" in " ".join(c.value for c in at.caption)
    at.number_input(key="rank").set_value(2).run()
    at.number_input(key="max_steps").set_value(2).run()
    at.button(key="start").click().run()
    _wait_for_job(at)
    store = get_worker().store
    (run,) = store.runs()
    assert run["spec"]["adapter"]["kind"] == "bypass" and run["spec"]["adapter"]["layers"] == "paper"
    assert run["spec"]["data"]["random_tokens"] == 12 and run["spec"]["adapter"]["dropout"] == 0.1
    assert run["spec"]["train"]["until"] == "converged"
    assert run["summary"].p_eff == 2 * 2 * 64 and run["summary"].n_tokens == 12
    assert any("memcore bypass" in b.label for b in at.get("download_button"))


def test_compare_mode_runs_both_methods(app_env):
    at = _app()
    at.text_area(key="passage").input("Two methods race to remember this line.").run()
    at.toggle(key="compare").set_value(True).run()
    at.number_input(key="max_steps").set_value(2).run()
    at.button(key="start").click().run()
    _wait_for_job(at)
    md = " ".join(m.value for m in at.markdown)
    assert "**sft**" in md and "**memft-ot**" in md
    from common import get_store

    assert sorted(r["method"] for r in get_store().runs()) == ["memft-ot", "sft"]


def test_runs_page_lists_replays_exports_and_deletes(app_env):
    at = _app()
    at.text_area(key="passage").input("A short line to keep.").run()
    at.number_input(key="max_steps").set_value(2).run()
    at.button(key="start").click().run()
    _wait_for_job(at)
    from common import get_store

    done = get_store().runs()[0]
    get_store().create_run(done["spec"] if isinstance(done["spec"], dict) else done["spec"].to_dict())  # queued
    at = _app("app_pages/runs.py")
    assert not at.exception
    assert at.selectbox(key="picked").value == done["id"]  # it opens the newest run that has steps, not the queued
    rows = at.dataframe[0].value
    queued = rows.loc[rows["status"] == "queued", "run"].item()
    assert rows.loc[rows["status"] == "queued", "ΔL"].isna().all()
    assert at.dataframe[0].proto.placeholder == "—"  # its unknown cells read as a dash, not the word "None"
    get_store().delete_run(queued)
    at = _app("app_pages/runs.py")
    df = at.dataframe[0].value
    assert len(df) == 1 and df.iloc[0]["status"] == "completed" and df.iloc[0]["adapter"] == "lora"
    import pandas as pd

    created = pd.to_datetime(df["created"])  # to the second, in the table and its CSV export
    assert (created == created.dt.floor("s")).all()
    slider = at.slider[0]
    assert slider.value == 2  # last recorded step (states after 0, 1, 2 updates)
    slider.set_value(0).run()
    assert "step **0**" in " ".join(m.value for m in at.markdown)
    assert "A" in _html(at)
    rid = df.iloc[0]["run"]
    at.button(key=f"del-{rid}")
    assert at.button(key=f"del-{rid}").disabled
    at.checkbox(key=f"sure-{rid}").check().run()
    at.button(key=f"del-{rid}").click().run()
    at = _app("app_pages/runs.py")
    assert "No runs yet" in " ".join(i.value for i in at.info)


def test_runs_page_empty_store(app_env):
    at = _app("app_pages/runs.py")
    assert "No runs yet" in " ".join(i.value for i in at.info)


def test_a_reloaded_page_finds_its_job_from_the_url(app_env):
    at = _app()
    at.text_area(key="passage").input("Find me again after a reload.").run()
    at.number_input(key="max_steps").set_value(2).run()
    at.number_input(key="rank").set_value(3).run()
    at.button(key="start").click().run()
    job_id = at.query_params["job"]
    job_id = job_id[0] if isinstance(job_id, list) else job_id
    _wait_for_job(at)
    fresh = AppTest.from_file(APP, default_timeout=60)  # a new session, as after closing the tab
    fresh.query_params["job"] = job_id
    fresh.run()
    assert "Result" in [s.value for s in fresh.subheader]
    assert any("Find" in h for h in [_parse(_html(fresh))[1]])
    # and the form shows that job's settings, ready to run again or vary
    assert fresh.text_area(key="passage").value == "Find me again after a reload."
    assert fresh.number_input(key="rank").value == 3 and fresh.number_input(key="max_steps").value == 2
    # a job started from the Runs page may keep that page's path in its URL: reloaded, it shows the job all the same
    on_runs = AppTest.from_file(APP, default_timeout=60)
    on_runs.run()
    on_runs.switch_page("app_pages/runs.py")
    on_runs.query_params["job"] = job_id
    on_runs.run()
    assert not on_runs.exception and "Result" in [s.value for s in on_runs.subheader]


def test_law_page_renders_the_shipped_sweep(app_env):
    at = _app("app_pages/law.py")
    assert not at.exception
    sources = at.selectbox(key="law_source").options
    assert any(s.startswith("shipped:") for s in sources)
    at.selectbox(key="law_source").set_value("shipped: default_smollm2_135m").run()
    md = " ".join(m.value for m in at.markdown)
    assert "**sft**" in md and "**memft-ot**" in md and "R² **" in md
    params = at.dataframe[0].value
    assert list(params["parameter"]) == ["C", "alpha", "beta", "b", "alpha/beta"]
    assert (params["95% low"] <= params["value"]).all() and (params["value"] <= params["95% high"]).all()
    value = params.set_index("parameter")["value"]  # the exponent of the lines of equal ΔL, and what it means
    assert value["alpha/beta"] == pytest.approx(value["alpha"] / value["beta"])
    said = next(c.value for c in at.caption if c.value.startswith("alpha/beta: ΔL stays the same along ℓ ∝ r^(α/β), "
                                                                  "so at the same ΔL doubling the rank reaches "
                                                                  f"{2 ** value['alpha/beta']:.2f}×"))
    assert said.endswith("since its points are budget-bound, not at capacity.")  # the 300-step sweep's are
    assert len(at.get("vega_lite_chart")) >= 2  # surface and slices
    # the what-if opens on a point of each sweep, short of saturation: no extrapolation caption, no "saturated"
    # (rank 8 × 256 tokens, the old default, lies outside the bypass capacity sweep)
    import pandas as pd

    for sweep in ["capacity_bypass_random", "default_smollm2_135m"]:
        at.selectbox(key="law_source").set_value(f"shipped: {sweep}").run()
        table = pd.read_csv(Path(APP).parent.parent / "sample_data" / "sweeps" / f"{sweep}.csv")
        rank, length = at.number_input(key=f"wi_rank-shipped: {sweep}"), at.number_input(key=f"wi_len-shipped: {sweep}")
        assert rank.value in set(table["rank"]) and table["length"].min() <= length.value <= table["length"].max()
        assert not any("outside the fitted points" in c.value for c in at.caption)
        said = next(m.value for m in at.markdown if m.value.startswith("Predicted ΔL at rank"))
        assert "saturated" not in said and "bits/param" in said, said  # a number to read, not a non-answer
    rank.set_value(4).run()
    assert "Predicted ΔL at rank 4" in " ".join(m.value for m in at.markdown)
    # the what-if has its own method picker, starting at the one under Surface, and answers with that method's fit
    said = lambda: next(m.value for m in at.markdown if m.value.startswith("Predicted ΔL at rank 4"))  # noqa: E731
    sft_said = said()
    picker = at.radio(key="wi_method-shipped: default_smollm2_135m-sft")
    assert picker.value == "sft" and picker.options == at.radio(key="law_method").options
    picker.set_value("memft-ot").run()
    assert at.radio(key="law_method").value == "sft" and said() != sft_said
    assert any(c.value.startswith("With the memft-ot fit") for c in at.caption)


def _own_run(tiny_model_dir) -> None:
    """A user's own finished run in the app's store (LoRA on a text, 2 steps of memft-ot): unlike any sweep."""
    from common import get_store

    from memcore.config import DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.runner import execute, prepare

    store = get_store()
    spec = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), data=DataSpec(text="A run of my own."),
                   train=TrainSpec(method="memft-ot", max_steps=2))
    base, samples = prepare(spec, home=store.home)
    execute(spec, store, base, samples)


def test_law_page_shows_the_papers_regime(app_env, tiny_model_dir):
    """The capacity sweep: regime from how points stopped, ΔL / accuracy / recall heatmaps per method, the frontier
    and capacity, the verbatim what-if; a user's own run is placed on the cells with a note on what differs."""
    _own_run(tiny_model_dir)
    at = _app("app_pages/law.py")
    assert not at.exception
    assert at.selectbox(key="law_source").value == "shipped: capacity_bypass_random"
    heads = [h.value for h in at.subheader]
    assert "Recall: low loss is not high accuracy" in heads and "Verbatim-recall frontier and capacity" in heads
    captions = " ".join(c.value for c in at.caption)
    # how the points stopped, and the regime of the points the law is fitted on (not the table's saturated majority)
    assert "How its points stopped:" in captions and "stopped at the step budget" in captions
    assert "so the fit is **budget-bound (optimization)**" in captions and "capacity-bound" not in captions
    # surface + slices + 3 heatmaps for each of the 2 methods + the capacity chart
    assert len(at.get("vega_lite_chart")) >= 2 + 6 + 1
    warnings = " ".join(w.value for w in at.warning)
    assert ("differs from the sweep in adapter lora (sweep: bypass)" in warnings
            and "data text (sweep: random tokens)" in warnings)
    assert "Its parameters are not pinned down by its points" in captions  # the what-if says what its fit is
    at.number_input(key="wi_verbatim").set_value(40).run()
    md = " ".join(m.value for m in at.markdown)
    assert ("this sweep's frontier ℓ*(r) (at its 300-step budget, fitted over every rank, so it also extrapolates): "
            "the smallest rank predicted to recall **40** tokens verbatim with sft is **") in md
    # the newcomer's view of the capacity sweep: the saturated corner said, a what-if that is not trivially rank 1,
    # the frontier table in numbers or words (never "None"), and the tie between the methods said
    assert "Grey: where the fitted law predicts more than" in captions
    # it opens inside the sweep (a rank it trained, its median length); asked past it, at rank 8 and 256 tokens:
    assert not any("outside the fitted points" in c.value for c in at.caption)
    at.number_input(key="wi_rank-shipped: capacity_bypass_random").set_value(8).run()
    at.number_input(key="wi_len-shipped: capacity_bypass_random").set_value(256).run()
    need = next(m.value for m in at.markdown if m.value.startswith("Smallest rank predicted to reach ΔL"))
    assert "**1**" not in need, need
    assert need.endswith("(above the fitted ranks 1–4: an extrapolation of the law)")  # rank 9 of a rank 1-4 fit
    # random tokens: ΔL / ln 2 passes the bits a token carries (a base model worse than uniform); counted at that
    said = next(m.value for m in at.markdown if m.value.startswith("Predicted ΔL at rank 8, 256 tokens"))
    import re
    bits = float(re.search(r"≈ ([\d,]+) bits over", said).group(1).replace(",", ""))
    assert "bits a token carries: ΔL / ln 2 is more than that" in said and bits <= 15.6 * 256 < 13.092 / 0.6931 * 256
    frontier_tables = [t.value for t in at.dataframe if "bits/param there" in t.value.columns]
    assert frontier_tables and all(t["bits/param there"].map(lambda v: v is not None and v != "None").all()
                                   for t in frontier_tables)
    assert "tie at every rank here" in captions
    at.selectbox(key="law_source").set_value("shipped: default_smollm2_135m").run()
    assert not at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "so the fit is **budget-bound (optimization)**" in captions and "capacity-bound" not in captions


def test_an_interrupted_run_resumes_from_the_runs_page(app_env, tiny_model_dir):
    """A run cut off mid-way (its checkpoint saved) gets Resume and Run again; Resume continues its history."""
    from common import get_store

    from memcore.config import DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.runner import execute, prepare

    store = get_store()
    spec = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), data=DataSpec(text="Interrupted, then resumed."),
                   train=TrainSpec(method="sft", max_steps=12, stop_when_recalled=False))
    calls = iter(range(100))
    base, samples = prepare(spec, home=store.home)
    execute(spec, store, base, samples, should_stop=lambda: next(calls) >= 6)  # stops after 6 updates, checkpoint saved
    rid = store.runs()[0]["id"]
    store.set_status(rid, "interrupted", error="the app server stopped while it trained")
    at = _app("app_pages/runs.py")
    assert at.button(key=f"resume-{rid}").label == "Resume from step 6"
    assert at.button(key=f"again-{rid}").label == "Run again"
    at.button(key=f"resume-{rid}").click().run()
    _wait_for_job(at)
    run = store.run(rid)
    assert run["status"] == "completed" and run["summary"].steps == 12
    assert [s.step for s in store.steps(rid)] == list(range(13))
    assert len(store.runs()) == 1  # continued in place, not a new run


def test_runs_page_says_when_a_run_kept_a_decimated_history(app_env, tiny_model_dir, monkeypatch):
    from common import get_store

    import memcore.runner as runner
    from memcore.config import DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.runner import execute, prepare

    monkeypatch.setattr(runner, "HISTORY_SNAPSHOTS", 8)
    store = get_store()
    spec = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), data=DataSpec(text="Kept in a few snapshots."),
                   train=TrainSpec(method="sft", max_steps=30, stop_when_recalled=False, history="decimated"))
    base, samples = prepare(spec, home=store.home)
    execute(spec, store, base, samples)
    at = _app("app_pages/runs.py")
    assert not at.exception
    caption = " ".join(c.value for c in at.caption)
    n = len(store.replay(store.runs()[0]["id"]).steps)
    assert f"{n} snapshots of its 30 steps" in caption
    slider = at.select_slider[0]
    steps = store.replay(store.runs()[0]["id"]).steps
    assert slider.label == "Step" and list(slider.options) == [str(k) for k in steps] and slider.value == steps[-1]
    slider.set_value(steps[-2]).run()
    shown = " ".join(m.value for m in at.markdown)
    assert f"step **{steps[-2]}**" in shown


def _progress_text(runs_steps: list[int], max_steps: int, stop_requested: bool = False) -> str:
    """The live progress line for a running job whose runs are at `runs_steps` (1 s of training per step)."""
    def script(runs_steps, max_steps, stop_requested):
        import time

        import run_view
        from jobs import Job, RunLive

        from memcore.config import RunSpec, TrainSpec

        spec = RunSpec(train=TrainSpec(max_steps=max_steps))
        job = Job(id="j", session=None, specs=[spec] * len(runs_steps), labels=["a", "b"][:len(runs_steps)],
                  status="running", started=time.time() - 5, stop_requested=stop_requested)
        for s, label in zip(runs_steps, ["sft", "memft-ot"]):
            live = RunLive(label=label, spec=spec)
            live.rows = [{"step": s, "elapsed": float(s)}] if s else []
            job.runs.append(live)
        run_view.render_progress(job)

    at = AppTest.from_function(script, default_timeout=30, args=(runs_steps, max_steps, stop_requested))
    at.run()
    return at.get("progress")[0].proto.text


def test_the_progress_line_counts_every_run_and_says_when_it_is_finishing_or_stopping():
    # compare mode: one run done, the other half way -> a quarter of the work left, not "0 s left"
    text = _progress_text([20, 10], 20)
    assert "steps sft 20, memft-ot 10 of 20" in text and "at most 10 s left" in text
    assert "finishing" in _progress_text([20], 20)  # budget reached: the final check and save are running
    assert "stopping after the current step" in _progress_text([3], 20, stop_requested=True)


def test_runs_page_counts_tokens_above_tau_as_the_trainer_did(app_env, tiny_model_dir, monkeypatch):
    """The replayed p is float16 (0.5002 reads as 0.5): the headline takes the trainer's stored count."""
    import dataclasses

    from common import get_store

    from memcore.config import DataSpec, ModelSpec, RunSpec, TrainSpec
    from memcore.runner import execute, prepare
    from memcore.store import Store

    store = get_store()
    spec = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), data=DataSpec(text="Counted by the trainer."),
                   train=TrainSpec(method="sft", max_steps=3, stop_when_recalled=False))
    base, samples = prepare(spec, home=store.home)
    execute(spec, store, base, samples)
    real = Store.steps
    # a count that p > tau on the float16 history could not give, so the test sees which one the page shows
    monkeypatch.setattr(Store, "steps", lambda self, *a, **k: [dataclasses.replace(r, n_above=r.n_tokens + 7)
                                                               for r in real(self, *a, **k)])
    at = _app("app_pages/runs.py")
    assert not at.exception
    n = len(samples[0].target_ids)
    assert f"{n + 7}/{n} tokens above τ" in " ".join(m.value for m in at.markdown)


def test_any_learning_rate_in_range_can_be_typed(app_env):
    """The shipped capacity sweep's 3e-2 (not a stop of the old slider) reaches the run's spec as typed."""
    from common import get_worker

    at = _app()
    at.text_area(key="passage").input("Learning at the sweep's rate.").run()
    at.text_input(key="lr").input("3e-2").run()
    at.number_input(key="max_steps").set_value(1).run()
    at.button(key="start").click().run()
    job = get_worker().find(get_worker().store.jobs()[0]["id"])
    assert job.specs[0].train.lr == 0.03
    _wait_for_job(at)


def test_compare_mode_says_both_methods_instead_of_one(app_env):
    at = _app()
    assert not at.selectbox(key="method").disabled
    at.toggle(key="compare").set_value(True).run()
    at.run()
    assert at.text_input(key="methods_compared").value == "sft and memft-ot"
    assert at.text_input(key="methods_compared").disabled


def test_law_page_finds_the_frontier_of_the_apps_model(app_env):
    """Find the frontier: bad settings refused in words, then a search on the tiny model from the form to its
    brackets, drawn beside the shipped sweep's, and its probes offered as sweep data."""
    from common import get_worker

    at = _app("app_pages/law.py")
    assert not at.exception
    at.multiselect(key="fs_ranks").set_value([]).run()
    at.button(key="fs_start").click().run()
    assert any("choose at least one rank" in e.value for e in at.error)
    at.multiselect(key="fs_ranks").set_value([1, 2]).run()
    at.text_input(key="fs_lr").set_value("fast").run()
    at.button(key="fs_start").click().run()
    assert any("learning rate" in e.value.lower() for e in at.error)
    at.text_input(key="fs_lr").set_value("0.1").run()
    at.number_input(key="fs_steps").set_value(2).run()  # out of its box's bounds: refused in words, not replaced
    at.button(key="fs_start").click().run()
    assert any("Step budget per probe must be from 10 to 5,000; got 2" in e.value for e in at.error)
    assert get_worker().store.jobs() == []
    at.number_input(key="fs_steps").set_value(300).run()
    at.number_input(key="fs_tokens").set_value(48).run()
    at.number_input(key="fs_seeds").set_value(1).run()
    at.number_input(key="fs_steps").set_value(30).run()
    at.button(key="fs_start").click().run()
    assert not at.exception and at.query_params.get("search_job")
    _wait_for_job(at, timeout=300)
    at.run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "Frontier of" in text and "probes" in text
    sid = next(s for s in at.selectbox(key="law_source").options if s.startswith("your sweep: frontier-"))
    table = next(d.value for d in at.dataframe if "ℓ* between (tokens)" in d.value.columns)
    assert list(table["rank"]) == [1, 2]
    assert all("–" in v or "≥" in v or "<" in v for v in table["ℓ* between (tokens)"])
    charts = [str(c.proto) for c in at.get("vega_lite_chart") if "this search" in str(c.proto)]
    assert charts and "shipped sweep" in charts[0]
    job_id = at.query_params["search_job"]
    at.button(key=f"fs-show-{job_id[0] if isinstance(job_id, list) else job_id}").click().run()
    assert at.selectbox(key="law_source").value == sid


def test_a_phonebook_trains_in_minibatches_and_shows_its_entries(app_env):
    from common import get_worker

    at = _app()
    at.radio(key="source").set_value("PhoneBook").run()
    at.number_input(key="phonebook").set_value(6).run()
    at.number_input(key="batch_size").set_value(2).run()
    at.number_input(key="max_steps").set_value(4).run()
    at.button(key="start").click().run()
    _wait_for_job(at)
    (run,) = get_worker().store.runs()
    assert run["spec"]["train"]["batch_size"] == 2 and run["summary"].samples == 6
    html_ = _html(at)
    tags, text = _parse(html_)
    # a grid of six entries, each a name and its number, with the count recalled above it
    assert html_.count('class="mc-entry') == 6 and "of 6 entries recalled" in text
    assert any(ch.isdigit() for ch in text) and "Phone" not in text
    assert "script" not in tags
    # four steps recall nothing: the first wrong entry is named, and each entry's generation is listed by name
    book = run["spec"]["data"]
    (caps,) = [c.value for c in at.caption if c.value.startswith("The first entry greedy decoding")]
    assert caps.startswith("The first entry greedy decoding was getting wrong: **#") and "-token answer (" in caps
    (table,) = [d.value for d in at.dataframe]
    assert list(table.columns) == ["entry", "answer", "generated", "recalled", "wrong from token"] and len(table) == 6
    assert (table["wrong from token"] == "").tolist() == table["recalled"].tolist()  # named for the wrong ones only
    assert list(table["recalled"]) == sorted(table["recalled"])  # the wrong ones first
    named = caps.split("**")[1]
    assert named in set(table["entry"]) and named.split(" ", 1)[1] in text  # the same name as in the grid
    assert all(a.isdigit() or "-" in a for a in table["answer"]) and book
    # Generate with no prompt of its own recites every entry from its own prompt, each named
    next(b for b in at.button if b.label == "Generate").click().run()
    assert not at.exception
    assert any(c.value == "From each of the 6 entries' own prompts:" for c in at.caption)
    assert list(at.dataframe[-1].value["entry"].sort_values()) == sorted(table["entry"])
    at = _app("app_pages/runs.py")
    assert not at.exception and _html(at).count('class="mc-entry') == 6
    # the replay names the first wrong entry as the live view did, not a flat token number
    replayed = [c.value for c in at.caption if c.value.startswith("The first entry greedy decoding")]
    assert replayed == [caps] and not any("diverges at token #" in m.value for m in at.markdown)


def _benchmark_tables(folder: Path) -> None:
    """Benchmark tables as `bench_memft.py report --out` writes them, from a synthetic table where memft-ot recalls
    in 20 fewer steps than sft on every seed (a clear win) and memft-sw in the same steps ± noise (a tie)."""
    import json

    import numpy as np
    import pandas as pd

    from memcore.frontier import paired_differences

    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        level = rng.normal(100, 20)  # a per-seed level that pairing cancels
        for m, shift in (("sft", 0.0), ("memft-ot", -20.0), ("memft-sw", 0.0)):
            rows.append({"method": m, "rank": 1, "length": 20, "where": "0.5ℓ*", "seed": seed,
                         "steps": level + shift + rng.normal(0, 1 if m != "memft-sw" else 8)})
    paired = paired_differences(pd.DataFrame(rows), ["steps"], by=("rank", "length", "where"))
    shares = [{"method": m, "rank": 1, "length": 30, "where": "1.5ℓ*", "seed": seed,  # a share: read in points
               "frac_above": above + 0.01 * seed}
              for seed in range(3) for m, above in (("sft", 0.4), ("memft-sw", 0.6))]
    paired = pd.concat([paired, paired_differences(pd.DataFrame(shares), ["frac_above"],
                                                   by=("rank", "length", "where"))], ignore_index=True)
    folder.mkdir(parents=True, exist_ok=True)
    paired.to_csv(folder / "long_context_paired.csv", index=False)
    pd.DataFrame([{"method": m, "rank": r, "outcome": "bracketed", "lo": lo, "hi": hi, "lo_rate": 1.0,
                   "hi_rate": 0.0, "bits_per_param": 0.6, "settled": hi is not None,
                   "probing": None if hi is not None else 2 * lo if lo else 40, "probing_back": 1 if lo == 80 else 0,
                   "probing_recalled": 1 if lo == 80 else 0}
                  for m, r, lo, hi in (("sft", 1, 38, 40), ("memft-ot", 1, 40, 42), ("memft-sw", 1, 36, 38),
                                       ("sft", 2, 76, 80), ("memft-ot", 2, 80, None), ("memft-sw", 2, None, None))
                  ]).assign(fitted_ell_star=[39.2, 41.5, 37.0, 78.1, None, None],
                            fitted_lo=[38.1, 40.2, 35.5, 75.0, None, None],
                            fitted_hi=[40.9, 44.0, 38.2, 81.0, None, None],
                            minus_sft=[None, 2.3, -2.2, None, None, None],
                            minus_sft_lo=[None, 0.4, -4.0, None, None, None],
                            minus_sft_hi=[None, 4.6, 0.1, None, None, None],
                            minus_sft_verdict=[None, "more", "tie", None, None, None]) \
        .to_csv(folder / "long_context_frontier.csv", index=False)
    pd.DataFrame([{"method": m, "rank": 1, "length": 20, "measure": "steps", "new_seeds": "3,4", "new_mean": mean,
                   "new_n": 2, "shipped_lo": -1.0, "shipped_hi": 1.0, "inside": inside, "pooled_n": 5,
                   "pooled_mean": pm, "pooled_lo": plo, "pooled_hi": phi, "pooled_verdict": v}
                  for m, mean, inside, pm, plo, phi, v in (("memft-ot", 0.5, True, -3.8, -8.2, 0.6, "tie"),
                                                           ("memft-sw", 18.0, False, 12.0, 3.353, 20.647, "loses"))
                  ]).to_csv(folder / "long_context_spot.csv", index=False)
    pd.DataFrame([{"method": m, "rank": 1, "end": end, "length": n, "shipped_recalled": 3 if end == "lo" else 1,
                   "shipped_runs": 3, "new_seeds": "3,4", "new_recalled": k, "new_runs": 2, "p_fit": p,
                   "p_lo": max(p - 0.3, 0.0), "p_hi": min(p + 0.1, 1.0), "inside": inside, "pooled_ell_star": ell,
                   "pooled_lo": ell - 1.5, "pooled_hi": ell + 3.0,
                   **({"pooled_minus_sft": 2.0, "pooled_minus_sft_lo": -0.5, "pooled_minus_sft_hi": 4.5,
                       "pooled_minus_sft_verdict": "tie", "shipped_minus_sft": 2.3, "shipped_minus_sft_lo": 0.4,
                       "shipped_minus_sft_hi": 4.6, "shipped_minus_sft_verdict": "more"} if m != "sft" else {})}
                  for m, end, n, k, p, inside, ell in (("sft", "lo", 38, 2, 0.9, True, 39.2),
                                                      ("sft", "hi", 40, 2, 0.2, False, 39.2),
                                                      ("memft-ot", "lo", 40, 2, 0.8, True, 41.2),
                                                      ("memft-ot", "hi", 42, 0, 0.4, True, 41.2))
                  ]).to_csv(folder / "long_context_spot_frontier.csv", index=False)
    pd.DataFrame([{"method": "sft", "rank": r, "lo": lo, "hi": hi, "lo_rate": 1.0, "hi_rate": 0.0, "lo_seeds": k,
                   "hi_seeds": 2, "facts": lo, "p_eff": 1152 * r, "bits_per_param": 0.23, "settled": r == 1,
                   "most_recalled": most, "most_recalled_book": at, "most_recalled_seeds": 2,
                   "most_recalled_bits_per_param": most * 33.22 / (1152 * r)}
                  for r, lo, hi, k, most, at in ((1, 8, 9, 2, 10.0, 16), (2, 16, 32, 1, 20.5, 32))]) \
        .to_csv(folder / "phonebook_capacity.csv", index=False)
    pd.DataFrame([{"method": "sft", "points": 4, "failed": 2, "budget_stops": 2, "plateau_stops": 0}]) \
        .to_csv(folder / "phonebook_plateau_rule.csv", index=False)
    pd.DataFrame([{"method": "memft-ot", "rank": 2, "measure": m, "n": 7, "mean": mean, "lo": lo, "hi": hi,
                   "baseline_mean": base, "method_mean": base + mean, "verdict": "tie"}
                  for m, mean, lo, hi, base in (("entries_recalled", 2.43, -0.81, 5.67, 19.0),
                                                ("share_recalled", 0.08, -0.02, 0.18, 0.81))]) \
        .to_csv(folder / "phonebook_paired.csv", index=False)
    pd.DataFrame([{"method": m, "rank": 1, "length": n, "seed": sd, "window": 200, "plateau_stop": a,
                   "recalled": kind != "held", "steps": b, "kind": kind,
                   "stop_reason": "recalled" if kind != "held" else "max_steps"}
                  for m, n, sd, a, b, kind in (("sft", 40, 0, 900, 2000, "held"),
                                               ("memft-ot", 42, 0, 1100, 1450, "cut short"),
                                               ("sft", 44, 1, 800, 250, "diverged"))]) \
        .assign(diverged_at=[300, None, 35], delta_loss=[10.5, 11.0, 11.0], stop_delta_loss=[10.0, 11.0, 11.0],
                open_wait=[12, 0, 0], late_delta_loss=[0.3, 0.0, 0.0], on_plateau=[False, False, False],
                token_accuracy=[0.95, 1.0, 1.0], stop_token_accuracy=[0.90, 0.9, 0.9], frac_above=[0.6, 1.0, 1.0],
                stop_frac_above=[0.5, 0.8, 0.8]) \
        .to_csv(folder / "long_context_window.csv", index=False)
    (folder / "phonebook.json").write_text(json.dumps({"seeds": [0, 1], "epochs": 200, "note": "synthetic book",
                                                       "state": "complete",
                                                       "command": "python bench/bench_phonebook.py run"}))
    pd.DataFrame([{"method": "sft", "points": 7, "form": "power", "C": 2.0, "alpha": 0.5, "alpha_lo": 0.31,
                   "alpha_hi": 0.69, "beta": 0.25, "beta_lo": 0.1, "beta_hi": 0.4, "alpha_over_beta": 2.0,
                   "alpha_over_beta_lo": 1.5, "alpha_over_beta_hi": 2.5, "b": 0.1, "r2": 0.97,
                   "fitted_on": "fitted on the 7 converged, unsaturated points (as the paper does)",
                   "regime": "capacity-bound (converged)"}]).to_csv(folder / "long_context_law.csv", index=False)
    pd.DataFrame([{"run_id": None, "method": m, "rank": 1, "length": 60, "seed": sd, "around": True, "where": "1.5ℓ*",
                   "exact_recall": False, "delta_loss": 10.0, "open_wait": wait, "late_delta_loss": late,
                   "on_plateau": wait >= 200}
                  for m, sd, wait, late in (("sft", 0, 0, 0.4), ("sft", 1, 300, 0.0), ("memft-ot", 0, 10, 0.2))]
                 + [{"run_id": None, "method": "sft", "rank": 1, "length": 40, "seed": 0, "around": False,
                     "where": "", "exact_recall": True, "delta_loss": 12.0}]) \
        .to_csv(folder / "long_context_points.csv", index=False)
    (folder / "long_context.json").write_text(json.dumps({"settings": {"adapter": "bypass", "data": "random tokens",
                                                                       "max steps": 2000}, "plateau_window": 200,
                                                          "note": "synthetic", "command": "python bench/x.py run",
                                                          "state": "interim: 1 frontier(s) still open (memft-sw/r2)"}))


def test_law_page_names_a_broken_benchmark_table_and_shows_the_rest(app_env, tmp_path, monkeypatch):
    """A window table that is not one (a hand-edited file, another tool's) gets a warning naming it; the frontier
    beside it still shows."""
    import pandas as pd

    _benchmark_tables(tmp_path / "paper")
    pd.DataFrame({"method": ["sft"], "steps": [3]}).to_csv(tmp_path / "paper" / "long_context_window.csv",
                                                           index=False)
    monkeypatch.setenv("MEMCORE_BENCHMARK_DIR", str(tmp_path / "paper"))
    at = _app("app_pages/law.py")
    assert not at.exception
    assert any("Could not read long_context_window.csv as a window check" in w.value for w in at.warning)
    assert any("ℓ* (tokens)" in " ".join(t.value.columns) or "frontier (tokens)" in t.value.columns
               for t in at.dataframe)
    at.toggle(key="bench_mine").set_value(True).run()  # no runs of one's own yet: said, not an empty chart
    assert any(c.value.startswith("No runs of your own in this store yet") for c in at.caption)


def test_the_frontier_spot_says_when_the_benchmark_was_refitted_since(tmp_path, monkeypatch):
    """The spot's 'benchmark's seeds alone' difference is the fit when the spot ran; once the benchmark goes on and
    its table is refitted, the words give both, each named, instead of two intervals for one quantity."""
    import sys

    import pandas as pd

    monkeypatch.syspath_prepend(str(Path(APP).parent))
    sys.modules.pop("benchmark_view", None)
    from benchmark_view import frontier_spot_words

    _benchmark_tables(tmp_path)
    spot = pd.read_csv(tmp_path / "long_context_spot_frontier.csv")
    front = pd.read_csv(tmp_path / "long_context_frontier.csv")
    same = frontier_spot_words(spot, front)  # the table as the spot saw it: one interval, as before
    assert "(the benchmark's seeds alone: +2.3 [+0.4, +4.6] more)" in same and "refitted since" not in same
    front.loc[front["method"] == "memft-ot", ["minus_sft", "minus_sft_lo", "minus_sft_hi", "minus_sft_verdict"]] = \
        [2.3, -0.1, 4.9, "tie"]  # more points since: the lower end crossed 0
    moved = frontier_spot_words(spot, front)
    assert ("(the benchmark's seeds alone, on its points when the spot ran: +2.3 [+0.4, +4.6] more; refitted since "
            "on the points it has now, as in the table above: +2.3 [−0.1, +4.9] tie)") in moved


def test_the_top_box_says_memft_wins_only_where_every_cell_is_more(tmp_path, monkeypatch):
    """The top box's sentence answers the user's question from the verdicts: 'holds more at every rank' only when
    every MemFT cell is 'more'; one tie is enough for 'not at every rank'."""
    import sys

    import pandas as pd

    monkeypatch.syspath_prepend(str(Path(APP).parent))
    sys.modules.pop("benchmark_view", None)
    from benchmark_view import summary_words

    front = pd.DataFrame([{"method": m, "rank": r, "fitted_ell_star": 40.0 * r + (3 if m != "sft" else 0),
                           "minus_sft": None if m == "sft" else 3.0, "minus_sft_lo": None if m == "sft" else 1.0,
                           "minus_sft_hi": None if m == "sft" else 5.0,
                           "minus_sft_verdict": None if m == "sft" else "more"}
                          for m in ("sft", "memft-ot") for r in (1, 2)])
    words = summary_words(front, {"seeds": [0, 1, 2]})
    assert ("**So MemFT holds more than SFT at every rank here**, as the paper claims: memft-ot holds more at ranks "
            "1, 2.") in words
    front.loc[3, ["minus_sft_lo", "minus_sft_verdict"]] = [-1.0, "tie"]
    words = summary_words(front, {"seeds": [0, 1, 2]})
    assert "does not hold more than SFT at every rank here**: memft-ot holds more at rank 1 and the same at rank 2." \
        in words


def test_law_page_shows_the_benchmark_with_intervals(app_env, tiny_model_dir, tmp_path, monkeypatch):
    """The benchmark's frontier per method (brackets, open ends in words), the paired differences with their
    verdicts drawn and counted, and a user's own run placed against the brackets with what it differs in."""
    monkeypatch.setenv("MEMCORE_BENCHMARK_DIR", str(tmp_path / "none"))
    at = _app("app_pages/law.py")
    assert not at.exception
    assert "MemFT against SFT, with intervals" in [h.value for h in at.subheader]
    assert any("bench/bench_memft.py run" in i.value for i in at.info)  # nothing yet: the command to make it
    assert not any("What the long-context benchmark finds" in i.value for i in at.info)  # and no answer on top

    _benchmark_tables(tmp_path / "paper")
    monkeypatch.setenv("MEMCORE_BENCHMARK_DIR", str(tmp_path / "paper"))
    _own_run(tiny_model_dir)
    at = _app("app_pages/law.py")
    assert not at.exception
    # the answer at the top of the page: each method's fitted frontier and difference from sft's, and a link down
    top = next(i.value for i in at.info if i.value.startswith("**What the long-context benchmark finds"))
    assert "(up to 2,000 steps)" in top
    # each ℓ* with its 95% interval, and MemFT's difference from sft's with its own
    assert "| sft | 39.2 [38.1, 40.9] | 78.1 [75.0, 81.0] |" in top
    assert "| memft-ot | 41.5 [40.2, 44.0] (+2.3 [+0.4, +4.6], +6%: **more**) | — |" in top
    assert "| memft-sw | 37.0 [35.5, 38.2] (−2.2 [−4.0, +0.1], −6%: tie) | — |" in top  # the interval: a tie
    assert ("**So, unlike the paper's claim, MemFT does not hold more than SFT at every rank here**: memft-ot holds "
            "more at rank 1; memft-sw the same at rank 1.") in top  # the answer in words, not left to the reader
    assert ("With seeds 3 and 4 added at the bracket ends (the frontier's spot re-run), refitted over every seed: "
            "memft-ot at rank 1 +2.0 [−0.5, +4.5] tie.") in top  # the five-seed answer beside the three-seed one
    assert "](#memft-against-sft) (interim: a snapshot of a benchmark not yet finished)" in top
    assert "The shipped sweep the law below is fitted on stops at 300 steps" in top
    assert "Terms on this page" in [e.label for e in at.expander]  # the page's words explained for a newcomer
    assert "- **memft-ot**: MemFT, threshold only: the gradient goes only to the tokens still below τ." in " ".join(
        m.value for m in at.markdown)
    md = " ".join(m.value for m in at.markdown)
    assert "**memft-ot − sft**: of 1 comparison it wins 1, ties 0, loses 0." in md
    assert ("**memft-sw − sft**: of 2 comparisons it wins 1, ties 1, loses 0. Pooled with the spot re-run over 5 "
            "seeds, of its 1 cell it wins 0, ties 0, loses **1**.") in md  # a tie on 3 seeds, a loss on 5: both said
    table = next(t.value for t in at.dataframe if "frontier (tokens)" in t.value.columns)
    assert list(table["method"]) == ["sft", "sft", "memft-ot", "memft-ot", "memft-sw", "memft-sw"]
    assert list(table["frontier (tokens)"]) == ["38 – 40", "76 – 80", "40 – 42", "≥ 80", "36 – 38",
                                                        "not yet known"]
    # bits per parameter at the longest recalled so far is a lower bound while the search still trains there
    assert list(table["bits/param"]) == ["0.600", "0.600", "0.600", "≥ 0.600", "0.600", "≥ 0.600"]
    # what each open frontier is training now, and how its seeds back have done
    assert list(table["in training (tokens)"]) == ["—", "—", "—", "160: 1 of 1 recalled", "—", "40"]
    # the fitted ℓ* with its interval where placed, and each method's minus sft's
    assert list(table["fitted ℓ* [95%] (tokens)"]) == ["39.2 [38.1, 40.9]", "78.1 [75.0, 81.0]", "41.5 [40.2, 44.0]",
                                                      "—", "37.0 [35.5, 38.2]", "—"]
    assert list(table["− sft [95%]"]) == ["—", "—", "+2.3 [+0.4, +4.6] more", "—", "−2.2 [−4.0, +0.1] tie", "—"]
    specs = [c.proto.spec for c in at.get("vega_lite_chart")]
    fronts = [s for s in specs if "shortest not recalled" in s and "memft-sw" in s]  # the benchmark's brackets
    assert len(fronts) == 1 and '"title": "your runs"' in fronts[0] and "A run of my own" not in fronts[0]
    assert "recalled verbatim" in fronts[0] and "not recalled" in fronts[0]
    assert any("95% lo" in s and "against sft" in s for s in specs)  # the paired chart
    assert "differs from the benchmark in adapter lora (benchmark: bypass)" in " ".join(c.value for c in at.caption)
    paired = next(t.value for t in at.dataframe  # read as a reader reads it
                  if "difference [95% interval]" in t.value.columns)
    assert set(paired["verdict"]) == {"wins", "tie"}
    assert paired["difference [95% interval]"].str.match(r"^[+−]\d+\.\d \[[+−]\d+\.\d, [+−]\d+\.\d\]$").all()
    share = paired[paired["measure"].str.startswith("tokens with p > τ")].iloc[0]  # a share reads in points
    assert share["difference [95% interval]"].startswith("+20.0 [") and share["method / sft"] == "61.0 / 41.0"
    assert "% of tokens, differences in points" in share["measure"]
    steps_chart = next(s for s in specs if "steps to exact recall" in s and "95% lo" in s)
    import json

    sort = next(layer["encoding"]["y"]["sort"] for layer in json.loads(steps_chart)["layer"]
                if "y" in layer.get("encoding", {}))
    assert sort[sort.index("memft-sw · r1 · ℓ=20 (0.5ℓ*)") + 1] == "memft-sw · r1 · ℓ=20 (0.5ℓ*, with seeds 3, 4)"
    assert '"value": "diamond"' in steps_chart  # the spot's pooled cell drawn right after its own, a diamond
    assert "A diamond is a cell pooled over the benchmark's seeds and the spot re-run's" in " ".join(
        c.value for c in at.caption)
    md = " ".join(m.value for m in at.markdown)  # the spot re-run, pooled over every seed
    assert ("Frontier spot re-run with seeds 3, 4 (`python bench/bench_memft.py spot --frontier --seeds 3 4 --ranks "
            "1`): at 3 of 4 bracket ends the new seeds' recall is a plausible draw") in md
    assert "; not at sft r1 · 40 tokens: 2 of 2 recalled where the fit gives P(recall) 0.20 [0.00, 0.30]." in md
    assert ("Refitted over the benchmark's points and the new seeds' at the ends (tokens, 95% interval): sft r1 ℓ* "
            "39.2 [37.7, 42.2]; memft-ot r1 ℓ* 41.2 [39.7, 44.2], − sft +2.0 [−0.5, +4.5] **tie** (the benchmark's "
            "seeds alone: +2.3 [+0.4, +4.6] more).") in md
    ends = next(t.value for t in at.dataframe if "plausible" in t.value.columns)  # and end by end
    assert ends[ends["plausible"] == "no"][["method", "end", "tokens", "new seeds", "fit's P(recall) [95%]"]] \
        .values.tolist() == [["sft", "shortest not recalled", 40, "2 of 2", "0.20 [0.00, 0.30]"]]
    assert (ends["plausible"] == "yes").sum() == 3
    assert "**Spot re-run with seeds 3,4**: 1 of 2 differences fall inside" in md
    assert ("memft-sw − sft, r1 · 20 tokens, steps to exact recall (fewer is better): +12.0 [+3.4, +20.6] over 5 "
            "seeds, **loses**") in md
    caps = " ".join(c.value for c in at.caption)
    assert ("(200 steps without a new best) against points it stopped at the frontiers (the nearest each, and those "
            "whose recall would move a bracket), trained again without it up to the step budget (`python "
            "bench/bench_memft.py window`, `--decisive`): 2 of 3 recalled, 1 of them cut short by the rule (the share "
            "it cuts there: 95% Clopper-Pearson interval 1%–91%), 1 on a path that had left the run's copy before the "
            "rule stopped it; each point in the table. Where the rule cut a point") in caps
    assert "turns on floating-point order" in caps
    assert ("From the rule's stop to the budget, the points it held (not recalled either way) gained: sft (1 point) "
            "ΔL +5.0%, token accuracy +5.0 points, tokens above τ +10.0 points.") in caps  # the held one only
    window = next(t.value for t in at.dataframe if "rule's stop" in t.value.columns)  # point by point
    assert window[["method", "tokens", "seed", "rule's stop", "without the rule"]].values.tolist() == [
        ["sft", 40, 0, 900, "held to 2,000"], ["sft", 44, 1, 800, "recalled at 250: diverged"],
        ["memft-ot", 42, 0, 1100, "recalled at 1,450: cut short"]]
    assert window.iloc[0][["ΔL gain", "accuracy gain",
                           "above τ gain", "at the budget"]].tolist() == \
        ["+5.0%", "+5.0", "+10.0", "improving (12 steps since best)"]
    assert window.iloc[1]["ΔL gain"] == "—"  # recalled: nothing held to gain
    assert "Every probe not recalled ran out of its 200 epochs" in caps  # a budget-bound PhoneBook says so
    assert "synthetic book. Complete: made by `python bench/bench_phonebook.py run`." in caps  # and that it is done
    # and so does the shipped 300-step sweep's frontier, beside the benchmark that trains on to a plateau
    assert any("18 of the 18 points not recalled stopped at the step budget (300 steps) still improving" in i.value
               for i in at.info)
    book = next(t.value for t in at.dataframe if "largest book recalled (entries = facts)" in t.value.columns)
    assert list(book["seeds recalling each end"]) == ["2 of 2 · 0 of 2", "1 of 1 so far · 0 of 2"]
    # a book past the largest recalled whole still holds entries: the most any book held, beside it
    assert list(book["most in a book (bits/param)"]) == ["10 of 16 (0.288)", "20.5 of 32 (0.296)"]
    same = next(t.value for t in at.dataframe if "books" in t.value.columns)  # PhoneBook: MemFT on the same books
    assert same.iloc[0].to_dict() == {"method − sft": "memft-ot", "rank": 2, "measure": "entries recalled",
                                      "difference [95% interval]": "+2.4 [−0.8, +5.7]", "method / sft": "21.4 / 19.0",
                                      "books": 7, "verdict": "tie"}
    assert same.iloc[1]["difference [95% interval]"] == "+0.08 [−0.02, +0.18]"
    assert '"domain": ["wins", "tie", "loses"]' in steps_chart  # the legend names only the verdicts drawn
    assert '"domain": ["wins"]' in next(s for s in specs if "tokens with p > τ" in s or "tokens with p > \\u03c4" in s)
    law = next(t.value for t in at.dataframe if "α (rank) [95%]" in t.value.columns)  # the law past the frontier
    assert law.iloc[0].to_dict() == {"method": "sft", "α (rank) [95%]": "0.50 [0.31, 0.69]",
                                     "β (length) [95%]": "0.25 [0.10, 0.40]",
                                     "α/β (ℓ ∝ r^(α/β) at equal ΔL) [95%]": "2.00 [1.50, 2.50]", "R²": "0.970",
                                     "points": 7, "regime": "capacity-bound (converged)"}
    assert any(c.value.startswith("α/β is the exponent of the law's lines of equal ΔL") for c in at.caption)
    assert any(c.value == "Fitted on the 7 converged, unsaturated points (as the paper does)." for c in at.caption)
    assert any("A method missing here has fewer than six points past its frontier" in c.value for c in at.caption)
    assert not any("the fit is not yet the law" in c.value for c in at.caption)  # stage-2 cells are in
    budget = next(c.value for c in at.caption if c.value.startswith("Past the frontier, where the points stood"))
    assert budget.startswith("Past the frontier, where the points stood at the 2,000-step budget: 1 of 3 on a "
                             "plateau (no new best in tokens above τ or argmax-right tokens for 200+ steps), per "
                             "method in the table.")
    stood = next(t.value for t in at.dataframe if "on a plateau" in t.value.columns)  # per method, in a table
    assert stood.to_dict("records") == [
        {"method": "sft", "points": 2, "on a plateau": 1, "steps since last best (median, least)": "150, 0",
         "ΔL rise over the last 200 steps (median)": "+0.200 nats (+2.0%)"},
        {"method": "memft-ot", "points": 1, "on a plateau": 0, "steps since last best (median, least)": "10, 10",
         "ΔL rise over the last 200 steps (median)": "+0.200 nats (+2.0%)"}]
    assert "not a plateau" in budget  # some were still rising: read at the budget, and said so
    stood_el = next(t for t in at.dataframe if "on a plateau" in t.value.columns)  # its terse header is explained
    header_help = json.loads(stood_el.proto.columns)["steps since last best (median, least)"]["help"]
    assert "last new best (in tokens above τ or argmax-right tokens) to the step budget" in header_help
    assert "200 or more is a plateau by the rule" in header_help
    # the verbatim what-if (the 300-step sweep's law) says what the benchmark, trained on, found at that length
    at.number_input(key="wi_verbatim").set_value(60).run()
    md = " ".join(m.value for m in at.markdown)  # the benchmark's answer first, the sweep's beside it
    assert ("The long-context benchmark (random tokens, up to 2,000 steps and a plateau, interim): **rank 2** holds "
            "60 tokens verbatim with sft: it recalled 76 (its frontier there: 76–80 tokens; fitted ℓ*, where its "
            "chance of recall crosses 1/2: 78.1 [75.0, 81.0]).") in md
    assert md.index("**rank 2** holds 60") < md.index("Beside it, by this sweep's frontier")
    every = next(t.value for t in at.dataframe if "seeds recalling it" in t.value.columns)  # every method's answer
    assert every.to_dict("records") == [  # memft-sw's rank 2 has recalled nothing yet: its answer is not known
        {"method": "sft", "smallest rank": "2", "recalled end (tokens)": "76 at rank 2", "seeds recalling it":
         "", "fitted ℓ* [95%]": "78.1 [75.0, 81.0]"},
        {"method": "memft-ot", "smallest rank": "2", "recalled end (tokens)": "80 at rank 2", "seeds recalling it":
         "", "fitted ℓ* [95%]": ""},
        {"method": "memft-sw", "smallest rank": "not known yet", "recalled end (tokens)": "36 at rank 1",
         "seeds recalling it": "", "fitted ℓ* [95%]": "37.0 [35.5, 38.2]"}]
    at.number_input(key="wi_verbatim").set_value(30).run()  # short enough for rank 1 with every method
    every = next(t.value for t in at.dataframe if "seeds recalling it" in t.value.columns)
    assert list(every["smallest rank"]) == ["1", "1", "1"]
    at.number_input(key="wi_verbatim").set_value(100).run()
    every = next(t.value for t in at.dataframe if "seeds recalling it" in t.value.columns)
    assert list(every["smallest rank"]) == ["above 2", "above 2", "not known yet"]
    assert ("no rank it searches (1, 2) has sft recalling 100 tokens; the most is 76 at rank 2, so more than that "
            "takes a higher rank than it trained. At its fitted 39 tokens per rank (rank 2's ℓ*), that is about "
            "**rank 3**, a guess past what it trained.") in " ".join(m.value for m in at.markdown)
    assert any(c.value.startswith("Where the two differ, go by the benchmark") for c in at.caption)
    warned = " ".join(w.value for w in at.warning)  # unfinished tables say so, and how to go on
    assert "not finished: 1 frontier(s) still open (memft-sw/r2)" in warned and "python bench/x.py run" in warned
    (tmp_path / "paper" / "phonebook_capacity.csv").unlink()  # the other benchmark missing: its command is named
    import pandas as pd

    law_csv = tmp_path / "paper" / "long_context_law.csv"  # and the law still on the search's failed probes, from a
    pd.read_csv(law_csv).assign(fitted_on="the search's failed probes (stage 2's points past the frontier are too "
                                          "few so far): fitted on the 7 converged points") \
        .filter(regex="^(?!alpha_over_beta)").to_csv(law_csv, index=False)  # report older than α/β
    at = _app("app_pages/law.py")
    assert any("the fit is not yet the law" in c.value for c in at.caption)
    law = next(t.value for t in at.dataframe if "α (rank) [95%]" in t.value.columns)
    assert "R²" in law.columns and not any(c.startswith("α/β") for c in law.columns)
    assert not any(c.value.startswith("α/β is the exponent") for c in at.caption)
    assert any("No PhoneBook tables" in c.value and "bench_phonebook.py" in c.value for c in at.caption)


def test_memorize_more_on_top_of_a_run_and_replay_the_chain(app_env):
    """A finished run offers 'Memorize more on top of this': the next passage trains from its adapter with the earlier
    one measured beside it (its tokens and a chart of both passages), the results say how the earlier one fared, and
    the Runs page replays the chain as one story."""
    from common import get_store

    at = _app()
    at.text_area(key="passage").input("The first line to keep.").run()
    at.number_input(key="max_steps").set_value(3).run()
    at.button(key="start").click().run()
    _wait_for_job(at)
    (first,) = get_store().runs()
    rid = first["id"]
    at.button(key=f"more-start-{rid}").click().run()
    assert "Cannot start" in " ".join(e.value for e in at.error) and len(get_store().jobs()) == 1  # empty: refused
    assert at.text_area(key=f"more-prompt-{rid}").value == "Recite passage 2.\n"  # a prompt of its own
    lr = first["spec"]["train"]["lr"]
    assert any(f"learning rate {lr:g}" in c.value for c in at.caption)  # what it inherits is said
    at.text_area(key=f"more-text-{rid}").input("A second line on top.")
    at.number_input(key=f"more-steps-{rid}").set_value(2)
    at.checkbox(key=f"more-keep-{rid}").check()
    at.button(key=f"more-start-{rid}").click().run()
    _wait_for_job(at)
    assert not at.exception
    second = next(r for r in get_store().runs() if r["id"] != rid)
    assert second["spec"]["train"]["after"] == rid and second["spec"]["train"]["keep"] is True
    assert second["spec"]["data"]["text"] == "A second line on top." and second["steps"] == 2
    md = " ".join(m.value for m in at.markdown)
    n_first = first["summary"].n_tokens
    assert f"The earlier passage (run {rid})" in md and f"/{n_first}** tokens above τ" in md
    # the earlier passage's tokens drawn beside the new one's: both texts in the token views
    html = _html(at)
    assert "first" in html and "second" in html
    labels = {m.label for m in at.metric}
    assert {"Still recalled", "Tokens above τ", "Lost at step", "Rehearsal share"} <= labels
    summ = get_store().run(second["id"])["summary"]
    assert summ.after == rid and summ.earlier_tokens == n_first and summ.keep
    assert next(m.value for m in at.metric if m.label == "Tokens above τ") == f"{summ.earlier_above}/{n_first}"

    at = _app("app_pages/runs.py")
    df = at.dataframe[0].value
    row = df.set_index("run").loc[second["id"]]
    assert row["after"] == rid and row["rehearsed"] == "yes"
    assert df.set_index("run").loc[rid, ["after", "rehearsed"]].tolist() == ["", ""]  # blank, not "None"
    at.selectbox(key="picked").set_value(rid).run()
    assert second["id"] in " ".join(c.value for c in at.caption)  # trained on top of this one
    at.selectbox(key="picked").set_value(second["id"]).run()
    assert not at.exception
    md = " ".join(m.value for m in at.markdown)
    assert "A chain of runs" in md and f"A: run {rid}" in md and f"B: run {second['id']}" in md
    assert f"at step **2** · {summ.earlier_above}/{n_first} tokens above τ" in md
    story = [c for c in at.get("vega_lite_chart") if "one story" in c.proto.spec]
    assert story, "the chain's story chart is drawn"


def test_the_chain_chart_marks_each_passage_and_event():
    """charts.chain_chart: one line per passage, a recall strip per passage, and a labelled rule per event."""
    import charts
    import pandas as pd

    hist = pd.DataFrame({"step": [0, 1, 2, 0, 1, 2], "passage": ["A"] * 3 + ["B"] * 3,
                         "frac_above": [1.0, 0.5, 0.9, 0.0, 0.6, 1.0], "recalled": [1, 0, 1, 0, 0, 1]})
    spec = charts.stable_spec(charts.chain_chart(hist, pd.DataFrame({"step": [1], "label": ["A lost"]}), mark_step=2))
    text = str(spec)
    assert "A lost" in text and "recalled verbatim" in text
    data = [row for rows in spec["datasets"].values() for row in rows]
    band = [r for r in data if "next" in r and r["passage"] == "A"]
    assert [(r["step"], r["next"], r["recall"]) for r in band] == [(0, 1, "recalled verbatim"),
                                                                  (1, 2, "not recalled"), (2, 3, "recalled verbatim")]
    assert all(r["band_hi"] < 0 for r in data if "band_hi" in r)  # the bands sit under the lines' [0, 1]
    assert "vconcat" not in spec and "hconcat" not in spec  # one chart: it takes the page's width


def test_a_chain_sweep_in_the_store_is_offered_as_retention_never_as_law_points(app_env, tiny_model_dir, capsys):
    """After `memcore sweep --chain` the law page still renders; the chain sweep is a source of the retention section
    only (its runs are not law points), and `memcore fit --sweep` on it says what it is instead of fitting it."""
    from common import get_store

    from memcore.chain_sweep import ChainSweepSpec, run_chain_sweep
    from memcore.cli import main
    from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec

    template = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), adapter=AdapterSpec(rank=2, layers="all"),
                       data=DataSpec(random_tokens=6), train=TrainSpec(max_steps=2, lr=2e-2))
    sweep = ChainSweepSpec(template=template, ranks=(2,), first_lengths=(6,), second_lengths=(3,),
                           strategies=("none",), seeds=(0,), name="my-chains")
    assert len(list(run_chain_sweep(sweep, get_store(), batch=1))) == 2
    at = _app("app_pages/law.py")
    assert not at.exception
    law_sources = next(s.options for s in at.selectbox if s.key == "law_source")
    assert not any("my-chains" in o for o in law_sources)
    chain_sources = next(s.options for s in at.selectbox if "shipped: chains_bypass_random" in s.options)
    assert "your chain sweep: my-chains" in chain_sources
    assert main(["fit", "--sweep", "my-chains"]) != 0
    assert "my-chains is a chain sweep" in capsys.readouterr().err
    main(["fit"])  # the whole store: the first passage is a point, the chained run is left out and said so
    assert "1 run(s) trained on top of another (--after) left out" in capsys.readouterr().err


def test_law_page_shows_retention_against_capacity(app_env, tmp_path, monkeypatch):
    """The chain sweep's section: the first passage's retention per strategy against (ℓ_A + ℓ_B)/ℓ*(r), two charts
    and the table behind them, first passages never learned left out and said so."""
    import pandas as pd
    import retention_view

    rows = []
    for strategy, kept in (("none", 0.2), ("keep-sft", 1.0), ("keep-memft-ot", 0.9)):
        for ell_b in (8, 64):
            for seed in (0, 1):
                rows.append({"rank": 1, "first_length": 16, "second_length": ell_b, "strategy": strategy,
                             "seed": seed, "first_recalled": seed == 0 or ell_b == 8, "first_steps": 40,
                             "retained_above": kept, "retained_recalled": kept > 0.5, "retained_prefix": 3,
                             "lost_at": None, "regained_at": None, "second_steps": 50, "second_recalled": True,
                             "second_above": 1.0, "rehearsal_share": 0.0 if strategy == "none" else 0.3,
                             "stop_reason": "recalled", "first_run": "r"})
    csv = tmp_path / "chains.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    monkeypatch.setattr(retention_view, "SHIPPED_CHAINS", csv)
    at = _app("app_pages/law.py")
    assert not at.exception
    assert "Memory that keeps changing: a second passage on top of the first" in [s.value for s in at.subheader]
    specs = [c.proto.spec for c in at.get("vega_lite_chart")]
    assert any("still above" in s for s in specs) and any("seeds still reciting A" in s for s in specs)
    captions = " ".join(c.value for c in at.caption)
    assert "3 chain(s) left out" in captions and "ℓ*(r) = " in captions
    table = next(d.value for d in at.dataframe if "(ℓ_A+ℓ_B)/ℓ*" in d.value.columns)
    assert len(table) == 6 and set(table["strategy"]) == {"none", "keep-sft", "keep-memft-ot"}
    slope = float(captions.split("ℓ*(r) = ")[1].split("·r")[0])
    fills = sorted(table["(ℓ_A+ℓ_B)/ℓ*"].round(3).unique())
    assert fills == sorted({round(24 / slope, 3), round(80 / slope, 3)})


def test_a_chain_of_two_earlier_passages_draws_each_apart_with_its_own_count():
    """C on top of B on top of A: A's and B's tokens are two strips, each named with its run, its count above τ and
    whether it is still recalled (all argmax right), never run together into one text."""
    def script():
        import chain_view
        import numpy as np

        from memcore.pieces import Piece

        pieces = [Piece(text=t) for t in ("The", " cat", ".", "Orbit", " ninety", " two")]
        p = np.array([0.9, 0.8, 0.7, 0.9, 0.2, 0.6], dtype=np.float32)
        correct = np.array([True, True, True, True, False, True])
        chain_view.render_passages(["run-a", "run-b"], [3, 3], pieces, p, correct, 0.5)

    at = AppTest.from_function(script, default_timeout=30)
    at.run()
    assert not at.exception
    assert [c.value for c in at.caption] == ["run run-a: 3/3 tokens above τ · recalled verbatim",
                                             "run run-b: 2/3 tokens above τ · not recalled verbatim"]
    strips = [str(e.proto.body) for e in at.get("html")]
    assert len(strips) == 2 and "Orbit" not in strips[0] and "Orbit" in strips[1]


def test_compare_modes_verdict_gives_the_gap_and_says_one_seed_is_one_draw():
    from run_view import race_verdict

    head, caveat = race_verdict([(120, "sft"), (119, "memft-ot")])
    assert head.startswith("**memft-ot** reached exact recall first, at step 119, 1 step (1%) ahead of the other")
    assert "sft: step 120" in head and "memft-ot: step 119" in head
    assert "One seed each" in caveat and "Seed box" in caveat
    head, _ = race_verdict([(None, "sft"), (80, "memft-ot")])
    assert "the only one to get there within the budget" in head and "sft: not recalled" in head
    head, caveat = race_verdict([(50, "sft"), (50, "memft-ot")])
    assert head.startswith("**sft and memft-ot** reached exact recall at the same step, 50") and caveat
    assert race_verdict([(None, "sft"), (None, "memft-ot")]) == (
        "Neither run reached exact recall within the budget.", None)


def test_a_flat_target_token_is_placed_in_its_entry():
    from run_view import entry_name, entry_place

    lengths = [3, 1, 4]
    assert [entry_place(i, lengths) for i in range(8)] == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 2),
                                                          (2, 3)]
    with pytest.raises(IndexError, match="token 8 is outside the 8 target tokens"):
        entry_place(8, lengths)
    assert entry_name(["Ann Lee: ", "#2: ", "A very long name indeed: "], 0) == "#1 Ann Lee"
    assert entry_name(["Ann Lee: ", "#2: "], 1) == "#2"  # no name to give: its number alone
    assert entry_name(["", "", "A very long name indeed: "], 2, limit=10) == "#3 A very lo…"  # ten characters
