"""interleaved_median_times: the round order, the inputs in turn and the untimed ``before`` hook."""

from __future__ import annotations

from jaxsparse.testing import interleaved_median_times


def test_interleaved_rounds_cycle_inputs_and_call_before_each_timed_call():
    calls = []

    def recorder(name):
        def fn(value):
            calls.append((name, value))
            return value
        return fn

    fns = {"a": recorder("a"), "b": recorder("b")}
    seconds = interleaved_median_times(fns, [(1,), (2,), (3,)], 4, before=lambda: calls.append(("before", None)))
    assert set(seconds) == {"a", "b"} and all(value >= 0.0 for value in seconds.values())
    warm_up = [("a", 1), ("b", 1)]
    rounds = []
    for turn in range(4):
        value = (1, 2, 3)[turn % 3]
        rounds += [("before", None), ("a", value), ("before", None), ("b", value)]
    assert calls == warm_up + rounds
