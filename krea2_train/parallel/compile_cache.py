"""A run's ``torch.compile`` results, kept in its directory so a restart on any node starts warm.

Inductor caches compiled graphs and kernels on the local disk (``/tmp/torchinductor_USER``): a
restart on the same node finds them, a restart on another node (after a node failure) compiles
everything again, which is most of a start's time with compiled blocks (full-width blocks with
Triton autotuning take minutes). ``torch.compiler.save_cache_artifacts`` serializes the
artifacts a process compiled or found (Inductor graphs with their Triton kernels, AOTAutograd,
autotuning), and ``load_cache_artifacts`` writes them into the local caches of a new process,
where the next compile hits them. On CPU the C++ kernels are not among the artifacts and are
compiled again: the tiny model's first step takes 27 s cold, 19 s with the artifacts and 2.4 s
with the node's own warm cache (docs/benchmarks.md).

Rank 0 writes ``run_dir/compile_cache.bin`` (one writer, published atomically: no lock on the
shared filesystem); every rank loads it at a start. A cache is only a shortcut: one that does not
load (another torch version, a damaged file) is logged and compiling goes on as without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from krea2_train.files import published

logger = logging.getLogger(__name__)

COMPILE_CACHE_NAME = "compile_cache.bin"


def load_compile_cache(path: str | Path) -> int:
    """Write the artifacts of ``path`` into this process's compile caches; returns how many (0
    when there is no file, or it does not load)."""
    path = Path(path)
    if not path.is_file():
        return 0
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as error:  # a shortcut that fails costs a compile, never the start
        logger.warning("compile cache %s does not load (%s: %s): compiling without it", path, type(error).__name__, error)
        return 0
    if info is None:  # torch logged why (a checksum, a pickle) and loaded nothing
        logger.warning("compile cache %s does not load (torch could not read it): compiling without it", path)
        return 0
    loaded = sum(len(keys) for keys in info.artifacts.values())
    logger.info("compile cache: %d artifacts loaded from %s", loaded, path)
    return loaded


class CompileCacheWriter:
    """Rank 0's writer of ``path``: :meth:`save` publishes the artifacts this process compiled or
    found when they grew since the last save (serializing them again is cheap)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # a start that loaded the file and compiled nothing new finds the same bytes: not rewritten
        self.saved_bytes = self.path.stat().st_size if self.path.is_file() else 0

    def save(self) -> bool:
        """Publish the artifacts if they changed; returns whether it wrote. Failures are logged."""
        try:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is None or len(artifacts[0]) == self.saved_bytes:
                return False
            with published(self.path, durable=False) as temporary:
                temporary.write_bytes(artifacts[0])
        except Exception as error:  # never a failure of the run
            logger.warning("compile cache %s not written (%s: %s)", self.path, type(error).__name__, error)
            return False
        self.saved_bytes = len(artifacts[0])
        logger.info("compile cache: %.1f MB written to %s", self.saved_bytes / 1e6, self.path)
        return True


def compile_cache_counts() -> dict[str, int]:
    """This process's Inductor graph cache hits and misses (compiled graphs) so far."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"hits": int(inductor["fxgraph_cache_hit"]), "misses": int(inductor["fxgraph_cache_miss"])}
