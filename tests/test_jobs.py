"""The app's job queue: one job trains at a time, others wait their turn and see their place."""

import time

import pytest

from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec


@pytest.fixture
def worker(home, tiny_model_dir):
    from jobs import Worker

    w = Worker(home, preload=ModelSpec(name=str(tiny_model_dir)))
    yield w
    w.close()


def _spec(model_dir, text, steps, method="sft"):
    return RunSpec(model=ModelSpec(name=str(model_dir)), adapter=AdapterSpec(rank=2), data=DataSpec(text=text),
                   train=TrainSpec(method=method, max_steps=steps, stop_when_recalled=False))


def _wait(cond, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_jobs_run_one_at_a_time_in_order_and_report_their_place(worker, tiny_model_dir):
    first = worker.submit([_spec(tiny_model_dir, "the first job trains for a while " * 4, 40)], session="a")
    second = worker.submit([_spec(tiny_model_dir, "the second job waits its turn", 2)], session="b")
    _wait(lambda: first.status == "running")
    assert second.status == "queued" and worker.position(second) == 1 and worker.position(first) == 0
    _wait(lambda: not first.is_live)
    _wait(lambda: not second.is_live)
    assert first.status == second.status == "done"
    assert second.started >= first.finished - 0.5  # never overlapped
    live = first.runs[0]
    assert live.steps == list(range(41)) and live.summary.steps == 40 and live.run_id == live.summary.run_id
    assert len(live.p_history) == 41 and len(live.p_history[-1]) == len(live.pieces)


def test_stop_keeps_what_was_learned_and_a_queued_job_never_starts(worker, tiny_model_dir):
    running = worker.submit([_spec(tiny_model_dir, "stop me soon please " * 5, 10_000)], session="a")
    queued = worker.submit([_spec(tiny_model_dir, "never started", 5)], session="b")
    _wait(lambda: len(running.runs[0].steps) >= 3)
    worker.stop(queued)
    assert queued.status == "stopped"
    worker.stop(running)
    _wait(lambda: not running.is_live)
    assert running.status == "stopped"
    summary = running.runs[0].summary
    assert summary.status == "stopped" and 3 <= summary.steps < 10_000
    run = worker.store.run(summary.run_id)
    assert run["status"] == "stopped" and (worker.store.adapter_dir(summary.run_id) / "adapter_config.json").is_file()
    assert queued.runs[0].run_id is None and len(worker.store.runs()) == 1


def test_a_failing_job_reports_its_error_and_the_queue_goes_on(worker, tiny_model_dir):
    impossible = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), adapter=AdapterSpec(rank=2, layers=(99,)),
                         data=DataSpec(text="x y"), train=TrainSpec(max_steps=2))
    bad = worker.submit([impossible], session="a")
    good = worker.submit([_spec(tiny_model_dir, "after the failure", 2)], session="b")
    _wait(lambda: not good.is_live)
    assert bad.status == "failed" and "layer 99 does not exist" in bad.error
    assert good.status == "done"


def test_old_finished_jobs_leave_memory_but_can_still_be_opened(worker, tiny_model_dir, monkeypatch):
    import jobs

    monkeypatch.setattr(jobs, "MAX_FINISHED_IN_MEMORY", 2)
    submitted = [worker.submit([_spec(tiny_model_dir, f"job number {i}", 1)], session="a") for i in range(4)]
    _wait(lambda: not submitted[-1].is_live)
    _wait(lambda: len(worker.jobs) <= 2)
    assert submitted[0].id not in worker.jobs and submitted[-1].id in worker.jobs
    again = worker.find(submitted[0].id)  # read back from the store, history and all
    assert again is not submitted[0] and again.status == "done" and again.runs[0].steps == [0, 1]
    assert again.runs[0].summary.steps == 1


def test_a_server_shutting_down_leaves_its_run_resumable(home, tiny_model_dir):
    from jobs import Worker

    from memcore.runner import resumable_step

    w = Worker(home)
    job = w.submit([_spec(tiny_model_dir, "shut down while this trains " * 3, 100_000)], session="a")
    _wait(lambda: len(job.runs[0].steps) >= 3)
    w.close()  # what the server does at exit
    store = type(w.store)(home)
    run = store.run(job.runs[0].run_id)
    assert store.job(job.id)["status"] == "interrupted" and run["status"] == "interrupted"
    # stopped after its step, checkpoint of that step saved
    assert resumable_step(store, run["id"]) == run["steps"] >= 3
    assert (store.adapter_dir(run["id"]) / "adapter_config.json").is_file()
    from memcore.service import trainer_lock

    trainer_lock(home).acquire(timeout=0)  # the lock is free for the next server


def test_a_job_the_dispatcher_claims_before_submit_returns_still_lets_the_next_one_start(worker, tiny_model_dir,
                                                                                         monkeypatch):
    """Submit queues the job in the store before it records its own Job: a dispatcher that claims it in between
    feeds a Job of its own. Both must be one object, or the finished job is never cleared as current and every
    later job waits in the queue for good (seen in the browser test about once in 27 starts)."""
    import threading

    from jobs import Job

    real = Job.from_row.__func__

    def slow(cls, row):  # widen the gap on the page's side only, so the dispatcher always claims first
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.5)
        return real(cls, row)

    monkeypatch.setattr(Job, "from_row", classmethod(slow))
    first = worker.submit([_spec(tiny_model_dir, "claimed before submit returns", 2)], session="a")
    assert worker.find(first.id) is first  # the page and the dispatcher hold the same Job
    _wait(lambda: not first.is_live)
    second = worker.submit([_spec(tiny_model_dir, "and the next one still starts", 2)], session="a")
    _wait(lambda: not second.is_live, timeout=60)
    assert first.status == second.status == "done"
