"""The Prefect API a process reports to, and stage functions as Prefect tasks."""
from __future__ import annotations

import os
from collections.abc import Callable


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to; without PREFECT_API_URL that is a temporary local server, which
    this starts now (the same one the flows of this process then use)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    url = PREFECT_API_URL.value()
    if not url and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    return url


def share_prefect_api() -> str | None:
    """prefect_api_url(), exported as PREFECT_API_URL so that processes started from here (task-runner workers)
    report to the same server instead of each starting a temporary one."""
    url = prefect_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url


def stage_task(fn: Callable, name: str, retries: int):
    """A stage function as a Prefect task with orchestration.retries retries (no result caching: the stages'
    checkpoints decide what is redone, so a retry of a training stage resumes from its last epoch)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(fn, name=name, retries=retries, retry_delay_seconds=1, cache_policy=NO_CACHE)
