"""The run's compile cache file: a file that does not load costs a compile, never the start; rank
0 rewrites it only when the artifacts grew. (A real restart from it: tests/test_trainer.py.)"""

from __future__ import annotations

import logging

import torch

from krea2_train.parallel import compile_cache
from krea2_train.parallel.compile_cache import CompileCacheWriter, load_compile_cache


def test_a_missing_or_damaged_cache_file_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / compile_cache.COMPILE_CACHE_NAME
    assert load_compile_cache(path) == 0  # none yet: a first start
    path.write_bytes(b"\x00 not a cache \xff" * 10)
    with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
        assert load_compile_cache(path) == 0
    assert f"compile cache {path} does not load" in caplog.text and "compiling without it" in caplog.text


def test_the_writer_publishes_only_grown_artifacts_and_never_raises(tmp_path, monkeypatch, caplog):
    path = tmp_path / compile_cache.COMPILE_CACHE_NAME
    artifacts = [None]
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: artifacts[0])
    writer = CompileCacheWriter(path)
    assert writer.save() is False and not path.exists()  # nothing compiled yet
    artifacts[0] = (b"graphs-1", None)
    assert writer.save() is True and path.read_bytes() == b"graphs-1"
    assert writer.save() is False  # unchanged: not rewritten
    assert CompileCacheWriter(path).save() is False  # a start that loaded the same bytes does not rewrite them
    artifacts[0] = (b"graphs-1 and 2", None)
    assert writer.save() is True and path.read_bytes() == b"graphs-1 and 2"
    assert list(tmp_path.iterdir()) == [path]  # published by a rename: no temporary file left

    def failing():
        raise RuntimeError("serializer broke")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", failing)
    with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
        assert writer.save() is False
    assert "not written (RuntimeError: serializer broke)" in caplog.text and path.read_bytes() == b"graphs-1 and 2"
