"""kopf's own patches are sent again on 409 (``handlers/kopf_patching.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.clients import patching as kopf_patching_module

from kubeloop.handlers import kopf_patching


def conflict() -> kopf_errors.APIConflictError:
    return kopf_errors.APIConflictError("injected", status=409, headers={})


class Server:
    """The API server's answers to consecutive patches (the boundary, scripted)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []

    async def patch(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_a_409_is_sent_again_until_the_patch_lands() -> None:
    server = Server(conflict(), conflict(), {"metadata": {"resourceVersion": "7"}})
    send = kopf_patching.retrying(server.patch, delays=(0, 0, 0))
    assert asyncio.run(send(url="/x", payload={"status": {}})) == {
        "metadata": {"resourceVersion": "7"}
    }
    assert [c["payload"] for c in server.calls] == [{"status": {}}] * 3  # the same patch


def test_a_409_that_persists_is_raised_after_the_last_retry() -> None:
    server = Server(*(conflict() for _ in range(4)))
    send = kopf_patching.retrying(server.patch, delays=(0, 0, 0))
    with pytest.raises(kopf_errors.APIConflictError):
        asyncio.run(send(url="/x", payload={}))
    assert len(server.calls) == 4


def test_other_errors_are_left_to_kopf() -> None:
    unprocessable = kopf_errors.APIUnprocessableEntityError("test failed", status=422, headers={})
    server = Server(unprocessable)
    send = kopf_patching.retrying(server.patch, delays=(0, 0))
    with pytest.raises(kopf_errors.APIUnprocessableEntityError):
        asyncio.run(send(url="/x", payload=[]))
    assert len(server.calls) == 1  # a failed resourceVersion test is kopf's to handle


def test_install_wraps_the_function_kopfs_patching_calls_once() -> None:
    """The hook: kopf's patch_obj calls ``api.patch`` through the module at each call. If a
    kopf upgrade moves it, this fails (and the pin in pyproject.toml is what to revisit)."""
    original = kopf_api.patch
    shipped = original.__wrapped__ if hasattr(original, kopf_patching._MARK) else original  # type: ignore[attr-defined]
    kopf_api.patch = shipped
    try:
        kopf_patching.install()
        wrapped = kopf_api.patch
        kopf_patching.install()
        assert kopf_api.patch is wrapped  # not wrapped twice
        assert kopf_patching_module.api.patch is wrapped  # type: ignore[attr-defined]
        assert wrapped.__wrapped__ is shipped
    finally:
        kopf_api.patch = original


def test_at_most_in_flight_patches_are_sent_at_once() -> None:
    """A burst of objects patches at the same moment; the API server sees a bounded number
    of requests (and connections) at a time, and every patch is still sent."""
    under_way = peak = 0

    async def patch(**_: Any) -> dict[str, Any]:
        nonlocal under_way, peak
        under_way += 1
        peak = max(peak, under_way)
        await asyncio.sleep(0.01)
        under_way -= 1
        return {}

    send = kopf_patching.retrying(patch, delays=(), in_flight=4)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(send(url=f"/{i}") for i in range(40)))

    assert asyncio.run(burst()) == [{}] * 40
    assert peak == 4
