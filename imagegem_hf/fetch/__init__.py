"""From the published tables to pixels and LoRA files, and fresh raw pages from the Civitai API.

- [`fetch_images`]: the images of the `images` config as sharded parquet with an `image` column;
- [`fetch_loras`]: LoRA safetensors by `downloadUrl`, SHA-256 verified, ready for `imagegem w2w build`;
- [`crawl`]: `/api/v1/images` and `/api/v1/models` pages, as the raw input of `imagegem dataset build`.

All three resume where a killed run stopped and share one [`FetchConfig`] (concurrency, per-host rate, retries
with backoff honouring `Retry-After`, timeouts).
"""

from imagegem_hf.fetch.client import FetchConfig, Fetcher, FetchOutcome
from imagegem_hf.fetch.images import ImageFetchReport, fetch_images

__all__ = ["FetchConfig", "FetchOutcome", "Fetcher", "ImageFetchReport", "fetch_images"]
