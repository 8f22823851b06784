"""URL inputs of the service: the library's one URL fetcher (:mod:`speciesclf.sources.fetch`) under the
ServeConfig's ``url_*`` settings, awaited on the service's event loop, its errors answered through the one
error table. Only the request's deadline is the service's own business here."""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import ImageError
from ..sources.fetch import UrlFetcher, UrlPolicy
from ._images import ApiError, error_for_prediction

__all__ = ["ServiceFetcher", "url_policy"]


def url_policy(config: Any) -> UrlPolicy:
    """The :class:`~speciesclf.sources.fetch.UrlPolicy` of a :class:`~speciesclf.serve.ServeConfig`."""
    return UrlPolicy(allow_hosts=config.url_allow_hosts, allow_networks=config.url_allow_networks,
                     connect_timeout_s=config.url_connect_timeout_s, read_timeout_s=config.url_read_timeout_s,
                     timeout_s=config.url_timeout_s, max_redirects=config.url_max_redirects,
                     max_bytes=config.url_max_bytes, max_length=config.url_max_length)


class ServiceFetcher:
    """Fetches ``{"url": ...}`` inputs. Create it on the serving loop (its concurrency bound belongs to it);
    ``injected`` (resolver, connector, ssl_context) goes to :class:`~speciesclf.sources.fetch.UrlFetcher`."""

    def __init__(self, config: Any, **injected: Any):
        self.fetcher = UrlFetcher(url_policy(config), max_concurrent=config.url_max_concurrent, **injected)

    async def fetch(self, url: Any, timeout_s: float, field: str = "url") -> bytes:
        """The image bytes of ``url``, or :class:`ApiError`: ``url_not_allowed`` / ``url_fetch_failed`` (400),
        ``image_too_large`` (413), or ``deadline_exceeded`` (503) when ``timeout_s`` (what is left of the
        request's deadline) ran out before the fetch's own ``url_timeout_s`` did."""
        if not isinstance(url, str) or not url:
            raise ApiError(422, "invalid_request", f"{field} must be a non-empty string")
        try:
            return await asyncio.wait_for(self.fetcher.fetch(url, accept="image/*"), max(timeout_s, 0.0))
        except (TimeoutError, asyncio.TimeoutError):
            raise ApiError(503, "deadline_exceeded",
                           f"{field}: the request's deadline passed while fetching the URL") from None
        except ImageError as e:
            raise error_for_prediction(e, field) from None
