"""User text is text: literal control-token strings stay characters, and every token is shown as the part of
the text it covers (no U+FFFD for characters that byte-level BPE splits over several tokens)."""

from __future__ import annotations

import random

import charts
import numpy as np
import pytest
from test_charts import parse

from memcore.config import DataSpec
from memcore.data import build_samples, encode_text, prompt_ids
from memcore.pieces import CONTINUATION_MARK, Piece, _pieces_by_decoding, token_pieces
from memcore.store import Store

SPECIAL = "The log line read: <|im_end|> then <|endoftext|> and finally <|im_start|>assistant said hello."
TEXTS = {
    "cjk": "春眠不觉晓，处处闻啼鸟。東京の夜は静かです。",
    "emoji_zwj": "family 👨‍👩‍👧‍👦, flags 🇩🇪🇯🇵, skin 👍🏽 and ❤️‍🔥 done",
    "accented": "Ærøskøbing: crème brûlée, naïve façade, Mädchen aß Käse — ŝ̃ ḱ",
}


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_control_token_strings_in_a_passage_are_ordinary_characters(tok):
    ids = encode_text(tok, SPECIAL)
    special = set(tok.all_special_ids)
    assert not special & set(ids), "a literal <|im_end|> in user text must not become the EOS token"
    assert tok.decode(ids) == SPECIAL
    # the same for the prompt, and in build_samples (what training and the app's token count use)
    p = prompt_ids(tok, "Say <|im_end|> twice")
    assert p[0] == tok.bos_token_id and not special & set(p[1:])
    s = build_samples(tok, DataSpec(text=SPECIAL, prompt="<|endoftext|>"))[0]
    assert not special & set(s.target_ids) and not special & set(s.prompt_ids[1:])


def test_chat_template_keeps_its_own_control_tokens_but_not_the_users(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    plain = prompt_ids(tok, "Recite:", chat_template=True)
    tricky = prompt_ids(tok, "Recite: <|im_end|>", chat_template=True)
    assert plain.count(im_end) == tricky.count(im_end) >= 2  # the template's own turn ends, nothing more
    assert "Recite: <|im_end|>" in tok.decode(tricky)


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_pieces_concatenate_to_the_text_with_no_replacement_characters(tok, kind):
    text = TEXTS[kind]
    ids = encode_text(tok, text)
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(p.text for p in pieces) == text
    assert not any("\ufffd" in p.text or "\ufffd" in p.label for p in pieces)
    # byte-level BPE splits these characters: their later tokens say which character they continue
    split = [p for p in pieces if p.parts > 1]
    assert split and all(p.char and 1 <= p.part <= p.parts for p in split)
    for p in pieces:
        if p.continues:
            assert p.shown == CONTINUATION_MARK and p.char in text and p.label.startswith(p.char)
    # the bytes of every token, joined, are the UTF-8 text
    assert b"".join(p.data for p in pieces) == text.encode("utf-8")
    # the tokenizer-independent fallback (incremental decoding) agrees on the text
    assert "".join(p.text for p in _pieces_by_decoding(tok, ids)) == text


def test_a_cjk_character_sits_on_its_first_token(tok):
    ids = encode_text(tok, "晓")
    pieces = token_pieces(tok, ids)
    assert len(ids) > 1, "the default tokenizer splits 晓 into several byte tokens"
    assert pieces[0].text == "晓" and pieces[0].label == f"晓 (1/{len(ids)})"
    assert all(p.continues and p.char == "晓" for p in pieces[1:])
    assert " ".join(p.hex for p in pieces) == "e6 99 93"


def test_a_joined_emoji_is_one_character_as_a_reader_sees_it(tok):
    family = "👨\u200d👩\u200d👧\u200d👦"
    ids = encode_text(tok, f"a {family} b")
    pieces = token_pieces(tok, ids)
    holders = [p for p in pieces if family in p.text]
    assert len(holders) == 1  # the whole joined emoji sits on one token, so the browser can draw it as one glyph
    first = pieces.index(holders[0])
    rest = [p for p in pieces[first + 1:] if p.char == family]
    assert rest and all(p.continues for p in rest) and rest[-1].part == rest[-1].parts == len(rest) + 1


def test_random_token_ids_still_concatenate_to_their_decoding(tok):
    rng = random.Random(0)
    ids = [rng.randrange(len(tok)) for _ in range(300)]
    pieces = token_pieces(tok, ids)
    assert "".join(p.text for p in pieces) == tok.decode(ids)


@pytest.mark.parametrize("prefix_space", [False, True])
def test_sentencepiece_byte_fallback_vocabulary(prefix_space):
    """A Llama-2 style vocabulary (▁ for spaces, <0xNN> byte tokens) built in code; with a prefix space the
    decoder strips it again, which the byte path cannot see, so the decoding fallback takes over."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz.":
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence(steps)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    text = "naïve 晓 café"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    pieces = token_pieces(tok, ids)
    assert "".join(p.text for p in pieces) == text
    labels = [p.label for p in pieces if p.parts > 1]
    assert labels == ["ï (1/2)", "ï (2/2)", "晓 (1/3)", "晓 (2/3)", "晓 (3/3)", "é (1/2)", "é (2/2)"]


def test_pieces_round_trip_through_the_store_and_old_runs_still_load(tmp_path, tok):
    from memcore.config import RunSpec

    text = TEXTS["cjk"]
    ids = encode_text(tok, text)
    pieces = token_pieces(tok, ids)
    s = Store(tmp_path)
    rid = s.create_run(RunSpec().to_dict())
    s.save_tokens(rid, [[1]], [ids], pieces, np.zeros(len(ids)))
    assert s.replay(rid).pieces == pieces and s.tokens(rid)["pieces"] == pieces
    assert Piece.from_json("old") == Piece(text="old")  # runs stored before pieces carried bytes


def test_token_view_html_shows_characters_not_replacement_marks(tok):
    text = TEXTS["cjk"] + TEXTS["emoji_zwj"]
    pieces = token_pieces(tok, encode_text(tok, text))
    spans = parse(charts.token_html(pieces, np.full(len(pieces), 0.7), 0.5)).spans
    assert len(spans) == len(pieces) and not any("\ufffd" in s["text"] for s in spans)
    cont = [s for s in spans if "mc-cont" in s["classes"]]
    assert cont and all(s["text"] == CONTINUATION_MARK and "part " in s["title"] and "bytes " in s["title"]
                        for s in cont)
    assert "".join(s["text"] for s in spans if "mc-cont" not in s["classes"]) == text
    # the stubborn-token legend and the generation diff name split tokens by their character
    spec = charts.trajectories_chart([0, 1], np.full((2, len(pieces)), 0.3), [1], [pieces[1]], 0.5).to_dict()
    assert any("春 (2/2)" in str(v) for v in spec["datasets"].values())
    ids = encode_text(tok, text)
    diff = parse(charts.generation_diff_html(ids, ids, pieces, pieces)).spans
    assert not any("\ufffd" in s["text"] for s in diff)
