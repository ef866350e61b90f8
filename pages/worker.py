"""The job processes' side of :mod:`pages.jobs`: the tasks and a job process's main.

Kept apart from the pool and free of Streamlit, so that a job process (it imports this
module to run) loads torch and qcore but not Streamlit: an idle spare held 582 MB resident
(320 MB its own) against 616 MB (353 MB) when it imported the pool's module.
Each task is ``fn(payload, progress, should_stop)``: the payload names the model and the
data by reference (a session model comes with its bytes, ``model_bytes``, rebuilt and
checked against its SHA-256 by qcore.executors.load_refs); it returns plain picklable data
(tables, records, state bytes), never a live module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

# how much lower a job process's CPU priority is than the web process's (os.nice): the
# sliders of everyone else come first, a job takes the cores they leave
NICE_ENV, DEFAULT_NICE = "QP_JOB_NICE", 10


def _env_int(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        return default


Report = Callable[[int, int, dict], None]


def _sweep(payload: dict, progress: Report, _stop: Callable[[], bool]) -> Any:
    import qcore
    from qcore.executors import RAY_ADDRESS_ENV, RayExecutor

    address = os.environ.get(RAY_ADDRESS_ENV) or None
    executor = RayExecutor(address=address) if address else None
    data = qcore.DatasetRef.from_dict(payload["dataset"])
    calib = qcore.DatasetRef.from_dict(payload["calib"]) if payload.get("calib") else None
    grid = qcore.SweepGrid.from_dict(payload["grid"])
    return qcore.sweep(qcore.ModelRef.from_dict(payload["model"]), data, grid, calib=calib,
                       progress=progress, executor=executor,
                       model_bytes=payload.get("model_bytes"))  # fmt: skip


def _sensitivity(payload: dict, progress: Report, _stop: Callable[[], bool]) -> Any:
    """As pages.cache.sensitivity_table."""
    import qcore
    from qcore.executors import load_refs

    model, data, _ = load_refs(payload)
    return qcore.layer_sensitivity(
        model, data, bits=tuple(payload["bits"]), prune_rates=tuple(payload["rates"]),
        quant=qcore.QuantConfig(per_channel=payload["per_channel"]), progress=progress,
    )  # fmt: skip


def _mixed(payload: dict, progress: Report, _stop: Callable[[], bool]) -> Any:
    """As pages.cache.mixed_result, then the uniform widths' sweep the page draws beside it
    (pages.cache.sweep_table)."""
    import qcore
    from qcore.executors import load_refs

    model, data, calib = load_refs(payload)
    res = qcore.mixed_precision(
        model, data, payload["budget_bytes"], tuple(payload["candidates"]),
        quant=qcore.QuantConfig(per_channel=payload["per_channel"]), search_dataset=calib,
        progress=progress,
    )  # fmt: skip
    phase = "Measuring every uniform bit width on the test split"
    uniform = qcore.sweep(model, data, qcore.SweepGrid.from_dict(payload["grid"]),
                          progress=lambda d, t, _r: progress(d, t, {"phase": phase}))  # fmt: skip
    return res, uniform


def _finetune(payload: dict, progress: Report, should_stop: Callable[[], bool]) -> dict:
    """As pages.cache.finetune_run; the fine-tuned model comes back as its bytes and hash,
    the compressed one as its packed file."""
    import qcore
    from qcore.executors import load_dataset_ref, load_refs, pack_model
    from qcore.refs import state_sha256

    model, test, calib = load_refs(payload)
    train = load_dataset_ref({**payload["dataset"], "split": "train"})
    config = qcore.CompressionConfig.from_dict(payload["config"])
    ft = qcore.FinetuneConfig.from_dict(payload["ft"])
    res = qcore.finetune(model, train, config, ft, calib=calib, progress=progress,
                         should_stop=should_stop)  # fmt: skip
    comp = qcore.compress(res.model, config, calib=calib if payload["act"] else None)
    m, float_m = qcore.evaluate(comp.model, test), qcore.evaluate(res.model, test)
    return {"model_bytes": pack_model(res.model), "sha256": state_sha256(res.model),
            "history": res.history, "stopped": res.stopped, "seconds": res.seconds,
            "accuracy": m.accuracy, "float_accuracy": float_m.accuracy, "n": m.n,
            "size_bytes": comp.size_bytes, "packed": qcore.packed_bytes(comp)}  # fmt: skip


def _deep(payload: dict, progress: Report, _stop: Callable[[], bool]) -> dict:
    """As pages.cache.deep_result; the compressed model comes back as its packed file."""
    import qcore
    from qcore.executors import load_dataset_ref, load_refs

    model, test, calib = load_refs(payload)
    train = load_dataset_ref({**payload["dataset"], "split": "train"})
    n = payload["max_train"]
    if len(train) > n:  # as pages.cache.deep_train_split
        train = dataclasses.replace(train, x=train.x[:n], y=train.y[:n],
                                    indices=train.indices[:n])  # fmt: skip
    res = qcore.deep_compression(model, train, calib, prune_rate=payload["prune_rate"],
                                 bits=payload["bits"], epochs=payload["epochs"], test=test,
                                 progress=progress)  # fmt: skip
    return {"result": dataclasses.replace(res, compressed=None),
            "size_bytes": res.compressed.size_bytes, "packed": qcore.packed_bytes(res.compressed)}


def _robustness(payload: dict, progress: Report, _stop: Callable[[], bool]) -> dict:
    """Every curve of a Robustness run, as pages.cache.robustness_table computes each: a
    table, or the sentence of its ValueError, by (perturbation index, variant index)."""
    import qcore
    from qcore.executors import load_refs, refs_key, worker_memo

    model, data, calib = load_refs(payload)
    out: dict[tuple[int, int], Any] = {}
    curves = [(i, j) for i in range(len(payload["params"]))
              for j in range(len(payload["variants"]))]  # fmt: skip
    for k, (i, j) in enumerate(curves):
        prm, v = payload["params"][i], payload["variants"][j]
        bitflip = prm["perturbation"] == "bitflip"
        phase = f"{prm['perturbation']} on {v['label']}"
        try:
            if v["keeps_float"] and not bitflip:
                target = model
            else:
                key = ("robustness", *refs_key(payload), json.dumps(v["config"], sort_keys=True))
                comp = worker_memo(key, lambda v=v: qcore.compress(
                    model, qcore.CompressionConfig.from_dict(v["config"]),
                    calib=calib if v["needs_calib"] else None))  # fmt: skip
                target = comp if bitflip else comp.model
            ds, limit = data, prm["limit"]
            if limit is not None and limit < len(ds.y):  # as pages.cache._first_images
                ds = dataclasses.replace(ds, x=ds.x[:limit], y=ds.y[:limit],
                                         indices=ds.indices[:limit])  # fmt: skip
            out[i, j] = qcore.robustness(
                target, ds, prm["perturbation"], tuple(prm["strengths"]), steps=prm["steps"],
                progress=lambda d, t, _r, k=k, phase=phase: progress(
                    k * 100 + round(100 * d / max(t, 1)), 100 * len(curves), {"phase": phase}),
            )  # fmt: skip
        except ValueError as e:
            out[i, j] = str(e)
    return out


TASKS: dict[str, Callable[[dict, Report, Callable[[], bool]], Any]] = {
    "sweep": _sweep, "sensitivity": _sensitivity, "mixed": _mixed, "finetune": _finetune,
    "deep": _deep, "robustness": _robustness,
}  # fmt: skip
LIVE_ROWS = {"finetune"}  # tasks whose progress rows the page draws as they come (a chart)
GENTLE_STOP = {"finetune"}  # Stop asks these to end after the step and return what they have


def _job_main(start: Any, conn: Any, stop: Any) -> None:
    """A job process's main. It starts before a job needs it (the pool keeps one spare),
    lowers its priority and imports torch and qcore while it waits: seconds a job would
    otherwise spend starting. Then it runs the one job the pool sends over ``start``
    (``(task, payload, threads)``) as :func:`_worker`; the pool closing ``start`` instead
    (it shut down) ends it."""
    try:
        os.nice(_env_int(NICE_ENV, DEFAULT_NICE))
    except OSError:  # not allowed here: the job runs at the web process's priority
        pass
    import qcore  # noqa: F401 - what every task imports, loaded before the job comes
    import qcore.executors  # noqa: F401

    try:
        task, payload, threads = start.recv()
    except (EOFError, OSError):
        return
    finally:
        start.close()
    _worker(task, payload, conn, threads, stop)


def _worker(task: str, payload: dict, conn: Any, threads: int, stop: Any) -> None:
    """Run the task in this job process with the web process's torch thread count (so its
    numbers equal the in-process run's), send ("progress", done, total, phase, row) as it
    goes and ("ok", result) or ("error", is_value_error, message) at the end."""
    import torch

    torch.set_num_threads(threads)
    live = task in LIVE_ROWS

    def progress(done: int, total: int, row: dict) -> None:
        phase = row.get("phase") if isinstance(row, dict) else None
        conn.send(("progress", done, total, phase, dict(row) if live else None))

    try:
        conn.send(("ok", TASKS[task](payload, progress, stop.is_set)))
    except ValueError as e:  # a sentence for the user
        conn.send(("error", True, str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the page, not raised here
        conn.send(("error", False, f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
