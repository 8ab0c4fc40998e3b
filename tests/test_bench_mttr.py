"""``krea2 bench mttr`` on the tiny model: a rank is killed, torchrun restarts the group, and the
bench reports the recovery it measured and the run log's (no speed is asserted)."""

import argparse
import math

import pytest

from krea2_train.bench import mttr as bench_mttr


@pytest.mark.slow
def test_mttr_bench_measures_a_real_restart(public_tmp_dir, tmp_path, monkeypatch):
    from krea2_train.store.db import DSN_ENV, STORE_DIR_ENV

    monkeypatch.setenv(STORE_DIR_ENV, str(tmp_path / "the_users_store"))  # the bench must train on a store of its own
    monkeypatch.setenv(DSN_ENV, "postgresql://bench@127.0.0.1:9/the_users_database")
    parser = argparse.ArgumentParser()
    bench_mttr.add_arguments(parser)
    args = parser.parse_args(["--mttr-models", "tiny", "--mttr-kill-step", "3", "--mttr-dir", str(public_tmp_dir)])
    measured, logged, *phases = bench_mttr.run(args)
    assert measured["metric"] == "tiny: SIGKILL -> first step after restart"
    assert logged["metric"] == "tiny: recovery in the run log"
    assert [row["metric"] for row in phases] == [
        "tiny: relaunch (failure -> process up)", "tiny: setup (imports, model, checkpoint)", "tiny: first step (compilation, warm-up)"]
    for row in (measured, logged, *phases):
        assert row["bench"] == "mttr" and row["unit"] == "s"
        assert row["value"] > 0 and math.isfinite(row["value"])
    assert sum(row["value"] for row in phases) == pytest.approx(logged["value"], abs=0.5)  # the recovery, split
    assert measured["met"] == (measured["value"] < bench_mttr.TINY_TARGET_S)
    assert list(public_tmp_dir.iterdir()) == []  # its runs are removed
    assert not (tmp_path / "the_users_store").exists()
