"""The Memorize page's inputs, away from its layout: files read under the app's limits, and a stored job's spec
turned back into the form's values (the inverse of what the page's widgets give memcore.specs)."""

from __future__ import annotations

from typing import Any

from common import MAX_PASTE_CHARS, MAX_UPLOAD_BYTES

from memcore.config import MemcoreError, RunSpec
from memcore.data import JsonlData, parse_jsonl
from memcore.specs import default, parse_keys
from memcore.textio import decode_text

LR_RANGE = (1e-6, 1.0)  # learning rates the Memorize page accepts


def parse_lr(text: str) -> tuple[float | None, str | None]:
    """(the learning rate, None) typed in the Memorize page's box ('3e-2', '0.03'), or (None, why not): not a
    number, or outside LR_RANGE."""
    try:
        lr = float(text.strip())
    except ValueError:
        return None, f"The learning rate must be a number such as 2e-3 or 0.03; got {text.strip()!r}."
    lo, hi = LR_RANGE
    if not lo <= lr <= hi:
        return None, f"The learning rate must be between {lo:g} and {hi:g}; got {lr:g}."
    return lr, None


def paste_error(text: str) -> str | None:
    """Why a pasted passage cannot be used (longer than MAX_PASTE_CHARS characters), or None."""
    if len(text) > MAX_PASTE_CHARS:
        return (f"The passage is {len(text):,} characters; the app accepts up to {MAX_PASTE_CHARS:,}. Shorten it or "
                "use the CLI.")
    return None


def _too_big(upload: Any) -> str | None:
    if upload.size > MAX_UPLOAD_BYTES:
        return (f"{upload.name} is {upload.size / 1e6:.1f} MB; the app accepts files up to "
                f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB.")
    return None


def read_text_upload(upload: Any) -> tuple[str | None, str | None]:
    """(the text, None) of an uploaded UTF-8 file, or (None, why not): over MAX_UPLOAD_BYTES, not text, or no text
    at all (empty or only whitespace), said as soon as the file is chosen rather than at Start."""
    error = _too_big(upload)
    if error:
        return None, error
    try:
        text = decode_text(upload.getvalue(), upload.name)
    except MemcoreError as e:
        return None, str(e)
    if not text.strip():
        return None, (f"{upload.name} holds no text to memorize (it is empty or only whitespace)" if upload.getvalue()
                      else f"{upload.name} is empty: no text to memorize")
    return text, None


def read_jsonl_upload(upload: Any, keys: str, line: int) -> tuple[JsonlData | None, str | None]:
    """(the parsed samples, None) of an uploaded JSONL file, or (None, why not). `keys` is 'PROMPT,TARGET' or blank
    (the layout is detected); `line` is the 1-based line to keep, 0 for all."""
    try:
        error = _too_big(upload)
        if error:
            raise MemcoreError(error)
        return parse_jsonl(upload.getvalue(), upload.name, parse_keys(keys), line or None), None
    except MemcoreError as e:
        return None, str(e)


def describe_jsonl(parsed: JsonlData) -> str:
    """One line on what was read: the layout and keys, and how many samples of how many lines."""
    n, lines = len(parsed.pairs), parsed.lines
    return (f"{parsed.layout} layout ({parsed.fields[0]} → {parsed.fields[1]}): {n} sample{'s' if n != 1 else ''} of "
            f"{lines} line{'s' if lines != 1 else ''}" + (f" · {parsed.note}" if parsed.note else ""))


def form_state(spec: RunSpec, compare: bool) -> dict[str, Any]:
    """The Memorize form's widget values (by widget key) that show `spec`: a page opened on a job's URL in a new
    session shows that job's settings, not the defaults."""
    d, a, t = spec.data, spec.adapter, spec.train
    if d.text is not None:
        state: dict[str, Any] = {"source": "Paste", "passage": d.text}
    elif d.random_tokens is not None:
        state = {"source": "Random tokens", "random_tokens": d.random_tokens}
    elif d.pairs is not None:  # the uploaded file is gone with its session: show the pairs as a pasted passage
        state = {"source": "Paste", "passage": "\n".join(target for _, target in d.pairs)}
    else:
        state = {"source": "PhoneBook", "phonebook": d.phonebook, "batch_size": t.batch_size or 0}
    state.update(adapter=a.kind, dropout=float(a.dropout), until_converged=t.until == "converged")
    # a compare job trains sft and memft-ot whatever the Method box says: it shows the default, not the first run's
    method = default("method") if compare else t.method
    state.update(prompt=d.prompt or "", model=spec.model.name, quant=spec.model.quant, method=method, rank=a.rank,
                 alpha=float(a.alpha or 0.0), tau=t.tau, max_steps=t.max_steps, seed=t.seed,
                 stop_when_recalled=t.stop_when_recalled, compare=compare)
    state["layers_bypass" if a.kind == "bypass" else "layers"] = a.layers if isinstance(a.layers, str) else ",".join(
        map(str, a.layers))
    if isinstance(a.targets, str):
        state["targets"] = a.targets
    state["lr"] = f"{t.lr:g}"
    return state
