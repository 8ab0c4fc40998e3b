"""``krea2 bench all``: every benchmark runs, a failing one is reported, and the suite stays on CPU.

The benchmarks' own ``run`` functions are replaced by stand-ins (the real ones take minutes); the
dispatch, the arguments each gets, the printing and the exit status are the real ones.
"""

import argparse
import importlib
import json
from dataclasses import dataclass, field

import pytest

from krea2_train.bench import BENCHES
from krea2_train.cli import main

MODULES = [module for modules in BENCHES.values() for module in modules]
FAILING = "krea2_train.bench.ckpt"


@dataclass
class Recorder:
    """What the stand-ins saw: each one's arguments, and the output printed before each ran."""

    capsys: pytest.CaptureFixture
    args: dict[str, argparse.Namespace] = field(default_factory=dict)
    out: str = ""
    err: str = ""

    def read(self) -> str:
        captured = self.capsys.readouterr()
        self.out += captured.out
        self.err += captured.err
        return self.out


def _row(name: str) -> dict:
    return {"bench": name.rsplit(".", 1)[1], "metric": f"ran {name}", "value": 1.0, "unit": "x", "target": None, "met": None}


@pytest.fixture
def recorder(monkeypatch, capsys) -> Recorder:
    """Replaces every benchmark's run by one that returns one row (the FAILING one raises)."""
    recorder = Recorder(capsys)

    def stand_in(name: str):
        def run(args: argparse.Namespace) -> list[dict]:
            printed = recorder.read()
            for earlier in recorder.args.keys() - {FAILING}:
                assert f"ran {earlier}" in printed, f"{earlier}'s rows were not printed before {name} ran"
            recorder.args[name] = args
            if name == FAILING:
                raise RuntimeError("disk on fire")
            return [_row(name)]

        return run

    for name in MODULES:
        monkeypatch.setattr(importlib.import_module(name), "run", stand_in(name))
    return recorder


def test_a_failing_bench_is_reported_the_others_still_run_and_the_exit_status_is_1(recorder, tmp_path):
    json_path = tmp_path / "rows.json"
    assert main(["bench", "all", "--json", str(json_path)]) == 1
    recorder.read()

    assert list(recorder.args) == MODULES  # every bench ran, those after the failing one too
    succeeded = [name for name in MODULES if name != FAILING]
    final_table = recorder.out.split("\n\n")[-1]
    assert all(f"ran {name}" in final_table for name in succeeded)
    assert f"FAILED {FAILING}: RuntimeError: disk on fire" in recorder.err.splitlines()[-1]
    assert "Traceback" in recorder.err
    assert [row["metric"] for row in json.loads(json_path.read_text())] == [f"ran {name}" for name in succeeded]


def test_every_bench_passing_exits_0(recorder, monkeypatch):
    monkeypatch.setattr(importlib.import_module(FAILING), "run", lambda args: [_row(FAILING)])
    assert main(["bench", "all"]) == 0
    assert "FAILED" not in recorder.err + recorder.capsys.readouterr().err


def test_the_train_bench_runs_on_cpu_on_a_gpu_host_and_the_others_with_their_defaults(recorder, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    main(["bench", "all"])
    assert recorder.args["krea2_train.bench.train"].device == "cpu"
    assert recorder.args["krea2_train.bench.ckpt"].ckpt_model == "100m"
    assert recorder.args["krea2_train.bench.data_loader"].loader_resolutions == [256, 64]


def test_a_bench_whose_arguments_do_not_parse_fails_alone(recorder, monkeypatch):
    import krea2_train.bench as bench

    monkeypatch.setattr(importlib.import_module(FAILING), "run", lambda args: [_row(FAILING)])
    monkeypatch.setitem(bench.ALL_OPTIONS, MODULES[0], ["--no-such-option"])  # argparse exits on it
    assert main(["bench", "all"]) == 1
    recorder.read()
    assert list(recorder.args) == [m for m in MODULES[1:] if m != FAILING]  # the others ran (FAILING's lambda records nothing)
    assert f"FAILED {MODULES[0]}: SystemExit: 2" in recorder.err
