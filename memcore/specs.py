"""From plain settings to RunSpecs, and a preflight of a spec against a model: one way, for the CLI and the app.

*Settings* are plain values keyed by option name. An option is named after the spec field it sets
(memcore/config.py), except ``model`` (ModelSpec.name) and ``adapter`` (AdapterSpec.kind); ``seed`` sets both
the data seed and the training seed. A setting left out takes its dataclass default, so every default is
stated once, on the dataclass; the field docstrings there are the options' help text (``option_help``).
Lists come as the user typed them: ``layers`` '0,5,9' (or '0 5 9'), ``targets`` 'q_proj,v_proj'.

The preflight checks what a spec asks of a model before anything trains: target tokens against the data's
maximum and the model's context length, adapter layer indices against the model's layer count.
"""

from __future__ import annotations

import ast
import functools
import inspect
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from memcore.config import TARGET_PRESETS, AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec

SPECS: tuple[type, ...] = (ModelSpec, AdapterSpec, DataSpec, TrainSpec)
_RENAMED = {(ModelSpec, "name"): "model", (AdapterSpec, "kind"): "adapter"}
LAYER_PRESETS: tuple[str, ...] = ("all", "paper")


def _option_table() -> dict[str, tuple[tuple[type, str], ...]]:
    table: dict[str, list[tuple[type, str]]] = {}
    for cls in SPECS:
        for f in fields(cls):
            table.setdefault(_RENAMED.get((cls, f.name), f.name), []).append((cls, f.name))
    return {name: tuple(places) for name, places in table.items()}


OPTIONS: dict[str, tuple[tuple[type, str], ...]] = _option_table()
"""Option name -> the (spec class, field name) pairs it sets: one pair for every option but 'seed'."""


def _field(name: str) -> tuple[type, str]:
    if name not in OPTIONS:
        raise MemcoreError(f"unknown setting {name!r}; settings are {', '.join(OPTIONS)}")
    return OPTIONS[name][0]


# --- what an option is: default, help, type ----------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (a string literal right after the field), with its
    whitespace collapsed: field name -> text. Fields without one are left out."""
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def option_help(name: str) -> str:
    """The help text of option `name`: its field's docstring on the config dataclass ('' if it has none).
    Raises MemcoreError for an unknown option."""
    cls, fname = _field(name)
    return field_docs(cls).get(fname, "")


def default(name: str) -> Any:
    """The dataclass default of option `name` (for 'seed', the data seed's, which equals the training seed's).
    Raises MemcoreError for an unknown option."""
    cls, fname = _field(name)
    f = next(f for f in fields(cls) if f.name == fname)
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def option_type(name: str) -> tuple[type, tuple[str, ...] | None]:
    """(the type one value of option `name` is read as: bool, int, float or str; its choices, or None) from the
    field's annotation: Literal[...] gives str with choices, `int | None` gives int, a list or preset gives str
    (parsed by the builder). Raises MemcoreError for an unknown option."""
    cls, fname = _field(name)
    hint = get_type_hints(cls)[fname]
    if get_origin(hint) is Literal:
        return str, tuple(get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return (hint if hint in (bool, int, float) else str), None


# --- parsing lists -------------------------------------------------------------------------------------------


def _words(value: str, what: str) -> list[str]:
    """The items of a list the user typed, separated by commas, spaces or both ('0,5,9', '0, 5, 9', '0 5 9').
    Raises MemcoreError naming `what` and the value for an empty item ('1,,2', a comma at an end) or an item given
    twice."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) > 1 and not all(parts):
        raise MemcoreError(f"{what} {value!r} has an empty item (two commas in a row, or one at an end); "
                           "write them like 0,5,9")
    items = [w for p in parts for w in p.split()]
    twice = sorted({w for w in items if items.count(w) > 1})
    if twice:
        raise MemcoreError(f"{what} {value!r} lists {twice[0]} twice")
    return items


def parse_layers(value: str | Sequence[int]) -> str | tuple[int, ...]:
    """'all', 'paper', or block indices written '0,5,9' or '0 5 9' -> the preset or a tuple of ints (a sequence of
    ints passes through as a tuple). Raises MemcoreError naming the value when a part is not an integer."""
    if not isinstance(value, str):
        return tuple(value)
    value = value.strip()
    if value in LAYER_PRESETS:
        return value
    try:
        return tuple(int(p) for p in _words(value, "layers"))
    except ValueError:
        raise MemcoreError(f"layers must be 'all', 'paper' or layer indices like 0,5,9, got {value!r}") from None


def parse_targets(value: str | Sequence[str]) -> str | tuple[str, ...]:
    """'attn', 'mlp', 'all', or module names written 'q_proj,v_proj' -> the preset or a tuple of names."""
    if not isinstance(value, str):
        return tuple(value)
    value = value.strip()
    return value if value in TARGET_PRESETS else tuple(_words(value, "targets"))


def parse_epochs(value: str) -> tuple[int, ...] | None:
    """Curriculum epochs written '20,40,60,80' -> (20, 40, 60, 80); blank means None. Raises MemcoreError naming the
    value when a part is not a whole number."""
    if not value.strip():
        return None
    try:
        return tuple(int(p) for p in _words(value, "curriculum epochs"))
    except ValueError:
        raise MemcoreError(f"curriculum epochs must be whole numbers like 20,40,60,80, got {value!r}") from None


def parse_keys(value: str | None) -> tuple[str, str] | None:
    """JSONL keys written 'PROMPT,TARGET' -> (prompt key, target key); blank means None (the layout is detected).
    Raises MemcoreError naming the value unless it is two non-empty names."""
    if value is None or not value.strip():
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise MemcoreError(f"JSONL keys must be two names, PROMPT,TARGET; got {value!r}")
    return parts[0], parts[1]


# --- building specs --------------------------------------------------------------------------------------------


def default_layers(adapter: str) -> str:
    """The layers an adapter kind gets when none are named: 'paper' (one block) for the bypass, else 'all'."""
    return "paper" if adapter == "bypass" else "all"


def run_spec(settings: Mapping[str, Any]) -> RunSpec:
    """One RunSpec from plain settings keyed by option name (see OPTIONS), the source of the data among them
    (exactly one of text, phonebook, pairs, random_tokens). Left-out settings take the dataclass defaults;
    `layers` left out or None takes default_layers(adapter); `layers` and `targets` may be strings as typed.
    Raises MemcoreError naming the bad value: an unknown setting, an unparsable list, alpha or targets given for
    the bypass adapter, or any value a spec dataclass refuses."""
    s = dict(settings)
    for name in s:
        _field(name)
    kind = s.get("adapter", default("adapter"))
    if s.get("layers") is None:
        s["layers"] = default_layers(kind)
    if "targets" in s:
        s["targets"] = parse_targets(s["targets"])

    def part(cls: type) -> Any:
        return cls(**{f: s[name] for name, places in OPTIONS.items() if name in s for c, f in places if c is cls})

    model = part(ModelSpec)
    if kind == "bypass" and (s.get("alpha") is not None or s.get("targets", "all") != "all"):
        raise MemcoreError("--alpha and --targets apply to LoRA; the bypass adapter has no scaling and always wraps "
                           "the MLP")
    s["layers"] = parse_layers(s["layers"])
    if isinstance(s.get("curriculum_epochs"), str):
        s["curriculum_epochs"] = parse_epochs(s["curriculum_epochs"])
    return RunSpec(model=model, adapter=part(AdapterSpec), data=part(DataSpec), train=part(TrainSpec))


def run_specs(settings: Mapping[str, Any], methods: Sequence[str] | None = None) -> list[RunSpec]:
    """run_spec(settings), or one spec per method in `methods` (the app's compare mode: the same text, seed and
    adapter under each objective). Raises MemcoreError as run_spec does."""
    if not methods:
        return [run_spec(settings)]
    return [run_spec({**settings, "method": m}) for m in methods]


# --- preflight -------------------------------------------------------------------------------------------------


def check_layers(adapter: AdapterSpec, layer_count: int | None) -> None:
    """Refuse adapter layer indices a model with `layer_count` blocks does not have (no check when unknown).
    Raises MemcoreError naming the first missing layer and the valid range."""
    if layer_count is None or isinstance(adapter.layers, str):
        return
    bad = [i for i in adapter.layers if i >= layer_count]
    if bad:
        raise MemcoreError(f"layer {bad[0]} does not exist: this model has layers 0..{layer_count - 1}")


@dataclass(frozen=True)
class Preflight:
    """What a spec comes to on a model, known before anything trains."""

    samples: list[Any]  # data.Sample: prompt and target token ids, one per sample
    n_tokens: int  # target tokens over all samples
    context_length: int  # the model's context, in tokens
    n_layers: int | None  # the model's transformer blocks (None: its config does not say)


def preflight(spec: RunSpec, tokenizer: Any, config: Any, vocab_size: int | None = None) -> Preflight:
    """Tokenize the spec's data with `tokenizer` and check it and the adapter's layers against the model `config`
    (a transformers PretrainedConfig or anything with its attributes). `vocab_size` bounds random and noise token
    ids (default: the tokenizer's length). Raises MemcoreError naming the bad value: more target tokens than
    spec.data.max_tokens (with the count), a sample longer than the context (with both numbers), a layer the
    model does not have."""
    from memcore.blocks import context_length, layer_count  # torch: imported only when a model is at hand
    from memcore.data import build_samples

    context = context_length(config)
    samples = build_samples(tokenizer, spec.data, context, vocab_size=vocab_size)
    n_blocks = layer_count(config)
    check_layers(spec.adapter, n_blocks)
    return Preflight(samples, sum(len(s.target_ids) for s in samples), context, n_blocks)


