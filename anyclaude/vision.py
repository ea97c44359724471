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
the same image there. That is only right where a token's position is its index in the
prompt. Gemma 3 is such a model; models with multi-dimensional positions (Qwen2/2.5/3-VL's
mrope, whose position state mlx-vlm keeps in the model between calls) are not fed images
here yet: they load as text models, as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct

from .errors import InvalidRequest

# mlx-vlm model types whose images anyclaude feeds: positions are plain token indexes,
# so a cached prefix past an image is valid for the same image.
SUPPORTED = frozenset({"gemma3"})


def model_type(where: str) -> str | None:
    """The mlx-vlm model type of a model folder whose config has a vision tower, or None."""
    try:
        config = json.loads((Path(where) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not config.get("vision_config"):
        return None
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


def key_of(digest: str) -> int:
    # 48 bits of the image's hash: negative, so no vocabulary id is ever equal to it.
    return -1 - int(digest[:12], 16)


class Vision:
    """What a model that sees needs beyond the text path: its processor, its image token."""

    def __init__(self, processor: Any, kind: str, image_token: int):
        self.processor, self.kind, self.image_token = processor, kind, image_token

    def prepare(self, text: str, pictures: list[Picture]) -> tuple[list[int], Images]:
        """The token ids of a rendered prompt whose image placeholders the processor expands,
        and its images (a prompt thread)."""
        try:
            out = self.processor(text=[text], images=[p.image for p in pictures], add_special_tokens=False)
        except Exception as exc:  # an image the processor cannot take (too small a side, ...)
            raise InvalidRequest(f"image: the model's processor cannot take it: {exc}") from None
        # The processor hands back MLX arrays made from NumPy (copies; nothing is computed
        # on any stream). They go back to NumPy here: MLX lives on the engine thread.
        ids = [int(i) for i in np.asarray(out["input_ids"])[0]]
        pixels = np.asarray(out["pixel_values"])
        spans = _runs(ids, self.image_token)
        if len(spans) != len(pictures) or len(pixels) != len(pictures):
            raise InvalidRequest(f"image: the chat template placed {len(spans)} of the {len(pictures)} images of this conversation")
        keys = list(ids)
        for (start, end), picture in zip(spans, pictures):
            keys[start:end] = [key_of(picture.digest)] * (end - start)
        return ids, Images(keys=keys, spans=spans, pixels=[pixels[i : i + 1] for i in range(len(pictures))])


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    array = np.asarray(ids) == token
    edges = np.flatnonzero(np.diff(np.concatenate([[False], array, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def load(where: str, kind: str):
    """A model that sees, its mlx-lm tokenizer and its Vision (engine thread)."""
    from mlx_lm.utils import load_tokenizer
    from mlx_vlm.utils import load as vlm_load

    model, processor = vlm_load(where)
    config = json.loads((Path(where) / "config.json").read_text())
    eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    tokenizer = load_tokenizer(Path(where), eos_token_ids=[eos] if isinstance(eos, int) else eos)
    image_token = config.get("image_token_index", config.get("image_token_id"))
    if image_token is None:
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return LanguageModel(model), tokenizer, Vision(processor, kind, int(image_token))


class LanguageModel:
    """An mlx-vlm model as the engine drives a text model: token ids in, logits out, with
    mlx-lm's cache types (which the prefix cache knows how to copy, trim and save)."""

    def __init__(self, model: Any):
        self.vlm = model
        self.language_model = model.language_model

    def __call__(self, inputs, cache=None):
        return self.language_model(inputs, cache=cache).logits

    def embedded(self, inputs, embeddings, cache=None):
        """A pass whose input embeddings are given (image features among them)."""
        return self.language_model(inputs, inputs_embeds=embeddings, cache=cache).logits

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
            else:
                out.append(layer)
        return out

    def parameters(self):
        return self.vlm.parameters()


class Prompted:
    """The model for one prompt with images: a pass over tokens among which are an
    image's computes their embeddings with the vision tower; other passes are plain.

    It follows the position of each pass from `position` (the tokens the cache holds).
    An image's features are computed whole, with the text around it that the pass (and
    the image) covers, even when the pass begins or ends inside the image (a prefill
    chunk boundary, or a cached prefix that stopped there)."""

    def __init__(self, model: LanguageModel, prompt: list[int], images: Images, position: int):
        self.model, self.prompt, self.images, self.position = model, prompt, images, position
        self._window: tuple[int, int, Any] | None = None

    def __call__(self, inputs, cache=None):
        start, end = self.position, self.position + inputs.shape[-1]
        self.position = end
        touched = [i for i, (a, b) in enumerate(self.images.spans) if a < end and b > start]
        if not touched:
            return self.model(inputs, cache=cache)
        first, last = self.images.spans[touched[0]][0], self.images.spans[touched[-1]][1]
        window = self._embeddings(min(start, first), max(end, last), touched)
        low, _, embeddings = window
        return self.model.embedded(inputs, embeddings[:, start - low : end - low], cache=cache)

    def _embeddings(self, low: int, high: int, touched: list[int]):
        import mlx.core as mx

        held = self._window
        if held is not None and held[0] <= low and high <= held[1]:
            return held
        ids = mx.array(self.prompt[low:high])[None]
        pixels = mx.array(np.concatenate([self.images.pixels[i] for i in touched]))
        features = self.model.vlm.get_input_embeddings(ids, pixels, mask=mx.ones(ids.shape, dtype=mx.int32))
        self._window = (low, high, features.inputs_embeds)
        return self._window

    def __getattr__(self, name):  # layers, make_cache: the model's own
        return getattr(self.model, name)
