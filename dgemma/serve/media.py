"""Where a request's images come from: inline data: URLs always; http(s) URLs and local files only where the server
was started to allow them (vLLM's `--allowed-media-domains` and `--allowed-local-media-path`).

Fetching a URL a client names makes the server a client of someone else's host (and of the hosts on its own
network: server-side request forgery), so nothing is fetched by default: `--allowed-media-domains` names the hosts
whose images may be fetched (`*` for any), and every redirect must stay on them. A fetch has a timeout and a size
cap. `--allowed-local-media-path DIR` lets `file://` URLs read images under DIR, and nothing outside it (symlinks
resolved first).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..vision import ImageError

FETCH_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 20 << 20  # OpenAI's per-image limit


def image_source(url: str, *, domains: tuple[str, ...] = (), local_root: str | None = None,
                 timeout: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> str | bytes:
    """What `vision.load_image` reads for an image URL: a data: URL as it is, a fetched URL's or a file's bytes.
    ImageError (a 400) for a URL this server may not read, or one that cannot be read."""
    if url.startswith("data:"):
        return url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _fetch(url, domains, timeout, max_bytes)
    if scheme == "file":
        return _local(unquote(parts.path), local_root, max_bytes)
    raise ImageError("an image URL must be a data: URL (data:image/png;base64,...), or http(s) / file:// where the "
                     "server allows it")


def _allowed(host: str | None, domains: tuple[str, ...]) -> bool:
    return bool(host) and ("*" in domains or host.lower() in domains)


def _fetch(url: str, domains: tuple[str, ...], timeout: float, max_bytes: int) -> bytes:
    host = urlsplit(url).hostname
    if not _allowed(host, domains):
        raise ImageError(f"this server does not fetch images from {host or url!r}: send the image inline as a data: "
                         "URL, or start the server with --allowed-media-domains naming that host")
    import httpx

    def check(request):  # every hop of a redirect chain, too
        if not _allowed(request.url.host, domains):
            raise ImageError(f"the image URL redirects to {request.url.host!r}, which --allowed-media-domains does "
                             "not name")

    try:
        with httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=5,
                          event_hooks={"request": [check]}) as client, client.stream("GET", url) as r:
            if r.status_code != 200:
                raise ImageError(f"fetching the image failed: {url} answered {r.status_code}")
            data = bytearray()
            for piece in r.iter_bytes():
                data += piece
                if len(data) > max_bytes:
                    raise ImageError(f"the image at {url} is larger than {max_bytes:,} bytes")
            return bytes(data)
    except httpx.HTTPError as e:
        raise ImageError(f"fetching the image failed: {type(e).__name__}: {e}") from None


def _local(path: str, root: str | None, max_bytes: int) -> bytes:
    if root is None:
        raise ImageError("this server reads no local files: send the image inline as a data: URL, or start the "
                         "server with --allowed-local-media-path DIR")
    base = Path(root).expanduser().resolve()
    try:
        target = Path(path).resolve()
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    if not target.is_relative_to(base):
        raise ImageError(f"file:// images must be under {base} (--allowed-local-media-path)")
    if not target.is_file():
        raise ImageError(f"no image file {target}")
    if target.stat().st_size > max_bytes:
        raise ImageError(f"the image file is larger than {max_bytes:,} bytes")
    return target.read_bytes()
