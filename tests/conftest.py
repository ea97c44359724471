"""Fixtures: the real daemon (Granian on a free port, the tiny profile), and the official SDK."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anthropic
import pytest

from anyclaude.engine.cpu import blas
from bench.harness import Daemon



def pytest_configure(config):
    # In-process MLX (model, cache and constraint tests) runs several times faster
    # with OpenBLAS in front of the bundled BLAS, as the daemon does it: re-run
    # pytest so, with its output capture undone so the new process has our terminal.
    capture = config.pluginmanager.getplugin("capturemanager")
    capture.suspend_global_capture(in_=True)
    blas.preload_and_reexec(["-m", "pytest", *sys.argv[1:]], module=None)
    capture.resume_global_capture()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    os.environ["ANYCLAUDE_CACHE"] = str(cache)  # the GGUF import goes here, for the daemon too
    return cache


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> Path:
    """The tiny profile's model, imported from its GGUF as the daemon does it."""
    from anyclaude import models, profiles

    (model,) = profiles.load("tiny").profile.models.values()
    return Path(models.prepare(model))


@pytest.fixture(scope="session")
def tiny_net(tiny_model):
    """The tiny model and its tokenizer in this process, dequantized as the engine does it
    on a CPU (much faster there). Shared: tests must not change its weights."""
    from mlx_lm import load

    from anyclaude.engine.cpu import fast as cpu

    model, tokenizer = load(str(tiny_model))
    cpu.dequantize(model)
    return model, tokenizer


_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report() -> list[str]:
    """Lines for the end of the test run's output (what ran, e.g. the Claude Code version)."""
    return _REPORT


def pytest_terminal_summary(terminalreporter):
    for line in _REPORT:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, model_cache, tiny_model):
    d = Daemon("tiny", model_cache, tmp_path_factory.mktemp("daemon") / "daemon.log")
    try:
        d.wait_ready()
        yield d
    finally:
        code = d.stop()
        assert code == 0, f"daemon exited with {code}:\n{d.output()}"


@pytest.fixture(scope="session")
def client(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="sk-local-test", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)
