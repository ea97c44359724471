"""The text of a PDF document, for models that read text (pypdf)."""

from __future__ import annotations

import base64
import binascii
import io
import logging

# A page's text is joined to the next by a blank line, and a page with none says so.
_NO_TEXT = "[page {n}: no text]"


def text(data: str) -> str:
    """The text of a base64-encoded PDF, page by page; raises ValueError if it is not
    one that can be read."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("its data is not base64") from None
    # pypdf warns about every oddity of real-world files; a prompt does not need them.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted:
            raise ValueError("it is encrypted")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except (PdfReadError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"it cannot be read ({type(e).__name__})") from None
    return "\n\n".join(p or _NO_TEXT.format(n=i + 1) for i, p in enumerate(pages))
