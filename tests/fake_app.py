"""The real app and Granian, with a scripted engine in place of MLX, to inject faults.

The last user message says what the engine does (`SCRIPT:<name>`); see `ScriptedEngine`.
Started by the `fake_daemon` fixture as `granian --factory fake_app:create_app`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

from anyclaude import constrain, profiles
from anyclaude.http.app import App
from anyclaude.server import Server
from anyclaude.engine.engine import Loaded
from anyclaude.engine.events import Done, Failed, Generation, Job, Prefilled, Token


class ScriptedEngine:
    """Behind the engine interface: plays a fault script instead of running a model."""

    def __init__(self, tokenizer):
        constrain.prepare(tokenizer)  # as the real loader does, not in the first request
        self.loaded = Loaded(model=None, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(tokenizer.eos_token_ids), device="scripted")
        self.load_error = None
        self.ready = True
        self.cache = None
        self.max_batch = 1  # one script at a time, as the fault tests expect

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def set_prefill_step(self, tokens: int) -> None:
        pass

    def set_max_batch(self, sequences: int | None) -> None:
        pass

    def configure_cache(self, max_bytes: int, persist: bool) -> None:
        pass

    def wait_ready(self, timeout=None) -> bool:
        return True

    def submit(self, job: Job, generation: Generation) -> None:
        threading.Thread(target=self._play, args=(job, generation), daemon=True).start()

    def _play(self, job: Job, generation: Generation) -> None:
        generation.started_at = time.monotonic()  # taken up at once, as the real engine says
        tokenizer = self.loaded.tokenizer
        text = tokenizer.decode(job.prompt)
        script = re.findall(r"SCRIPT:([\w-]+)", text)[-1]
        emit = lambda s: [generation.put(Token(t)) for t in tokenizer.encode(s, add_special_tokens=False)]  # noqa: E731
        if script == "stall-before-first-token":
            pass
        elif script == "stall-mid-text":
            generation.put(Prefilled(len(job.prompt), 0.0))
            emit("Hello, this is the start of")
        elif script == "stall-mid-tool-call":
            generation.put(Prefilled(len(job.prompt), 0.0))
            emit('Let me read it.\n<tool_call>\n{"name": "Read", "arguments": {"file_')
        elif script == "slow-tool-call":
            # A long call generated at a steady pace: no token shows anything until its end.
            generation.put(Prefilled(len(job.prompt), 0.0))
            call = '<tool_call>\n{"name": "Write", "arguments": {"file_path": "/tmp/a.txt", "content": "' + "lorem ipsum " * 12 + '"}}\n</tool_call>'
            for token in tokenizer.encode(call, add_special_tokens=False):
                if generation.wait_cancelled(timeout=0.05):
                    break
                generation.put(Token(token))
            generation.put(Done("stop"))
            return
        elif script == "slow-answer":
            # Text at a steady pace, for longer than the test profile's first_token.
            generation.put(Prefilled(len(job.prompt), 0.0))
            for token in tokenizer.encode("word " * 100, add_special_tokens=False):
                if generation.wait_cancelled(timeout=0.05):
                    break
                generation.put(Token(token))
            generation.put(Done("stop"))
            return
        elif script == "read-file":
            # An agent loop as a tool-calling model of the generic/hermes family plays it:
            # a Read of the path after the script's name, then, once that call's result is
            # in the prompt, an answer quoting it (and nothing else from the prompt).
            generation.put(Prefilled(len(job.prompt), 0.0))
            results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.S)
            if results:
                quoted = results[-1].split("<system-reminder>")[0].strip()
                emit(f"The file reads:\n{quoted}")
            else:
                path = re.findall(r"SCRIPT:read-file (\S+)", text)[-1]
                call = json.dumps({"name": "Read", "arguments": {"file_path": path}})
                emit(f"I will read it.\n<tool_call>\n{call}\n</tool_call>")
            generation.put(Done("stop"))
            return
        elif script == "think":
            emit("<think>The user wants a number.</think>Forty-two.")
            generation.put(Done("stop"))
            return
        elif script == "crash-mid-text":
            emit("Hello")
            generation.put(Failed("RuntimeError: the engine crashed"))
            return
        # Stalled: hold the engine until the daemon cancels the work, as MLX would between steps.
        generation.wait_cancelled()
        generation.put(Done("cancelled"))


def create_app() -> App:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(os.environ["FAKE_TOKENIZER_DIR"])
    loaded = profiles.load(os.environ["ANYCLAUDE_PROFILE"])
    return App(Server(loaded, make_engine=lambda key, model, profile: ScriptedEngine(tokenizer)))
