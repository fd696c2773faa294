"""The app's queue lives in the run store: it survives a killed server, a second app process on the same home
never starts a second trainer, and the CLI and the app can write the store at the same moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
from memcore.store import Store

ROOT = Path(__file__).resolve().parent.parent

# An app server as far as the queue is concerned: a Worker (the object every page talks to) that submits jobs
# given on the command line as JSON specs, then keeps serving until it is killed.
SERVER = r"""
import json, sys, time
from pathlib import Path
from jobs import Worker
from memcore.config import RunSpec
w = Worker(Path(sys.argv[1]))
for d in json.loads(sys.argv[2]):
    w.submit([RunSpec.from_dict(d)], session="server")
print("owner" if w.owner else "follower", flush=True)
while True:
    time.sleep(0.2)
"""


def _spec(model_dir, text, steps, **train):
    return RunSpec(model=ModelSpec(name=str(model_dir)), adapter=AdapterSpec(rank=2), data=DataSpec(text=text),
                   train=TrainSpec(method="sft", max_steps=steps, stop_when_recalled=False, **train))


def _server(home: Path, specs: list[RunSpec]) -> subprocess.Popen:
    import json

    env = dict(os.environ, MEMCORE_HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT / "app"), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(home), json.dumps([s.to_dict() for s in specs])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def _wait(cond, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(out) and not out.startswith("Z")


def test_the_queue_survives_a_killed_server(home, tiny_model_dir):
    from jobs import Worker

    long_run = _spec(tiny_model_dir, "the first job trains for a long while " * 3, 100_000, checkpoint_every=0.2)
    server = _server(home, [long_run, _spec(tiny_model_dir, "second in line", 3),
                            _spec(tiny_model_dir, "third in line", 3)])
    store = Store(home)
    try:
        assert server.stdout.readline().strip() == "owner"
        jobs = store.jobs()
        assert len(jobs) == 3 and [j["status"] for j in jobs][1:] == ["queued", "queued"]

        def training():
            j = store.job(jobs[0]["id"])
            return (j["run_ids"][0] and len(store.steps(j["run_ids"][0])) >= 5
                    and (home / "runs" / j["run_ids"][0] / "checkpoint.pt").exists())
        _wait(training, what="the first job to train and checkpoint")
        trainer = _children(server.pid)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    # the training process notices that its server is gone, keeps what it learned, and exits
    _wait(lambda: not any(_alive(p) for p in trainer), timeout=30, what="the orphaned trainer to exit")
    run_id = store.job(jobs[0]["id"])["run_ids"][0]

    w = Worker(home)  # the server comes back
    try:
        assert w.owner
        first = w.find(jobs[0]["id"])
        assert first.status == "interrupted" and store.run(run_id)["status"] == "interrupted"
        second, third = w.find(jobs[1]["id"]), w.find(jobs[2]["id"])
        _wait(lambda: not third.is_live, what="the queued jobs to run")
        assert second.status == third.status == "done" and second.started <= third.started
        assert third.runs[0].summary.steps == 3

        # one click: resume the interrupted run where its checkpoint left it
        stored = len(store.steps(run_id))
        again = w.submit([first.specs[0]], session="user", kind="resume", run_ids=[run_id])
        _wait(lambda: len(again.runs[0].steps) > 0 and again.runs[0].steps[-1] >= stored + 3,
              what="the resumed run to go on")
        w.stop(again)
        _wait(lambda: not again.is_live, what="the resumed run to stop")
        steps = [s.step for s in store.steps(run_id)]
        assert steps == list(range(len(steps))) and len(steps) > stored  # one unbroken history
        assert again.runs[0].steps[0] == 0  # the live view shows the history from before the restart too
    finally:
        w.close()


def test_a_second_app_process_queues_into_the_first_ones_trainer(home, tiny_model_dir):
    from jobs import Worker

    first = _server(home, [_spec(tiny_model_dir, "the first server's own job " * 3, 30)])
    try:
        assert first.stdout.readline().strip() == "owner"
        second = Worker(home)
        try:
            assert not second.owner and second._proc is None  # no second trainer on this device
            job = second.submit([_spec(tiny_model_dir, "submitted to the second server", 4)], session="b")
            assert second.position(job) == 1
            _wait(lambda: not second.find(job.id).is_live, what="the first server to train the second's job")
            assert job.status == "done" and job.runs[0].summary.steps == 4 and job.runs[0].steps == [0, 1, 2, 3, 4]
            # the first server goes away: the second takes over the lock and the queue
            first.send_signal(signal.SIGKILL)
            first.wait()
            later = second.submit([_spec(tiny_model_dir, "after the takeover", 2)], session="b")
            _wait(lambda: not second.find(later.id).is_live, what="the second server to take over")
            assert second.owner and later.status == "done"
        finally:
            second.close()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


WRITER = r"""
import sys, time, numpy as np
from pathlib import Path
from memcore.config import RunSpec
from memcore.pieces import Piece
from memcore.records import RunSummary, StepRow
from memcore.store import Store
s = Store(Path(sys.argv[1]))
end = time.time() + float(sys.argv[2])
n = 0
while time.time() < end:
    rid = s.create_run(RunSpec().to_dict())
    s.save_tokens(rid, [[1]], [[5] * 300], [Piece("x")] * 300, np.zeros(300))
    s.set_status(rid, "running")
    for k in range(0, 20, 5):
        s.write_steps(rid, [StepRow(step=k + i, loss=1.0, delta_loss=0.1, n_above=1, n_correct=1, n_tokens=300,
                                    active=1, recalled=False, first_divergence=0, elapsed=0.0, lr=1e-3, skipped=False,
                                    p=np.zeros(300, np.float16), correct=np.zeros(300, bool)) for i in range(5)])
    j = s.create_job([RunSpec().to_dict()], ["x"])
    s.claim_job()
    s.update_job(j, status="done")
    s.set_status(rid, "completed", summary=RunSummary.from_dict(dict(
        run_id=rid, steps=19, stop_reason="max_steps", recalled=False, first_divergence=0, n_tokens=300, n_above=1,
        n_correct=1, base_loss=1.1, loss=1.0, delta_loss=0.1, p_eff=10, bits_stored=1.0, bits_per_param=0.1,
        seconds_per_step=0.0, train_seconds=0.0, model="m", quant=None, method="sft", tau=0.5, rank=1, adapter_dir="",
        prompt_ids=[1], target_ids=[5] * 300, generated_ids=None)))
    n += 1
print(n)
"""


def test_the_cli_and_the_app_write_one_store_at_the_same_moment(home, tiny_model_dir):
    env = dict(os.environ, MEMCORE_HOME=str(home))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(home), "8"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    cli = subprocess.run([sys.executable, "-m", "memcore.cli", "train", "--model", str(tiny_model_dir),
                          "--sample", "orbit", "--max-steps", "40", "--full-budget", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    results = [w.communicate(timeout=300) for w in writers]
    assert cli.returncode == 0 and "locked" not in cli.stderr, cli.stderr[-2000:]
    for w, (out, err) in zip(writers, results):
        assert w.returncode == 0 and "locked" not in err, err[-2000:]
        assert int(out.strip()) > 0
    store = Store(home)
    assert len(store.runs(status="completed")) == 1 + sum(int(out) for out, _ in results)
