"""Instant queries against Prometheus, with the errors mapped for the rollout.

``prometheus_api_client.PrometheusConnect`` is synchronous: every call runs in a worker thread so
the operator's event loop never blocks. Errors come out as three kinds:

- ``PrometheusUnavailable``: connection refused, timeout, 5xx or another unexpected answer —
  it may heal, retry later (``kopf.TemporaryError``).
- ``InvalidQuery``: Prometheus rejected the query (HTTP 400/422) — it will not heal.
- ``AmbiguousQuery``: a query meant to yield one number yielded several series.

A result that is empty, NaN or ±Inf comes back as ``None``: the caller must treat it as
inconclusive, never as a pass.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from kubeloop.planning.promql import InvalidQuery

__all__ = ["AmbiguousQuery", "InvalidQuery", "PrometheusClient", "PrometheusUnavailable"]


class PrometheusUnavailable(Exception):
    """Prometheus could not answer (unreachable, timed out, 5xx): retry later."""


class AmbiguousQuery(ValueError):
    """A query that should yield one value yielded several series."""


class _HTTPStatus(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(status, error)
        self.status = status
        self.error = error


def _raise_for_status(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """A response hook: keep the status code and Prometheus' own error text.

    (``PrometheusConnect`` folds both into one message string.)
    """
    if response.status_code == 200:
        return
    try:
        error = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        error = response.text[:500]
    raise _HTTPStatus(response.status_code, error)


class PrometheusClient:
    """Instant queries for analyses: one number, or one number per label value."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        session = requests.Session()
        session.hooks["response"].append(_raise_for_status)
        # No retries in here: the caller retries with backoff; a query must fail fast.
        self._prom = PrometheusConnect(
            url=self.url, session=session, retry=Retry(total=0, raise_on_status=False)
        )

    def close(self) -> None:
        self._prom.close()

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def query_value(self, promql: str) -> float | None:
        """The single value of ``promql``; ``None`` when empty, NaN or ±Inf (inconclusive)."""
        result = await self._query(promql)
        if not result:
            return None
        if _is_scalar(result):
            return _finite(result[1])
        samples = [_sample(series, promql) for series in result]
        if len(result) > 1:
            labels = ", ".join(json.dumps(s.get("metric", {}), sort_keys=True) for s in result[:5])
            raise AmbiguousQuery(
                f"query {promql!r} returned {len(result)} series where one value was expected "
                f"(e.g. {labels}): aggregate it, e.g. with sum(...)"
            )
        return _finite(samples[0])

    async def query_vector(self, promql: str, label: str | None = None) -> dict[str, float]:
        """``{label value: value}`` for a ``sum by (label) (...)`` query.

        Without ``label``, each series must carry at most one label (as ``sum by (x)`` yields)
        and is keyed by its value. A series without the label counts under ``""``; NaN and ±Inf
        samples are left out; two series with the same key raise ``AmbiguousQuery``.
        """
        result = await self._query(promql)
        if result and _is_scalar(result):
            raise InvalidQuery(f"query {promql!r} returned a scalar, not a vector by label")
        values: dict[str, float] = {}
        for series in result:
            metric = series.get("metric", {}) if isinstance(series, dict) else {}
            if label is not None:
                key = str(metric.get(label, ""))
            elif len(metric) <= 1:
                key = str(next(iter(metric.values()), ""))
            else:
                raise AmbiguousQuery(
                    f"query {promql!r} returned series with several labels "
                    f"({json.dumps(metric, sort_keys=True)}): "
                    "aggregate it with sum by (label) (...)"
                )
            if key in values:
                raise AmbiguousQuery(
                    f"query {promql!r} returned several series for {label or 'label'}={key!r}: "
                    "aggregate it with sum by (label) (...)"
                )
            value = _finite(_sample(series, promql))
            if value is not None:
                values[key] = value
        return values

    async def query_table(
        self, promql: str, labels: tuple[str, ...]
    ) -> dict[tuple[str, ...], float]:
        """``{(label values…): value}`` for a ``sum by (labels…) (...)`` query; a label a
        series lacks counts as ""; NaN and ±Inf samples are left out."""
        result = await self._query(promql)
        if result and _is_scalar(result):
            raise InvalidQuery(f"query {promql!r} returned a scalar, not a vector by label")
        table: dict[tuple[str, ...], float] = {}
        for series in result:
            metric = series.get("metric", {}) if isinstance(series, dict) else {}
            key = tuple(str(metric.get(label, "")) for label in labels)
            if key in table:
                where = dict(zip(labels, key, strict=True))
                raise AmbiguousQuery(
                    f"query {promql!r} returned several series for {where}: "
                    f"aggregate it with sum by ({', '.join(labels)}) (...)"
                )
            value = _finite(_sample(series, promql))
            if value is not None:
                table[key] = value
        return table

    async def _query(self, promql: str) -> list[Any]:
        try:
            result = await asyncio.to_thread(
                self._prom.custom_query,
                promql,
                # Prometheus gives up on its side too, instead of computing for nobody
                # (in float seconds: its duration syntax has no fractions, "0.5s" is a 400).
                params={"timeout": f"{self.timeout:g}"},
                timeout=self.timeout,
            )
        except _HTTPStatus as exc:
            if exc.status in (400, 422):
                raise InvalidQuery(
                    f"Prometheus at {self.url} rejected the query {promql!r}: {exc.error}"
                ) from None
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} answered HTTP {exc.status}: {exc.error}"
            ) from None
        except requests.RequestException as exc:  # refused, reset, timeout, not JSON
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} is unavailable: {type(exc).__name__}: {exc}"
            ) from exc
        except (KeyError, TypeError) as exc:
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} sent an unexpected answer: {exc!r}"
            ) from exc
        if not isinstance(result, list):
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} sent an unexpected result: {result!r:.200}"
            )
        return result


def _is_scalar(result: list[Any]) -> bool:
    """A scalar (or string) result is ``[timestamp, "value"]``; a vector is a list of series."""
    return len(result) == 2 and isinstance(result[0], (int, float)) and isinstance(result[1], str)


def _sample(series: Any, promql: str) -> str:
    if not isinstance(series, dict) or "value" not in series:
        # A range vector ("values"): the query misses a function such as rate(...).
        raise InvalidQuery(
            f"query {promql!r} did not return an instant vector; "
            "wrap range selectors in a function such as rate(...)"
        )
    return str(series["value"][1])


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
