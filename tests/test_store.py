import os
import subprocess
import sys

import numpy as np
import pytest

from memcore.config import MemcoreError, RunSpec
from memcore.pieces import Piece
from memcore.records import RunSummary, StepRow
from memcore.store import Store


def _spec():
    return RunSpec().to_dict()


def _row(step, n=5):
    p = np.linspace(0.1, 0.9, n).astype(np.float16)
    return StepRow(step=step, loss=1.0, delta_loss=0.5, n_above=2, n_correct=3, n_tokens=n, active=3, recalled=False,
                   first_divergence=1, elapsed=0.1 * step, lr=1e-3, skipped=False, p=p, correct=p > 0.4)


def test_steps_and_token_history_round_trip(tmp_path):
    s = Store(tmp_path)
    rid = s.create_run(_spec())
    s.save_tokens(rid, [[1, 2]], [[5, 6, 7, 8, 9]], [Piece(c) for c in "abcde"], np.zeros(5))
    s.set_status(rid, "running")
    s.write_steps(rid, [_row(0), _row(1)])
    s.write_steps(rid, [_row(2)])
    assert s.steps(rid) == [StepRow(**{**_row(k).scalar_dict(), "recalled": False, "skipped": False})
                            for k in (0, 1, 2)]
    rp = s.replay(rid)
    assert rp.steps == [0, 1, 2] and rp.p.shape == (3, 5) and rp.correct.shape == (3, 5)
    assert np.allclose(rp.p[1], np.linspace(0.1, 0.9, 5), atol=1e-3)
    assert rp.correct[0].tolist() == [False, False, True, True, True]
    assert rp.target_ids == [5, 6, 7, 8, 9] and rp.pieces[0].text == "a"
    s.set_status(rid, "completed", summary=_summary(rid))
    r = s.run(rid)
    assert r["status"] == "completed" and r["summary"] == _summary(rid) and r["finished"] >= r["started"]
    assert r["length"] == 5 and r["steps"] == 2


def _summary(rid: str) -> RunSummary:
    return RunSummary(run_id=rid, steps=2, stop_reason="max_steps", recalled=False, verified_by_generate=True,
                      teacher_forced_recalled=False, first_divergence=1, teacher_forced_first_divergence=1, n_tokens=5,
                      n_above=2, n_correct=3, converged=False, exact_recall=False, token_accuracy=0.6,
                      verbatim_prefix=1,
                      adapter="lora", base_loss=2.0, loss=1.0, delta_loss=1.0, p_eff=100, bits_stored=7.2,
                      bits_per_param=0.072, seconds_per_step=0.1, train_seconds=0.2, model="m", quant=None,
                      method="sft", tau=0.5, rank=2, adapter_dir="/x", prompt_ids=[1, 2], target_ids=[5, 6, 7, 8, 9],
                      generated_ids=None)


def test_an_older_summary_reads_with_the_fields_added_since_derived_from_what_it_had():
    old = _summary("r").to_dict()
    for k in ("converged", "exact_recall", "token_accuracy", "verbatim_prefix", "adapter", "history", "snapshots",
              "source_bits_per_token", "status"):
        del old[k]
    old["teacher_forced_recalled"], old["teacher_forced_first_divergence"] = True, None
    old["point_seconds"] = 3.5  # a key this version does not know: kept
    s = RunSummary.from_dict(old)
    assert s.exact_recall is True and s.verbatim_prefix == 5 and s.token_accuracy == pytest.approx(0.6)
    assert s.adapter == "lora" and s.converged is False and s.history == "full"
    assert s.to_dict()["point_seconds"] == 3.5 and RunSummary.from_dict(s.to_dict()) == s


def test_resolve_prefix_last_and_errors(tmp_path):
    s = Store(tmp_path)
    with pytest.raises(MemcoreError, match="empty"):
        s.resolve("last")
    a = s.create_run(_spec(), run_id="20260101-000000-aaaa")
    b = s.create_run(_spec(), run_id="20260101-000000-aaab")
    assert s.resolve("20260101-000000-aaaa") == a
    assert s.resolve("last") == b
    with pytest.raises(MemcoreError, match="ambiguous"):
        s.resolve("20260101")
    with pytest.raises(MemcoreError, match="no run"):
        s.resolve("zzz")


def test_runs_of_dead_processes_show_as_interrupted(tmp_path):
    s = Store(tmp_path)
    rid = s.create_run(_spec(), status="running")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    s._exec("UPDATE runs SET pid=? WHERE id=?", (int(dead.stdout), rid))
    live = s.create_run(_spec(), status="running")  # our own pid: alive
    s.close()
    s2 = Store(tmp_path)
    assert s2.run(rid)["status"] == "interrupted"
    assert s2.run(live)["status"] == "running"
    assert os.getpid() == s2.run(live)["pid"]


def test_filters_and_delete(tmp_path):
    s = Store(tmp_path)
    spec = _spec()
    a = s.create_run(spec)
    spec2 = RunSpec().to_dict()
    spec2["train"]["method"] = "sft"
    b = s.create_run(spec2)
    assert [r["id"] for r in s.runs(method="sft")] == [b]
    s.delete_run(a)
    assert [r["id"] for r in s.runs()] == [b]
    assert not (tmp_path / "runs" / a).exists()


def test_broken_database_file_gets_a_clear_message(tmp_path):
    (tmp_path / "runs.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MemcoreError, match="cannot be opened"):
        Store(tmp_path)
    assert (tmp_path / "runs.db").read_bytes().startswith(b"this is not sqlite")  # left untouched
