"""pytest plugin for run_all.py's GPU test phase: representative cases first, and a time budget for the session.

Order: the cases of each test function are spread over its parameter grid (first, last, middle, quarters, ...) and
the functions take turns, so a budget that runs out part-way has still run every test function on cases from across
its grid. Budget: once DINOV3_TEST_BUDGET_S seconds have passed since the session started, every test not yet started
is skipped with BUDGET_REASON (run_all.py counts those apart from ordinary skips). With pytest-timeout installed, a
test still running DINOV3_TEST_GRACE_S seconds after the budget ended fails with pytest-timeout's "Timeout" (reported
apart too), so that the session ends by itself and writes its report.
"""

from __future__ import annotations

import os
import time

import pytest

BUDGET_REASON = "not run: the GPU test phase's time budget was used up"
_start = time.monotonic()


def spread(n: int) -> list:
    """0..n-1 in van der Corput order scaled to n (0, n/2, n/4, 3n/4, ...), then the last: early prefixes cover the
    whole range."""
    order, seen, i = [], set(), 0
    while len(order) < n:
        f, denom, k = 0.0, 1.0, i
        while k:
            denom *= 2
            f += (k & 1) / denom
            k >>= 1
        idx = int(f * n)
        if idx not in seen:
            seen.add(idx)
            order.append(idx)
            if len(order) == 1 and n > 1:  # the last case early: it is often the largest shape
                seen.add(n - 1)
                order.append(n - 1)
        i += 1
    return order


def representative_order(items: list) -> list:
    groups: dict = {}
    for item in items:
        groups.setdefault(item.nodeid.split("[", 1)[0], []).append(item)
    spread_groups = [[g[i] for i in spread(len(g))] for g in groups.values()]
    ordered = []
    for r in range(max((len(g) for g in spread_groups), default=0)):
        ordered += [g[r] for g in spread_groups if r < len(g)]
    return ordered


def pytest_sessionstart(session):
    global _start
    _start = time.monotonic()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    items[:] = representative_order(items)


def _budget() -> float:
    return float(os.environ.get("DINOV3_TEST_BUDGET_S", "inf"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    # Before pytest-timeout's own wrapper reads the item's timeout marker.
    if item.config.pluginmanager.hasplugin("timeout") and _budget() != float("inf"):
        left = _budget() + float(os.environ.get("DINOV3_TEST_GRACE_S", "30")) - (time.monotonic() - _start)
        marker = item.get_closest_marker("timeout")
        own = marker.args[0] if marker is not None and marker.args else None
        item.add_marker(pytest.mark.timeout(max(1.0, left if own is None else min(own, left))))
    yield


def pytest_runtest_setup(item):
    if time.monotonic() - _start > _budget():
        pytest.skip(BUDGET_REASON)
