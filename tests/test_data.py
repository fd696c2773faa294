import pytest
import torch

from memcore.config import DataSpec, MemcoreError
from memcore.data import Sample, build_samples, decode_text, list_samples, make_batch, phonebook, read_text_file


def test_batch_keeps_exactly_the_target_predictions():
    samples = [Sample([1, 2], [10, 11, 12]), Sample([1], [20])]
    b = make_batch(samples, pad_id=0)
    # inputs drop each sequence's last token and are left-padded
    assert b.input_ids.tolist() == [[1, 2, 10, 11], [0, 0, 0, 1]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    assert b.position_ids[1, -1] == 0 and b.position_ids[0].tolist() == [0, 1, 2, 3]
    # the last K = 3 input positions predict: row 0 -> 10, 11, 12; row 1 -> only its last position predicts 20
    assert b.labels.tolist() == [[10, 11, 12], [0, 0, 20]]
    assert b.target_mask.tolist() == [[True, True, True], [False, False, True]]
    assert b.flat_targets() == [10, 11, 12, 20] == b.labels[b.target_mask].tolist()


def test_phonebook_is_seeded_and_well_formed():
    a, b, c = phonebook(20, seed=1), phonebook(20, seed=1), phonebook(20, seed=2)
    assert a == b and a != c
    assert len({name for name, _ in a}) == 20
    assert all(len(num) == 10 and num.isdigit() for _, num in a)


def test_build_samples_prompt_length_and_noise(default_base):
    tok = default_base.tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 4
    full = build_samples(tok, DataSpec(text=text, prompt="Say it:"))
    assert full[0].prompt_ids[0] == tok.bos_token_id
    assert tok.decode(full[0].target_ids) == text
    cut = build_samples(tok, DataSpec(text=text, length=7))
    assert cut[0].target_ids == full[0].target_ids[:7]
    noisy = build_samples(tok, DataSpec(text=text, noise=0.25, seed=3))[0].target_ids
    changed = sum(x != y for x, y in zip(noisy, full[0].target_ids))
    assert changed == round(0.25 * len(noisy))
    assert noisy == build_samples(tok, DataSpec(text=text, noise=0.25, seed=3))[0].target_ids


def test_phonebook_samples_condition_on_the_name(default_base):
    tok = default_base.tokenizer
    samples = build_samples(tok, DataSpec(phonebook=5, seed=0))
    (name, number) = phonebook(5, 0)[0]
    assert name in tok.decode(samples[0].prompt_ids) and tok.decode(samples[0].target_ids) == f" {number}"


def test_too_long_text_is_refused_with_both_numbers(default_base):
    tok = default_base.tokenizer
    with pytest.raises(MemcoreError, match=r"\d+ target tokens, more than the configured maximum of 50"):
        build_samples(tok, DataSpec(text="word " * 200, max_tokens=50))
    with pytest.raises(MemcoreError, match=r"\d+ tokens with its prompt, more than the model's context of 64 tokens"):
        build_samples(tok, DataSpec(text="word " * 200, max_tokens=4000), context_length=64)


def test_many_samples_are_bounded_per_sample_and_by_memory_not_by_the_passage_limit(default_base, monkeypatch):
    import memcore.data as data

    tok = default_base.tokenizer
    book = build_samples(tok, DataSpec(phonebook=250, seed=0))  # about 2,750 answer tokens: over one passage's 2,048
    assert sum(len(s.target_ids) for s in book) > 2048 and len(book) == 250
    with pytest.raises(MemcoreError, match="a sample's target is 11 tokens, more than the configured maximum of 5"):
        build_samples(tok, DataSpec(phonebook=3, max_tokens=5))
    monkeypatch.setattr(data, "MAX_TOTAL_TARGET_TOKENS", 100)
    with pytest.raises(MemcoreError, match="the 20 samples hold 220 target tokens, more than memcore trains at once"):
        build_samples(tok, DataSpec(phonebook=20))


def test_chat_template_prompt(default_base):
    tok = default_base.tokenizer
    s = build_samples(tok, DataSpec(text="hello world", prompt="Recite:", chat_template=True))[0]
    assert "Recite:" in tok.decode(s.prompt_ids) and "assistant" in tok.decode(s.prompt_ids)


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    (tmp_path / "bin").write_bytes(b"\x00\x01\x02abc")
    (tmp_path / "latin").write_bytes("café".encode("latin-1"))
    (tmp_path / "ok").write_text("café ✓", encoding="utf-8")
    with pytest.raises(MemcoreError, match="not text"):
        read_text_file(tmp_path / "bin")
    with pytest.raises(MemcoreError, match="not UTF-8"):
        read_text_file(tmp_path / "latin")
    with pytest.raises(MemcoreError, match="does not exist"):
        read_text_file(tmp_path / "missing")
    assert read_text_file(tmp_path / "ok") == "café ✓"
    assert decode_text("\ufeffhi".encode()) == "hi"


def test_samples_are_shipped():
    assert {"lighthouse", "recipe", "orbit", "long_archive"} <= set(list_samples())


def test_batch_moves_to_a_device_intact():
    b = make_batch([Sample([1], [2, 3]), Sample([1], [4])])
    moved = b.to(torch.device("cpu"))
    assert moved.input_ids.equal(b.input_ids) and moved.flat_targets() == [2, 3, 4]
