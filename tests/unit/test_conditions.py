from __future__ import annotations

import datetime as dt

from kubeloop.contract.durations import rfc3339
from kubeloop.planning.conditions import find, is_true, set_condition

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=5)


def test_new_condition_gets_transition_time_and_generation() -> None:
    conds = set_condition([], "Ready", "True", "Reconciled", "ok", generation=3, now=T0)
    assert conds[0].last_transition_time == "2026-01-01T12:00:00Z"
    assert conds[0].observed_generation == 3
    assert is_true(conds, "Ready")


def test_transition_time_moves_only_when_status_flips() -> None:
    conds = set_condition([], "Ready", "True", "A", "", generation=1, now=T0)
    same = set_condition(conds, "Ready", "True", "B", "new message", generation=2, now=T1)
    assert find(same, "Ready").last_transition_time == rfc3339(T0)  # type: ignore[union-attr]
    assert find(same, "Ready").reason == "B"  # type: ignore[union-attr]
    assert find(same, "Ready").observed_generation == 2  # type: ignore[union-attr]
    flipped = set_condition(same, "Ready", "False", "C", "", generation=2, now=T1)
    assert find(flipped, "Ready").last_transition_time == rfc3339(T1)  # type: ignore[union-attr]
    assert not is_true(flipped, "Ready")


def test_other_conditions_are_kept_in_order() -> None:
    conds = set_condition([], "Ready", "True", "A", "", generation=1, now=T0)
    conds = set_condition(conds, "Degraded", "False", "A", "", generation=1, now=T0)
    conds = set_condition(conds, "Ready", "False", "B", "", generation=1, now=T1)
    assert [c.type for c in conds] == ["Ready", "Degraded"]
