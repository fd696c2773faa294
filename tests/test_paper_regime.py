"""The paper's regime: its data layouts (JSONL, random tokens), its bypass adapter, and training to convergence."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from memcore.blocks import decoder_layers
from memcore.bypass import mlp_of
from memcore.config import AdapterSpec, DataSpec, MemcoreError, RunSpec, TrainSpec
from memcore.data import build_samples, make_batch, ordinary_token_ids, parse_jsonl, random_token_ids
from memcore.measure import base_losses, token_losses
from memcore.placement import p_eff
from memcore.stack import SlotAdapter
from memcore.targets import paper_layer
from memcore.train import BestCounts, FrozenPrefix, converged, train_iter, waits_for_a_new_best

# --- JSONL ---------------------------------------------------------------------------------------------------


def test_phonebook_jsonl_gives_one_sample_per_line():
    raw = '{"query": "Ada Berg:", "target": " 0123456789", "id": 1}\n\n{"query": "Wen Xu:", "target": " 9876543210"}\n'
    d = parse_jsonl(raw.encode(), "pb.jsonl")
    assert d.layout == "phonebook" and d.fields == ("query", "target") and d.lines == 2
    assert d.pairs == (("Ada Berg:", " 0123456789"), ("Wen Xu:", " 9876543210"))


def test_long_context_jsonl_takes_one_line_and_says_so():
    lines = [json.dumps({"question": f"Output the memory {i}.", "matching": f"text number {i}", "extra": [1]})
             for i in range(3)]
    d = parse_jsonl("\n".join(lines))
    assert d.layout == "long-context" and d.pairs == (("Output the memory 0.", "text number 0"),)
    assert "3 long-context lines" in d.note and "--jsonl-line" in d.note
    assert parse_jsonl("\n".join(lines), line=3).pairs == (("Output the memory 2.", "text number 2"),)
    with pytest.raises(MemcoreError, match="line 4 does not exist"):
        parse_jsonl("\n".join(lines), line=4)


def test_custom_jsonl_fields():
    d = parse_jsonl('{"in": "Q", "out": "A"}\n{"in": "R", "out": "B"}', fields=("in", "out"))
    assert d.layout == "custom" and d.pairs == (("Q", "A"), ("R", "B"))


@pytest.mark.parametrize("raw, message", [
    ('{"query": "a", "target": "b"}\n{"query": "c", "target": "d"\n', r"f\.jsonl line 2: not valid JSON"),
    ('{"query": "a", "target": "b"}\n[1, 2]\n', r"line 2: expected a JSON object"),
    ('{"query": "a", "target": "b"}\n\n{"query": "c"}\n', r"line 3: no 'target' key \(keys: query\)"),
    ('{"query": "a", "target": 5}\n', r"line 1: 'target' must be a string, got int"),
    ('{"query": "a", "target": "  "}\n', r"line 1: 'target' is empty"),
    ('{"prompt": "a", "answer": "b"}\n', r"keys answer, prompt match neither .* --jsonl-fields"),
    ('\n\n', r"no JSON lines"),
])
def test_bad_jsonl_lines_are_named(raw, message):
    with pytest.raises(MemcoreError, match=message):
        parse_jsonl(raw.encode(), "f.jsonl")


def test_jsonl_pairs_train_as_a_batch(default_base):
    d = parse_jsonl('{"query": "Ada Berg:", "target": " 0123456789"}\n{"query": "Wen Xu:", "target": " 55"}')
    spec = DataSpec(pairs=d.pairs, length=3)
    samples = build_samples(default_base.tokenizer, spec)
    assert len(samples) == 2 and all(len(s.target_ids) <= 3 for s in samples)
    # the spec survives its JSON round trip with the pairs as tuples
    again = RunSpec.from_dict(json.loads(json.dumps(RunSpec(data=spec).to_dict())))
    assert again.data == spec


def test_data_spec_wants_exactly_one_source():
    with pytest.raises(MemcoreError, match="exactly one .* got text and random_tokens"):
        DataSpec(text="x", random_tokens=10)
    with pytest.raises(MemcoreError, match="random tokens must be an integer >= 1"):
        DataSpec(text=None, random_tokens=0)


# --- random tokens -------------------------------------------------------------------------------------------


def test_random_tokens_are_seeded_ordinary_and_uniform(default_base):
    tok = default_base.tokenizer
    pool = ordinary_token_ids(tok)
    specials = set(tok.all_special_ids)
    assert specials and not specials & set(pool.tolist())
    a = random_token_ids(tok, 200, seed=3)
    assert a == random_token_ids(tok, 200, seed=3) and a != random_token_ids(tok, 200, seed=4)
    # uniform over the pool: 200,000 draws in 16 equal bins of the pool pass a chi-square test
    big = np.array(random_token_ids(tok, 200_000, seed=0))
    ranks = np.searchsorted(pool, big)
    assert (pool[ranks] == big).all()
    counts = np.bincount(ranks * 16 // len(pool), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-3
    s = build_samples(tok, DataSpec(random_tokens=50, seed=3, length=20))
    assert s[0].target_ids == a[:20]


# --- the bypass adapter -------------------------------------------------------------------------------------


def _batch(base, text="Seven pale moths circled the lamp until the kettle sang."):
    return make_batch(build_samples(base.tokenizer, DataSpec(text=text)), base.tokenizer.pad_token_id)


def test_bypass_forward_is_mlp_plus_xab_and_starts_as_the_base(tiny_base, bypassed):
    b = _batch(tiny_base)
    before, _ = token_losses(tiny_base.model, b)
    m = bypassed(AdapterSpec(rank=3, layers="paper", kind="bypass", dropout=0.1))
    hidden = tiny_base.model.config.hidden_size
    assert p_eff(m) == 3 * 2 * hidden
    layer = paper_layer(len(decoder_layers(m)))
    _, bp = mlp_of(decoder_layers(m)[layer])
    A, B = bp.A[0], bp.B[0]  # the run's slot
    assert isinstance(bp, SlotAdapter) and A.shape == (hidden, 3) and B.shape == (3, hidden)
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    bound = 1 / hidden ** 0.5  # PEFT's lora_A init: kaiming-uniform, a = sqrt(5), fan-in = hidden
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    start, _ = token_losses(m, b)
    assert torch.equal(start, before)  # B = 0: exactly the base model
    with torch.no_grad():
        torch.nn.init.normal_(bp.B, std=0.5)
    x = torch.randn(2, 5, hidden)
    m.stack.set_rows([0, 0])
    want = bp.base(x) + x @ bp.A[0] @ bp.B[0]  # dropout off: no dropout, no alpha/r scaling
    assert torch.allclose(bp(x), want, atol=1e-5)
    after, _ = token_losses(m, b)
    assert not torch.allclose(after, before)
    assert torch.allclose(base_losses(m, b), before, atol=1e-6)  # switched off for the base loss
    # only A and B train; every other weight stays frozen
    assert {n.split(".")[-1] for n, p in m.named_parameters() if p.requires_grad} == {"A", "B"}


def test_bypass_saves_reloads_and_detaches(tiny_base, tmp_path):
    b = _batch(tiny_base)
    plain, _ = token_losses(tiny_base.model, b)
    with tiny_base.adapted(AdapterSpec(rank=2, layers=(1, 2), kind="bypass")) as m:
        for p in m.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.3)
        trained, _ = token_losses(m, b)
        m.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "bypass_config.json").read_text())
    assert cfg["rank"] == 2 and cfg["layers"] == [1, 2] and cfg["adapter"] == "bypass"
    assert torch.equal(token_losses(tiny_base.model, b)[0], plain)  # the MLPs are back, untouched
    with tiny_base.adapted(tmp_path / "ad") as again:
        assert torch.allclose(token_losses(again, b)[0], trained, atol=1e-6)
    assert torch.equal(token_losses(tiny_base.model, b)[0], plain)


def test_bypass_trains_with_the_frozen_prefix_cache(tiny_base, bypassed):
    b = _batch(tiny_base)
    m = bypassed(AdapterSpec(rank=2, layers="paper", kind="bypass"))
    prefix = FrozenPrefix.maybe(m)
    assert prefix is not None and prefix.k == paper_layer(len(decoder_layers(m)))
    reports = list(train_iter(m, b, TrainSpec(method="sft", lr=5e-2, max_steps=15, stop_when_recalled=False)))
    assert reports[-1].delta_loss > 0.05


def test_cli_trains_jsonl_with_the_bypass_and_exports_memcores_files(home, tiny_model_dir, tmp_path, capsys):
    from memcore.cli import main

    f = tmp_path / "pb.jsonl"
    f.write_text('{"query": "Ada Berg:", "target": " 0123456789"}\n{"query": "Wen Xu:", "target": " 555"}\n')
    code = main(["train", "--jsonl", str(f), "--adapter", "bypass", "--rank", "2", "--model", str(tiny_model_dir),
                 "--max-steps", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert "phonebook layout (query -> target), 2 samples" in err
    assert summary["adapter"] == "bypass" and summary["p_eff"] == 2 * 2 * 64 and len(summary["target_ids"]) == 2
    assert main(["generate", summary["run_id"]]) == 0  # reloads the bypass from the run's folder
    capsys.readouterr()
    assert main(["export", summary["run_id"], str(tmp_path / "out")]) == 0  # memcore's files, and a card saying so
    assert (tmp_path / "out" / "bypass_model.safetensors").is_file() and not (tmp_path / "out" / "adapter_config.json"
                                                                             ).exists()
    capsys.readouterr()
    assert main(["train", "--text", "abc", "--adapter", "bypass", "--alpha", "4", "--max-steps", "1"]) == 2
    assert "--alpha and --targets apply to LoRA" in capsys.readouterr().err
    assert main(["train", "--jsonl", str(tmp_path / "none.jsonl")]) == 2
    assert "JSONL file" in capsys.readouterr().err
    assert main(["train", "--jsonl", str(f), "--prompt", "Ignored?"]) == 2
    assert "every sample brings its own prompt" in capsys.readouterr().err


# --- convergence ---------------------------------------------------------------------------------------------


class _R:
    def __init__(self, above, n=10):
        self.n_above, self.n_tokens = above, n


def test_converged_rule():
    from collections import deque

    spec = TrainSpec(until="converged", plateau_window=20, plateau_tol=0.05)
    assert converged(_R(10), deque([0.0]), spec) == "all_above_tau"
    rising = deque([0.1 * i for i in range(30)], maxlen=30)
    assert converged(_R(3), rising, spec) is None
    flat = deque([5.0 + 0.001 * i for i in range(30)], maxlen=30)
    assert converged(_R(3), flat, spec) == "plateau"
    assert converged(_R(3), deque(list(flat)[:20]), spec) is None  # not enough history yet


class _C:
    def __init__(self, step, above, correct, n=10):
        self.step, self.n_above, self.n_correct, self.n_tokens = step, above, correct, n


def test_recall_plateau_waits_for_a_window_without_a_new_best_in_either_count():
    from collections import deque

    spec = TrainSpec(until="converged", plateau_on="recall", plateau_window=5, plateau_tol=100.0)
    best = BestCounts()
    # tokens above tau stall from step 2 while the argmax-right count still improves until step 6
    counts = [(1, 1), (3, 2), (4, 3), (4, 4), (4, 5), (4, 5), (4, 6)] + [(4, 6), (3, 5)] * 5
    verdicts = []
    for step, (a, c) in enumerate(counts):
        r = _C(step, a, c)
        best.see(r)
        verdicts.append(converged(r, deque([0.0] * 200), spec, best))
    # a ΔL rule with a huge tolerance would call step 0 a plateau already; the recall rule waits for step 6 + 5
    assert verdicts.index("plateau") == 11 and set(verdicts[:11]) == {None}
    assert converged(_C(0, 10, 10), deque(), spec, BestCounts()) == "all_above_tau"
    with pytest.raises(MemcoreError, match="plateau_on"):
        TrainSpec(plateau_on="loss")


def test_the_waits_for_a_new_best_say_which_windows_would_have_cut_a_run_short():
    from collections import deque

    # gains at steps 1, 2, 3 (argmax-right only), then a stall of 7 steps before a late gain at 10, then 4 quiet
    counts = [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 2, 3)] + [(s, 2, 3) for s in range(4, 10)] + \
        [(10, 3, 3)] + [(s, 1, 1) for s in range(11, 15)]
    waits, last = waits_for_a_new_best(counts)
    assert waits == [1, 1, 1, 7] and last == 4
    for window in (3, 6, 7):  # the rule stops the run before step 10's gain exactly when a wait exceeds the window
        spec = TrainSpec(until="converged", plateau_on="recall", plateau_window=window, plateau_tol=100.0)
        best, stopped = BestCounts(), None
        for step, a, c in counts:
            r = _C(step, a, c)
            best.see(r)
            if converged(r, deque([0.0] * 200), spec, best) == "plateau":
                stopped = step
                break
        assert (stopped is not None and stopped < 10) == any(w > window for w in waits)


class _E(_C):
    """A rehearsing run's step: its own counts and the earlier targets' (n_earlier of them, `kept` above τ and
    argmax-right)."""

    def __init__(self, step, above, correct, kept, n_earlier=16):
        super().__init__(step, above, correct, n=64)
        self.earlier_p = torch.full((n_earlier,), 0.9)
        self.earlier_above = kept
        self.earlier_correct = torch.arange(n_earlier) < kept


def test_a_rehearsing_run_is_not_called_a_plateau_while_its_own_passage_is_still_going_in():
    from collections import deque

    spec = TrainSpec(until="converged", plateau_on="recall", plateau_window=5, plateau_tol=100.0)
    # the earlier 16 tokens start learned and are lost at once; the new passage gains a token every 3 steps,
    # never bringing the whole set back to its step-0 count of 16
    steps = [_E(s, s // 3, s // 3, 16 if s == 0 else 0) for s in range(31)]
    best, verdicts = BestCounts(), []
    for r in steps:
        best.see(r, with_earlier=True)
        verdicts.append(converged(r, deque([0.0] * 200), spec, best, with_earlier=True))
    assert set(verdicts) == {None} and best.step == 30 and (best.above, best.own_above) == (16, 10)
    # once the new passage stalls too, a window later it is a plateau
    later = []
    for s in range(31, 40):
        r = _E(s, 10, 10, 0)
        best.see(r, with_earlier=True)
        later.append(converged(r, deque([0.0] * 200), spec, best, with_earlier=True))
    assert 31 + later.index("plateau") == 30 + 5


def replay_at(reports) -> BestCounts:
    replay = BestCounts()
    for r in reports:
        replay.see(r)
    return replay


def test_recall_plateau_stops_a_stalled_run_and_resumes_with_its_best_counts(bypassed, tiny_base):
    b = _batch(tiny_base, "A much longer passage, " * 12)
    spec = TrainSpec(method="memft-ot", lr=1e-5, max_steps=300, stop_when_recalled=False, until="converged",
                     verify=False, plateau_on="recall", plateau_window=8)
    whole = list(train_iter(bypassed(AdapterSpec(rank=1, layers="paper"), seed=1), b, spec))
    replay = BestCounts()
    for r in whole:
        replay.see(r)
    assert whole[-1].stop_reason == "plateau" and whole[-1].step < 300
    assert whole[-1].step == replay.step + 8  # exactly one window after its last new best in either count
    saved, calls = [], iter(range(1000))
    first = list(train_iter(bypassed(AdapterSpec(rank=1, layers="paper"), seed=1), b, spec,
                            should_stop=lambda: next(calls) >= 4, checkpoint=saved.append))
    assert first[-1].stop_reason == "stopped" and BestCounts(*saved[-1].best_counts) == replay_at(first)
    resumed = list(train_iter(bypassed(AdapterSpec(rank=1, layers="paper"), seed=7), b, spec, resume=saved[-1]))
    assert resumed[-1].stop_reason == "plateau" and resumed[-1].step == whole[-1].step


def test_until_converged_stops_when_every_token_is_above_tau(default_base):
    # (a tiny random model cannot put p > 0.5 on any token: its final norm and small embeddings cap the logits)
    b = make_batch(build_samples(default_base.tokenizer, DataSpec(random_tokens=12, seed=1)), 0)
    spec = TrainSpec(method="sft", lr=3e-2, max_steps=300, stop_when_recalled=False, until="converged", verify=False,
                     plateau_window=300)
    with default_base.adapted(AdapterSpec(rank=4, layers="paper", kind="bypass", dropout=0.1)) as m:
        reports = list(train_iter(m, b, spec))
    final = reports[-1]
    assert final.stop_reason == "all_above_tau" and final.step < 300
    # measured without dropout at the end: every token really is above tau, and so recalled
    assert final.n_above == final.n_tokens and final.recalled


def test_until_converged_stops_on_a_plateau(bypassed, tiny_base):
    b = _batch(tiny_base, "A much longer passage, " * 12)
    m = bypassed(AdapterSpec(rank=1, layers="paper"))
    spec = TrainSpec(method="sft", lr=1e-4, max_steps=300, stop_when_recalled=False, until="converged", verify=False,
                     plateau_window=10, plateau_tol=0.5)
    reports = list(train_iter(m, b, spec))
    assert reports[-1].stop_reason == "plateau" and reports[-1].step == 10 + 10 - 1
    budget = list(train_iter(m, b, TrainSpec(method="sft", lr=1e-4, max_steps=25, stop_when_recalled=False,
                                             verify=False)))
    assert budget[-1].stop_reason == "max_steps"


def test_a_resumed_run_keeps_its_plateau_window(bypassed, tiny_base):
    b = _batch(tiny_base, "A much longer passage, " * 12)
    spec = TrainSpec(method="sft", lr=1e-4, max_steps=300, stop_when_recalled=False, until="converged", verify=False,
                     plateau_window=10, plateau_tol=0.5)
    whole = list(train_iter(bypassed(AdapterSpec(rank=1, layers="paper"), seed=1), b, spec))
    saved, calls = [], iter(range(1000))
    first = list(train_iter(bypassed(AdapterSpec(rank=1, layers="paper"), seed=1), b, spec,
                            should_stop=lambda: next(calls) >= 12, checkpoint=saved.append))
    assert first[-1].stop_reason == "stopped" and len(saved[-1].recent_delta_loss) == 12  # steps 0-11
    resumed = list(train_iter(bypassed(AdapterSpec(rank=1, layers="paper"), seed=7), b, spec, resume=saved[-1]))
    assert resumed[-1].stop_reason == whole[-1].stop_reason == "plateau" and resumed[-1].step == whole[-1].step == 19
