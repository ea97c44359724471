"""Images in a long conversation: the time to render each turn's prompt when every earlier
screenshot is processed again, against anyclaude, which processes each image once.

    uv run python bench/images.py [--turns 8] [--width 1280 --height 800]

Claude Code sends a conversation's images again on every turn (a Read of a PNG comes back
inside its tool result). Each turn here adds one screenshot-sized image that way. The
model is a random-weight Qwen3.5 from mlx-vlm's classes (tests/vision_model.py) with
Qwen3-VL's own resolution limits (16 px patches, up to 16M pixels), so the processor's
work per image is what a real Qwen3.5 or Qwen3.6 costs; the model itself is not run.
Both columns render the same prompts (checked), through `prompt.render`, in one run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from anyclaude import models, profiles, prompt, vision  # noqa: E402
from anyclaude.api import wire  # noqa: E402
from bench.harness import from_tests  # noqa: E402


def screenshot(seed: int, width: int, height: int) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.repeat(rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8), 8, axis=0).repeat(8, axis=1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(out.getvalue()).decode()}}


def conversation(turns: int, width: int, height: int) -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": "Look at the screenshots I take and tell me what changed."}]
    for i in range(turns):
        call = {"type": "tool_use", "id": f"toolu_{i}", "name": "Read", "input": {"file_path": f"/tmp/shot{i}.png"}}
        messages += [
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": [screenshot(i, width, height)]}]},
        ]
    return messages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()

    (tiny,) = profiles.load("tiny").profile.models.values()
    where = from_tests("vision_model").build_qwen(Path(tempfile.mkdtemp()) / "qwen3_5", Path(models.prepare(tiny)))
    config = json.loads((where / "preprocessor_config.json").read_text())
    config |= {"min_pixels": 65536, "max_pixels": 16777216, "size": {"shortest_edge": 65536, "longest_edge": 16777216}}
    (where / "preprocessor_config.json").write_text(json.dumps(config))
    _, tokenizer, seeing = vision.load(str(where), "qwen3_5")
    read = {"name": "Read", "description": "Read a file.", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}}}
    remembered, anew = seeing.remembered, seeing.remembered.inner

    def render(messages: list[dict], processor) -> tuple[float, prompt.Rendered]:
        seeing.processor.image_processor = processor
        body = {"model": "m", "max_tokens": 8, "messages": messages, "tools": [read]}
        request = wire.decode_request(json.dumps(body).encode())
        started = time.perf_counter()
        rendered = prompt.render(request, tokenizer, vision=seeing)
        return time.perf_counter() - started, rendered

    render(conversation(1, args.width, args.height), anew)  # the first call's own costs, in neither column
    print(f"{args.turns} turns, one {args.width}x{args.height} screenshot more each")
    print(f"{'turn':>4} {'images':>6} {'tokens':>7} {'all again (s)':>14} {'anyclaude (s)':>14} {'ratio':>6}")
    total_again = total_once = 0.0
    for turn in range(1, args.turns + 1):
        messages = conversation(turn, args.width, args.height)
        again, a = render(messages, anew)
        once, b = render(messages, remembered)
        assert a.ids == b.ids and all(np.array_equal(x, y) for x, y in zip(a.seen_images.pixels, b.seen_images.pixels))
        total_again, total_once = total_again + again, total_once + once
        print(f"{turn:>4} {turn:>6} {len(b.ids):>7} {again:>14.3f} {once:>14.3f} {again / once:>6.1f}")
    print(f"total: {total_again:.2f} s processing every image on every turn, {total_once:.2f} s each once ({total_again / total_once:.1f}x)")
    seeing.processor.image_processor = remembered


if __name__ == "__main__":
    main()
