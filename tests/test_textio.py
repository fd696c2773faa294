"""Files from any editor: every reader of a user's file (passages, JSONL, law tables; CLI and app uploads) decodes
the Unicode encodings desktop editors save, and a binary file keeps its message."""

from __future__ import annotations

import codecs
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from memcore.cli import main
from memcore.config import MemcoreError
from memcore.data import parse_jsonl, read_jsonl, read_text_file
from memcore.law import read_law_csv
from memcore.textio import decode_text, sniff_bomless

FIELD = Path(__file__).parent / "field"
TEXT = "Plot 7 waters on Tuesdays; 3 m³ of compost, 45,80 € — 春眠不觉晓 🌱\nsecond line\n"

# (python codec, bytes put in front): every encoding an editor or spreadsheet writes
ENCODINGS = {
    "utf-8": ("utf-8", b""),
    "utf-8 with BOM": ("utf-8", codecs.BOM_UTF8),
    "utf-16 LE with BOM (Notepad 'Unicode')": ("utf-16-le", codecs.BOM_UTF16_LE),
    "utf-16 BE with BOM": ("utf-16-be", codecs.BOM_UTF16_BE),
    "utf-32 LE with BOM": ("utf-32-le", codecs.BOM_UTF32_LE),
    "utf-32 BE with BOM": ("utf-32-be", codecs.BOM_UTF32_BE),
    "utf-16 LE without BOM": ("utf-16-le", b""),
    "utf-16 BE without BOM": ("utf-16-be", b""),
    "utf-32 LE without BOM": ("utf-32-le", b""),
}


def encoded(text: str, name: str) -> bytes:
    codec, bom = ENCODINGS[name]
    return bom + text.encode(codec)


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_every_editor_encoding_decodes_to_the_same_text(name):
    assert decode_text(encoded(TEXT, name), "notes.txt") == TEXT


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_passage_files_jsonl_and_law_tables_read_every_encoding(tmp_path, name):
    (tmp_path / "p.txt").write_bytes(encoded(TEXT, name))
    assert read_text_file(tmp_path / "p.txt") == TEXT

    lines = [json.dumps({"query": f"Name {i}:", "target": f" {i}0123456789 €"}, ensure_ascii=False) for i in range(3)]
    (tmp_path / "pb.jsonl").write_bytes(encoded("\r\n".join(lines) + "\r\n", name))
    data = read_jsonl(tmp_path / "pb.jsonl")
    assert data.layout == "phonebook" and data.pairs[2] == ("Name 2:", " 20123456789 €")

    table = "rank\tlength\tdelta_loss\r\n" + "".join(f"{r}\t{n}\t{1.3 * r ** 0.5 * n ** -0.35:.5f}\r\n"
                                                      for r in (1, 2, 4) for n in (32, 64, 128))
    (tmp_path / "law.txt").write_bytes(encoded(table, name))
    df = read_law_csv(tmp_path / "law.txt")
    assert list(df.columns) == ["rank", "length", "delta_loss"] and len(df) == 9
    assert df["delta_loss"].iloc[0] == pytest.approx(1.3 * 32 ** -0.35, abs=1e-5)
    assert read_law_csv(encoded(table, name), name="upload.txt")["length"].tolist() == df["length"].tolist()


def test_the_field_files_notepad_unicode_and_excel_unicode_text():
    text = read_text_file(FIELD / "notes_utf16.txt")
    assert text.startswith("Allotment rota, spring\nPlot 7 waters on Tuesdays") and "45,80 €" in text
    df = read_law_csv(FIELD / "law_excel_unicode.txt")
    assert {"rank", "length", "delta_loss"} <= set(df.columns) and len(df) == 16


def test_fit_reads_excel_unicode_text_from_the_command_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMCORE_HOME", str(tmp_path / "home"))
    assert main(["fit", "--csv", str(FIELD / "law_excel_unicode.txt"), "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["n"] == 16 and fit["r2"] > 0.99 and 0.3 < fit["alpha"] < 0.7


@pytest.mark.parametrize("raw", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)),
    zlib.compress(b"some text " * 200),
    np.arange(300, dtype="<i2").tobytes(),  # int16 samples: NULs at every odd offset, like UTF-16 LE
    np.arange(300, dtype="<i4").tobytes(),
    b"\x00\x01\x02abc",
], ids=["png", "zlib", "int16", "int32", "nul-and-controls"])
def test_a_real_binary_file_keeps_its_message(tmp_path, raw):
    (tmp_path / "blob.bin").write_bytes(raw)
    with pytest.raises(MemcoreError, match=r"blob.bin is not (text \(it contains NUL bytes; binary file\?\)|UTF-8)"):
        read_text_file(tmp_path / "blob.bin")


def test_a_claimed_encoding_that_does_not_decode_is_named_with_the_advice_to_save_as_utf8():
    broken = codecs.BOM_UTF16_LE + "ok".encode("utf-16-le") + b"\x00\xd8"  # a lone high surrogate at the end
    with pytest.raises(MemcoreError, match=r"notes.txt looks like UTF-16 LE text .* save it as UTF-8"):
        decode_text(broken, "notes.txt")
    with pytest.raises(MemcoreError, match=r"notes.txt is not UTF-8 text \(bad byte at offset 3\); save it as UTF-8"):
        decode_text("café".encode("latin-1"), "notes.txt")
    assert decode_text("café".encode("latin-1"), "t.csv", legacy="cp1252") == "café"


def test_sniffing_needs_the_nul_pattern_of_a_unicode_encoding():
    assert sniff_bomless("hello world".encode("utf-16-le")) == ("utf-16-le", "UTF-16 LE")
    assert sniff_bomless("hello world".encode("utf-16-be")) == ("utf-16-be", "UTF-16 BE")
    assert sniff_bomless("hi there".encode("utf-32-be")) == ("utf-32-be", "UTF-32 BE")
    assert sniff_bomless(b"plain ascii") is None
    assert sniff_bomless(bytes(64)) is None  # all NUL: no text in any encoding


def test_app_uploads_decode_like_the_cli(tmp_path):
    from inputs import read_jsonl_upload, read_text_upload

    def upload(name: str, data: bytes) -> SimpleNamespace:
        return SimpleNamespace(name=name, size=len(data), getvalue=lambda: data)

    text, err = read_text_upload(upload("notes.txt", (FIELD / "notes_utf16.txt").read_bytes()))
    assert err is None and text == read_text_file(FIELD / "notes_utf16.txt")
    line = json.dumps({"question": "Output the memory.", "matching": "Ünïcödé passage"}, ensure_ascii=False)
    data, err = read_jsonl_upload(upload("lc.jsonl", encoded(line + "\n", "utf-16 LE with BOM (Notepad 'Unicode')")),
                                  "", 0)
    assert err is None and data.pairs == (("Output the memory.", "Ünïcödé passage"),)
    text, err = read_text_upload(upload("x.bin", b"\x89PNG\x00\x00\x01\x02"))
    assert text is None and "not text" in err
    # a file with nothing to memorize is named as soon as it is chosen, not only when Start is pressed
    assert read_text_upload(upload("empty.txt", b"")) == (None, "empty.txt is empty: no text to memorize")
    for blank in (b" \n\t\n", "\n".encode("utf-16")):  # whitespace alone, or a BOM and a newline
        assert read_text_upload(upload("blank.txt", blank)) == (
            None, "blank.txt holds no text to memorize (it is empty or only whitespace)")
    assert parse_jsonl(encoded(line, "utf-32 LE with BOM"), "lc.jsonl").pairs == data.pairs
