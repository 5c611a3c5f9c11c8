"""From the published tables to pixels and LoRA files, and fresh raw pages from the Civitai API.

- [`fetch_images`]: the images of the `images` config as sharded parquet with an `image` column;
- [`fetch_loras`]: LoRA safetensors by `downloadUrl`, SHA-256 verified, ready for `imagegem w2w build`;
- [`crawl`]: `/api/v1/images` and `/api/v1/models` pages, as the raw input of `imagegem dataset build`.

All three resume where a killed run stopped and share one [`FetchConfig`] (concurrency, per-host rate, retries
with backoff honouring `Retry-After`, timeouts). Names are imported lazily, so registering the CLI commands stays
cheap.
"""

from __future__ import annotations

from imagegem_hf._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "FetchConfig": "imagegem_hf.fetch.client",
    "FetchOutcome": "imagegem_hf.fetch.client",
    "Fetcher": "imagegem_hf.fetch.client",
    "ImageFetchReport": "imagegem_hf.fetch.images",
    "fetch_images": "imagegem_hf.fetch.images",
    "fetched_image_loader": "imagegem_hf.fetch.images",
    "LoraFetchReport": "imagegem_hf.fetch.loras",
    "fetch_loras": "imagegem_hf.fetch.loras",
    "CrawlReport": "imagegem_hf.fetch.crawl",
    "crawl": "imagegem_hf.fetch.crawl",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
