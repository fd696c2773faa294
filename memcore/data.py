"""Text -> target tokens, and the batch layout every training step uses.

A sample is (prompt_ids, target_ids): the prompt is conditioned on, the target is what must be memorized.
Samples are packed into one left-padded batch whose input drops each sequence's last token, so that the
last n_i logits of row i are exactly the predictions of its n_i target tokens (teacher forcing). With
``logits_to_keep = K = max n_i`` the model computes logits only there.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcore.config import MAX_TOTAL_TARGET_TOKENS, DataSpec, MemcoreError, TooManyTokens
from memcore.textio import decode_text, read_user_file

MAX_FILE_BYTES = 20_000_000
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"

_FIRST = ("Ada", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kira", "Luca",
          "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Ximena",
          "Yusuf", "Zoe")
_LAST = ("Abbott", "Berg", "Castro", "Dubois", "Eriksen", "Fischer", "Garcia", "Haas", "Ito", "Jensen", "Kowalski",
         "Larsen", "Moreau", "Novak", "Okafor", "Petrov", "Quist", "Rossi", "Sato", "Tanaka", "Ueda", "Varga",
         "Weber", "Xu", "Yilmaz", "Zhou")


@dataclass(frozen=True)
class Sample:
    """One memorization target: prompt token ids (context, not trained on) and target token ids."""
    prompt_ids: list[int]
    target_ids: list[int]


def samples_dir() -> Path:
    """The folder of shipped sample data (passages/, sweeps/)."""
    return SAMPLE_DIR


def list_samples() -> list[str]:
    """Names of the shipped sample passages (for --sample), sorted."""
    d = samples_dir() / "passages"
    return sorted(p.stem for p in d.glob("*.txt")) if d.is_dir() else []


def read_sample(name: str) -> str:
    """The text of a shipped sample passage. Raises MemcoreError naming the available ones."""
    path = samples_dir() / "passages" / f"{name}.txt"
    if not path.is_file():
        have = ", ".join(list_samples()) or "none"
        raise MemcoreError(f"no sample passage named {name!r}; available: {have}")
    return path.read_text(encoding="utf-8")


def read_text_file(path: str | Path) -> str:
    """A passage file's text in any Unicode encoding an editor saves (memcore.textio.decode_text), up to
    MAX_FILE_BYTES. Raises MemcoreError naming the file: missing, a directory, too large, binary or undecodable."""
    return read_user_file(path, "text file", MAX_FILE_BYTES)


def phonebook(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (name, 10-digit number) pairs, the same for the same seed."""
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name in names:
            name = f"{name} {len(out)}"
        names.add(name)
        out.append((name, "".join(str(rng.randrange(10)) for _ in range(10))))
    return out


JSONL_LAYOUTS: dict[str, tuple[str, str]] = {
    "phonebook": ("query", "target"),  # the paper's PhoneBook: many short samples, trained as one batch
    "long-context": ("question", "matching"),  # the paper's long-context files: one long target per line
}


@dataclass(frozen=True)
class JsonlData:
    """Prompt/target pairs read from a JSONL file, with the layout they were recognised as."""

    pairs: tuple[tuple[str, str], ...]
    layout: str  # 'phonebook', 'long-context' or 'custom'
    fields: tuple[str, str]  # the (prompt, target) keys used
    lines: int  # JSON lines in the file (blank lines not counted)
    note: str | None = None  # something the user should know (e.g. which line of several was taken)


def parse_jsonl(raw: bytes | str, what: str = "JSONL", fields: tuple[str, str] | None = None,
                line: int | None = None) -> JsonlData:
    """Read JSONL prompt/target pairs, recognising the paper's layouts by their keys.

    PhoneBook lines ``{"query": ..., "target": ...}`` give one sample per line, all trained together;
    long-context lines ``{"question": ..., "matching": ...}`` give one long target, the first line's unless
    `line` (1-based) picks another; `fields` = (prompt key, target key) names other keys (every line is a
    sample). Blank lines are skipped; other keys are ignored.

    Raises MemcoreError naming the line number for a line that is not a JSON object, lacks a key, or holds a
    non-string or empty target; and when no layout can be recognised (naming the keys found)."""
    text = decode_text(raw, what) if isinstance(raw, bytes) else raw
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, ln in enumerate(text.splitlines(), start=1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise MemcoreError(f"{what} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise MemcoreError(f"{what} line {n}: expected a JSON object with prompt and target keys, "
                               f"got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise MemcoreError(f"{what} has no JSON lines: nothing to memorize")
    if fields is not None:
        layout, keys = "custom", fields
    else:
        first = rows[0][1]
        found = [name for name, (p, t) in JSONL_LAYOUTS.items() if p in first and t in first]
        if not found:
            raise MemcoreError(f"{what} line {rows[0][0]}: keys {', '.join(sorted(first)) or '(none)'} match neither "
                               "the PhoneBook layout (query, target) nor the long-context one (question, matching); "
                               "name yours with --jsonl-fields PROMPT,TARGET")
        layout, keys = found[0], JSONL_LAYOUTS[found[0]]
    note, total = None, len(rows)
    if line is not None:
        if not 1 <= line <= len(rows):
            raise MemcoreError(f"{what} has {len(rows)} JSON lines; line {line} does not exist")
        rows = [rows[line - 1]]
    elif layout == "long-context" and len(rows) > 1:
        note = f"{what} has {len(rows)} long-context lines; using the first (pick another with --jsonl-line N)"
        rows = rows[:1]
    pairs = []
    for n, obj in rows:
        for key in keys:
            if key not in obj:
                raise MemcoreError(f"{what} line {n}: no {key!r} key (keys: {', '.join(sorted(obj))})")
            if not isinstance(obj[key], str):
                raise MemcoreError(f"{what} line {n}: {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj[keys[1]].strip():
            raise MemcoreError(f"{what} line {n}: {keys[1]!r} is empty: nothing to memorize")
        pairs.append((obj[keys[0]], obj[keys[1]]))
    return JsonlData(tuple(pairs), layout, keys, total, note)


def read_jsonl(path: str | Path, fields: tuple[str, str] | None = None, line: int | None = None) -> JsonlData:
    """parse_jsonl on a file (size and encoding checked as for text files; '-' reads standard input)."""
    if str(path) == "-":
        import sys

        return parse_jsonl(sys.stdin.buffer.read(), "standard input", fields, line)
    if not Path(path).exists():
        raise MemcoreError(f"JSONL file {path} does not exist")
    return parse_jsonl(read_text_file(path), str(path), fields, line)


def ordinary_token_ids(tokenizer: Any, vocab_size: int | None = None) -> np.ndarray:
    """Ids of the vocabulary's ordinary tokens: every id below len(tokenizer) (or vocab_size if smaller) that is
    not a special or added control token. Shape [n], int64."""
    n = min(len(tokenizer), vocab_size) if vocab_size else len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(i))
    ids = np.arange(n, dtype=np.int64)
    return ids[~np.isin(ids, sorted(special))] if special else ids


def random_token_ids(tokenizer: Any, n: int, seed: int = 0, vocab_size: int | None = None) -> list[int]:
    """n token ids drawn independently and uniformly from ordinary_token_ids (the paper's r100 targets);
    the same seed gives the same ids. Each carries log2(#ordinary tokens) bits (15.6 for the default model)."""
    pool = ordinary_token_ids(tokenizer, vocab_size)
    return np.random.default_rng(seed).choice(pool, size=n, replace=True).tolist()


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """User text -> token ids, with no special tokens added and none recognised: a literal "<|im_end|>" or
    "<|endoftext|>" in a passage is ordinary characters, never the model's control token."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


_SLOT = "\ue000memcore-user-text\ue000"  # a private-use marker where the user's prompt goes in a chat template


def prompt_ids(tokenizer: Any, prompt: str | None, chat_template: bool = False) -> list[int]:
    """Token ids a target is conditioned on: BOS + the prompt (or the prompt as a chat user turn).

    The prompt is user text (see encode_text); a chat template's own control tokens stay control tokens:
    the template is rendered around a marker, and only the user's part is tokenized as plain text."""
    prompt = prompt or ""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise MemcoreError("this tokenizer has no chat template; drop --chat-template")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], add_generation_prompt=True,
                                                 tokenize=False)
        if rendered.count(_SLOT) != 1:
            raise MemcoreError("this tokenizer's chat template does not place the user's message once; "
                               "drop --chat-template")
        before, after = rendered.split(_SLOT)
        return (tokenizer.encode(before, add_special_tokens=False) + encode_text(tokenizer, prompt)
                + tokenizer.encode(after, add_special_tokens=False))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + encode_text(tokenizer, prompt)
    if not ids:  # no BOS and no prompt: the first target token still needs a context to be predicted from
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    return ids


def _noise(target: list[int], fraction: float, vocab: int, rng: random.Random) -> list[int]:
    """Replace round(fraction * len) target tokens, at random positions, by other random tokens."""
    out = list(target)
    k = round(fraction * len(out))
    for i in rng.sample(range(len(out)), k):
        new = rng.randrange(vocab - 1)
        out[i] = new if new < out[i] else new + 1  # uniform over the vocabulary minus the original token
    return out


def build_samples(tokenizer: Any, spec: DataSpec, context_length: int | None = None,
                  vocab_size: int | None = None) -> list[Sample]:
    """Tokenize a DataSpec into samples, applying length control and noise; refuse what does not fit."""
    if spec.random_tokens is not None:
        pairs = [(spec.prompt, None)]
    elif spec.pairs is not None:
        pairs = list(spec.pairs)
    elif spec.text is not None:
        pairs = [(spec.prompt, spec.text)]
    else:
        pairs = [(f"Name: {name}\nPhone:", f" {number}") for name, number in phonebook(spec.phonebook or 0, spec.seed)]
    vocab = vocab_size or len(tokenizer)
    rng = random.Random(spec.seed)
    samples = []
    for prompt, text in pairs:
        p = prompt_ids(tokenizer, prompt, spec.chat_template)
        t = (random_token_ids(tokenizer, spec.random_tokens, spec.seed, vocab_size) if text is None
             else encode_text(tokenizer, text))
        if not t:
            raise MemcoreError("the text produces no tokens: nothing to memorize")
        if spec.length is not None:
            t = t[: spec.length]
        if spec.noise > 0:
            t = _noise(t, spec.noise, vocab, rng)
        samples.append(Sample(p, t))
    total = sum(len(s.target_ids) for s in samples)
    if len(samples) == 1 and total > spec.max_tokens:
        raise TooManyTokens(total, spec.max_tokens)
    if len(samples) > 1:  # many samples: each is bounded like a passage, their sum by memory
        longest_target = max(len(s.target_ids) for s in samples)
        if longest_target > spec.max_tokens:
            raise MemcoreError(f"a sample's target is {longest_target} tokens, more than the configured maximum of "
                               f"{spec.max_tokens} for one sample (raise --max-tokens; nothing is truncated silently)")
        if total > MAX_TOTAL_TARGET_TOKENS:
            raise MemcoreError(f"the {len(samples)} samples hold {total} target tokens, more than memcore trains "
                               f"at once ({MAX_TOTAL_TARGET_TOKENS}: every sample is measured at every epoch); "
                               "split the data into several runs")
    longest = max(len(s.prompt_ids) + len(s.target_ids) for s in samples)
    if context_length is not None and longest > context_length:
        raise MemcoreError(f"the text is {longest} tokens with its prompt, "
                           f"more than the model's context of {context_length} tokens")
    return samples


@dataclass
class Batch:
    """Left-padded teacher-forcing batch. Shapes: B rows, T input positions, K kept logit positions."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, K] long, target token for each kept position (0 where masked)
    target_mask: torch.Tensor  # [B, K] bool, True where the kept position predicts a target token
    samples: list[Sample]

    @property
    def keep(self) -> int:
        """K: the kept (target) positions per row."""
        return self.labels.shape[1]

    @property
    def n_targets(self) -> int:
        """Target tokens in the batch."""
        return int(self.target_mask.sum())

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.labels.to(device), self.target_mask.to(device), self.samples)

    def with_labels(self, labels: torch.Tensor) -> Batch:
        """Same inputs, other labels (used to show which labels an update depends on)."""
        return Batch(self.input_ids, self.attention_mask, self.position_ids, labels, self.target_mask, self.samples)

    def flat_targets(self) -> list[int]:
        """Every target token id, sample 0's first."""
        return [t for s in self.samples for t in s.target_ids]


def make_batch(samples: list[Sample], pad_id: int = 0) -> Batch:
    """Right-padded inputs for teacher forcing: each row is prompt + target[:-1]; labels [B, K] and
    target_mask [B, K] cover the last K positions (K = longest target)."""
    seqs = [s.prompt_ids + s.target_ids[:-1] for s in samples]
    T = max(len(x) for x in seqs)
    K = max(len(s.target_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    labels = torch.zeros((B, K), dtype=torch.long)
    mask = torch.zeros((B, K), dtype=torch.bool)
    for i, (seq, s) in enumerate(zip(seqs, samples)):
        input_ids[i, T - len(seq):] = torch.tensor(seq)
        attention[i, T - len(seq):] = 1
        n = len(s.target_ids)
        labels[i, K - n:] = torch.tensor(s.target_ids)
        mask[i, K - n:] = True
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, attention, position_ids, labels, mask, samples)
