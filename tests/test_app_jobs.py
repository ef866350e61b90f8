"""The analysis pages' heavy work in the job pool (pages/jobs.py, ``QP_JOB_WORKERS=1``): the
page submits a job, a worker process computes it, and the page draws the same numbers as
the in-process computation (pages.cache); a model made in the session goes to the worker as
its bytes and hash."""

from __future__ import annotations

import os

import pandas as pd
from test_app import needs_sample, ok
from test_app_analysis import TITLES, open_page
from test_app_finetune import open_finetune
from test_jobs import _until

import qcore
from pages import cache
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef, state_sha256

MLP, DIGITS = ModelRef("digits-mlp"), DatasetRef("digits")


def _jobs(jobs, task: str) -> list:
    """The pool's jobs of ``task``, oldest first, each checked to have run in a worker."""
    found = [j for j in jobs.pool()._jobs.values() if j.task == task]
    for j in found:
        assert j.state == "done", j.error
        assert j._process is not None and j._process.pid != os.getpid()  # not this process
    return found


def _sensitivity(at, bits=(2, 8), rates=(0.5,)):
    at.multiselect(key="sens_bits").set_value(list(bits))
    at.multiselect(key="sens_prune").set_value(list(rates))
    at.button(key="sens_run").click().run()
    ok(at, TITLES["sensitivity"])


@needs_sample
def test_sensitivity_runs_in_a_worker_and_draws_the_in_process_table(one_job_worker) -> None:
    at = open_page("sensitivity", "digits-mlp")
    spare = one_job_worker.pool()._spare  # opening the page started the pool's spare process
    assert spare is not None and spare.process.is_alive()
    _sensitivity(at)
    (job,) = _jobs(one_job_worker, "sensitivity")
    assert job._process is spare.process  # the job ran in it
    ref = cache.sensitivity_table(MLP, DIGITS, (2, 8), (0.5,), False)  # the in-process table
    pd.testing.assert_frame_equal(job.result, ref, check_exact=True)
    shown = next(d.value for d in at.dataframe)
    assert list(shown["accuracy"]) == list(ref["accuracy"])
    # a rerun (any widget) finds the finished job by its key: nothing runs again
    at.select_slider(key="sens_sqnr_bits").set_value(8).run()
    ok(at, TITLES["sensitivity"])
    assert _jobs(one_job_worker, "sensitivity") == [job]


@needs_sample
def test_finetune_trains_in_a_worker_and_its_model_goes_to_workers_as_bytes(
    one_job_worker,
) -> None:
    at = open_finetune(model="digits-mlp", dataset="digits", bits="2")
    at.button(key="ft_train").click().run()
    ok(at, "Fine-tune")
    ft, settings = qcore.FinetuneConfig(), Settings(bits=2).canonical()
    outcome = at.session_state["finetune_runs"][(MLP, DIGITS, settings, ft)]
    (job,) = _jobs(one_job_worker, "finetune")
    assert outcome.compressed is None and outcome.packed  # it came back from the worker
    ref = cache.finetune_run(MLP, DIGITS, settings, ft)  # the in-process run
    assert state_sha256(outcome.result.model) == state_sha256(ref.result.model)
    assert (outcome.accuracy, outcome.float_accuracy, outcome.size_bytes) == (
        ref.accuracy, ref.float_accuracy, ref.size_bytes)  # fmt: skip
    assert outcome.packed_bytes() == ref.packed_bytes()
    pd.testing.assert_frame_equal(outcome.result.history.drop(columns="seconds"),
                                  ref.result.history.drop(columns="seconds"))  # fmt: skip

    # the fine-tuned model, opened in the session, is sent to the next job as bytes + hash
    # (the pool's own page helper builds the payload from the module the session holds)
    at.button(key="ft_open").click().run()
    name = at.session_state["model"]
    ref_model = ModelRef(name, sha256=state_sha256(ref.result.model))
    payload = one_job_worker.refs_payload(ref_model, DIGITS)
    assert payload["model"] == {"name": name, "sha256": ref_model.sha256}
    assert isinstance(payload["model_bytes"], bytes)
    sens = one_job_worker.pool().submit(("sens-ft",), "s", "sensitivity", {
        **payload, "bits": [2], "rates": [], "per_channel": False})  # fmt: skip
    _until(lambda: sens.finished)
    assert sens.state == "done", sens.error
    expected = qcore.layer_sensitivity(ref.result.model, qcore.load_dataset("digits"),
                                       bits=(2,), prune_rates=())  # fmt: skip
    pd.testing.assert_frame_equal(sens.result, expected, check_exact=True)


@needs_sample
def test_with_no_workers_the_page_runs_in_process(jobs_in_process) -> None:
    at = open_page("sensitivity", "digits-mlp")
    _sensitivity(at)
    assert jobs_in_process.pool().workers == 0
    assert not list(jobs_in_process.pool()._jobs.values())  # nothing went to the pool
    assert next(d.value for d in at.dataframe)["layer"].tolist() == ["fc1"] * 3 + ["fc2"] * 3
