"""HTML mail made safe for a browser: nh3 (ammonia) with remote images blocked."""

from __future__ import annotations

from dataclasses import dataclass

import nh3

_URL_SCHEMES = {"http", "https", "mailto", "cid", "tel"}
_REMOTE_PREFIXES = ("http:", "https:", "//")
# What a blocked remote image's src becomes: a scheme no browser fetches, and the image's index
# in `remote_images`, so a page that chooses to show it can fetch it through the image proxy.
REMOTE_IMAGE_PREFIX = "remote-image:"


@dataclass(frozen=True, slots=True)
class SanitizedHtml:
    html: str
    remote_images_blocked: int
    remote_images: tuple[str, ...] = ()  # the blocked http(s) sources, in document order


def sanitize_html(html: str) -> SanitizedHtml:
    """Scripts, event handlers, forms and styles removed; remote image sources dropped.

    A remote image is how a sender learns when and where mail was read (a tracking pixel), so
    the `src` of every image not carried inside the message (cid:) is counted and replaced by
    `remote-image:N` (N its index in `remote_images`); `srcset` is dropped.
    """
    blocked = 0
    remote: list[str] = []

    def keep_attribute(tag: str, attribute: str, value: str) -> str | None:
        nonlocal blocked
        if tag == "img" and attribute in ("src", "srcset"):
            if value.strip().lower().startswith(_REMOTE_PREFIXES) or attribute == "srcset":
                blocked += 1
                if attribute == "src":
                    url = value.strip()
                    remote.append("https:" + url if url.startswith("//") else url)
                    return f"{REMOTE_IMAGE_PREFIX}{len(remote) - 1}"
                return None
        return value

    cleaned = nh3.clean(
        html,
        clean_content_tags={"script", "style", "title", "head"},
        attribute_filter=keep_attribute,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
    )
    return SanitizedHtml(cleaned, blocked, tuple(remote))
