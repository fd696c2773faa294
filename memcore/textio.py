"""A user's file as text: the one decoder every reader of user files uses (passages, JSONL, law tables; the CLI
and the app's uploads alike).

Desktop editors and spreadsheets save "text" in several Unicode encodings. ``decode_text`` reads:
  - UTF-8, with or without a byte-order mark (what most editors write);
  - UTF-16 and UTF-32, little or big endian, with a BOM (Windows Notepad's "Unicode", Excel's "Unicode Text");
  - UTF-16 and UTF-32 without a BOM, recognised by where their NUL bytes fall (one byte in two, or three in
    four, for text in Latin script) and decoded when every character is text;
  - optionally a legacy code page as the last resort (law tables: Excel's "CSV" on Windows is cp1252).
Anything else is refused with a MemcoreError that names the file and what was found: NUL bytes in no Unicode
pattern (a binary file), a recognised encoding that does not decode (with the advice to save as UTF-8), or a
byte that is not UTF-8 (with its offset). Nothing here imports torch: `memcore fit` reads tables without it.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from memcore.config import MemcoreError

# longest BOM first: UTF-32 LE's BOM begins with UTF-16 LE's
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)
# control characters that no text holds (tab, line feed, vertical tab, form feed and carriage return are text)
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")
_SAMPLE = 4096  # bytes looked at to recognise a BOM-less UTF-16/32 file


def _nul_share(raw: bytes, width: int) -> list[float]:
    """The share of NUL bytes at each offset modulo `width` in the file's first _SAMPLE bytes."""
    head = raw[: _SAMPLE - _SAMPLE % width]
    counts = [0] * width
    for i, b in enumerate(head):
        if b == 0:
            counts[i % width] += 1
    per = max(1, len(head) // width)
    return [c / per for c in counts]


def sniff_bomless(raw: bytes) -> tuple[str, str] | None:
    """(codec, name) of a BOM-less UTF-16 or UTF-32 file, read off where its NUL bytes fall: UTF-16 LE text has a
    NUL at the odd offset of every character below U+0100 (in Latin script nearly all of them; in CJK text its
    spaces, digits and line ends) and none at even offsets; UTF-32 LE at offset 3 mod 4 always and 2 mod 4 nearly
    always; the big-endian forms the mirror image. None when the NULs follow no such pattern, or there are none
    (UTF-16 text without a single character below U+0100 is not recognised: it may even be valid UTF-8)."""
    if len(raw) < 4 or b"\x00" not in raw:
        return None
    s4 = _nul_share(raw, 4)
    if len(raw) % 4 == 0:
        # a code point is below U+110000: its top byte is always NUL and the next one nearly always
        if s4[3] > 0.99 and s4[2] > 0.5 and s4[0] < 0.02:
            return "utf-32-le", "UTF-32 LE"
        if s4[0] > 0.99 and s4[1] > 0.5 and s4[3] < 0.02:
            return "utf-32-be", "UTF-32 BE"
    if len(raw) % 2 == 0:
        even, odd = _nul_share(raw, 2)
        if even < 0.02 and odd > 0.1:
            return "utf-16-le", "UTF-16 LE"
        if odd < 0.02 and even > 0.1:
            return "utf-16-be", "UTF-16 BE"
    return None


def _as_text(raw: bytes, codec: str, name: str, what: str, how: str) -> str:
    """raw decoded with `codec`, or a MemcoreError naming the encoding and saying to save as UTF-8; a decoded text
    holding control characters is a binary file, not text."""
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        raise MemcoreError(f"{what} looks like {name} text ({how}) but does not decode as {name} (bad bytes at offset "
                           f"{e.start}); save it as UTF-8 and try again") from None
    if _CONTROL.search(text):
        raise MemcoreError(f"{what} is not text (it contains NUL bytes; binary file?)")
    return text


def decode_text(raw: bytes, what: str = "input", legacy: str | None = None) -> str:
    """A user's file's bytes as text, in whichever Unicode encoding a desktop editor saved it (the module's
    docstring lists them); a byte-order mark is dropped. `legacy` names a code page tried last (e.g. "cp1252"
    for spreadsheets' CSV), else bytes that are not UTF-8 are refused.

    Raises MemcoreError naming `what`: a binary file ("not text (it contains NUL bytes; binary file?)"), a file
    that claims or looks like UTF-16/32 but does not decode (naming the encoding, advising UTF-8), or bad UTF-8
    (with the offset of the first bad byte)."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    for bom, codec, name in _BOMS:
        if raw.startswith(bom):
            return _as_text(raw[len(bom):], codec, name, what, "it starts with a byte-order mark")
    found = sniff_bomless(raw)
    if found is not None:
        return _as_text(raw, found[0], found[1], what, "NUL bytes where that encoding puts them, no byte-order mark")
    if b"\x00" in raw:
        raise MemcoreError(f"{what} is not text (it contains NUL bytes; binary file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if legacy is not None:
            try:
                return raw.decode(legacy)
            except UnicodeDecodeError:
                pass
        raise MemcoreError(f"{what} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None


def read_user_file(path: str | Path, kind: str, max_bytes: int, legacy: str | None = None) -> str:
    """The text of a user's file at `path` (decode_text), refused before reading when larger than `max_bytes`.
    `kind` names the file in messages ("text file", "CSV file", ...).

    Raises MemcoreError: no such file, a directory, unreadable (the OS's reason), too large, or decode_text's."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise MemcoreError(f"{p} is a directory, not a {kind}")
        if size > max_bytes:
            raise MemcoreError(f"{p} is {size / 1e6:.0f} MB; memcore accepts a {kind} of up to "
                               f"{max_bytes / 1e6:.0f} MB")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise MemcoreError(f"{kind} {p} does not exist") from None
    except OSError as e:
        raise MemcoreError(f"cannot read {p}: {e.strerror or e}") from None
    return decode_text(raw, str(p), legacy)
