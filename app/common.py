"""What every page shares: the process-wide worker, tokenizers, the run store, and the session's identity."""

from __future__ import annotations

import os
import uuid
import warnings

import streamlit as st

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import charts  # noqa: E402
from jobs import Worker  # noqa: E402

from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TooManyTokens  # noqa: E402
from memcore.home import memcore_home  # noqa: E402
from memcore.loading import load_config, load_tokenizer  # noqa: E402
from memcore.specs import preflight  # noqa: E402
from memcore.store import Store  # noqa: E402

MAX_PASTE_CHARS = 200_000
MAX_UPLOAD_BYTES = 1_000_000


@st.cache_resource(show_spinner=False)
def get_worker() -> Worker:
    """One worker per server process: it owns the device, the base models and the job queue."""
    preload = (None if os.environ.get("MEMCORE_APP_NO_PRELOAD") else
               ModelSpec(name=os.environ.get("MEMCORE_APP_MODEL", "default")))
    return Worker(memcore_home(), preload=preload)


@st.cache_resource(show_spinner="loading tokenizer ...")
def get_tokenizer(model_name: str):
    """The tokenizer alone (cheap) so the page can count tokens before anything trains. Raises MemcoreError
    within seconds for a model that is neither a local folder nor reachable (memcore.loading.load_tokenizer)."""
    return load_tokenizer(ModelSpec(name=model_name))


@st.cache_resource(show_spinner=False, max_entries=8)
def get_model_config(model_name: str):
    """The model's config alone (no weights), for the preflight's context length and layer count."""
    return load_config(ModelSpec(name=model_name))


@st.cache_data(show_spinner=False, max_entries=64)
def preflight_counts(model_name: str, data: DataSpec, layers: str | tuple[int, ...]) -> tuple[int, int]:
    """(target tokens, model context in tokens) of memorizing `data` with an adapter on `layers` of the model, by
    memcore's preflight; raises MemcoreError when that cannot run (too many tokens, a layer the model lacks, ...)."""
    spec = RunSpec(model=ModelSpec(name=model_name), adapter=AdapterSpec(layers=layers), data=data)
    try:
        checked = preflight(spec, get_tokenizer(model_name), get_model_config(model_name))
    except TooManyTokens as e:  # said in the app's terms: the limit is its own, and it has no flag to raise it
        raise MemcoreError(f"The text is {e.total:,} target tokens; the app memorizes at most {e.limit:,}. Shorten it "
                           "(the JSONL source's 'keep first ℓ tokens' does so), or train longer texts from the command "
                           "line, where the limit can be raised.") from None
    return checked.n_tokens, checked.context_length


def get_store() -> Store:
    return get_worker().store


def session_id() -> str:
    if "session" not in st.session_state:
        st.session_state.session = uuid.uuid4().hex[:8]
    return st.session_state.session


def default_model_name() -> str:
    return os.environ.get("MEMCORE_APP_MODEL", "default")


def bounded_number(where, label: str, lo, hi, out_of_range: list[str], **kwargs):
    """A number input whose bounds [lo, hi] are checked here, not by the widget. Streamlit keeps an out-of-range
    value to itself (a red box and a tooltip) and hands the script the last valid one, so a Start button would train
    with settings other than those shown; here every value reaches the script, and one outside the bounds is added
    to out_of_range in words ('Rank must be from 1 to 1,024; got 0') for the caller to refuse with."""
    value = where.number_input(label, **kwargs)
    if not lo <= value <= hi:
        out_of_range.append(f"{label} must be from {lo:,} to {hi:,}; got {value:,}")
    return value


def error_text(e: Exception) -> str:
    return str(e) if isinstance(e, MemcoreError) else f"{type(e).__name__}: {e}"


def show_chart(chart, container=None) -> None:
    """Draw an altair chart (or its spec, already turned into a dict, as charts.live_spec makes) without
    re-validating it against the Vega-Lite schema on every refresh (validation costs more than building the
    chart), its datasets under stable names (charts.stable_spec) so a redraw with new data updates the chart
    in place."""
    spec = chart if isinstance(chart, dict) else charts.stable_spec(chart)
    (container or st).vega_lite_chart(spec, width="stretch")
