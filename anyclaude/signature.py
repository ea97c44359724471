"""Thinking-block signatures that carry their reasoning.

Claude Code asks for thinking with `display: "omitted"`: the block comes without its
text, and goes back in the next request the same way, with its signature. The templates
that keep reasoning within a tool loop need that text to render the turn as the model
wrote it (or the prefix cache misses from there), so the signature carries it, and the
prompt reads it back. Nothing else reads a local signature.
"""

from __future__ import annotations

import base64
import binascii
import zlib

PLAIN = "anyclaude-local"
_SEALED = PLAIN + "."


def seal(reasoning: str) -> str:
    """A signature that carries `reasoning`."""
    return _SEALED + base64.urlsafe_b64encode(zlib.compress(reasoning.encode())).decode()


def unseal(signature: str) -> str:
    """The reasoning a signature carries ("" if none, or not one of ours)."""
    if not signature.startswith(_SEALED):
        return ""
    try:
        return zlib.decompress(base64.urlsafe_b64decode(signature[len(_SEALED) :]), bufsize=1 << 16).decode()
    except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError):
        return ""
