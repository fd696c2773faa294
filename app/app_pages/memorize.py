"""Memorize: choose a text and settings, press Start, watch every token cross τ; then check recall."""

import io
import time
import zipfile

import charts
import numpy as np
import pandas as pd
import streamlit as st
from common import MAX_PASTE_CHARS, MAX_UPLOAD_BYTES, default_model_name, error_text, get_tokenizer, get_worker, session_id, show_chart

from memcore.config import DEFAULT_PROMPT, METHODS, QUANTS, AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec
from memcore.data import build_samples, decode_text, list_samples, read_sample
from memcore.pieces import token_pieces

LR_CHOICES = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]
worker = get_worker()

st.title("Memorize")
st.caption("Paste a passage, pick a LoRA rank and a threshold τ, and watch each token's probability climb past τ. "
           "A token with p > 0.5 is necessarily the model's top choice, so once every token is past 0.5 the passage is recited verbatim.")

job = worker.find(st.query_params.get("job"))


def _prefill(spec, compare: bool) -> None:
    """A page opened on a job's URL in a new session shows that job's settings, not the defaults."""
    ss = st.session_state
    if spec.data.text is not None:
        ss.update(source="Paste", passage=spec.data.text)
    elif spec.data.random_tokens is not None:
        ss.update(source="Random tokens", random_tokens=spec.data.random_tokens)
    elif spec.data.pairs is not None:  # the uploaded file is gone with its session: show the pairs as a pasted passage
        ss.update(source="Paste", passage="\n".join(t for _, t in spec.data.pairs))
    else:
        ss.update(source="PhoneBook", phonebook=spec.data.phonebook)
    ss.update(adapter=spec.adapter.kind, dropout=float(spec.adapter.dropout), until_converged=spec.train.until == "converged")
    ss.update(prompt=spec.data.prompt or "", model=spec.model.name, quant=spec.model.quant, method=spec.train.method,
              rank=spec.adapter.rank, alpha=float(spec.adapter.alpha or 0.0), tau=spec.train.tau, max_steps=spec.train.max_steps,
              seed=spec.train.seed, stop_when_recalled=spec.train.stop_when_recalled, compare=compare)
    layers = spec.adapter.layers if isinstance(spec.adapter.layers, str) else ",".join(map(str, spec.adapter.layers))
    ss["layers_bypass" if spec.adapter.kind == "bypass" else "layers"] = layers
    if isinstance(spec.adapter.targets, str):
        ss["targets"] = spec.adapter.targets
    if spec.train.lr in LR_CHOICES:
        ss["lr"] = spec.train.lr


if job is not None and "source" not in st.session_state:
    _prefill(job.specs[0], compare=len(job.specs) > 1)

# --- inputs --------------------------------------------------------------------------------------------------

left, right = st.columns([3, 2], gap="large")
with left:
    source = st.radio("Text to memorize", ["Paste", "Upload", "Sample", "PhoneBook", "Random tokens", "JSONL"], horizontal=True,
                      key="source")
    text, phonebook, pairs, random_n, keep_len, input_error = None, None, None, None, None, None
    if source == "Paste":
        text = st.text_area("Passage", key="passage", height=180, placeholder="Paste the text to memorize ...")
        if len(text) > MAX_PASTE_CHARS:
            input_error = f"The passage is {len(text):,} characters; the app accepts up to {MAX_PASTE_CHARS:,}. Shorten it or use the CLI."
    elif source == "Upload":
        f = st.file_uploader("Text file (.txt or .md, UTF-8)", type=["txt", "md"], key="upload")
        if f is not None:
            if f.size > MAX_UPLOAD_BYTES:
                input_error = f"{f.name} is {f.size / 1e6:.1f} MB; the app accepts files up to {MAX_UPLOAD_BYTES / 1e6:.0f} MB."
            else:
                try:
                    text = decode_text(f.getvalue(), f.name)
                except MemcoreError as e:
                    input_error = str(e)
    elif source == "Sample":
        name = st.selectbox("Sample passage", list_samples(), key="sample")
        text = read_sample(name)
        st.text(text[:600] + (" ..." if len(text) > 600 else ""))
    elif source == "PhoneBook":
        phonebook = int(st.number_input("PhoneBook entries", min_value=1, max_value=2000, value=20, key="phonebook",
                                        help="Seeded 'Name: ...' -> 10-digit number pairs, trained as a batch"))
    elif source == "Random tokens":
        random_n = int(st.number_input("Random tokens", min_value=1, max_value=2048, value=64, key="random_tokens",
                                       help="Token ids drawn uniformly from the vocabulary's ordinary tokens, seeded by the "
                                            "seed: the paper's r100 data, where memorization is bounded by capacity"))
    else:
        f = st.file_uploader("JSONL of prompt/target pairs", type=["jsonl", "json", "txt"], key="jsonl",
                             help="The paper's PhoneBook lines {query, target} (trained as one batch) or long-context lines "
                                  "{question, matching} (one long target); other keys below")
        c_keys, c_line, c_len = st.columns(3)
        keys = c_keys.text_input("Keys (PROMPT,TARGET)", value="", key="jsonl_fields", placeholder="auto: query,target or question,matching")
        line_no = int(c_line.number_input("Line (0 = auto)", min_value=0, max_value=1_000_000, value=0, key="jsonl_line"))
        keep_len = int(c_len.number_input("Keep first ℓ tokens (0 = all)", min_value=0, max_value=100_000, value=0, key="jsonl_length")) or None
        if f is not None:
            from memcore.data import parse_jsonl

            try:
                if f.size > MAX_UPLOAD_BYTES:
                    raise MemcoreError(f"{f.name} is {f.size / 1e6:.1f} MB; the app accepts files up to {MAX_UPLOAD_BYTES / 1e6:.0f} MB.")
                fields = None
                if keys.strip():
                    parts = [k.strip() for k in keys.split(",")]
                    if len(parts) != 2 or not all(parts):
                        raise MemcoreError(f"keys must be two names, PROMPT,TARGET; got {keys!r}")
                    fields = (parts[0], parts[1])
                parsed = parse_jsonl(f.getvalue(), f.name, fields, line_no or None)
                pairs = parsed.pairs
                st.caption(f"{parsed.layout} layout ({parsed.fields[0]} → {parsed.fields[1]}): {len(pairs)} sample"
                           f"{'s' if len(pairs) != 1 else ''} of {parsed.lines} line{'s' if parsed.lines != 1 else ''}"
                           + (f" · {parsed.note}" if parsed.note else ""))
            except MemcoreError as e:
                input_error = str(e)
    # a text area, not a text input: the default prompt ends in a newline, as on the command line
    prompt = st.text_area("Prompt (conditioned on, not trained)", value=DEFAULT_PROMPT, key="prompt", height=68,
                          disabled=phonebook is not None or source == "JSONL",
                          help="PhoneBook and JSONL samples bring their own prompts")

with right:
    model_name = st.text_input("Model", value=default_model_name(), key="model",
                               help="'default' (SmolLM2-135M-Instruct, offline), a Hugging Face id, or a local folder")
    c1, c2 = st.columns(2)
    quant = c1.selectbox("Quantization", QUANTS, key="quant", help="nf4 = QLoRA on a 4-bit base (bitsandbytes)")
    method = c2.selectbox("Method", METHODS, index=1, key="method",
                          help="sft: mean loss on every token · memft-ot: only tokens below τ · memft-sw: sliding window")
    adapter_kind = st.radio("Adapter", ["lora", "bypass"], horizontal=True, key="adapter",
                            format_func=lambda k: {"lora": "LoRA (PEFT)", "bypass": "the paper's MLP bypass"}[k],
                            help="bypass: out = MLP(x) + x·A·B on one layer's MLP, no scaling, 2·hidden parameters per rank "
                                 "(the paper's adapter; saved by memcore, not exportable to PEFT)")
    bypass = adapter_kind == "bypass"
    rank = int(c1.number_input("Rank", min_value=1, max_value=1024, value=8, key="rank"))
    alpha = float(c2.number_input("LoRA alpha (0 = same as rank)", min_value=0.0, max_value=8192.0, value=0.0, key="alpha",
                                  disabled=bypass))
    targets = c1.selectbox("Target modules", ["all", "attn", "mlp"], key="targets", disabled=bypass)
    # one field per adapter, each with its own default: the bypass is one layer's adapter ('paper'), LoRA all layers
    layers_text = c2.text_input("Layers", value="paper" if bypass else "all", key="layers_bypass" if bypass else "layers",
                                help="all, paper (one middle layer: its MLP), or indices: 0,5,9 (as --layers on the command line)")
    dropout = float(c1.number_input("Adapter dropout", min_value=0.0, max_value=0.9, value=0.0, step=0.05, key="dropout",
                                    help="dropout on the adapter's input during training (the paper uses 0.1 with its bypass)"))
    tau = st.slider("Threshold τ", min_value=0.05, max_value=0.95, value=0.5, step=0.05, key="tau")
    lr = st.select_slider("Learning rate", options=LR_CHOICES, value=2e-3, format_func=lambda x: f"{x:g}", key="lr")
    c3, c4 = st.columns(2)
    max_steps = int(c3.number_input("Step budget", min_value=1, max_value=10_000, value=200, key="max_steps"))
    seed = int(c4.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="seed"))
    stop_when_recalled = st.checkbox("Stop as soon as it is recalled verbatim", value=True, key="stop_when_recalled")
    until_converged = st.checkbox("Stop when converged: every token above τ, or ΔL flat for 100 steps", value=False,
                                  key="until_converged", help="the paper's regime: train to convergence (as --until converged)")
    compare = st.toggle("Compare mode: sft and memft-ot side by side", key="compare")


def _layers(value: str):
    value = value.strip()
    if value in ("all", "paper"):
        return value
    try:
        return tuple(int(x) for x in value.replace(",", " ").split())
    except ValueError:
        raise MemcoreError(f"layers must be 'all', 'paper' or layer indices like 0,5,9 (got {value!r})") from None


def build_specs() -> list[RunSpec]:
    """The runs a press of Start asks for; raises MemcoreError with the reason if they are impossible."""
    if input_error:
        raise MemcoreError(input_error)
    model = ModelSpec(name=model_name.strip() or "default", quant=quant)
    layers = _layers(layers_text)
    if bypass:
        adapter = AdapterSpec(rank=rank, layers=layers, kind="bypass", dropout=dropout)
    else:
        adapter = AdapterSpec(rank=rank, alpha=alpha or None, targets=targets, layers=layers, dropout=dropout)
    passage = None if source in ("Random tokens", "JSONL", "PhoneBook") else text
    if source == "JSONL" and pairs is None and input_error is None:
        raise MemcoreError("choose a JSONL file to memorize")
    data = DataSpec(text=passage, phonebook=phonebook, pairs=pairs, random_tokens=random_n, length=keep_len, prompt=prompt, seed=seed)
    methods = ["sft", "memft-ot"] if compare else [method]
    specs = [RunSpec(model=model, adapter=adapter, data=data,
                     train=TrainSpec(method=m, tau=tau, lr=lr, max_steps=max_steps, stop_when_recalled=stop_when_recalled, seed=seed,
                                     until="converged" if until_converged else "budget"))
             for m in methods]
    return specs


@st.cache_resource(show_spinner=False, max_entries=8)
def model_config(model: str):
    from transformers import AutoConfig

    from memcore.loading import resolve_source

    return AutoConfig.from_pretrained(resolve_source(ModelSpec(name=model)))


@st.cache_data(show_spinner=False, max_entries=64)
def count_tokens(model: str, data: DataSpec) -> tuple[int, int | None]:
    """(target tokens, model context) for the data; raises MemcoreError if it cannot be used."""
    context = getattr(model_config(model), "max_position_embeddings", None)
    samples = build_samples(get_tokenizer(model), data, context_length=context)
    return sum(len(s.target_ids) for s in samples), context


def check_layers(model: str, layers) -> None:
    n = getattr(model_config(model), "num_hidden_layers", None)
    if n is not None and not isinstance(layers, str) and max(layers) >= n:
        raise MemcoreError(f"layer {max(layers)} does not exist: this model has layers 0..{n - 1}")


# token count against the limit, shown before anything starts
specs, problem = None, None
try:
    specs = build_specs()
    n_tokens, context = count_tokens(specs[0].model.name, specs[0].data)
    check_layers(specs[0].model.name, specs[0].adapter.layers)
except MemcoreError as e:
    problem = str(e)
except Exception as e:  # tokenizer of an unreachable model, say
    problem = error_text(e)
with left:
    if specs is not None and problem is None:
        st.caption(f"**{n_tokens:,} target tokens** · limit {specs[0].data.max_tokens:,}" + (f" · model context {context:,}" if context else ""))
    elif problem and (text or phonebook or pairs or random_n or input_error):
        st.error(problem)

busy = job is not None and job.active
start = st.button("Start", type="primary", disabled=busy, key="start")
if start:
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

# --- live view ---------------------------------------------------------------------------------------------------


def _snapshot(live) -> dict:
    """What the page draws of a run, copied under the job's lock (the dispatcher thread records concurrently).
    Costs the same at step 10 and step 10,000: the run keeps a bounded history and running stubborn counts."""
    snap = dict(label=live.label, spec=live.spec, pieces=live.pieces, summary=live.summary, recalled_at=live.recalled_at,
                run_id=live.run_id, steps=[], rows=[])
    if not live.steps:
        return snap
    stubborn_ever = [t["index"] for t in live.stubborn.top(6)]  # longest at or below τ so far
    kept = charts.thin(len(live.steps))
    snap.update(steps=[live.steps[i] for i in kept], rows=[live.rows[i] for i in kept], step=live.steps[-1],
                last_row=live.rows[-1], p=live.p.astype(np.float32),
                p_prev=None if live.p_prev is None else live.p_prev.astype(np.float32),
                trajectories=live.p_history[kept][:, stubborn_ever].astype(np.float32), stubborn_ever=stubborn_ever,
                first_divergence=live.first_divergence)
    return snap


def _run_view(snap: dict, key: str, tau: float) -> dict:
    """The token view's HTML and the run's two charts as Vega-Lite specs, built once per step and session:
    the refreshes between two steps only resend them."""
    cache = st.session_state.setdefault("run_views", {})
    for other in [k for k in cache if k.split("-")[0] != key.split("-")[0]]:  # keep only this job's views
        del cache[other]
    hit = cache.get(key)
    if hit is not None and hit["step"] == snap["step"]:
        return hit
    p, prev = snap["p"], snap["p_prev"]
    crossed = (prev <= tau) & (p > tau) if prev is not None and len(prev) == len(p) else None  # since the previous step
    idx = snap["stubborn_ever"]
    stubborn = [i for i in idx if p[i] <= tau]  # flagged in the text while still below
    view = {"step": snap["step"],
            "html": charts.token_html(snap["pieces"], p, tau, crossed=crossed, stubborn=stubborn, first_divergence=snap["first_divergence"]),
            "histogram": charts.histogram_chart(p, tau).to_dict(validate=False),
            "trajectories": charts.trajectories_chart(snap["steps"], np.asarray(snap["trajectories"]), list(range(len(idx))),
                                                      [snap["pieces"][i] for i in idx], tau, token_ids=idx).to_dict(validate=False)}
    cache[key] = view
    return view


def render_run(snap: dict, key: str, tau: float, show_tokens: bool = True) -> None:
    if not snap["steps"]:
        st.info(f"{snap['label']}: measuring the base model ...")
        return
    p, row = snap["p"], snap["last_row"]
    st.markdown(f"**{snap['label']}** · step {row['step']} · **{int(round(row['frac_above'] * len(p)))}/{len(p)}** tokens above τ · "
                f"argmax right {int(round(row['frac_correct'] * len(p)))}/{len(p)} · ΔL {row['delta_loss']:.3f}")
    fd = snap["first_divergence"]
    if fd is None:
        st.success("Every teacher-forced argmax is right: greedy decoding recites the whole text.")
    else:
        st.caption(f"Greedy decoding currently goes astray at token #{fd} ({snap['pieces'][fd].label!r}); everything after it "
                   "would be generated from a wrong prefix.")
    view = _run_view(snap, key, tau)
    if show_tokens:
        st.html(view["html"])
        st.html(charts.legend_html(tau))
    c1, c2 = st.columns(2)
    show_chart(view["histogram"], c1)
    show_chart(view["trajectories"], c2)


def _curves(job_id: str, snaps: list[dict], tau: float) -> dict:
    """The curves of every run of the job as one Vega-Lite spec, rebuilt only when a run has a new step."""
    key = (job_id, tuple(s.get("step") for s in snaps))
    hit = st.session_state.get("curves_view")
    if hit is not None and hit[0] == key:
        return hit[1]
    hist = pd.concat([pd.DataFrame(s["rows"]).assign(run=s["label"]) for s in snaps if s["rows"]], ignore_index=True)
    spec = charts.curves_chart(hist, tau).to_dict(validate=False)
    st.session_state["curves_view"] = (key, spec)
    return spec


def render_job(job, live_mode: bool) -> None:
    snaps = []
    with job.lock:
        snaps = [_snapshot(r) for r in job.runs]
    tau_job = job.specs[0].train.tau
    # status line with progress
    if job.status == "queued":
        n = worker.position(job)
        st.info(f"Queued: {n} job{'s' if n != 1 else ''} ahead of yours. It starts by itself when the device is free.")
    elif job.status == "loading":
        st.info("Loading the model and measuring the base loss ...")
    elif job.status == "failed":
        st.error(f"The run failed: {job.error}")
    elif job.status == "interrupted":
        st.warning(f"This job was interrupted ({job.error or 'the app stopped while it trained'}). Its runs keep their steps, "
                   "and their adapter and checkpoint as of the last save: resume them or run them again from the Runs page.")
        first = next((r.run_id for r in job.runs if r.run_id), None)
        st.page_link("app_pages/runs.py", label="Open it on the Runs page", icon=":material/history:",
                     query_params={"run": first} if first else None)
    rows = [s["last_row"] for s in snaps if s["rows"]]
    if rows:
        step = max(r["step"] for r in rows)
        train_s = max(r["elapsed"] for r in rows)
        wall = (job.finished or time.time()) - (job.started or job.created)
        left_s = train_s / step * (job.max_steps - step) if step else None
        eta = f" · at most {left_s:.0f} s left" if left_s is not None and job.active else ""
        st.progress(min(1.0, step / job.max_steps), text=f"step {step}/{job.max_steps} · {wall:.1f} s elapsed{eta} · {job.status}")
    if job.active:
        if st.button("Stop", key=f"stop-{job.id}", help="Stops after the current step; the adapter and metrics so far are kept"):
            worker.stop(job)
            st.toast("Stopping after the current step ...")
    curves = _curves(job.id, snaps, tau_job) if rows else None
    if len(snaps) == 1:
        render_run(snaps[0], f"{job.id}-0", tau_job)
    else:
        cols = st.columns(len(snaps))
        for i, (c, s) in enumerate(zip(cols, snaps)):
            with c:
                render_run(s, f"{job.id}-{i}", tau_job)
    if curves is not None:
        show_chart(curves)
    if not job.active:
        render_results(job, snaps)


def render_results(job, snaps) -> None:
    st.divider()
    st.subheader("Result")
    if len(snaps) > 1:
        done = [(s["recalled_at"], s["label"]) for s in snaps if s["summary"] and s["summary"].get("recalled")]
        if done:
            step, who = min(done)
            others = ", ".join(f"{lab}: {'step ' + str(at) if at is not None else 'not recalled'}" for at, lab in
                               [(s["recalled_at"] if s["summary"] and s["summary"].get("recalled") else None, s["label"]) for s in snaps])
            st.success(f"**{who}** reached exact recall first, after {step} steps ({others}).")
        else:
            st.warning("Neither run reached exact recall within the budget.")
    cols = st.columns(len(snaps))
    for c, s in zip(cols, snaps):
        with c:
            summ = s["summary"]
            if not summ:
                st.caption(f"{s['label']}: no summary ({job.status}).")
                continue
            st.markdown(f"**{s['label']}** · run `{summ['run_id']}` · {summ.get('status')} ({summ['stop_reason']})")
            m1, m2, m3 = st.columns(3)
            m1.metric("Recalled verbatim", "yes" if summ["recalled"] else "no")
            m2.metric("Steps", summ["steps"])
            m3.metric("ΔL (nats/token)", f"{summ['delta_loss']:.3f}")
            m1.metric("P_eff", f"{summ['p_eff']:,}")
            m2.metric("Bits stored", f"{summ['bits_stored']:.0f}")
            m3.metric("Bits / parameter", f"{summ['bits_per_param']:.2e}")
            gen = summ.get("generated_ids")
            if gen is not None:
                tok = get_tokenizer(s["spec"].model.name)
                flat_gen = [t for g in gen for t in g] if gen and isinstance(gen[0], list) else gen
                flat_tgt = [t for g in summ["target_ids"] for t in g] if summ["target_ids"] and isinstance(summ["target_ids"][0], list) else summ["target_ids"]
                st.caption("Greedy generation from the prompt, compared with the target:")
                st.html(charts.generation_diff_html(flat_tgt, flat_gen, s["pieces"], token_pieces(tok, flat_gen)))
            for note in summ.get("notes") or []:
                st.warning(note)
            adapter = summ["adapter_dir"]
            kind = "memcore bypass: bypass_config.json + safetensors" if summ.get("adapter") == "bypass" else "PEFT"
            st.download_button(f"Download adapter ({kind}, zip)", data=_zip_dir(adapter), file_name=f"memcore-{summ['run_id']}.zip",
                               mime="application/zip", key=f"dl-{summ['run_id']}")
            with st.form(f"gen-{summ['run_id']}"):
                q = st.text_input("Prompt the memorized model", value="", placeholder="leave empty to use the run's own prompt")
                if st.form_submit_button("Generate"):
                    try:
                        with st.spinner("generating ..."):
                            out = worker.generate(summ["run_id"], q or None)
                        st.text((q or "") + out["text"][0])
                    except Exception as e:
                        st.error(error_text(e))


@st.cache_data(show_spinner=False, max_entries=8)
def _zip_dir(path: str) -> bytes:
    from pathlib import Path

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(Path(path).iterdir()):
            if f.is_file():
                z.write(f, arcname=f"adapter/{f.name}")
    return buf.getvalue()


@st.fragment(run_every=0.4)
def live_view(job_id: str) -> None:
    j = worker.find(job_id)
    if j is None:
        return
    render_job(j, live_mode=True)
    if not j.active:  # finished: one full rerun switches to the static result view
        st.rerun()


if job is not None:
    st.divider()
    if job.active:
        live_view(job.id)
    else:
        render_job(job, live_mode=False)
elif worker.active_jobs():
    st.divider()
    st.caption("Jobs training now (from any session):")
    for j in worker.active_jobs():
        if st.button(f"watch job {j.id} ({', '.join(j.labels)}, {j.status})", key=f"watch-{j.id}"):
            st.query_params["job"] = j.id
            st.rerun()
