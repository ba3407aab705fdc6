"""The Prefect API that task-runner workers report to, and stage functions as Prefect tasks.

A flow reports to PREFECT_API_URL when it is set (a team's server, a deployment's worker), else to the temporary
local server Prefect starts for the process (on the loopback interface, gone with the process).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable


def start_in_background() -> Callable[[], None]:
    """Without PREFECT_API_URL, start now, in a thread, the temporary server that Prefect would start for this
    process when its first flow runs (Prefect's own, on 127.0.0.1), so that it starts while the caller imports and
    checks its config; returns a function that waits until it answers."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread.join


def share_prefect_api() -> str:
    """The API this process reports to, exported as PREFECT_API_URL so that processes started from here
    (task-runner workers) report to the same server instead of each starting a temporary one of its own."""
    from prefect.client.orchestration import get_client

    url = str(get_client(sync_client=True).api_url).rstrip("/")
    os.environ["PREFECT_API_URL"] = url
    return url


def worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn of every task of the flows: retry a failure that may pass on another try (a lost
    worker, a dropped connection), not one that fails the same way on every try (dna.errors.fails_alike: a bad
    config, a missing input, a diverging loss, a failed parity check)."""
    from dna.errors import fails_alike

    error = state.data if isinstance(state.data, BaseException) else None
    return error is None or not fails_alike(error)


def stage_task(fn: Callable, name: str, retries: int):
    """A stage function as a Prefect task with orchestration.retries retries of what is worth retrying (no result
    caching: the stages' checkpoints decide what is redone, so a retry of a training stage resumes from its last
    epoch)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(fn, name=name, retries=retries, retry_delay_seconds=1, retry_condition_fn=worth_retrying,
                cache_policy=NO_CACHE)
