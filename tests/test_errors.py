"""User errors reach the command line as one message and exit 1; bugs keep their traceback."""

import errno
import subprocess
import sys

import pytest

from krea2_train.errors import EXIT_USER_ERROR, UsageError, report_user_errors
from krea2_train.model.layouts import CheckpointError
from krea2_train.store.errors import StoreUnavailable
from krea2_train.train.checkpoint import CheckpointWriteError, NoCheckpointError


@pytest.mark.parametrize("error", [
    CheckpointError("checkpoint.safetensors is another model"),
    NoCheckpointError("run x has no committed checkpoint"),
    StoreUnavailable("cannot reach PostgreSQL at localhost:5432"),
    CheckpointWriteError("disk full while writing step-00000010"),
    OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/step-00000010"),
    FileExistsError(errno.EEXIST, "File exists", "samples.png"),  # an --out that names an existing file of another kind
])
def test_user_errors_print_one_line_and_exit_1(error, capsys):
    def fail() -> int:
        raise error

    assert report_user_errors("krea2", fail) == EXIT_USER_ERROR
    printed = capsys.readouterr().err
    assert printed.startswith("krea2: error: ") and str(error) in printed and "Traceback" not in printed


@pytest.mark.parametrize("error", [KeyError("model.weight"), OSError(errno.EIO, "I/O error"), RuntimeError("CUDA error")])
def test_bugs_and_unexplained_errors_keep_their_traceback(error):
    def fail() -> int:
        raise error

    with pytest.raises(type(error)):
        report_user_errors("krea2", fail)


def test_krea2_traceback_shows_every_traceback(monkeypatch):
    monkeypatch.setenv("KREA2_TRACEBACK", "1")

    def fail() -> int:
        raise CheckpointError("corrupt")

    with pytest.raises(CheckpointError):
        report_user_errors("krea2", fail)


def test_krea2_command_reports_a_corrupt_checkpoint_without_a_traceback(tmp_path):
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"garbage")
    export = [sys.executable, "-m", "krea2_train.cli", "export", str(corrupt), "--layout", "diffusers", "--out", str(tmp_path / "out")]
    done = subprocess.run(export, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("krea2: error: ") and "truncated or not a safetensors file" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_the_trainer_records_a_user_error_for_the_launcher(tmp_path, monkeypatch, capsys):
    """python -m krea2_train on an error a restart meets again: one message, exit 1, and
    runs/<run>/user_error.txt, which launch/slurm/run_training.sh reads to not resubmit."""
    import krea2_train.train.trainer as trainer
    from krea2_train.__main__ import main
    from krea2_train.errors import USER_ERROR_RECORD

    def foreign_checkpoint(config):
        raise CheckpointError("stage.init_from's checkpoint x.safetensors has a different model config")

    monkeypatch.setattr(trainer, "run", foreign_checkpoint)
    assert main(["--config", "stage/pretrain_256", f"runs_root={tmp_path}", "run_name=pt"]) == 1
    assert capsys.readouterr().err.startswith("krea2_train: error: stage.init_from's checkpoint")
    assert (tmp_path / "pt" / USER_ERROR_RECORD).read_text().startswith("CheckpointError: stage.init_from's checkpoint")

    def bug(config):
        raise KeyError("model.weight")

    monkeypatch.setattr(trainer, "run", bug)
    with pytest.raises(KeyError):
        main(["--config", "stage/pretrain_256", f"runs_root={tmp_path}", "run_name=other"])
    assert not (tmp_path / "other").exists()  # a bug may go away on a restart: no record

    def database_down(config):
        raise StoreUnavailable("cannot reach PostgreSQL at db:5432/krea2")

    monkeypatch.setattr(trainer, "run", database_down)
    assert main(["--config", "stage/pretrain_256", f"runs_root={tmp_path}", "run_name=third"]) == 1
    assert not (tmp_path / "third").exists()  # the database may be back by the next start


def test_a_model_directory_that_is_not_there_is_a_lasting_user_error(tmp_path, capsys):
    """A mistyped encoder path: one line naming the setting and the path, exit 1, and the record
    that keeps the launcher from resubmitting the same typo (it was a traceback and no record)."""
    from krea2_train.__main__ import main
    from krea2_train.errors import USER_ERROR_RECORD, MissingPathError, is_lasting_error

    assert main(["--config", "stage/pretrain_256", "irepa.encoder=/no/such/dinov2", f"runs_root={tmp_path}", "run_name=pt"]) == 1
    printed = capsys.readouterr().err  # after the tiny text encoder's progress bar
    assert "\nkrea2_train: error: irepa.encoder='/no/such/dinov2' is not a local transformers model directory" in printed
    assert "Traceback" not in printed
    assert (tmp_path / "pt" / USER_ERROR_RECORD).read_text().startswith("MissingPathError: irepa.encoder=")
    error = MissingPathError("text encoder directory /x does not exist")
    assert is_lasting_error(error) and isinstance(error, FileNotFoundError) and str(error).endswith("/x does not exist")


def test_a_missing_init_from_names_the_setting(tmp_path, capsys):
    from krea2_train.__main__ import main

    assert main(["--config", "stage/lora", "stage.init_from=/no/krea2-raw.safetensors", f"runs_root={tmp_path}", "run_name=l"]) == 1
    assert ("krea2_train: error: stage.init_from='/no/krea2-raw.safetensors': '/no/krea2-raw.safetensors' does not exist"
            in capsys.readouterr().err)
    from krea2_train.conditioning.conditioner import build_conditioner
    from krea2_train.errors import MissingPathError

    with pytest.raises(MissingPathError, match="^conditioning.text_encoder='/no/qwen3-vl-4b': the text encoder directory does not exist$"):
        build_conditioner("pixel", "/no/qwen3-vl-4b")
    with pytest.raises(MissingPathError, match="^conditioning.autoencoder_path='/no/vae': the VAE directory does not exist$"):
        build_conditioner("qwen_image", tmp_path, autoencoder_path="/no/vae")  # checked before any weight loads


def test_a_bad_override_is_recorded_and_a_new_start_clears_the_record(tmp_path, monkeypatch):
    """The Slurm launcher passes run_name= and runs_root=: a config that does not compose is
    recorded there too (a typo would fail every restart); the next start removes a stale record."""
    import krea2_train.train.trainer as trainer
    from krea2_train.__main__ import main
    from krea2_train.errors import USER_ERROR_RECORD

    record = tmp_path / "pt" / USER_ERROR_RECORD
    assert main(["--config", "stage/pretrain_256", "optim.lrr=1e-4", f"runs_root={tmp_path}", "run_name=pt"]) == 2
    assert "unknown config key 'optim.lrr'" in record.read_text()

    def database_down(config):
        raise StoreUnavailable("cannot reach PostgreSQL at db:5432/krea2")

    monkeypatch.setattr(trainer, "run", database_down)  # the typo fixed, the database away: retryable
    assert main(["--config", "stage/pretrain_256", f"runs_root={tmp_path}", "run_name=pt"]) == 1
    assert not record.exists()


def test_a_command_line_that_does_not_parse_is_recorded_for_the_launcher(tmp_path, capsys):
    """`--confg` (a typo of an option, not of an override) exits 2 before any config exists: the
    launcher's run_name= and runs_root= still name the run, so the record keeps the job from
    resubmitting the typo; --help and a run without those keys record nothing."""
    from krea2_train.__main__ import main
    from krea2_train.errors import USER_ERROR_RECORD

    with pytest.raises(SystemExit) as stop:
        main(["--confg", "stage/lora", f"runs_root={tmp_path}", "run_name=pt"])
    assert stop.value.code == 2 and "required: --config" in capsys.readouterr().err
    assert (tmp_path / "pt" / USER_ERROR_RECORD).read_text().startswith(
        f"UsageError: the command line does not parse: --confg stage/lora runs_root={tmp_path} run_name=pt")
    with pytest.raises(SystemExit) as stop:
        main(["--config", "stage/sft", "--print_config", f"runs_root={tmp_path}", "run_name=other"])
    assert stop.value.code == 2 and "unrecognized arguments: --print_config" in capsys.readouterr().err
    assert (tmp_path / "other" / USER_ERROR_RECORD).is_file()
    with pytest.raises(SystemExit) as stop:
        main(["--help", f"runs_root={tmp_path}", "run_name=third"])
    assert stop.value.code == 0 and not (tmp_path / "third").exists()


def test_a_full_disk_under_the_metrics_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from krea2_train.train import metrics as metrics_module
    from krea2_train.train.metrics import MetricsLogger

    metrics = MetricsLogger(tmp_path, rank=0, total_steps=10, wandb_mode="disabled")

    def full_disk(path, line, **kwargs):
        assert path == metrics.jsonl_path
        raise OSError(errno.ENOSPC, "No space left on device")  # as os.write reports it: no file name

    monkeypatch.setattr(metrics_module, "append_line", full_disk)

    def log():
        metrics.log_step(1, {"loss": 1.0}, step_time=0.1)

    assert report_user_errors("krea2_train", log) == EXIT_USER_ERROR
    assert f"No space left on device: '{metrics.jsonl_path}'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "train", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["bench", "train", "--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
    (["bench", "train", "--lora", "-1"], "argument --lora: must be an integer >= 0, got -1"),
    (["bench", "ckpt", "--ckpt-saves", "0"], "argument --ckpt-saves: must be a positive integer, got 0"),
    (["sample", "--checkpoint", "x", "--prompt", "a", "--steps", "-1"], "argument --steps: must be a positive integer, got -1"),
    (["sample", "--checkpoint", "x", "--prompt", "a", "--guidance", "abc"], "argument --guidance: must be a number >= 0, got 'abc'"),
    (["average", "run", "--last", "0", "--layout", "original", "--out", "x.safetensors"], "argument --last: must be a positive integer"),
    (["lora", "memory", "--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["data", "shapes", "--out", "x", "--n", "0"], "argument --n: must be a positive integer, got 0"),
    (["demo", "--scale", "0"], "argument --scale: must be a positive number, got 0"),
    (["demo", "--stages", "0"], "argument --stages: must be an integer from 1 to 8, got 0"),
    (["demo", "--sample-steps", "0"], "argument --sample-steps: must be an integer from 1 to 1000, got 0"),
    (["lora", "memory", "--resolution", "1000"], "argument --resolution: must be a positive multiple of 16 px, got 1000"),
    (["lora", "memory", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["bench", "data", "--queue-workers", "0"], "argument --queue-workers: must be a positive integer, got 0"),
    (["data", "work", "--job", "decode", "--workers", "0"], "argument --workers: must be a positive integer, got 0"),
    (["data", "pack-target", "--dataset", "d", "--resolution", "32", "--out", "s", "--pixel-multiple", "0"],
     "argument --pixel-multiple: must be a positive integer, got 0"),
    (["data", "balance", "--dataset", "d", "--name", "n", "--target", "10", "--levels", "8", "0"],
     "argument --levels: must be a positive integer, got 0"),
    (["sample", "--checkpoint", "x", "--prompt", "a", "--device", "gpu9"], "argument --device: 'gpu9' is not a device"),
    (["lora", "extract", "--from", "a", "--to", "b", "--rank", "2", "--out", "l.safetensors", "--device", "cuda:99"],
     "argument --device: cuda:99: this machine has"),
])
def test_numbers_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    """Before any work: exit 2 and the argument named, not a traceback from deep inside."""
    from krea2_train.cli import main

    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_the_command_list_says_of_each_command_what_its_own_parser_says():
    """`krea2 --help` lists the commands without importing their modules: its help texts must
    stay those the modules register."""
    from krea2_train.cli import COMMAND_HELP, COMMAND_MODULES, build_parser

    assert set(COMMAND_HELP) == set(COMMAND_MODULES)
    for name in COMMAND_MODULES:
        subparsers = next(action for action in build_parser(name)._actions if action.dest == "command")
        registered = {choice.dest: choice.help for choice in subparsers._choices_actions}
        assert registered[name] == COMMAND_HELP[name], name
        command = subparsers.choices[name]  # and its own --help reads as plain text
        assert "``" not in (command.description or ""), name


def test_sampling_weights_outside_a_run_names_every_missing_conditioning_option(tmp_path):
    """An exported checkpoint carries no conditioning: one message names both options, with what a
    Krea 2 and a tiny CPU run's export take (before: one option per attempt)."""
    import argparse

    from krea2_train.train.sample import conditioning_settings

    args = argparse.Namespace(checkpoint=str(tmp_path / "export"), autoencoder=None, autoencoder_path=None, text_encoder=None,
                              max_text_tokens=None)
    with pytest.raises(UsageError, match="pass --autoencoder and --text-encoder .*--text-encoder runs/RUN/text_encoder --autoencoder pixel"):
        conditioning_settings(args, None)
    args.autoencoder = "pixel"
    with pytest.raises(UsageError, match="pass --text-encoder \\("):
        conditioning_settings(args, None)
