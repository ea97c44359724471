"""Finding OpenBLAS and putting it in front of the reference BLAS that the MLX CPU wheel bundles."""

from __future__ import annotations

import glob
import os
import platform
import sys
import sysconfig

# Library names that export the cblas_* symbols MLX calls, best first.
_OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so")
# Debian installs each OpenBLAS flavour in its own directory; pthread plays best
# with MLX's own threads (the OpenMP build spins up a second, competing pool).
_FLAVOURS = ("openblas-pthread", "openblas-openmp", "openblas-serial", "openblas", "")


def openblas_path() -> str | None:
    """Path of an installed OpenBLAS shared library to put in LD_PRELOAD, or None.

    Looks in the multiarch library directories (where Debian's libopenblas0-*
    packages install it) and the usual lib directories. Only Linux is searched:
    elsewhere MLX does not use the bundled reference BLAS.
    """
    if sys.platform != "linux":
        return None
    for directory in _library_dirs():
        for flavour in _FLAVOURS:
            for name in _OPENBLAS_NAMES:
                path = os.path.join(directory, flavour, name)
                if os.path.isfile(path):
                    return path
    return None


def _library_dirs() -> list[str]:
    triplets = []
    if multiarch := sysconfig.get_config_var("MULTIARCH"):
        triplets.append(multiarch)
    triplets.append(f"{platform.machine()}-linux-gnu")
    dirs = [f"{prefix}/lib/{triplet}" for triplet in triplets for prefix in ("/usr", "/usr/local")]
    # Any other multiarch directory this machine has (e.g. an unusual triplet).
    dirs += sorted(glob.glob(f"/usr/lib/{platform.machine()}-*"))
    dirs += ["/usr/lib64", "/usr/lib", "/usr/local/lib64", "/usr/local/lib"]
    return list(dict.fromkeys(dirs))


def loaded() -> bool:
    """Whether an OpenBLAS library is mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            return "libopenblas" in maps.read()
    except OSError:
        return False


def preload_and_reexec(argv: list[str], module: str | None = "anyclaude") -> None:
    """Re-run this command (`python -m module *argv`) with OpenBLAS in LD_PRELOAD, if
    installed and not there yet.

    LD_PRELOAD only takes effect when a process starts, and it is the only way to
    put OpenBLAS's cblas_* in front of the bundled ones. ANYCLAUDE_BLAS=bundled opts out.
    """
    if os.environ.get("ANYCLAUDE_BLAS") == "bundled":
        return
    library = openblas_path()
    preloaded = os.environ.get("LD_PRELOAD", "")
    if library is None or library in preloaded.split(":"):
        return
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (library, preloaded) if p))
    prefix = ["-m", module] if module else []
    os.execve(sys.executable, [sys.executable, *prefix, *argv], env)
