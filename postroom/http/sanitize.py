"""HTML mail made safe for a browser: nh3 (ammonia) with remote images blocked."""

from __future__ import annotations

from dataclasses import dataclass

import nh3

_URL_SCHEMES = {"http", "https", "mailto", "cid", "tel"}
_REMOTE_PREFIXES = ("http:", "https:", "//")


@dataclass(frozen=True, slots=True)
class SanitizedHtml:
    html: str
    remote_images_blocked: int


def sanitize_html(html: str) -> SanitizedHtml:
    """Scripts, event handlers, forms and styles removed; remote image sources dropped.

    A remote image is how a sender learns when and where mail was read (a tracking pixel), so
    the `src` of every image not carried inside the message (cid:) is removed and counted.
    """
    blocked = 0

    def keep_attribute(tag: str, attribute: str, value: str) -> str | None:
        nonlocal blocked
        if tag == "img" and attribute in ("src", "srcset"):
            if value.strip().lower().startswith(_REMOTE_PREFIXES) or attribute == "srcset":
                blocked += 1
                return None
        return value

    cleaned = nh3.clean(
        html,
        clean_content_tags={"script", "style", "title", "head"},
        attribute_filter=keep_attribute,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
    )
    return SanitizedHtml(cleaned, blocked)
