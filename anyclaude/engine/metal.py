"""What the engine does differently on Metal: the wired limit while models are loaded,
and the prefill chunk when the profile does not set one. On the CPU, nothing changes."""

from __future__ import annotations

import threading
from collections.abc import Callable

# mlx-lm's own default on Metal (`generate_step(prefill_step_size=2048)`): fewer, larger
# passes keep the GPU busy. On the CPU, 512 bounds the attention scores of a chunk and
# the time a cancelled request waits for its chunk to end.
METAL_PREFILL_STEP = 2048
CPU_PREFILL_STEP = 512
# As mlx-lm: past this share of the recommended working set, generating is slow.
CLOSE_TO_LIMIT = 0.9


def metal_info() -> dict | None:
    """MLX's Metal device info, or None where MLX has no Metal (or does not import)."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    if not mx.metal.is_available():
        return None
    device_info = getattr(mx, "device_info", None) or mx.metal.device_info
    try:
        return dict(device_info())
    except (RuntimeError, TypeError, ValueError):  # informative only
        return {}


def default_prefill_step() -> int:
    """Prompt tokens per prefill step when `[engine] prefill_step` is not set: mlx-lm's
    2048 on Metal, 512 on the CPU."""
    import mlx.core as mx

    return METAL_PREFILL_STEP if mx.metal.is_available() else CPU_PREFILL_STEP


class WiredLimit:
    """Metal's wired limit, raised to the device's recommended working set while any
    model is loaded, and put back once the last one is unloaded.

    mlx-lm does the same around each generation: wired memory is not paged out, so
    the weights stay resident between requests. The limit is the process's, and several
    engines load and unload models at their own times, hence the count. `info` and
    `set_limit` are MLX's (`metal_info`, `mx.set_wired_limit`) unless given.
    """

    def __init__(self, info: Callable[[], dict | None] = metal_info, set_limit: Callable[[int], int] | None = None):
        self._info = info
        self._set_limit = set_limit
        self._lock = threading.Lock()
        self._holders = 0
        self._previous = 0
        self.limit: int | None = None

    def hold(self) -> int | None:
        """One more model loaded: the wired limit in bytes, or None (no Metal, nothing set)."""
        with self._lock:
            if self._holders == 0:
                size = (self._info() or {}).get("max_recommended_working_set_size")
                if not size:
                    return None
                self._previous = self._set(int(size))
                self.limit = int(size)
            self._holders += 1
            return self.limit

    def release(self) -> None:
        """One model fewer (a `hold` that returned a limit); after the last, the limit is
        put back. Call it once the model's work is synchronized: the limit must not
        change during an evaluation."""
        with self._lock:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders == 0:
                self._set(self._previous)
                self.limit = None

    def _set(self, limit: int) -> int:
        if self._set_limit is not None:
            return self._set_limit(limit)
        import mlx.core as mx

        return mx.set_wired_limit(limit)


def size_warning(weight_bytes: int, limit: int | None) -> str | None:
    """What to say when a model's weights come close to the wired limit, or None."""
    if not limit or weight_bytes <= CLOSE_TO_LIMIT * limit:
        return None
    return (
        f"the model's weights take {weight_bytes // 2**20} MB, close to or above Metal's recommended "
        f"working set of {limit // 2**20} MB: expect generation to be slow (a smaller quantization fits)"
    )


# The process's, shared by its engines.
WIRED = WiredLimit()
