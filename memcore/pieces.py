"""Each token as the part of the text it stands for.

Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) often splits one character over several tokens: a CJK
character is 3 UTF-8 bytes, an emoji 4, a family emoji with zero-width joiners 25. Decoding such a token
alone gives U+FFFD. Here the token ids are turned back into bytes, the bytes are cut into whole characters
(grapheme clusters: what a reader sees as one character), and every character is given to the token that
holds its first byte. So

- ``"".join(p.text for p in pieces)`` is the decoded text (the passage itself, for a passage);
- a token that only continues a character has ``text == ""`` and says which character it continues
  (``char``) and which part it is (``part`` of ``parts``);
- ``data`` keeps the token's own bytes, for a hover that shows them.

Tokenizers whose vocabulary cannot be mapped to bytes (or whose decoder rewrites text, e.g. stripping a
leading space) fall back to incremental decoding: tokens whose decoded text ends in an incomplete character
are grouped with the following ones, and the group's text goes on its first token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

CONTINUATION_MARK = "⁺"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece byte fallback
MAX_GROUP = 8  # most tokens one character may span before the fallback gives up waiting for it to complete


@dataclass(frozen=True)
class Piece:
    """One target token as text. ``text`` is what it adds to the passage; ``char``/``part``/``parts`` are set
    when it holds part of a character split over several tokens (part is 1-based)."""

    text: str
    data: bytes = b""
    char: str = ""
    part: int = 0
    parts: int = 0

    @property
    def continues(self) -> bool:
        """True when the token adds no character of its own: it holds later bytes of `char`."""
        return self.text == "" and self.parts > 1

    @property
    def shown(self) -> str:
        """What the token view prints: its text, or a continuation mark."""
        return CONTINUATION_MARK if self.continues else self.text

    @property
    def label(self) -> str:
        """A short name for lists and legends: the text, with the split character and its part where split."""
        if self.parts > 1:
            return f"{self.char if self.continues else self.text} ({self.part}/{self.parts})"
        return self.text

    @property
    def hex(self) -> str:
        """The piece's bytes as hex pairs, space-separated."""
        return " ".join(f"{b:02x}" for b in self.data)

    def to_json(self) -> Any:
        """Compact JSON form (the text alone when the piece is whole text)."""
        if not self.data and not self.parts:
            return self.text
        return {"t": self.text, "b": self.data.hex(), "c": self.char, "k": self.part, "n": self.parts}

    @classmethod
    def from_json(cls, v: Any) -> Piece:
        """A stored piece: a plain string (runs stored before pieces carried bytes) or the dict of to_json."""
        if isinstance(v, str):
            return cls(text=v)
        return cls(text=v["t"], data=bytes.fromhex(v.get("b", "")), char=v.get("c", ""), part=v.get("k", 0),
                   parts=v.get("n", 0))


def token_pieces(tokenizer: Any, ids: list[int]) -> list[Piece]:
    """One Piece per id, in order, whose texts concatenate to ``tokenizer.decode(ids)``.

    ids: flat list of token ids (any sequence: a passage, a generation, random tokens)."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    data = token_bytes(tokenizer, ids)
    if data is not None:
        pieces = pieces_from_bytes(data)
        if "".join(p.text for p in pieces) == _decode(tokenizer, ids):
            return pieces
    return _pieces_by_decoding(tokenizer, ids)


def pieces_from_bytes(data: list[bytes]) -> list[Piece]:
    """Cut the joined bytes into characters as a reader sees them (grapheme clusters of UTF-8 code points: a
    family emoji joined by zero-width joiners, a letter with combining accents, a flag; an invalid byte becomes
    U+FFFD on its own) and give each to the token holding its first byte."""
    owner = [i for i, b in enumerate(data) for _ in b]  # token index of every byte
    joined = b"".join(data)
    text = [""] * len(data)
    split: dict[int, tuple[str, int, int]] = {}
    for start, end, ch in _graphemes(_utf8_units(joined)):
        first, last = owner[start], owner[end - 1]
        text[first] += ch
        if last > first:
            n = last - first + 1
            for k, t in enumerate(range(first, last + 1)):
                split[t] = (ch, k + 1, n)
    return [Piece(text=text[i], data=data[i], char=split.get(i, ("", 0, 0))[0], part=split.get(i, ("", 0, 0))[1],
                  parts=split.get(i, ("", 0, 0))[2]) for i in range(len(data))]


def _graphemes(units: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Merge code-point units into grapheme clusters (Unicode text segmentation, via the regex module's \\X)."""
    import regex

    text = "".join(ch for _, _, ch in units)
    out, k = [], 0
    for m in regex.finditer(r"\X", text):
        n = len(m.group())
        out.append((units[k][0], units[k + n - 1][1], m.group()))
        k += n
    return out


def _utf8_units(b: bytes) -> list[tuple[int, int, str]]:
    """(start, end, character) for each UTF-8 character in b; a byte that starts no valid sequence is U+FFFD."""
    out = []
    i, n = 0, len(b)
    while i < n:
        lead = b[i]
        size = (1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0
                else 4 if 0xF0 <= lead < 0xF5 else 0)
        if size:
            try:
                out.append((i, i + size, b[i:i + size].decode("utf-8")))
                i += size
                continue
            except UnicodeDecodeError:
                pass
        out.append((i, i + 1, "\ufffd"))
        i += 1
    return out


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes] | None:
    """The bytes each token stands for, where the vocabulary tells (byte-level BPE, sentencepiece with byte
    fallback); None where it does not."""
    kind = _vocab_kind(tokenizer)
    if kind is None:
        return None
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = _added_tokens(tokenizer)
    out = []
    for i, t in zip(ids, tokens):
        if t is None:
            return None
        if i in special:
            out.append(t.encode("utf-8"))
        elif kind == "byte_level":
            dec = _byte_decoder()
            try:
                out.append(bytes(dec[c] for c in t))
            except KeyError:
                return None
        else:
            m = _BYTE_TOKEN.match(t)
            out.append(bytes([int(m.group(1), 16)]) if m else t.replace("▁", " ").encode("utf-8"))
    return out


def _vocab_kind(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "sentencepiece" if hasattr(tokenizer, "sp_model") else None
    desc = repr(backend.decoder)
    if "ByteLevel" in desc:
        return "byte_level"
    if "ByteFallback" in desc or "Metaspace" in desc or "▁" in desc:
        return "sentencepiece"
    return None


def _added_tokens(tokenizer: Any) -> set[int]:
    try:
        return set(tokenizer.added_tokens_decoder)
    except Exception:
        return set(getattr(tokenizer, "all_special_ids", []))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _pieces_by_decoding(tokenizer: Any, ids: list[int]) -> list[Piece]:
    """Fallback: decode growing prefixes of a short window; a token whose text ends in an incomplete character
    waits for the next ones, and the completed group's text goes on its first token."""
    pieces: list[Piece] = []
    start = 0  # first token of the pending group
    context = 0  # window start (a few settled tokens, so a decoder that strips a leading space sees context)
    settled = ""
    while start < len(ids):
        end = start + 1
        while True:
            full = _decode(tokenizer, ids[context:end])
            new = full[len(settled):] if full.startswith(settled) else full
            if not new.endswith("\ufffd") or end - start >= MAX_GROUP or end == len(ids):
                break
            end += 1
        n = end - start
        char = new[-1] if n > 1 and new else ""
        pieces.append(Piece(text=new, char=char, part=1 if n > 1 else 0, parts=n if n > 1 else 0))
        pieces.extend(Piece(text="", char=char, part=k, parts=n) for k in range(2, n + 1))
        start = end
        context = max(0, end - 4)
        settled = _decode(tokenizer, ids[context:end])
    return pieces


def pieces_text(pieces: list[Piece]) -> str:
    """The text the pieces spell, joined."""
    return "".join(p.text for p in pieces)
