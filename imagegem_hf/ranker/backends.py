"""Where `VLMRankerPipeline`'s replies come from: an in-process transformers model, or an inference server.

Both backends take the same requests — `(content, images)` pairs in the transformers chat-content format
(`{"type": "text", ...}` and `{"type": "image"}` parts, the images in order) — and return one reply per request,
so the pipeline's prompts, randomized scoring and parser are the same whichever serves the model.

`OpenAIChatBackend` talks to any OpenAI-compatible chat-completions endpoint (vLLM's `vllm serve`, TGI, SGLang):
images travel as base64 PNG data URLs, requests run concurrently (bounded), with timeouts and retries with backoff
on 429/5xx and dropped connections. A request that still fails gives a [`FailedReply`] (an empty reply that says
why), never an exception, so one dead server costs the affected candidates their VLM score, not the run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

# One request: chat content parts and the images its {"type": "image"} parts stand for, in order.
Request = tuple[list[dict[str, Any]], list[Image.Image]]


class FailedReply(str):
    """An empty reply standing for a request that got no answer; `reason` says why.

    Example:
        ```python
        >>> from imagegem_hf.ranker.backends import FailedReply
        >>> reply = FailedReply("connection error")
        >>> reply == "", reply.reason
        (True, 'connection error')
        ```
    """

    reason: str

    def __new__(cls, reason: str) -> FailedReply:
        reply = super().__new__(cls, "")
        reply.reason = reason
        return reply


class TransformersBackend:
    """Generate with an in-process image-text-to-text model and its processor (batched, greedy or sampled).

    Args:
        model: A transformers image-text-to-text model with `generate`.
        processor: Its processor (with a chat template).
        batch_size: Requests per `generate` call.
        max_new_tokens: Generation budget per request.
    """

    def __init__(self, model, processor, batch_size: int = 8, max_new_tokens: int = 256) -> None:
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def generate(
        self,
        requests: list[Request],
        sample_seed: int | None = None,
        show_progress: bool = False,
        temperature: float = 0.7,
    ) -> list[str]:
        """One reply per request, in batches; greedy unless `sample_seed` is given (then sampled at `temperature`)."""
        outputs = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=not show_progress, desc="VLM batches"):
            batch = requests[start : start + self.batch_size]
            texts = [
                self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
                for content, _ in batch
            ]
            images = [im for _, ims in batch for im in ims] or None
            inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt").to(self.model.device)
            kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
            if sample_seed is not None:
                torch.manual_seed(sample_seed + start)
                kwargs.update(do_sample=True, temperature=temperature)
            generated = self.model.generate(**inputs, **kwargs)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            outputs += self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return outputs


def image_data_url(image: Image.Image) -> str:
    """A `data:image/png;base64,...` URL of `image` (lossless, as the model would see it in process)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(content: list[dict[str, Any]], images: list[Image.Image]) -> list[dict[str, Any]]:
    """The chat-completions `messages` of one request: text parts as they are, each image as a data URL.

    Raises:
        ValueError: The content has more or fewer image parts than there are images.
    """
    parts, remaining = [], list(images)
    for part in content:
        if part.get("type") == "image":
            if not remaining:
                raise ValueError("The request has more {'type': 'image'} parts than images.")
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(remaining.pop(0))}})
        elif part.get("type") == "text":
            parts.append({"type": "text", "text": part["text"]})
    if remaining:
        raise ValueError(f"The request has {len(remaining)} image(s) without an {{'type': 'image'}} part.")
    return [{"role": "user", "content": parts}]


def _reply_text(body: bytes | None) -> str | FailedReply:
    try:
        message = json.loads(body or b"")["choices"][0]["message"]
        text = message["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return FailedReply("a response body that is not a chat completion")
    if isinstance(text, list):  # some servers return content parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    return text if isinstance(text, str) else FailedReply("a chat completion without text content")


def _run(coroutine):
    """Run a coroutine to completion, also from code that already runs in an event loop (e.g. a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class OpenAIChatBackend:
    """Generate through an OpenAI-compatible chat-completions endpoint (vLLM, TGI, SGLang, ...).

    Args:
        base_url: The API root, e.g. `"http://localhost:8000/v1"` (`/chat/completions` is appended).
        model: The served model's name (vLLM: the name given to `vllm serve`).
        max_new_tokens: `max_tokens` of each request.
        concurrency: Requests in flight at once.
        timeout: Seconds to wait for a connection and between bytes of an answer.
        retries: Retries of a request on 429/5xx, timeouts and dropped connections (with backoff).
        api_key: Sent as a bearer token; default: the `OPENAI_API_KEY` environment variable, if set.

    Example:
        ```python
        >>> from imagegem_hf.ranker import VLMRankerPipeline
        >>> # vllm serve mistral-community/pixtral-12b --served-model-name pixtral --limit-mm-per-prompt image=10
        >>> ranker = VLMRankerPipeline.from_endpoint("http://localhost:8000/v1", "pixtral")  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        max_new_tokens: int = 256,
        concurrency: int = 16,
        timeout: float = 120.0,
        retries: int = 3,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def payload(self, request: Request, sample_seed: int | None, temperature: float = 0.7) -> dict[str, Any]:
        """The chat-completions body of one request (temperature 0 = greedy, or `temperature` with a seed)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(*request),
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,
        }
        if sample_seed is not None:
            body.update(temperature=temperature, seed=sample_seed)
        return body

    def generate(
        self,
        requests: list[Request],
        sample_seed: int | None = None,
        show_progress: bool = False,
        temperature: float = 0.7,
    ) -> list[str]:
        """One reply per request (sampled at `temperature` when `sample_seed` is given); a request that gets no
        usable answer gives a [`FailedReply`]."""
        payloads = [
            self.payload(request, None if sample_seed is None else sample_seed + i, temperature)
            for i, request in enumerate(requests)
        ]
        return _run(self._generate(payloads, show_progress))

    async def _generate(self, payloads: list[dict[str, Any]], show_progress: bool) -> list[str]:
        from imagegem_hf.fetch.client import FetchConfig, Fetcher

        config = FetchConfig(
            concurrency=self.concurrency,
            requests_per_second=None,
            retries=self.retries,
            timeout=self.timeout,
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {},
        )
        url = f"{self.base_url}/chat/completions"
        progress = tqdm(total=len(payloads), desc="VLM requests", disable=not show_progress)

        async def one(fetcher: Fetcher, payload: dict[str, Any]) -> str:
            outcome = await fetcher.get(url, json=payload)
            progress.update()
            if not outcome.ok:
                return FailedReply(f"{outcome.reason} from {url}")
            return _reply_text(outcome.content)

        async with Fetcher(config) as fetcher:
            replies = await asyncio.gather(*(one(fetcher, p) for p in payloads))
        progress.close()
        return list(replies)
