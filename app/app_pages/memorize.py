"""Memorize: choose a text and settings, press Start, watch every token cross τ; then check recall.

Layout only: the widgets give memcore.specs settings (defaults from the spec dataclasses), which become RunSpecs
and pass memcore's preflight before Start; app/inputs.py reads files, app/run_view.py draws a job."""

import run_view
import streamlit as st
from common import (
    bounded_number,
    default_model_name,
    error_text,
    get_model_config,
    get_tokenizer,
    get_worker,
    preflight_counts,
    session_id,
)
from inputs import describe_jsonl, form_state, parse_lr, paste_error, read_jsonl_upload, read_text_upload

from memcore.config import ADAPTERS, METHODS, QUANTS, MemcoreError, ModelSpec
from memcore.data import list_samples, read_sample
from memcore.specs import default, default_layers, run_specs

worker = get_worker()

st.title("Memorize")
st.caption("Paste a passage, pick a LoRA rank and a threshold τ, and watch each token's probability climb past τ. "
           "A token with p > 0.5 is necessarily the model's top choice, so once every token is past 0.5 the passage is "
           "recited verbatim. That is enough, not needed: a token below 0.5 can still be the top choice, so a passage "
           "is often recited before every token is past 0.5.")

job = worker.find(st.query_params.get("job"))
if job is not None and "source" not in st.session_state:
    st.session_state.update(form_state(job.specs[0], compare=len(job.specs) > 1))

# --- inputs --------------------------------------------------------------------------------------------------

out_of_range: list[str] = []  # number boxes holding a value outside their bounds, in words (bounded_number)
data, keep_len, input_error = {}, None, None  # what to memorize (specs settings), its length cap, why it is unusable
left, right = st.columns([3, 2], gap="large")
with left:
    source = st.radio("Text to memorize", ["Paste", "Upload", "Sample", "PhoneBook", "Random tokens", "JSONL"],
                      horizontal=True, key="source")
    if source == "Paste":
        data["text"] = st.text_area("Passage", key="passage", height=180, placeholder="Paste the text to memorize ...")
        input_error = paste_error(data["text"])
    elif source == "Upload":
        f = st.file_uploader("Text file (.txt or .md; UTF-8, UTF-16 or UTF-32)", type=["txt", "md"], key="upload")
        if f is not None:
            data["text"], input_error = read_text_upload(f)
            if data["text"]:
                st.text(data["text"][:600] + (" ..." if len(data["text"]) > 600 else ""))
    elif source == "Sample":
        data["text"] = read_sample(st.selectbox("Sample passage", list_samples(), key="sample"))
        st.text(data["text"][:600] + (" ..." if len(data["text"]) > 600 else ""))
    elif source == "PhoneBook":
        c_n, c_b = st.columns(2)
        data["phonebook"] = int(bounded_number(
            c_n, "PhoneBook entries", 1, 2000, out_of_range, value=20, key="phonebook",
            help="Seeded 'Name: ...' -> 10-digit number pairs; shown as a grid of entries while they train"))
        data["batch_size"] = int(bounded_number(
            c_b, "Entries per step (0 = all)", 0, 2000, out_of_range, value=0, key="batch_size",
            help="Minibatches, as the paper trains PhoneBook (10-20 entries a step), reshuffled every epoch; "
                 "every entry is still shown as last measured")) or None
    elif source == "Random tokens":
        data["random_tokens"] = int(bounded_number(
            st, "Random tokens", 1, 2048, out_of_range, value=64, key="random_tokens",
            help="Token ids drawn uniformly from the vocabulary's ordinary tokens, seeded by the seed: the paper's "
                 "r100 data, where memorization is bounded by capacity"))
    else:
        f = st.file_uploader("JSONL of prompt/target pairs", type=["jsonl", "json", "txt"], key="jsonl",
                             help="The paper's PhoneBook lines {query, target} (trained as one batch) or long-context "
                                  "lines {question, matching} (one long target); other keys below")
        c_keys, c_line, c_len = st.columns(3)
        keys = c_keys.text_input("Keys (PROMPT,TARGET)", value="", key="jsonl_fields",
                                 placeholder="auto: query,target or question,matching")
        line_no = int(bounded_number(c_line, "Line (0 = auto)", 0, 1_000_000, out_of_range, value=0,
                                     key="jsonl_line"))
        keep_len = int(bounded_number(c_len, "Keep first ℓ tokens (0 = all)", 0, 100_000, out_of_range, value=0,
                                      key="jsonl_length")) or None
        if f is not None:
            parsed, input_error = read_jsonl_upload(f, keys, line_no)
            if parsed is not None:
                data["pairs"] = parsed.pairs
                st.caption(describe_jsonl(parsed))
    # a text area, not a text input: the default prompt ends in a newline, as on the command line
    prompt = st.text_area("Prompt (conditioned on, not trained)", value=default("prompt"), key="prompt", height=68,
                          disabled=source in ("PhoneBook", "JSONL"),
                          help="PhoneBook and JSONL samples bring their own prompts")

with right:
    model_name = st.text_input("Model", value=default_model_name(), key="model",
                               help="'default' (SmolLM2-135M-Instruct, offline), a Hugging Face id, or a local folder")
    model_note = st.empty()  # a model that cannot be loaded is named here, under its box, passage or not
    c1, c2 = st.columns(2)
    quant = c1.selectbox("Quantization", QUANTS, index=QUANTS.index(default("quant")), key="quant",
                         help="nf4 = QLoRA on a 4-bit base (bitsandbytes)")
    if st.session_state.get("compare", False):  # compare mode trains both, whatever a Method box would say
        c2.text_input("Methods", value="sft and memft-ot", disabled=True, key="methods_compared",
                      help="compare mode trains sft and memft-ot side by side; turn it off to pick one method")
        method = default("method")
    else:
        method = c2.selectbox("Method", METHODS, index=METHODS.index(default("method")), key="method",
                              help="sft: mean loss on every token · memft-ot: only tokens below τ · "
                                   "memft-sw: sliding window")
    adapter_kind = st.radio("Adapter", ADAPTERS, index=ADAPTERS.index(default("adapter")), horizontal=True,
                            key="adapter",
                            format_func=lambda k: {"lora": "LoRA (PEFT)", "bypass": "the paper's MLP bypass"}[k],
                            help="bypass: out = MLP(x) + x·A·B on one layer's MLP, no scaling, 2·hidden parameters per "
                                 "rank (the paper's adapter; saved by memcore, not exportable to PEFT)")
    bypass = adapter_kind == "bypass"
    rank = int(bounded_number(c1, "Rank", 1, 1024, out_of_range, value=default("rank"), key="rank"))
    alpha = float(bounded_number(c2, "LoRA alpha (0 = same as rank)", 0.0, 8192.0, out_of_range, value=0.0,
                                 key="alpha", disabled=bypass))
    target_choices = ["all", "attn", "mlp"]
    targets = c1.selectbox("Target modules", target_choices, index=target_choices.index(default("targets")),
                           key="targets", disabled=bypass)
    # one field per adapter, each with its own default: the bypass is one layer's adapter ('paper'), LoRA all layers
    layers = c2.text_input("Layers", value=default_layers(adapter_kind), key="layers_bypass" if bypass else "layers",
                           help="all, paper (one middle layer: its MLP), or indices: 0,5,9 (as --layers on the "
                                "command line)")
    dropout = float(bounded_number(c1, "Adapter dropout", 0.0, 0.9, out_of_range, value=default("dropout"),
                                   step=0.05, key="dropout",
                                   help="dropout on the adapter's input during training (the paper uses 0.1 with its "
                                        "bypass)"))
    tau = st.slider("Threshold τ", min_value=0.05, max_value=0.95, value=default("tau"), step=0.05, key="tau")
    lr, lr_error = parse_lr(st.text_input("Learning rate (AdamW)", value=f"{default('lr'):g}", key="lr",
                                          help="any value from 1e-6 to 1, e.g. 2e-3, 1e-2 (the paper's) or 3e-2 (the "
                                               "shipped capacity sweep's); it decays linearly to 0 over the budget"))
    if lr_error:
        st.error(lr_error)  # beside the box (Start says it again)
    c3, c4 = st.columns(2)
    max_steps = int(bounded_number(c3, "Step budget", 1, 10_000, out_of_range, value=default("max_steps"),
                                   key="max_steps"))
    seed = int(bounded_number(c4, "Seed", 0, 2**31 - 1, out_of_range, value=default("seed"), key="seed"))
    stop_when_recalled = st.checkbox("Stop as soon as it is recalled verbatim", value=default("stop_when_recalled"),
                                     key="stop_when_recalled")
    until_converged = st.checkbox(
        f"Stop when converged (all above τ, or ΔL flat {default('plateau_window')} steps)",
        value=default("until") == "converged", key="until_converged",
        help="the paper's regime: train to convergence (as --until converged)")
    compare = st.toggle("Compare mode: sft and memft-ot side by side", key="compare")
    # every problem of the form at once, so that fixing one does not reveal the next
    input_error = " ".join(e.rstrip(".") + "." for e in [input_error, lr_error, *out_of_range] if e) or None

settings = dict(model=model_name.strip() or default("model"), quant=quant, adapter=adapter_kind, rank=rank,
                layers=layers, dropout=dropout, prompt=prompt, length=keep_len, seed=seed, method=method, tau=tau,
                lr=lr, max_steps=max_steps, stop_when_recalled=stop_when_recalled,
                until="converged" if until_converged else "budget")
if not bypass:  # the bypass has no scaling and always wraps the MLP
    settings.update(alpha=alpha or None, targets=targets)

# the model first, on its own: its tokenizer and config (cached, no weights), so that a name that cannot be loaded
# is said under the Model box at once, before a passage is pasted
model_problem = None
try:
    get_tokenizer(settings["model"])
    get_model_config(settings["model"])
except MemcoreError as e:
    model_problem = str(e)
except Exception as e:  # a folder that is not a model, say
    model_problem = error_text(e)
if model_problem:
    model_note.error(model_problem)

# the runs Start asks for and their token count against the limit, shown before anything starts
specs, problem = None, None
try:
    if model_problem or input_error:  # every problem at once: the model's and the form's
        raise MemcoreError(" ".join(e for e in (model_problem, input_error) if e))
    if source == "JSONL" and "pairs" not in data:
        raise MemcoreError("choose a JSONL file to memorize")
    specs = run_specs(settings | data, methods=["sft", "memft-ot"] if compare else None)
    n_tokens, context = preflight_counts(specs[0].model.name, specs[0].data, specs[0].adapter.layers)
except MemcoreError as e:
    problem = str(e)
except Exception as e:  # tokenizer of an unreachable model, say
    problem = error_text(e)
with left:
    if specs is not None and problem is None:
        limit = specs[0].data.max_tokens
        if source == "PhoneBook":  # many samples: the limit is per entry, the total bounded by memory
            st.caption(f"**{n_tokens:,} target tokens** in {data['phonebook']:,} entries · limit {limit:,} per "
                       f"entry · model context {context:,}")
        else:
            st.caption(f"**{n_tokens:,} target tokens** · limit {limit:,} · model context {context:,}")
    elif problem and (any(data.values()) or input_error):
        # the model's problem is said under its box; here the form's, if any
        if shown := (input_error if model_problem else problem):
            st.error(shown)

busy = job is not None and job.is_live
if st.button("Start", type="primary", disabled=busy, key="start"):
    if problem or specs is None:
        st.error(f"Cannot start: {problem or 'paste a passage first'}")
    else:
        job = worker.submit(specs, session_id())
        st.query_params["job"] = job.id
        st.rerun()

if not worker.owner:
    st.caption("Another memcore app on this memcore home trains on this device; your runs join its queue.")
elif job is not None:
    pass  # the job's own status line says what the trainer is doing
elif not worker.is_model_ready(ModelSpec(name=default_model_name())) and worker.loading_error is None:
    st.caption("loading the default model in the background ...")
elif worker.loading_error:
    st.warning(f"The default model could not be loaded: {worker.loading_error}")

# --- the job -----------------------------------------------------------------------------------------------------


# While a job trains, two fragments refresh on their own: the progress line often (it shows the elapsed time),
# the token views and charts at most once a second (each refresh re-renders them in the browser, which on a
# machine that also trains takes CPU from training; bench/soak_app.py measures it).
PROGRESS_EVERY_S, VIEW_EVERY_S = 0.4, 1.0


@st.fragment(run_every=PROGRESS_EVERY_S)
def live_progress(job_id: str) -> None:
    j = worker.find(job_id)
    if j is None:
        return
    run_view.render_progress(j)
    if not j.is_live:  # finished: one full rerun switches to the static result view
        st.rerun()


@st.fragment(run_every=VIEW_EVERY_S)
def live_runs(job_id: str) -> None:
    j = worker.find(job_id)
    if j is not None:
        run_view.render_runs(j)


if job is not None:
    st.divider()
    if job.is_live:
        live_progress(job.id)
        live_runs(job.id)
    else:
        run_view.render_job(job)
elif worker.live_jobs():
    st.divider()
    st.caption("Jobs training now (from any session):")
    for j in worker.live_jobs():
        if j.kind == "frontier":
            st.page_link("app_pages/law.py", label=f"job {j.id} ({j.title}, {j.status}): on the Memory law page",
                         query_params={"search_job": j.id})
        elif st.button(f"watch job {j.id} ({j.title}, {j.status})", key=f"watch-{j.id}"):
            st.query_params["job"] = j.id
            st.rerun()
