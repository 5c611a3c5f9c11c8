"""`imagegem dataset crawl`: fresh raw pages from the public Civitai REST API, as `imagegem dataset build` reads them.

`GET {base_url}/images` and `{base_url}/models` are paged with a cursor (`metadata.nextCursor`). Each answer is
written unchanged as `OUT/<resource>/page-NNNNNN.json` (atomically: a page file is always a whole answer), then the
cursor of the next page is recorded in `OUT/crawl_state.json`. A killed crawl resumes from the recorded cursor: at
worst it fetches the last page again and rewrites the same file, so no page is lost or duplicated. Requests are
sequential per resource (a cursor is known only once the previous page arrived) and rate-limited per host; an API
key is read from the environment (`CIVITAI_API_KEY` by default) and sent as a bearer token.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tqdm.auto import tqdm

from imagegem_hf.fetch.client import FetchConfig, Fetcher
from imagegem_hf.fetch.storage import FolderLock, remove_stale_temporaries, write_atomic, write_json_atomic

CIVITAI_API = "https://civitai.com/api/v1"
RESOURCES = ("images", "models")
STATE_FILE = "crawl_state.json"


@dataclass
class CrawlReport:
    """What one `crawl` run did, per resource.

    Attributes:
        pages: Pages written by this run.
        items: Items in those pages.
        finished: Resources whose last page has been fetched (no next cursor).
        stopped: Resources stopped by a fault, with the reason (rerun to resume).
    """

    pages: dict[str, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{r}: {self.pages.get(r, 0):,} pages, {self.items.get(r, 0):,} items" for r in self.pages]
        text = "; ".join(parts)
        if self.finished:
            text += f"; finished: {', '.join(self.finished)}"
        if self.stopped:
            text += "; stopped: " + ", ".join(f"{r} ({why}): run again to resume" for r, why in self.stopped.items())
        return text + "."


def _next_cursor(metadata: Any) -> str | None:
    if not isinstance(metadata, dict):
        return None
    cursor = metadata.get("nextCursor")
    if cursor not in (None, ""):
        return str(cursor)
    next_page = metadata.get("nextPage")
    if next_page:
        query = parse_qs(urlsplit(str(next_page)).query)
        for key in ("cursor", "page"):
            if query.get(key):
                return query[key][0]
    return None


def crawl(
    output_dir: str | os.PathLike,
    *,
    base_url: str = CIVITAI_API,
    resources: tuple[str, ...] = RESOURCES,
    page_size: int = 100,
    max_pages: int | None = None,
    params: dict[str, str] | None = None,
    api_key_env: str = "CIVITAI_API_KEY",
    config: FetchConfig | None = None,
    show_progress: bool = True,
) -> CrawlReport:
    """Crawl API pages into a raw dump folder; resumes from `crawl_state.json`.

    Args:
        output_dir: The raw dump folder (`images/`, `models/`, `crawl_state.json`).
        base_url: API root (the public Civitai API by default).
        resources: Which listings to crawl.
        page_size: Items per page (`limit`; Civitai allows up to 200 for images and 100 for models).
        max_pages: Stop each resource after this many pages in this run (None: until the last page).
        params: Extra query parameters (e.g. `{"sort": "Newest", "nsfw": "None"}`); must stay the same across
            resumed runs.
        api_key_env: Environment variable holding an API key (sent as `Authorization: Bearer ...` when set).
        config: Rate, retries and timeouts (default: one request per second per host).
        show_progress: Show a progress bar over pages.

    Returns:
        A [`CrawlReport`].

    Raises:
        ValueError: The folder was crawled with another base URL, page size or parameters.

    Example:
        ```python
        >>> from imagegem_hf.fetch.crawl import crawl
        >>> report = crawl("raw", max_pages=10, params={"sort": "Newest"})  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
        ```
    """
    unknown = set(resources) - set(RESOURCES)
    if unknown:
        raise ValueError(f"Unknown resource(s) {sorted(unknown)}; choose from {', '.join(RESOURCES)}.")
    config = config or FetchConfig(concurrency=1, requests_per_second=1.0)
    api_key = os.environ.get(api_key_env)
    if api_key:
        config.headers = {**dict(config.headers), "Authorization": f"Bearer {api_key}"}
    output_dir = Path(output_dir)
    settings = {"base_url": base_url.rstrip("/"), "page_size": page_size, "params": dict(params or {})}
    report = CrawlReport()
    with FolderLock(output_dir):
        state_path = output_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.exists() else {"settings": settings, "resources": {}}
        if state["settings"] != settings:
            raise ValueError(
                f"{output_dir} was crawled with {state['settings']}; resume with the same base URL, page size and "
                "parameters, or choose another folder."
            )
        for resource in resources:
            (output_dir / resource).mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(output_dir / resource)
        progress = tqdm(desc="Crawling", unit="page", disable=not show_progress)
        asyncio.run(_crawl(output_dir, settings, resources, max_pages, config, state, report, progress))
        progress.close()
    return report


async def _crawl(output_dir, settings, resources, max_pages, config, state, report, progress) -> None:
    state_path = output_dir / STATE_FILE
    async with Fetcher(config) as fetcher:
        for resource in resources:
            entry = state["resources"].setdefault(resource, {"pages": 0, "items": 0, "cursor": None, "done": False})
            report.pages[resource] = report.items[resource] = 0
            while not entry["done"] and (max_pages is None or report.pages[resource] < max_pages):
                query = {"limit": str(settings["page_size"]), **settings["params"]}
                if entry["cursor"] is not None:
                    query["cursor"] = entry["cursor"]
                outcome = await fetcher.get(f"{settings['base_url']}/{resource}", params=query)
                if not outcome.ok:
                    report.stopped[resource] = outcome.reason
                    break
                try:
                    page = json.loads(outcome.content)
                    items = page["items"]
                    if not isinstance(items, list):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    report.stopped[resource] = "an answer that is not a JSON page with an `items` list"
                    break
                write_atomic(output_dir / resource / f"page-{entry['pages']:06d}.json", outcome.content)
                cursor = _next_cursor(page.get("metadata"))
                if cursor is not None and cursor == entry["cursor"]:
                    report.stopped[resource] = f"the API returned cursor {cursor!r} again (a loop)"
                    break
                entry.update(
                    pages=entry["pages"] + 1, items=entry["items"] + len(items), cursor=cursor, done=cursor is None
                )
                write_json_atomic(state_path, state)  # after the page: a kill in between refetches the same page
                report.pages[resource] += 1
                report.items[resource] += len(items)
                progress.update()
            if entry["done"]:
                report.finished.append(resource)
