"""The retry policy of the shared HTTP client: Retry-After is honoured (seconds or HTTP date) and capped."""

from __future__ import annotations

import email.utils

import pytest

from imagegem_hf.fetch.client import FetchConfig, Fetcher, retry_after_seconds


def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after_seconds("7") == 7.0
    now = 1_800_000_000.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_the_wait_before_a_retry_is_at_least_retry_after_and_at_most_max_backoff():
    fetcher = Fetcher(FetchConfig(backoff=0.01, max_backoff=20.0))
    assert all(fetcher._backoff(0, 3.0) == 3.0 for _ in range(20))  # jittered backoff (≤ 0.015 s) < Retry-After
    assert fetcher._backoff(0, 600.0) == 20.0  # a huge Retry-After is capped
    waits = [fetcher._backoff(attempt, None) for attempt in range(4)]
    assert all(0.005 * 2**a <= w <= 0.015 * 2**a for a, w in enumerate(waits))  # exponential with ±50% jitter


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="concurrency"):
        FetchConfig(concurrency=0)
    with pytest.raises(ValueError, match="requests_per_second"):
        FetchConfig(requests_per_second=0)
