"""A polite, fault-tolerant HTTP downloader shared by the image, LoRA and API-page fetchers.

Built on `aiohttp`: it spends 0.35 ms of CPU per request where httpx spends 4.5 ms (same local server, 32 requests
in flight), which decides whether a large fetch is bound by latency or by the CPU. Bounded concurrency, a per-host
request rate, timeouts, retries with exponential backoff and jitter on 429 / 5xx / connection errors (honouring
`Retry-After`), a redirect limit, and one outcome per URL that says what happened (`FetchOutcome.reason`) instead
of an exception. Bodies can be kept in memory or streamed into a file while being hashed, so a multi-GB LoRA never
sits in memory.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

# Reasons of failures that a later run may cure (the shard or file is then left to be fetched again).
TRANSIENT_REASONS = frozenset({"timeout", "connection error", "truncated body", "server error", "rate limited"})


@dataclass
class FetchConfig:
    """How a fetch job talks to servers.

    Example:
        ```python
        >>> from imagegem_hf.fetch.client import FetchConfig
        >>> FetchConfig(concurrency=32, requests_per_second=20).retries
        4
        ```
    """

    concurrency: int = field(default=16, metadata={"help": "Requests in flight at once, over all hosts."})
    requests_per_second: float | None = field(
        default=10.0, metadata={"help": "Request rate per host (None: unlimited). Be kind to public servers."}
    )
    retries: int = field(default=4, metadata={"help": "Retries after the first attempt on 429/5xx/timeouts."})
    backoff: float = field(default=0.5, metadata={"help": "Base of the exponential backoff, in seconds."})
    max_backoff: float = field(
        default=60.0, metadata={"help": "Longest wait before a retry, in seconds (also caps Retry-After)."}
    )
    timeout: float = field(default=30.0, metadata={"help": "Connect/read/write timeout of one attempt, seconds."})
    max_redirects: int = field(default=5, metadata={"help": "Redirects followed before giving up (loops stop)."})
    user_agent: str = field(default="imagegem_hf", metadata={"help": "User-Agent header of every request."})
    headers: Mapping[str, str] = field(default_factory=dict, metadata={"help": "Extra headers (e.g. an API key)."})

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}.")
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be > 0 or None, got {self.requests_per_second}.")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}.")


@dataclass
class FetchOutcome:
    """What became of one URL.

    Attributes:
        url: The requested URL.
        ok: Whether a body was received and accepted.
        content: The body (in-memory fetches) or None.
        path: The file the body was streamed into (file fetches) or None.
        sha256: Hex SHA-256 of the body (file fetches).
        status: The last HTTP status, or None when no response came.
        reason: Why it failed (`""` when ok): "http 404", "timeout", "redirect loop", "content type text/html", ...
        attempts: Requests made for this URL.
        content_type: The response's `Content-Type` header.
    """

    url: str
    ok: bool
    content: bytes | None = None
    path: Path | None = None
    sha256: str | None = None
    status: int | None = None
    reason: str = ""
    attempts: int = 0
    content_type: str = ""

    @property
    def transient(self) -> bool:
        """Whether a later attempt may succeed (the server was down, slow or overloaded)."""
        return not self.ok and self.reason in TRANSIENT_REASONS


class _HostLimiter:
    """Spaces requests to one host at least `1 / rate` seconds apart."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 0.0 if rate is None else 1.0 / rate
        self.next_time = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            delay = self.next_time - now
            self.next_time = max(now, self.next_time) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date), or None if absent/invalid.

    Example:
        ```python
        >>> from imagegem_hf.fetch.client import retry_after_seconds
        >>> retry_after_seconds("3")
        3.0
        ```
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# A check of a response before its body is read: returns a failure reason, or "" to accept it.
ResponseCheck = Callable[[aiohttp.ClientResponse], str]


class Fetcher:
    """Downloads URLs concurrently with retries; use as an async context manager.

    Args:
        config: Concurrency, rate, retry and timeout settings.

    Example:
        ```python
        >>> import asyncio
        >>> from imagegem_hf.fetch.client import FetchConfig, Fetcher
        >>> async def main(urls):
        ...     async with Fetcher(FetchConfig(concurrency=8)) as fetcher:
        ...         return await asyncio.gather(*(fetcher.get(u) for u in urls))
        >>> outcomes = asyncio.run(main(["http://127.0.0.1:8000/a.png"]))  # doctest: +SKIP
        ```
    """

    def __init__(self, config: FetchConfig | None = None) -> None:
        self.config = config or FetchConfig()
        self._client: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._limiters: dict[str, _HostLimiter] = {}
        self.requests = 0

    async def __aenter__(self) -> Fetcher:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.timeout, sock_connect=self.config.timeout, sock_read=self.config.timeout
        )
        self._client = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=self.config.concurrency),
            headers={"User-Agent": self.config.user_agent, **dict(self.config.headers)},
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        assert self._client is not None
        await self._client.close()
        self._client = None

    def _limiter(self, url: str) -> _HostLimiter:
        host = urlsplit(url).netloc
        if host not in self._limiters:
            self._limiters[host] = _HostLimiter(self.config.requests_per_second)
        return self._limiters[host]

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        wait = self.config.backoff * (2**attempt) * (0.5 + random.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.config.max_backoff)

    async def get(
        self,
        url: str,
        *,
        check: ResponseCheck | None = None,
        to_file: str | Path | None = None,
        params: Mapping[str, str] | None = None,
        json: Any = None,
    ) -> FetchOutcome:
        """Fetch one URL (a GET, or a POST of `json` when it is given); never raises for network or server faults.

        Args:
            url: The URL.
            check: Called on a 2xx response before its body is read; a non-empty return refuses it (no retry).
            to_file: Stream the body into this file (hashed on the way) instead of keeping it in memory. The file
                is removed when the fetch fails.
            params: Query parameters.
            json: A JSON body to POST (e.g. a chat-completions request) instead of a GET.

        Returns:
            A [`FetchOutcome`].
        """
        if self._client is None:
            raise RuntimeError("Fetcher.get() outside `async with Fetcher(...)`.")
        method = "GET" if json is None else "POST"
        outcome = FetchOutcome(url=url, ok=False)
        for attempt in range(self.config.retries + 1):
            retry_after = None
            async with self._slots:
                await self._limiter(url).wait()
                outcome.attempts += 1
                self.requests += 1
                try:
                    async with self._client.request(
                        method, url, params=params, json=json, max_redirects=self.config.max_redirects
                    ) as response:
                        outcome.status = response.status
                        outcome.content_type = response.headers.get("Content-Type", "")
                        if response.status in RETRY_STATUSES:
                            outcome.reason = "rate limited" if response.status == 429 else "server error"
                            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                        elif response.status >= 400:
                            outcome.reason = f"http {response.status}"
                            return outcome
                        else:
                            refused = check(response) if check else ""
                            if refused:
                                outcome.reason = refused
                                return outcome
                            await self._read_body(response, outcome, to_file)
                            outcome.ok, outcome.reason = True, ""
                            return outcome
                except aiohttp.TooManyRedirects:
                    outcome.reason = "redirect loop"
                    return outcome
                except TimeoutError:
                    outcome.reason = "timeout"
                except aiohttp.ClientPayloadError:
                    outcome.reason = "truncated body"  # the server closed before sending the announced bytes
                except (aiohttp.ClientError, OSError):
                    outcome.reason = "connection error"
                finally:
                    if not outcome.ok and to_file is not None:
                        Path(to_file).unlink(missing_ok=True)
            if attempt < self.config.retries:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        return outcome

    @staticmethod
    async def _read_body(response: aiohttp.ClientResponse, outcome: FetchOutcome, to_file: str | Path | None) -> None:
        if to_file is None:
            outcome.content = await response.read()
            return
        digest = hashlib.sha256()
        with open(to_file, "wb") as handle:
            async for chunk in response.content.iter_chunked(1 << 20):
                digest.update(chunk)
                handle.write(chunk)
        outcome.path = Path(to_file)
        outcome.sha256 = digest.hexdigest()
