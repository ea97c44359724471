"""Models that see images, through mlx-vlm: which ones, loading them, the images of a
prompt, and the forward passes that put an image's features where its tokens are.

The text path stays mlx-lm's: the tokenizer that renders prompts (and compiles forced-call
grammars) is mlx-lm's TokenizerWrapper, and the engine drives the model's language model
on token ids, with mlx-lm's cache types, exactly as it drives a text model. Only a
forward pass over image tokens differs: its input embeddings come from the model's own
`get_input_embeddings` (vision tower, projector, scatter into the text embeddings).

The prefix cache keys a prompt by its token ids with each image's tokens replaced by an
id derived from the image's hash (negative, so never a vocabulary id): text before the
first image is shared with any request, text after an image only with requests that have
the same image there.

That is right where a token's position depends only on the prompt up to it. Gemma 3's
position is its index. Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's and Qwen3.5/3.6's (natively
multimodal, dense and MoE: a hybrid of linear-attention and full-attention layers) are
mrope's: three per token, an image's tokens placed on its grid, the text after an image shifted back by
what the grid saved (the prompt's "rope delta"). mlx-vlm computes those from the whole
prompt and keeps them, and the delta, on the model object between calls, which cannot
serve several sequences on one model (the prefix cache's, a batch's). Here they are
computed per request instead (`mrope_positions`, from the prompt's ids, image spans and
grids) and given to every forward pass: `Prompted` holds a request's, a text-only pass
computes its own from the cache's offset (`LanguageModel`), and mlx-vlm's language model,
given positions, neither reads nor writes its own. Text before the first image has the
same positions in every prompt (its indexes), and the positions after an image depend on
the images before, whose hashes the cache key holds: a cached prefix, text-only or past
the same image, is valid for any prompt it begins. Decode steps are at index + delta.

Gemma 4's positions are its indexes too, but its image tokens attend to each other both
ways (mlx-vlm's `use_bidirectional_attention = "vision"`), so a prefill chunk or a cached
prefix that ends inside an image would give its first tokens other keys and values than
a whole pass does. So for such a model (`LanguageModel.whole_images`) the engine computes
each image in one forward pass (`whole_spans`: a prefill chunk ends before an image or
runs to its end) and resumes a cached prefix at an image boundary only (`resume_at`: one
that ends inside an image is cut back to its start). mlx-vlm lets an image's tokens see
each other only in a pass from an empty cache (as its generate computes a prompt with
images, whole); here a pass after a cached prefix (a checkpoint, an earlier turn) gets
that too (`_overlay_after_cache`). An image pass is also given what Gemma 4's
`get_input_embeddings` makes besides the embeddings: the per-layer inputs (of its small
models), with the image tokens' taken from the padding id.

Claude Code sends all of a conversation's images on every turn; the processor's output
for each is kept by the image's hash (`Remembered`), so a turn processes only its new ones.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import io
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct

from .api.errors import InvalidRequest

# mlx-vlm model types whose positions are mrope's: three per token (time, height, width),
# an image's tokens placed on its grid, the text after it shifted by what the grid saved.
MROPE = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe"})
# mlx-vlm model types whose images anyclaude feeds: Gemma 3's and Gemma 4's positions are
# plain token indexes, mrope's are computed here from the prompt and its images' grids.
SUPPORTED = frozenset({"gemma3", "gemma4"}) | MROPE


# mlx-vlm imports a model's modules when it loads it, and one model type's modules import
# another's (qwen3_5 imports qwen3_vl's processor): two engine threads loading two such
# models at once deadlock on Python's import locks. One load at a time.
_LOADING = threading.RLock()


def model_type(where: str) -> str | None:
    """The mlx-vlm model type of a model folder whose config has a vision tower, or None."""
    try:
        config = json.loads((Path(where) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not config.get("vision_config"):
        return None
    with _LOADING:
        try:
            from mlx_vlm.utils import get_model_type

            kind = get_model_type(config)
        except Exception:  # an mlx-vlm that cannot read this config
            return None
        if kind is None:
            return None
        import importlib.util

        return kind if importlib.util.find_spec(f"mlx_vlm.models.{kind}") is not None else None


def wanted(setting: bool | str, where: str) -> str | None:
    """The model type to load through mlx-vlm for a profile's `vision` setting, or None to
    load the model as text. `true` for a model anyclaude cannot feed images is an error."""
    if setting is False:
        return None
    kind = model_type(where)
    if kind in SUPPORTED:
        return kind
    if setting is True:
        found = f"a {kind} model" if kind else "no vision tower mlx-vlm knows in its config.json"
        raise ValueError(f"vision = true, but {where} has {found}; images reach {', '.join(sorted(SUPPORTED))} models")
    return None


class Picture(Struct, frozen=True):
    """An image of a request, decoded (on a prompt thread)."""

    digest: str
    image: Any  # a PIL image, RGB


def decode(source: dict) -> Picture:
    """A base64 image block's source as a picture; InvalidRequest if it is not one."""
    from PIL import Image

    data = source.get("data")
    if not isinstance(data, str):
        raise InvalidRequest("image.source.data: expected a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image.source.data: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            image = opened.convert("RGB")  # reads it all: a truncated file fails here
    except Exception as exc:  # PIL's plugins raise what they like (OSError, SyntaxError, bomb errors)
        media = source.get("media_type") or "image"
        raise InvalidRequest(f"image.source.data: cannot be read as {media}: {exc}") from None
    return Picture(hashlib.sha256(raw).hexdigest(), image)


class Images(Struct, frozen=True):
    """The images of a rendered prompt, in order, as the engine needs them."""

    # The prompt's token ids as the prefix cache keys them (each image's tokens an id of its hash).
    keys: list[int]
    # Where each image's tokens are in the prompt: [start, end).
    spans: list[tuple[int, int]]
    # The processor's pixel values of each image (NumPy: made into MLX arrays on the engine thread).
    pixels: list[Any]
    # For an mrope model: each image's grid of patches, (time, height, width), before merging.
    grids: list[tuple[int, int, int]] | None = None


def key_of(digest: str) -> int:
    # 48 bits of the image's hash: negative, so no vocabulary id is ever equal to it.
    return -1 - int(digest[:12], 16)


class Vision:
    """What a model that sees needs beyond the text path: its processor, its image token."""

    def __init__(self, processor: Any, kind: str, image_token: int):
        self.processor, self.kind, self.image_token = processor, kind, image_token
        self.remembered = processor.image_processor = Remembered(processor.image_processor)

    def prepare(self, text: str, pictures: list[Picture]) -> tuple[list[int], Images]:
        """The token ids of a rendered prompt whose image placeholders the processor expands,
        and its images (a prompt thread)."""
        try:
            with self.remembered.these([p.digest for p in pictures]):
                out = self.processor(text=[text], images=[p.image for p in pictures], add_special_tokens=False)
        except Exception as exc:  # an image the processor cannot take (too small a side, ...)
            raise InvalidRequest(f"image: the model's processor cannot take it: {exc}") from None
        # The processor hands back MLX arrays made from NumPy (copies; nothing is computed
        # on any stream). They go back to NumPy here: MLX lives on the engine thread.
        ids = [int(i) for i in np.asarray(out["input_ids"])[0]]
        raw = out["pixel_values"]
        spans = _runs(ids, self.image_token)
        grids = None
        if isinstance(raw, (list, tuple)):  # Gemma 4: images of different sizes, each its own array
            each = [np.asarray(p)[None] for p in raw]
        elif "image_grid_thw" in out:  # Qwen: the patches of all images in one array, each image's grid
            pixels = np.asarray(raw)
            grids = [(int(t), int(h), int(w)) for t, h, w in np.asarray(out["image_grid_thw"])]
            ends = np.cumsum([0] + [t * h * w for t, h, w in grids])
            each = [pixels[a:b] for a, b in zip(ends[:-1], ends[1:])]
        else:
            pixels = np.asarray(raw)
            each = [pixels[i : i + 1] for i in range(len(pixels))]
        if len(spans) != len(pictures) or len(each) != len(pictures):
            raise InvalidRequest(f"image: the chat template placed {len(spans)} of the {len(pictures)} images of this conversation")
        keys = list(ids)
        for (start, end), picture in zip(spans, pictures):
            keys[start:end] = [key_of(picture.digest)] * (end - start)
        return ids, Images(keys=keys, spans=spans, pixels=each, grids=grids)


# The image processor's output kept for images seen again (a conversation sends all its
# images on every turn; a 1280x800 screenshot takes Qwen's processor about 0.1 s on a CPU).
REMEMBERED_BYTES = 256 * 2**20


class Remembered:
    """A model's image processor that gives an image it has processed before (by hash) its
    earlier output, and processes only the others. Each image's output is its own (no
    processor anyclaude feeds looks at two images together), and the outputs of several are
    put together as the processor puts them: arrays end to end (stacked images, Qwen's
    patches and grids), lists joined, and images of different sizes as a list (Gemma 4)."""

    def __init__(self, processor: Any, limit: int = REMEMBERED_BYTES):
        self.inner, self.limit = processor, limit
        self.processed = 0  # images the processor itself has processed
        self._kept: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def these(self, digests: list[str]):
        """The hashes of the images the next call (on this thread) is given, in order."""
        self._local.digests = digests
        try:
            yield
        finally:
            self._local.digests = None

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> Any:
        digests = getattr(self._local, "digests", None)
        if not isinstance(images, list) or not images or digests is None or len(digests) != len(images) or args:
            with self._lock:
                self.processed += len(images) if isinstance(images, list) else 1
            return self.inner(images, *args, **kwargs)
        how = repr(sorted(kwargs.items()))
        with self._lock:
            found = {d: self._kept[(d, how)][0] for d in digests if (d, how) in self._kept}
            for d in found:
                self._kept.move_to_end((d, how))
        new = {d: image for d, image in zip(digests, images) if d not in found}
        for d, image in new.items():
            found[d] = self.inner([image], **kwargs)
        with self._lock:
            self.processed += len(new)
            for d in new:
                size = _nbytes(found[d])
                if size <= self.limit and (d, how) not in self._kept:
                    self._kept[(d, how)] = (found[d], size)
                    self._bytes += size
            while self._bytes > self.limit:
                _, (_, size) = self._kept.popitem(last=False)
                self._bytes -= size
        return _joined([found[d] for d in digests])


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "items"):
        return sum(_nbytes(v) for _, v in value.items())
    return 0


def _joined(parts: list[Any]) -> Any:
    """One-image outputs of an image processor as its output for all of them."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(_joined([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, list):
        return [x for p in parts for x in p]
    if isinstance(first, np.ndarray):
        if len({p.shape[1:] for p in parts}) == 1:
            return np.concatenate(parts)
        return [p[0] for p in parts]  # Gemma 4: images of different sizes, one array each
    if hasattr(first, "items"):
        joined = {k: _joined([p[k] for p in parts]) for k in first.keys()}
        return joined if isinstance(first, dict) else type(first)(data=joined)
    return first


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    array = np.asarray(ids) == token
    edges = np.flatnonzero(np.diff(np.concatenate([[False], array, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def load(where: str, kind: str):
    """A model that sees, its mlx-lm tokenizer and its Vision (engine thread)."""
    from mlx_lm.utils import load_tokenizer

    with _LOADING:
        from mlx_vlm.utils import load as vlm_load

        model, processor = vlm_load(where)
    config = json.loads((Path(where) / "config.json").read_text())
    eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    tokenizer = load_tokenizer(Path(where), eos_token_ids=[eos] if isinstance(eos, int) else eos)
    image_token = config.get("image_token_index", config.get("image_token_id"))
    if image_token is None:
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return LanguageModel(model, kind), tokenizer, Vision(processor, kind, int(image_token))


class LanguageModel:
    """An mlx-vlm model as the engine drives a text model: token ids in, logits out, with
    mlx-lm's cache types (which the prefix cache knows how to copy, trim and save)."""

    def __init__(self, model: Any, kind: str = ""):
        self.vlm = model
        self.language_model = model.language_model
        self.kind = kind
        # An mrope model's patches merged per token, per side; None for plain positions.
        self.merge = int(model.config.vision_config.spatial_merge_size) if kind in MROPE else None
        # Gemma 4: an image's tokens attend to each other both ways, so each image is
        # computed in one pass (`whole_spans`), which is told which tokens are the image's.
        self.whole_images = getattr(getattr(self.language_model, "config", None), "use_bidirectional_attention", None) == "vision"
        if self.whole_images:
            _overlay_after_cache(self.language_model.model)

    def __call__(self, inputs, cache=None):
        if self.merge is None:
            _adopt(cache)
            return self.language_model(inputs, cache=cache).logits
        # A pass with no image before it (a text-only request): every axis is the index.
        # Given explicitly, so that no position state mlx-vlm keeps on the model is read.
        return self.positioned(inputs, _text_positions(inputs, cache), cache=cache)

    def embedded(self, inputs, embeddings, cache=None, **extra):
        """A pass whose input embeddings are given (image features among them); `extra`:
        what else the model's `get_input_embeddings` gave for these tokens (Gemma 4's
        per-layer inputs, its token types)."""
        _adopt(cache)
        return self.language_model(inputs, inputs_embeds=embeddings, cache=cache, **extra).logits

    def positioned(self, inputs, positions, embeddings=None, cache=None, **extra):
        """An mrope model's pass at the given positions, (3, batch, tokens): mlx-vlm's
        language model uses them as they are, and neither reads nor writes the rope
        deltas and position ids it would otherwise keep on the shared model."""
        _adopt(cache)
        return self.language_model(inputs, inputs_embeds=embeddings, cache=cache, position_ids=positions, **extra).logits

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self) -> list:
        from mlx_lm.models import cache as lm

        made = self.language_model.make_cache() if hasattr(self.language_model, "make_cache") else None
        if made is None:
            return [lm.KVCache() for _ in self.layers]
        # mlx-vlm's classes have the same state and names; mlx-lm's are the ones the
        # prefix cache trims, copies and saves.
        out = []
        for layer in made:
            name = type(layer).__name__
            if name == "KVCache":
                out.append(lm.KVCache())
            elif name == "RotatingKVCache":
                out.append(lm.RotatingKVCache(max_size=layer.max_size, keep=layer.keep))
            elif name == "ArraysCache" and type(layer).__module__.startswith("mlx_vlm."):
                out.append(_arrays_cache()(len(layer.cache)))
            else:
                out.append(layer)
        return out

    def parameters(self):
        return self.vlm.parameters()


def _overlay_after_cache(text_model) -> None:
    """Make Gemma 4's both-ways attention among an image's tokens hold in a pass after a
    cached prefix too.

    mlx-vlm adds it to a mask only when the mask is square: a pass from an empty cache,
    as its generate computes a prompt with images, whole. A pass after a cached prefix
    (a checkpoint, an earlier turn) has a mask wider than the pass, whose last columns are
    the pass's own tokens. The engine never begins or ends a pass inside an image, so the
    cached keys are all before the pass's images, seen causally: the library's own
    overlay is applied to the square of the pass's own keys."""
    import mlx.core as mx

    original = text_model._apply_blockwise_bidirectional_overlay

    def overlay(base, types):
        past = base.shape[-1] - base.shape[-2]
        if past <= 0 or types is None or types.shape[1] != base.shape[-2]:
            return original(base, types)
        own = original(base[..., past:], types)
        before = mx.broadcast_to(base[..., :past], (*own.shape[:-1], past))
        return mx.concatenate([before, own], axis=-1)

    text_model._apply_blockwise_bidirectional_overlay = overlay


def whole_spans(model, images: Images | None) -> list[tuple[int, int]]:
    """The image spans a model must compute each in one forward pass (its image tokens
    attend to each other both ways: a pass that ends inside an image gives the image's
    first tokens keys and values computed without the rest), or none."""
    if images is None or not getattr(model, "whole_images", False):
        return []
    return list(images.spans)


def resume_at(spans: list[tuple[int, int]], cached: int) -> int:
    """Where a prompt whose cached prefix holds `cached` tokens may resume: there, or at
    the start of the image of `spans` that the prefix ends inside of."""
    for start, end in spans:
        if start < cached < end:
            return start
    return cached


@functools.cache
def _arrays_cache():
    """mlx-vlm's ArraysCache (what its linear-attention layers call: `update_window`,
    `lengths`, ...), with mlx-lm's state layout and name, so that the prefix cache saves
    it as mlx-lm's (`[cache] persist`): mlx-lm's loader makes an mlx-lm ArraysCache of
    it again, which `_adopt` turns back into this."""
    from mlx_vlm.models.cache import ArraysCache as Base

    class ArraysCache(Base):
        @property
        def state(self):
            return self.cache, self.left_padding, self.lengths

        @state.setter
        def state(self, value):
            self.cache, left_padding, lengths = value
            if left_padding is not None:
                self.left_padding = left_padding
            if lengths is not None:
                self.lengths = lengths

    return ArraysCache


def _adopt(cache) -> None:
    """Turn the mlx-lm ArraysCaches of a cache loaded from disk into mlx-vlm's, in place."""
    if not cache:
        return
    from mlx_lm.models.cache import ArraysCache

    for i, layer in enumerate(cache):
        if type(layer) is ArraysCache:
            adopted = _arrays_cache()(len(layer.cache))
            adopted.state = layer.state
            cache[i] = adopted


def _text_positions(inputs, cache):
    """Positions of a pass with no image before it: the cache's offset on, on every axis."""
    import mlx.core as mx

    batch, n = inputs.shape
    offset = 0
    for layer in cache or ():
        found = getattr(layer, "offset", None)
        if found is not None and not type(layer).__name__.startswith("Arrays"):
            offset = found
            break
    if isinstance(offset, mx.array) and offset.ndim > 0:  # a batch cache: each row its own
        rows = offset[:batch, None].astype(mx.int32) + mx.arange(n, dtype=mx.int32)[None]
    else:
        rows = mx.broadcast_to(mx.arange(int(offset), int(offset) + n, dtype=mx.int32)[None], (batch, n))
    return mx.broadcast_to(rows[None], (3, batch, n))


def mrope_positions(prompt_length: int, spans: list[tuple[int, int]], grids: list[tuple[int, int, int]], merge: int) -> tuple[np.ndarray, int]:
    """The mrope positions of a prompt, (3, tokens), and its delta: what is added to a
    token's index past the prompt (a generated token's positions are its index plus the
    delta, on every axis).

    Text counts on from the last position, on all three axes. An image's tokens sit on
    its merged grid: time, row and column added to the position the image starts at; the
    text after it starts one past the largest of them. So a token's positions depend on
    the prompt up to it (the images before it and their grids) and nothing after: the
    positions of a cached prefix are those of any prompt it is a prefix of."""
    out = np.empty((3, prompt_length), dtype=np.int32)
    at = done = 0  # the next position; the tokens placed
    for (start, end), (t, h, w) in zip(spans, grids):
        out[:, done:start] = at + np.arange(start - done)
        at += start - done
        gh, gw = h // merge, w // merge
        if end - start != t * gh * gw:
            raise ValueError(f"an image of {end - start} tokens on a {t}x{gh}x{gw} grid")
        ts, hs, ws = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        out[:, start:end] = at + np.stack([ts.ravel(), hs.ravel(), ws.ravel()])
        at += max(t, gh, gw)
        done = end
    out[:, done:] = at + np.arange(prompt_length - done)
    return out, int(at + prompt_length - done - prompt_length)


class Prompted:
    """The model for one prompt with images: a pass over tokens among which are an
    image's computes their embeddings with the vision tower; other passes are plain.

    It follows the position of each pass from `position` (the tokens the cache holds).
    An image's features are computed whole, with the text around it that the pass (and
    the image) covers, even when the pass begins or ends inside the image (a prefill
    chunk boundary, or a cached prefix that stopped there), which the engine allows for
    every model but Gemma 4 (`whole_spans`).

    For an mrope model it also holds the request's positions, computed from the prompt
    and its images alone (`mrope_positions`): the prompt's, and past it (the decode
    steps) the index plus the prompt's delta. Every pass is given its positions, so
    nothing of one sequence is kept on the model that several sequences share, and a
    request resumed from a cached prefix (text only, or past the same image) gets the
    positions it would have had cold."""

    def __init__(self, model: LanguageModel, prompt: list[int], images: Images, position: int):
        self.model, self.prompt, self.images, self.position = model, prompt, images, position
        self._window: tuple[int, int, Any] | None = None
        self._mrope = None
        if getattr(model, "merge", None) is not None:
            self._mrope = mrope_positions(len(prompt), images.spans, images.grids, model.merge)

    def __call__(self, inputs, cache=None):
        start, end = self.position, self.position + inputs.shape[-1]
        self.position = end
        touched = [i for i, (a, b) in enumerate(self.images.spans) if a < end and b > start]
        if self._mrope is not None:
            return self._positioned(inputs, start, end, touched, cache)
        if not touched:
            return self.model(inputs, cache=cache)
        first, last = self.images.spans[touched[0]][0], self.images.spans[touched[-1]][1]
        window = self._embeddings(min(start, first), max(end, last), touched)
        low, _, embeddings = window
        extra = {}
        # Gemma 4's small models (E2B, E4B): per-layer inputs, the image tokens' those of
        # the padding id (as the model's embeddings give them, not those of the ids passed).
        if getattr(embeddings, "per_layer_inputs", None) is not None:
            extra["per_layer_inputs"] = embeddings.per_layer_inputs[:, start - low : end - low]
        if getattr(self.model, "whole_images", False):
            import mlx.core as mx

            # The image's tokens marked as such, for the mask that lets them attend to
            # each other both ways.
            types = np.zeros((1, end - start), dtype=np.int32)
            for i in touched:
                a, b = self.images.spans[i]
                types[0, max(a, start) - start : min(b, end) - start] = 1
            extra["mm_token_type_ids"] = mx.array(types)
        return self.model.embedded(inputs, embeddings.inputs_embeds[:, start - low : end - low], cache=cache, **extra)

    def positions(self, start: int, end: int):
        """The mrope positions of tokens [start, end) of this request, (3, end - start)."""
        prompt, delta = self._mrope
        n = prompt.shape[1]
        past = np.arange(max(start, n), end, dtype=np.int32) + delta
        return np.concatenate([prompt[:, min(start, n) : min(end, n)], np.broadcast_to(past, (3, len(past)))], axis=1)

    def _positioned(self, inputs, start: int, end: int, touched: list[int], cache):
        import mlx.core as mx

        batch = inputs.shape[0]
        positions = mx.broadcast_to(mx.array(self.positions(start, end))[:, None], (3, batch, end - start))
        if not touched:
            return self.model.positioned(inputs, positions, cache=cache)
        first, last = self.images.spans[touched[0]][0], self.images.spans[touched[-1]][1]
        low, _, features = self._embeddings(min(start, first), max(end, last), touched)
        a, b = start - low, end - low
        extra = {}
        stack = getattr(features, "deepstack_visual_embeds", None)
        if stack is not None:  # Qwen3-VL: image features added again in the first layers
            seen = np.asarray(features.visual_pos_masks[0])
            rows = int(seen[:a].sum()), int(seen[:b].sum())
            if rows[1] > rows[0]:
                extra = {"visual_pos_masks": features.visual_pos_masks[:, a:b], "deepstack_visual_embeds": [layer[rows[0] : rows[1]] for layer in stack]}
        return self.model.positioned(inputs, positions, features.inputs_embeds[:, a:b], cache=cache, **extra)

    def _embeddings(self, low: int, high: int, touched: list[int]):
        import mlx.core as mx

        held = self._window
        if held is not None and held[0] <= low and high <= held[1]:
            return held
        ids = mx.array(self.prompt[low:high])[None]
        chosen = [self.images.pixels[i] for i in touched]
        if len({p.shape[1:] for p in chosen}) == 1:
            pixels = mx.array(np.concatenate(chosen))
        else:  # Gemma 4's images of different sizes: its vision tower takes them as a list
            pixels = [mx.array(p) for p in chosen]
        more = {}
        if self.images.grids is not None:
            more["image_grid_thw"] = mx.array([self.images.grids[i] for i in touched])
        # (An mrope model's own positions for this window, which it also computes, are not used.)
        features = self.model.vlm.get_input_embeddings(ids, pixels, mask=mx.ones(ids.shape, dtype=mx.int32), **more)
        self._window = (low, high, features)
        return self._window

    def __getattr__(self, name):  # layers, make_cache: the model's own
        return getattr(self.model, name)
