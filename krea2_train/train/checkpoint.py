"""Distributed, asynchronous, verified checkpoints on torch DCP.

A run directory holds its checkpoints under ``checkpoints/``::

    runs/NAME/
      model_config.json            Krea2DiT keywords (written by the trainer)
      checkpoints/
        step-00000100/             committed: manifest.json + DCP files + per-rank state
          manifest.json
          .metadata  __0_0.distcp  __1_0.distcp ...
          rank_state/rank-00000.pt rank-00001.pt ...
        step-00000200.tmp-TOKEN/   being written by the start TOKEN, or left by a crash (removed
                                   once nothing has written to it for STALE_TMP_S, at a start or
                                   after a commit)

A save writes everything under ``step-N.tmp-TOKEN/`` (TOKEN: one per start of the run, so two
starts running at once never write into each other's, and remove another's only once nothing has
written to it for STALE_TMP_S): every rank writes its DCP shard file (in a
background thread with ``async_mode="async"``) and its own ``rank_state`` file (RNG states and
rank-local Statefuls, which differ between ranks and so cannot live in DCP, which keeps one copy of
each non-tensor value). When every rank finished, rank 0 verifies the directory (the DCP metadata
loads, each file it references exists with the size the metadata implies, every rank's state file
exists), writes ``manifest.json`` (every file's size, and its SHA-256 computed by the rank that
wrote it, in the background after the write) and renames the directory to ``step-N/``. Only a
directory that has a manifest whose listed files all exist with their listed sizes counts as a
checkpoint; loading also checks the files' bytes against their digests, each rank a share.

Values of the global ``stateful`` dict that are not tensors (a TrainState, a loader's
``{epoch, batch index}``) must be identical on every rank; DTensor/FSDP2-sharded models and their
optimizers go in through :class:`ModelOptimizerState`, which reshards on load to any world size.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from krea2_train.errors import Krea2Error, MissingPathError, is_lasting_error
from krea2_train.files import file_sha256, fsync_path, write_text
from krea2_train.parallel.compat import world_collective_timeout
from krea2_train.train.runlog import RUNLOG_NAME

logger = logging.getLogger(__name__)
# One process without a process group is a supported mode here, not an accident worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized", category=UserWarning)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
RANK_STATE_DIR = "rank_state"
DCP_METADATA_NAME = ".metadata"
MODEL_CONFIG_NAME = "model_config.json"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 900.0  # an unfinished checkpoint untouched this long belongs to a start that died
_STEP_PREFIX = "step-"


class NoCheckpointError(Krea2Error, FileNotFoundError):
    """A run (or a requested step) has no committed checkpoint."""


class CheckpointWriteError(Krea2Error, RuntimeError):
    """Writing or committing a checkpoint failed; the previous checkpoint stays the latest."""

    retryable = True  # a flaky or full shared disk may be fine by the next start


class CheckpointVerificationError(Krea2Error, RuntimeError):
    """A checkpoint directory does not hold the files its metadata or manifest promise."""


class CheckpointMismatchError(CheckpointVerificationError):
    """A committed checkpoint that is not this run's: another model's weights, or another step's."""


class CheckpointUnreadableError(CheckpointVerificationError):
    """A committed checkpoint whose files do not read (corrupt, or a storage fault): the one
    before it is loaded instead."""

    retryable = True  # a storage fault may be gone by the next start


class CheckpointCorruptError(CheckpointUnreadableError):
    """A committed checkpoint whose bytes are known bad: a file that changed since it was written
    (SHA-256), or one that does not parse. Not a storage fault that may pass, which is only
    fallen back from: a corrupt checkpoint is also moved aside (see CheckpointManager.load)."""


class CheckpointLoadError(Krea2Error, RuntimeError):
    """Loading a committed checkpoint failed for another reason than its bytes (out of memory, a
    state that no longer fits); an older checkpoint would fail alike, so nothing falls back."""

    retryable = True


class CheckpointSettingsError(CheckpointLoadError):
    """A committed checkpoint whose state refuses this start's settings (its loader state was saved
    with another batch size): every restart would meet it, so it is recorded and not retried."""

    retryable = False


# ----------------------------------------------------------------------------------------------
# Stateful helpers
# ----------------------------------------------------------------------------------------------


class ModelOptimizerState(Stateful):
    """The model and its optimizer(s) as one Stateful, through ``get_state_dict``/``set_state_dict``.

    Keys are the plain parameter FQNs (FSDP2, ``torch.compile`` and activation-checkpoint wrappers
    do not show), tensors are DTensors when the model is sharded, and the optimizer state is keyed
    by parameter FQN, so DCP reshards both to any world size on load.
    ``state_dict()`` -> ``{"model": {fqn: tensor}, "optimizer": {...}}`` (no optimizer: model only).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
            return
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optimizer"]
        )


@dataclass
class TrainState(Stateful):
    """Progress counters of a run (identical on every rank)."""

    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0  # the non-finite steps in a row that end at ``step`` (a signal saves inside a streak)

    # fields a checkpoint written before they existed lacks: loaded as they are (see optional_state_keys)
    optional_state_keys = ("consecutive_skips",)

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(state_dict) - names)
        if unknown:
            raise ValueError(f"TrainState has no fields {unknown}; known fields: {sorted(names)}")
        for name, value in state_dict.items():
            setattr(self, name, int(value))


class _PartialState(Stateful):
    """``inner``'s state without the keys ``missing``; loading passes what was read on to it."""

    def __init__(self, inner: Stateful, missing: set[str]) -> None:
        self.inner, self.missing = inner, missing

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.inner.state_dict().items() if key not in self.missing}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def without_missing_optional_keys(stateful: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """``stateful`` for loading a checkpoint whose DCP keys are ``saved``: an entry with
    ``optional_state_keys`` (state added after checkpoints were written without it) asks only for
    those of them the checkpoint holds, so an older checkpoint still loads (DCP refuses a key it
    lacks); the others keep their current values. Every other key must be there."""
    adjusted = dict(stateful)
    for name, value in stateful.items():
        optional = getattr(value, "optional_state_keys", ())
        missing = {key for key in optional if f"{name}.{key}" not in saved}
        if missing:
            adjusted[name] = _PartialState(value, missing)
    return adjusted


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python ``random``, numpy's global generator, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed_rng(seed: int, step: int, rank: int) -> int:
    """Seed every generator from ``(seed, step, rank)``; returns the 64-bit seed used."""
    digest = hashlib.sha256(f"krea2-rng:{seed}:{step}:{rank}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little")
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)  # also seeds every CUDA device
    return derived


# ----------------------------------------------------------------------------------------------
# Directory names, verification and committed checkpoints
# ----------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def tmp_dir_name(step: int, token: str) -> str:
    """The directory a start (``token``) writes ``step`` into before committing it."""
    return f"{step_dir_name(step)}{TMP_SUFFIX}-{token}"


def set_aside_dir_name(step: int) -> str:
    """Where a committed checkpoint that failed to load is moved (see CheckpointManager.load): a
    name no step or unfinished-checkpoint pattern matches, so nothing loads, counts or removes it."""
    return f"unreadable-{step_dir_name(step)}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"


def is_tmp_dir_name(name: str) -> bool:
    """``step-N.tmp`` (written before per-start names) or ``step-N.tmp-TOKEN``."""
    stem, suffix, _ = name.partition(TMP_SUFFIX)
    return bool(suffix) and _parse_step(stem) is not None


def _parse_step(name: str) -> int | None:
    if not name.startswith(_STEP_PREFIX):
        return None
    digits = name[len(_STEP_PREFIX) :]
    return int(digits) if digits.isdigit() else None


def rank_state_path(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir / RANK_STATE_DIR / f"rank-{rank:05d}.pt"


def read_dcp_metadata(checkpoint_dir: str | os.PathLike):
    """The DCP ``Metadata`` of ``checkpoint_dir``.

    Raises:
        CheckpointVerificationError: it does not load (missing, truncated, not DCP's); a
            CheckpointCorruptError when its bytes do not parse.
    """
    try:
        return FileSystemReader(str(checkpoint_dir)).read_metadata()
    except Exception as error:
        error_class = CheckpointCorruptError if _is_corrupt(error) else CheckpointVerificationError
        raise error_class(f"the DCP metadata of {checkpoint_dir} does not load: {type(error).__name__}: {error}") from error


def dcp_expected_file_sizes(checkpoint_dir: str | os.PathLike) -> dict[str, int]:
    """File sizes the DCP metadata of ``checkpoint_dir`` implies (relative path -> bytes).

    Raises:
        CheckpointVerificationError: the metadata does not load.
    """
    metadata = read_dcp_metadata(checkpoint_dir)
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    return sizes


def _file_problems(directory: Path, expected_sizes: Mapping[str, int]) -> list[str]:
    problems = []
    for relative_path, size in sorted(expected_sizes.items()):
        path = directory / relative_path
        if not path.is_file():
            problems.append(f"{relative_path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{relative_path} has {path.stat().st_size} bytes, expected {size}")
    return problems


def verify_written_checkpoint(directory: Path, world_size: int) -> dict[str, int]:
    """Check a freshly written checkpoint; returns every file in it (relative path -> bytes).

    Raises:
        CheckpointVerificationError: naming each missing or truncated file.
    """
    problems = _file_problems(directory, dcp_expected_file_sizes(directory))
    for rank in range(world_size):
        path = rank_state_path(directory, rank)
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"{path.relative_to(directory)} (rank {rank}'s state) is missing or empty")
    if problems:
        raise CheckpointVerificationError(f"checkpoint {directory} is incomplete: " + "; ".join(problems))
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def read_manifest(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a committed checkpoint, after checking every file it lists.

    Raises:
        CheckpointVerificationError: no or unreadable manifest, or a listed file missing or resized.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointVerificationError(f"{checkpoint_dir} has no valid {MANIFEST_NAME} ({error})") from error
    problems = _file_problems(checkpoint_dir, files)
    if problems:
        raise CheckpointVerificationError(
            f"checkpoint {checkpoint_dir} does not match its manifest: " + "; ".join(problems)
        )
    return manifest


DIGEST_THREADS = 8  # files hashed at once (hashlib releases the GIL, so a fast file system is read in parallel)


def check_file_digests(checkpoint_dir: str | os.PathLike, digests: Mapping[str, str]) -> None:
    """Check the files ``digests`` names (relative path -> SHA-256 recorded when written) in
    ``checkpoint_dir``, several at a time.

    Raises:
        CheckpointVerificationError: naming each file whose bytes changed since it was written, or
            that cannot be read.
    """
    from concurrent.futures import ThreadPoolExecutor

    checkpoint_dir = Path(checkpoint_dir)
    names = sorted(digests)
    try:
        with ThreadPoolExecutor(min(DIGEST_THREADS, max(1, len(names)))) as pool:
            found = dict(zip(names, pool.map(lambda name: file_sha256(checkpoint_dir / name), names)))
    except OSError as error:
        raise CheckpointVerificationError(f"checkpoint {checkpoint_dir}: {error}") from error
    changed = [name for name in names if found[name] != digests[name]]
    if changed:
        raise CheckpointCorruptError(
            f"checkpoint {checkpoint_dir}: the bytes of {', '.join(changed)} changed since they were written (SHA-256 mismatch)"
        )


def check_model_digests(checkpoint_dir: str | os.PathLike) -> None:
    """Check the bytes of the files that hold a committed checkpoint's model tensors against the
    digests its manifest recorded (any other checkpoint, or one written before digests were
    recorded: nothing to check). What reads a checkpoint's weights outside training (export, average, merge, sample,
    ``stage.init_from``) calls it, so a bit flip that keeps a file's size is refused, not exported.

    Raises:
        CheckpointVerificationError: as :func:`check_file_digests`; or the manifest does not verify.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not (is_dcp_checkpoint(checkpoint_dir) and (checkpoint_dir / MANIFEST_NAME).is_file()):
        return  # a safetensors file, a diffusers directory, a DCP checkpoint outside a run: no digests
    digests = read_manifest(checkpoint_dir).get("sha256", {})
    if not digests:
        return
    metadata = read_dcp_metadata(checkpoint_dir)
    try:
        prefix = _model_prefix(checkpoint_dir, metadata.state_dict_metadata)
    except CheckpointVerificationError:  # no Krea2DiT among its tensors: every file is checked
        prefix = ""
    model_files = {info.relative_path for index, info in metadata.storage_data.items() if index.fqn.startswith(prefix)}
    check_file_digests(checkpoint_dir, {name: digest for name, digest in digests.items() if name in model_files or name == DCP_METADATA_NAME})


def committed_checkpoints(checkpoints_dir: str | os.PathLike) -> dict[int, Path]:
    """Verified committed checkpoints under ``checkpoints_dir``, by step (ascending).

    Directories whose manifest is missing or does not match their files are left out, with a warning.
    """
    return _verified(step_dirs(checkpoints_dir))


def _verified(dirs: Mapping[int, Path]) -> dict[int, Path]:
    """The directories of ``dirs`` whose manifest verifies, by step; the others with a warning."""
    found = {}
    for step, path in dirs.items():
        try:
            read_manifest(path)
        except CheckpointVerificationError as error:
            logger.warning("not counting %s as a checkpoint: %s", path, error)
            continue
        found[step] = path
    return found


def step_dirs(checkpoints_dir: str | os.PathLike) -> dict[int, Path]:
    """Every ``step-N`` directory under ``checkpoints_dir``, committed or not, by step."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return {}
    found = {step: path for path in checkpoints_dir.iterdir() if (step := _parse_step(path.name)) is not None and path.is_dir()}
    return dict(sorted(found.items()))


def resumable_checkpoints(checkpoints_dir: str | os.PathLike) -> dict[int, Path]:
    """:func:`committed_checkpoints`, refusing a run whose checkpoint directories all fail to verify.

    Raises:
        CheckpointVerificationError: ``step-N`` directories exist and none verifies (corrupt manifests,
            or a storage fault): resuming would silently start the run over at step 0.
    """
    present = step_dirs(checkpoints_dir)
    committed = _verified(present)
    if present and not committed:
        listed = ", ".join(path.name for path in list(present.values())[-3:])
        raise CheckpointVerificationError(
            f"{len(present)} checkpoint director{'y' if len(present) == 1 else 'ies'} in {checkpoints_dir} ({listed}) and none"
            " verifies (see the warnings above): the run would start over at step 0. Fix the storage, or move"
            " checkpoints/ aside to start the run over on purpose"
        )
    return committed


def retained_steps(steps: Iterable[int], keep_last: int, keep_every: int) -> set[int]:
    """The last ``keep_last`` steps plus every multiple of ``keep_every`` (0: none)."""
    ordered = sorted(steps)
    kept = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        kept.update(step for step in ordered if step % keep_every == 0)
    return kept


def _models_by_prefix(stateful: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The DCP key prefix of each model in a save's or load's state (``KEY.model.``), and the model."""
    return {f"{key}.model.": value.model for key, value in stateful.items() if isinstance(value, ModelOptimizerState)}


def _describe_failure(error: BaseException) -> str:
    """One line per failing rank: the exception type and message, without DCP's traceback dump."""
    if isinstance(error, CheckpointException):
        return "; ".join(
            f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _trace) in sorted(error.failures.items())
        )
    return f"{type(error).__name__}: {error}"


def _disk_full_note(path: Path) -> str:
    """A note such as " (No space left on device: ...)" when ``path``'s filesystem is (nearly) full, else "".

    A write that fails for lack of space does not always say so: torch's zip writer reports only
    "file write failed". Checked before the failed attempt's files are removed.
    """
    try:
        usage = shutil.disk_usage(path if path.exists() else path.parent)
    except OSError:
        return ""
    full = usage.free < 2**20 or (usage.free < 2**30 and usage.free < 0.01 * usage.total)
    if not full:
        return ""
    return f" (No space left on device: {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on {path.parent})"


class _Staging:
    """The DCP stagers of async saves: one kept from save to save where this torch allows it.

    The time a save blocks training is the copy of the state into host memory; into buffers
    already allocated (and, with an accelerator, pinned) it is several times shorter than into
    fresh ones, at the price of one host copy of the state kept between saves. torch 2.13's
    ``DefaultStager`` keeps its buffers; torch 2.11's closes its state-dict stager after each
    stage (buffers freed, and a second stage fails), so there every save gets a fresh stager,
    which is DCP's own default behaviour. A probe of two stages at start tells which.
    """

    def __init__(self) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self._new = lambda: DefaultStager(  # noqa: E731
            StagingOptions(
                use_pinned_memory=torch.accelerator.is_available(),
                use_shared_memory=False,
                use_async_staging=False,  # the copy finishes before save() returns: training may then update
                use_non_blocking_copy=False,
            )
        )
        kept = self._new()
        try:
            for _ in range(2):
                kept.stage({"probe": torch.zeros(1)})
        except Exception:  # noqa: BLE001 - any failure of the probe means: not reusable here
            kept = None
        self._kept = kept

    @property
    def reuses_buffers(self) -> bool:
        return self._kept is not None

    def stager(self):
        return self._kept if self._kept is not None else self._new()


def _storage_writer(path: Path) -> FileSystemWriter:
    """The DCP writer of one checkpoint (one file per rank, fsynced)."""
    return FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True)


# ----------------------------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load` restored."""

    step: int
    path: Path
    saved_world_size: int
    rank_state_restored: bool  # False when the world size changed: RNG was reseeded instead


def _written_since(directory: Path, since: float) -> bool:
    """Whether ``directory``, a file in it or in its subdirectories one level down (``rank_state/``)
    was modified after ``since``; stops at the first that was."""
    if directory.stat().st_mtime > since:
        return True
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.stat(follow_symlinks=False).st_mtime > since:
                return True
            if entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as inner:
                    if any(child.stat(follow_symlinks=False).st_mtime > since for child in inner):
                        return True
    return False


class CheckpointManager:
    """Saves, commits, prunes and loads the checkpoints of one run.

    Args:
        run_dir: the run's directory; checkpoints go to ``run_dir/checkpoints``.
        interval: :meth:`save` writes when ``step % interval == 0`` (``<= 0``: only when forced).
        keep_last: committed checkpoints to keep, newest first.
        keep_every: also keep every step that is a multiple of this (0: none).
        async_mode: ``"async"`` writes in a background thread (``dcp.async_save``, thread mode)
            after a blocking copy of the state to host memory; ``"sync"`` writes before returning.
        seed: the run's seed, for reseeding RNGs when the world size changed.
        config_hash: recorded in each manifest; a mismatch on load is logged.
        tolerated_failures: saves in a row that may fail without :meth:`save` raising (0: none).
            A save that fails is logged and listed in :attr:`failed_saves` (step, message), and the previous
            checkpoint stays the latest; a save whose caller passes ``may_fail=False`` (the last of
            a run, one before an exit) and an explicit :meth:`wait` always raise.

    Collective: construct, save, wait and load on every rank, in the same order.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        interval: int,
        keep_last: int = 3,
        keep_every: int = 0,
        async_mode: Literal["async", "sync"] = "async",
        seed: int = 0,
        config_hash: str | None = None,
        tolerated_failures: int = 0,
    ) -> None:
        if tolerated_failures < 0:
            raise ValueError(f"tolerated_failures must be >= 0, got {tolerated_failures}")
        if async_mode not in ("async", "sync"):
            raise ValueError(f"async_mode must be 'async' or 'sync', got {async_mode!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (the checkpoint to resume from), got {keep_last}")
        if keep_every < 0:
            raise ValueError(f"keep_every must be >= 0 (0 keeps none extra), got {keep_every}")
        self.run_dir = Path(run_dir)
        self.checkpoints_dir = self.run_dir / CHECKPOINTS_DIR
        self.interval = interval
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_mode = async_mode
        self.seed = seed
        self.config_hash = config_hash
        self.tolerated_failures = tolerated_failures
        self.failures_in_a_row = 0  # saves that failed since the last one that committed
        self.failed_saves: list[tuple[int, str]] = []  # tolerated failures (step, message), for the caller to record and clear
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # A group of its own: the background thread's collectives never interleave with training's.
        self._group = dist.new_group(backend="gloo", timeout=world_collective_timeout()) if self.distributed else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        self._staging = _Staging() if async_mode == "async" else None
        self._pending: Future | None = None  # the commit of the save in flight
        self._pending_step, self._pending_may_fail = 0, False
        self._abandoned = False  # a newer start owns the run: commit nothing more (see abandon)
        self._left_tmp_dirs: set[str] = set()  # other starts' fresh unfinished checkpoints, warned about once
        self.last_blocked_s: float | None = None
        self.last_write_s: float | None = None
        # this start's saves go to step-N.tmp-TOKEN: an older start still running (a requeued job
        # whose predecessor lives on) keeps its own, and never loses it to this one
        self._token = self._broadcast_from_rank0(uuid.uuid4().hex[:8])
        if self.rank == 0:
            self._remove_stale_tmp_dirs()
        self._barrier()

    # -- collectives on the checkpoint group (no-ops in one process) ---------------------------

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._group)

    def _broadcast_from_rank0(self, value: Any) -> Any:
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(self._group, 0), group=self._group)
        return holder[0]

    def _all_gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self._group)
        return gathered

    # -- queries -------------------------------------------------------------------------------

    def committed(self) -> dict[int, Path]:
        """Verified committed checkpoints by step (ascending)."""
        return committed_checkpoints(self.checkpoints_dir)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = list(self.committed())
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    # -- saving --------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        stateful: Mapping[str, Any],
        *,
        force: bool = False,
        may_fail: bool = True,
        rank_local: Mapping[str, Stateful] | None = None,
    ) -> bool:
        """Checkpoint ``stateful`` at ``step`` if it is due (or ``force``); returns whether it started.

        Args:
            stateful: key -> Stateful or state (tensors, DTensors, plain values identical on all ranks).
            may_fail: this save's failure counts against ``tolerated_failures``; False: it raises.
            rank_local: Statefuls whose state differs per rank; restored only at the same world size.
        Raises:
            CheckpointWriteError: the previous asynchronous save failed (found here), or, in sync
                mode, this one did; unless the failure is tolerated (see ``tolerated_failures``).
        """
        if not (force or self.should_save(step)):
            return False
        self.wait(tolerate=True)
        if self._broadcast_from_rank0(step in self.committed() if self.rank == 0 else None):
            logger.info("checkpoint step %d is already committed; not saving it again", step)
            return False
        tmp_dir = self.checkpoints_dir / tmp_dir_name(step, self._token)
        started = time.perf_counter()
        try:
            self._prepare(step, tmp_dir, rank_local or {})
        except CheckpointWriteError as error:  # the same on every rank
            self._failed(step, error, may_fail)
            return False
        state = dict(stateful)
        if self.async_mode == "async":
            write = dcp.async_save(
                state,
                storage_writer=_storage_writer(tmp_dir),
                process_group=self._group,
                no_dist=not self.distributed,
                async_stager=self._staging.stager(),
            )
        else:
            write = Future()
            try:
                dcp.save(state, storage_writer=_storage_writer(tmp_dir), process_group=self._group, no_dist=not self.distributed)
                write.set_result(None)
            except (Exception, CheckpointException) as error:
                write.set_exception(error)
        blocked_s = time.perf_counter() - started
        self.last_blocked_s = blocked_s
        model_prefixes = list(_models_by_prefix(stateful))
        finish = dict(step=step, tmp_dir=tmp_dir, write=write, started=started, blocked_s=blocked_s, model_prefixes=model_prefixes)
        self._pending = self._executor.submit(self._finish, **finish)
        self._pending_step, self._pending_may_fail = step, may_fail
        if self.async_mode == "sync":
            self.wait(tolerate=True)
        return True

    def _prepare(self, step: int, tmp_dir: Path, rank_local: Mapping[str, Stateful]) -> None:
        """Make ``tmp_dir`` (rank 0) and write each rank's own state into it (collective): a disk
        that is full or read-only before the DCP write is a CheckpointWriteError on every rank
        alike, its directory removed, where one rank's OSError left the others in a collective."""

        def attempt(write: Callable[[], None]) -> str | None:
            try:
                write()
            except Exception as error:  # any rank's failure (a disk, a state_dict) reaches every rank
                return f"{type(error).__name__}: {error}{_disk_full_note(tmp_dir)}"
            return None

        def make_dir() -> None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)

        problem = self._broadcast_from_rank0(attempt(make_dir) if self.rank == 0 else None)
        if problem is None:
            problems = self._all_gather(attempt(lambda: self._write_rank_state(tmp_dir, rank_local)))
            problem = next((found for found in problems if found is not None), None)
        if problem is not None:
            if self.rank == 0:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise CheckpointWriteError(f"checkpoint step {step} could not be written to {tmp_dir}: {problem}")

    def _write_rank_state(self, tmp_dir: Path, rank_local: Mapping[str, Stateful]) -> None:
        path = rank_state_path(tmp_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"rng": capture_rng_state(), "local": {key: value.state_dict() for key, value in rank_local.items()}}
        with open(path, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())

    def _finish(
        self, *, step: int, tmp_dir: Path, write: Future, started: float, blocked_s: float, model_prefixes: list[str]
    ) -> None:
        """Background: wait for every rank's write, then rank 0 verifies and commits (collective)."""
        digests: dict[str, str] = {}
        try:
            write.result()
            local_error = None
        except (Exception, CheckpointException) as error:
            local_error = _describe_failure(error) + _disk_full_note(tmp_dir)
        write_s = time.perf_counter() - started
        if local_error is None:
            try:
                digests = self._own_file_digests(tmp_dir)
            except OSError as error:
                local_error = f"{type(error).__name__}: {error}"
        gathered = self._all_gather((local_error, digests))
        errors = [error for error, _ in gathered if error is not None]
        digests = {name: digest for _, rank_digests in gathered for name, digest in rank_digests.items()}
        outcome = None
        if self.rank == 0:
            if self._abandoned:  # a newer start owns the run: this start's save is not committed
                shutil.rmtree(tmp_dir, ignore_errors=True)
                logger.warning("checkpoint step %d of a superseded start discarded (%s)", step, tmp_dir)
                outcome = "abandoned"
            elif errors:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                outcome = errors[0]
            else:
                try:
                    self._commit(step, tmp_dir, blocked_s=blocked_s, write_s=write_s, model_prefixes=model_prefixes, digests=digests)
                except Exception as error:  # every rank must reach the broadcast below
                    outcome = _describe_failure(error) + _disk_full_note(tmp_dir)
                    shutil.rmtree(tmp_dir, ignore_errors=True)  # not renamed: a whole checkpoint's space
                else:
                    self._prune()
        outcome = self._broadcast_from_rank0(outcome)
        if outcome == "abandoned":
            return
        if outcome is not None:
            raise CheckpointWriteError(f"checkpoint step {step} could not be written to {tmp_dir}: {outcome}")
        self.last_write_s = write_s

    def _own_file_digests(self, tmp_dir: Path) -> dict[str, str]:
        """SHA-256 of the files this rank wrote (its DCP file and state; rank 0 also the DCP
        metadata), by path relative to ``tmp_dir``: each rank reads back only its own bytes."""
        own = [*tmp_dir.glob(f"__{self.rank}_*.distcp"), rank_state_path(tmp_dir, self.rank)]
        if self.rank == 0:
            own.append(tmp_dir / DCP_METADATA_NAME)
        return {path.relative_to(tmp_dir).as_posix(): file_sha256(path) for path in own if path.is_file()}

    def _commit(
        self, step: int, tmp_dir: Path, *, blocked_s: float, write_s: float, model_prefixes: list[str], digests: dict[str, str]
    ) -> None:
        files = verify_written_checkpoint(tmp_dir, self.world_size)
        manifest = {
            "step": step,
            "world_size": self.world_size,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "blocked_s": round(blocked_s, 6),
            "write_s": round(write_s, 6),
            "bytes": sum(files.values()),
            "files": files,
            "sha256": {name: digest for name, digest in sorted(digests.items()) if name in files},
            "config_hash": self.config_hash,
            "model_prefix": model_prefixes[0] if model_prefixes else None,
        }
        manifest_path = tmp_dir / MANIFEST_NAME
        with open(manifest_path, "w") as file:
            json.dump(manifest, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        # the directory's entries (every rank's files and the manifest) are durable before the
        # rename makes them a checkpoint: a power loss never leaves a step-N missing a file
        fsync_path(tmp_dir)
        fsync_path(tmp_dir / RANK_STATE_DIR)
        final_dir = self.checkpoints_dir / step_dir_name(step)
        if final_dir.exists():
            try:
                read_manifest(final_dir)
            except CheckpointVerificationError:  # an uncommitted leftover of the same step: replaced
                shutil.rmtree(final_dir)
            else:  # another start of the run (an older one, still running) committed this step first
                self._discard_copy(step, tmp_dir)
                return
        try:
            os.rename(tmp_dir, final_dir)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            self._discard_copy(step, tmp_dir)  # the other start renamed its copy in between
            return
        fsync_path(self.checkpoints_dir)
        logger.info(
            "checkpoint step %d committed: %s, %.1f MB, blocked %.3f s, written in %.3f s",
            step, final_dir, manifest["bytes"] / 1e6, blocked_s, write_s,
        )  # fmt: skip

    @staticmethod
    def _discard_copy(step: int, tmp_dir: Path) -> None:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        logger.warning("checkpoint step %d was committed by another start of the run meanwhile; this copy is discarded", step)

    def _prune(self) -> None:
        """Delete committed checkpoints outside the retention policy, and stale unfinished ones;
        failures are only logged. A checkpoint is renamed to an unfinished name before its files
        go, so a deletion cut short leaves an unfinished directory (removed once stale), never a
        ``step-N`` that fails to verify."""
        committed = self.committed()
        kept = retained_steps(committed, self.keep_last, self.keep_every)
        for step, path in committed.items():
            if step in kept:
                continue
            doomed = path.with_name(tmp_dir_name(step, "deleting"))
            try:
                os.rename(path, doomed)
                shutil.rmtree(doomed)
            except OSError as error:
                logger.warning("could not remove checkpoint %s (retention): %s", path, error)
            else:
                logger.info("removed checkpoint step %d (retention)", step)
        self._remove_stale_tmp_dirs()

    def _remove_stale_tmp_dirs(self) -> None:
        """Remove the unfinished checkpoints of other starts that nothing has written to for
        STALE_TMP_S (a start that died mid-save, a deletion cut short); a fresher one may be an
        older start still writing (a requeued job whose predecessor lives on): it stays, with one
        warning. A directory holds its DCP files and ``rank_state/``; one recent file ends the look."""
        if not self.checkpoints_dir.is_dir():
            return
        stale_before = time.time() - STALE_TMP_S
        for path in self.checkpoints_dir.iterdir():
            if not is_tmp_dir_name(path.name) or path.name.endswith(f"-{self._token}"):
                continue
            try:
                fresh = _written_since(path, stale_before)
            except OSError:  # removed meanwhile
                continue
            if fresh:
                if path.name not in self._left_tmp_dirs:
                    self._left_tmp_dirs.add(path.name)
                    logger.warning("leaving %s: written to in the last %.0f s, perhaps by an older start of the run still running", path, STALE_TMP_S)
                continue
            logger.warning("removing %s, an unfinished checkpoint of an earlier start", path)
            shutil.rmtree(path, ignore_errors=True)

    def abandon(self) -> None:
        """A newer start owns the run: the save in flight, unless its commit has begun already, is
        not committed (its files are removed), and :meth:`wait` and :meth:`close` raise nothing for it."""
        self._abandoned = True

    def wait(self, *, tolerate: bool = False) -> None:
        """Finish the pending save, if any (collective).

        Args:
            tolerate: its failure counts against ``tolerated_failures`` if its save ``may_fail``,
                instead of raising.
        Raises:
            CheckpointWriteError: it failed (the checkpoint path and the OS error are in the message).
        """
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except CheckpointWriteError as error:  # the outcome is broadcast: every rank agrees
            self._failed(self._pending_step, error, tolerate and self._pending_may_fail)
        else:
            self.failures_in_a_row = 0

    def _failed(self, step: int, error: CheckpointWriteError, may_fail: bool) -> None:
        """Raise ``error``, unless it is tolerated: then it is logged and listed in :attr:`failed_saves`."""
        self.failures_in_a_row += 1
        if not may_fail or self.failures_in_a_row > self.tolerated_failures:
            if self.failures_in_a_row > 1:
                raise CheckpointWriteError(f"{error} ({self.failures_in_a_row} saves in a row failed)") from error
            raise error
        logger.error(
            "%s; training goes on, the checkpoint before stays the latest and the next save tries again "
            "(%d of %d failed saves in a row tolerated: checkpoint.tolerated_failures)",
            error, self.failures_in_a_row, self.tolerated_failures,
        )  # fmt: skip
        self.failed_saves.append((step, str(error)))

    def close(self) -> None:
        """Finish the pending save and stop the background thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- loading -------------------------------------------------------------------------------

    def load(
        self,
        stateful: dict[str, Any],
        step: int | None = None,
        *,
        rank_local: Mapping[str, Stateful] | None = None,
    ) -> LoadedCheckpoint | None:
        """Load the newest committed checkpoint (or ``step``) into ``stateful``, in place (collective).

        Statefuls get ``load_state_dict``; tensors are filled in place; other plain values are
        replaced in the dict.

        Sharded state is resharded to the current world size. RNG states and ``rank_local`` are
        restored when the world size is unchanged; otherwise the RNGs are reseeded from
        ``(seed, step, rank)`` and ``rank_local`` keeps its current state.

        Returns:
            what was loaded, or None when ``step`` is None and the run has no checkpoint yet.
        Raises:
            NoCheckpointError: ``step`` was given and is not a committed checkpoint.
        """
        self.wait()
        committed = self._broadcast_from_rank0(self.committed() if self.rank == 0 else None)
        if step is not None and step not in committed:
            raise NoCheckpointError(
                f"no committed checkpoint for step {step} in {self.checkpoints_dir}; committed steps: {sorted(committed) or 'none'}"
            )
        candidates = [step] if step is not None else sorted(committed, reverse=True)
        for index, candidate in enumerate(candidates):
            try:
                return self._load_step(stateful, candidate, committed[candidate], rank_local or {})
            except CheckpointUnreadableError as error:  # every rank raised it: every rank falls back alike
                if index + 1 == len(candidates):
                    raise
                logger.warning("checkpoint step %d cannot be loaded, falling back to step %d: %s", candidate, candidates[index + 1], error)
                if isinstance(error, CheckpointCorruptError) and self.rank == 0:  # not a storage fault that may pass
                    self._set_aside(candidate, committed[candidate])
        return None

    def _set_aside(self, step: int, path: Path) -> None:
        """Move a corrupt committed checkpoint out of the run's steps (its bytes kept for
        inspection): the run saves that step again when it gets there, where it skipped a
        step already committed and ended on the unreadable one; retention no longer counts it."""
        aside = path.with_name(set_aside_dir_name(step))
        try:
            os.rename(path, aside)
        except OSError as error:
            logger.warning("could not move the unreadable checkpoint %s aside: %s", path, error)
        else:
            logger.warning("moved the unreadable checkpoint step %d to %s (inspect it, then delete it)", step, aside)

    def _agree(self, problem: tuple[str, str] | None) -> None:
        """Raise on every rank what any rank found: a mismatch before a refused setting before an
        unreadable file before another error (``problem`` is ``(kind, message)`` or None)."""
        found = [found for found in self._all_gather(problem) if found is not None]
        for kind, error_class in (
            ("mismatch", CheckpointMismatchError),
            ("settings", CheckpointSettingsError),
            ("corrupt", CheckpointCorruptError),
            ("unreadable", CheckpointUnreadableError),
            ("other", CheckpointLoadError),
        ):
            messages = [message for found_kind, message in found if found_kind == kind]
            if messages:
                raise error_class("; ".join(dict.fromkeys(messages)))

    def _load_step(self, stateful: dict[str, Any], step: int, path: Path, rank_local: Mapping[str, Stateful]) -> LoadedCheckpoint:
        """Load one committed checkpoint (collective). Every rank raises the same error class if
        any rank could not (see :meth:`_agree`), so every rank falls back, or stops, alike.

        Raises:
            CheckpointMismatchError: its manifest's step is not its directory's, or its model's
                weights (names or shapes) are not this model's: a checkpoint copied from another run.
            CheckpointSettingsError: a state refused this start's settings (the loader's, saved
                with another batch size), with the state's own message.
            CheckpointUnreadableError: a file of it does not read (corrupt or a storage fault).
            CheckpointLoadError: loading failed otherwise (out of memory, an optimizer that changed).
        """
        problem = None
        try:
            manifest = read_manifest(path)
            self._check_digests(path, manifest)
            if int(manifest.get("step", step)) != step:
                raise CheckpointMismatchError(
                    f"{path} holds the checkpoint of step {manifest['step']}, not of step {step}: it was renamed or copied"
                    " from elsewhere; move it out of checkpoints/"
                )
            saved = read_dcp_metadata(path).state_dict_metadata
            self._check_model_keys(path, saved, stateful)
            to_load = without_missing_optional_keys(stateful, saved)
        except CheckpointMismatchError as error:
            problem = ("mismatch", str(error))
        except CheckpointCorruptError as error:
            problem = ("corrupt", str(error))
        except CheckpointVerificationError as error:
            problem = ("unreadable", str(error))
        self._agree(problem)
        if self.config_hash is not None and manifest.get("config_hash") not in (None, self.config_hash):
            logger.warning(
                "checkpoint %s was saved with config hash %s, this run's is %s", path, manifest["config_hash"], self.config_hash
            )
        saved_world_size = int(manifest["world_size"])
        same_world = saved_world_size == self.world_size
        payload = None
        try:
            dcp.load(to_load, checkpoint_id=str(path), process_group=self._group, no_dist=not self.distributed)
            if same_world:
                payload = torch.load(rank_state_path(path, self.rank), weights_only=False)
        except (Exception, CheckpointException) as error:
            refusals = _lasting_refusals(error)
            if refusals:
                problem = ("settings", f"{path}: {'; '.join(dict.fromkeys(refusals))}")
            else:
                kind = "corrupt" if _is_corrupt(error) else "unreadable" if _is_unreadable(error) else "other"
                problem = (kind, f"{path} does not read: {_describe_failure(error)}")
        self._agree(problem)
        if same_world:
            restore_rng_state(payload["rng"])
            for key, value in rank_local.items():
                value.load_state_dict(payload["local"][key])
        else:
            reseed_rng(self.seed, step, self.rank)
            logger.warning(
                "checkpoint %s was saved by %d ranks and is loaded by %d: RNG states reseeded from (seed=%d, step=%d, rank), "
                "rank-local state (%s) not restored",
                path, saved_world_size, self.world_size, self.seed, step, ", ".join(rank_local) or "none",
            )  # fmt: skip
        logger.info("loaded checkpoint step %d from %s", step, path)
        return LoadedCheckpoint(step, path, saved_world_size, same_world)

    def _check_digests(self, path: Path, manifest: Mapping[str, Any]) -> None:
        """Check this rank's share of the checkpoint's files against their SHA-256 in the manifest
        (checkpoints written before digests were recorded have none: sizes only).

        Raises:
            CheckpointVerificationError: naming each file whose bytes changed since it was written.
        """
        digests = sorted(manifest.get("sha256", {}).items())
        check_file_digests(path, dict(digests[self.rank :: self.world_size]))

    @staticmethod
    def _check_model_keys(path: Path, saved: Mapping[str, Any], stateful: Mapping[str, Any]) -> None:
        """Refuse a checkpoint (at ``path``, DCP keys ``saved``) whose model weights are not exactly
        this model's, by name and shape (DCP itself loads a checkpoint with extra weights,
        silently, into a smaller model)."""
        models = _models_by_prefix(stateful)
        if not models:
            return
        for prefix, model in models.items():
            expected = {name: tuple(tensor.shape) for name, tensor in get_model_state_dict(model).items()}
            found = {key[len(prefix):]: tuple(value.size) for key, value in saved.items()
                     if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)}  # fmt: skip
            extra, missing = sorted(found.keys() - expected.keys()), sorted(expected.keys() - found.keys())
            resized = sorted(name for name in found.keys() & expected.keys() if found[name] != expected[name])
            parts = [f"{len(extra)} weights this model lacks (e.g. {extra[0]})"] if extra else []
            parts += [f"{len(missing)} weights it lacks (e.g. {missing[0]})"] if missing else []
            if resized:
                first = resized[0]
                parts.append(f"{len(resized)} weights of another shape (e.g. {first}: {list(found[first])} saved, {list(expected[first])} here)")
            if parts and all(".lora_A." in name or ".lora_B." in name for name in [*extra, *missing, *resized]):
                raise CheckpointMismatchError(
                    f"checkpoint {path} holds LoRA weights of other lora settings than this start's: {'; '.join(parts)}. "
                    "Resume with the lora.rank and lora.targets the run was trained with, or start a new run_name"
                )
            if parts:
                described = "; ".join(parts)
                raise CheckpointMismatchError(
                    f"checkpoint {path} holds another model's weights: {described}. It was saved by another model"
                    " configuration (compare the run's model_config.json) or copied from another run; move it out of checkpoints/"
                )


def _lasting_refusals(error: BaseException) -> list[str]:
    """The messages of the lasting user errors (``errors.is_lasting_error``) a load failed on, on
    any rank: a state refusing this start's settings, which a restart would meet again."""
    failures = [failure for failure, _trace in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    return [str(failure) for failure in failures if is_lasting_error(failure)]


def _is_corrupt(error: BaseException) -> bool:
    """Whether a load failed on bytes that do not parse, and on no storage fault (a rank that
    could not read DCP's metadata shows the others an AssertionError: a symptom, not the cause)."""
    failures = [failure for failure, _trace in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    if any(isinstance(failure, (OSError, EOFError)) for failure in failures):
        return False
    parse_failure = lambda failure: (  # noqa: E731
        isinstance(failure, (pickle.UnpicklingError, AssertionError))
        or (isinstance(failure, RuntimeError) and "PytorchStreamReader" in str(failure))
    )
    return any(parse_failure(failure) for failure in failures)


def _is_unreadable(error: BaseException) -> bool:
    """Whether a load failed on the checkpoint's bytes, the failures a fallback to the checkpoint
    before can get around: a storage fault, or bytes that do not parse (a corrupt file that has no
    digest to catch it first: DCP's metadata read fails as an AssertionError on the other ranks).
    Not out of memory, and not a state that no longer fits (an optimizer whose groups or shapes
    changed raises ValueError or RuntimeError): an older checkpoint would fail alike."""
    if isinstance(error, CheckpointException):
        return all(_is_unreadable(failure) for failure, _trace in error.failures.values())
    corrupt_zip = isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error)
    return corrupt_zip or isinstance(error, (OSError, EOFError, pickle.UnpicklingError, AssertionError))


# ----------------------------------------------------------------------------------------------
# Reading checkpoints outside training (export, average, merge, init_from)
# ----------------------------------------------------------------------------------------------


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_METADATA_NAME).is_file()


def run_dir_of(checkpoint_dir: str | os.PathLike) -> Path | None:
    """``runs/NAME`` for ``runs/NAME/checkpoints/step-N``; None for a checkpoint outside a run."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.parent.parent if checkpoint_dir.parent.name == CHECKPOINTS_DIR else None


def _is_diffusers_directory(path: Path) -> bool:
    """A diffusers model directory, or a pipeline directory with a ``transformer/`` folder."""
    return any((path / name).is_file() for name in ("config.json", "model_index.json"))


def is_run_directory(path: str | os.PathLike) -> bool:
    """A run's directory: it holds ``checkpoints/``, the run's ``model_config.json`` or its run log."""
    return any((Path(path) / name).exists() for name in (CHECKPOINTS_DIR, MODEL_CONFIG_NAME, RUNLOG_NAME))


def resolve_run_dir(run_dir_or_name: str | os.PathLike, runs_root: str | os.PathLike) -> Path | None:
    """The run directory a path or a run name under ``runs_root`` stands for (None: neither is a
    run); a directory that is not a run (``./NAME`` in the working directory) does not shadow one."""
    for candidate in (Path(run_dir_or_name), Path(runs_root) / run_dir_or_name):
        if is_run_directory(candidate):
            return candidate
    return None


def find_run_checkpoint(
    run_dir_or_name: str | os.PathLike, runs_root: str | os.PathLike = "runs", *, step: int | None = None
) -> Path:
    """The checkpoint a path or run name stands for.

    - a safetensors file, a diffusers directory or a committed DCP checkpoint directory: itself;
    - a run directory, or a run name under ``runs_root``: its newest committed checkpoint (or ``step``).

    Raises:
        NoCheckpointError: nothing found, or the run has no committed checkpoint (or not ``step``).
    """
    path = Path(run_dir_or_name)
    is_dcp = path.is_dir() and is_dcp_checkpoint(path)
    is_diffusers = path.is_dir() and _is_diffusers_directory(path) and not is_run_directory(path)  # a run wins over an export in it
    if is_dcp or (path.is_file() and path.suffix == ".safetensors") or is_diffusers:
        if step is not None:
            raise NoCheckpointError(f"{path} is a checkpoint itself: a step ({step}) picks a checkpoint of a run, give the run")
        if is_dcp:
            if is_tmp_dir_name(path.name):
                raise NoCheckpointError(f"{path} is an unfinished checkpoint (never committed)")
            if run_dir_of(path) is not None or (path / MANIFEST_NAME).is_file():
                read_manifest(path)  # inside a run, only committed checkpoints count
        return path
    run_dir = resolve_run_dir(run_dir_or_name, runs_root)
    if run_dir is None:
        if not path.exists() and not (Path(runs_root) / path).exists():
            raise NoCheckpointError(f"{run_dir_or_name!r} does not exist (as a path, or as a run under {runs_root}/)")
        raise NoCheckpointError(
            f"{run_dir_or_name!r} is neither a checkpoint (safetensors file, diffusers directory, DCP directory) "
            f"nor a run directory, nor a run under {runs_root}/"
        )
    committed = committed_checkpoints(run_dir / CHECKPOINTS_DIR)
    if not committed:
        raise NoCheckpointError(f"run {run_dir} has no committed checkpoint under {run_dir / CHECKPOINTS_DIR}")
    if step is None:
        return committed[max(committed)]
    if step not in committed:
        raise NoCheckpointError(f"run {run_dir} has no committed checkpoint for step {step}; committed steps: {sorted(committed)}")
    return committed[step]


def _model_prefix(checkpoint_dir: Path, keys: Iterable[str]) -> str:
    """Where the model's tensors live among the DCP keys: the manifest says, else the keys do."""
    manifest_path = checkpoint_dir / MANIFEST_NAME
    if manifest_path.is_file():
        from krea2_train.model.layouts import read_checkpoint_json

        recorded = read_checkpoint_json(manifest_path).get("model_prefix")
        if recorded:
            return recorded
    marker = "img_in.weight"
    prefixes = sorted({key[: -len(marker)] for key in keys if key == marker or key.endswith("." + marker)})
    if len(prefixes) != 1:
        raise CheckpointVerificationError(
            f"cannot tell which tensors of {checkpoint_dir} are the model: "
            f"{'no' if not prefixes else 'several'} keys end with {marker!r} ({prefixes}); pass prefix="
        )
    return prefixes[0]


def load_model_weights(checkpoint_dir: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The full, unsharded model state dict of a DCP checkpoint, read in this process.

    Only the model's tensors are read (the optimizer state never enters memory).

    Args:
        prefix: the DCP key prefix of the model tensors (default: the manifest's, e.g. ``"model.model."``).
    Returns:
        parameter FQN (the diffusers key) -> CPU tensor in its saved dtype.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / MANIFEST_NAME).is_file():
        read_manifest(checkpoint_dir)
    metadata = read_dcp_metadata(checkpoint_dir)
    prefix = prefix if prefix is not None else _model_prefix(checkpoint_dir, metadata.state_dict_metadata)
    buffers = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not buffers:
        raise CheckpointVerificationError(f"{checkpoint_dir} holds no tensors under the prefix {prefix!r}")
    dcp.load(buffers, checkpoint_id=str(checkpoint_dir), no_dist=True)
    return {key[len(prefix) :]: tensor for key, tensor in buffers.items()}


def load_model_config(run_dir: str | os.PathLike) -> dict:
    """The Krea2DiT keywords a run recorded in ``model_config.json`` (lists become tuples)."""
    path = Path(run_dir) / MODEL_CONFIG_NAME
    if not path.is_file():
        raise MissingPathError(f"{run_dir} has no {MODEL_CONFIG_NAME} (the trainer writes it when a run starts)")
    from krea2_train.model.layouts import read_checkpoint_json

    values = read_checkpoint_json(path)
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def read_checkpoint_config(source: str | Path) -> dict:
    """The Krea2DiT config of a DCP checkpoint (its run's ``model_config.json``) or a safetensors
    checkpoint (recorded, else inferred from the tensor shapes), without reading any weight."""
    from krea2_train.model import layouts

    source = Path(source)
    if is_dcp_checkpoint(source):
        run_dir = run_dir_of(source)
        if run_dir is None:
            raise MissingPathError(
                f"{source} is a DCP checkpoint outside a run directory, so its model config (run/model_config.json) is unknown"
            )
        return load_model_config(run_dir)
    return layouts.index_checkpoint(source).model_config()


def records_model_config(source: str | Path) -> bool:
    """Whether the checkpoint records its Krea2DiT config (a run's DCP checkpoint, a diffusers
    directory, our safetensors) rather than leaving it to be inferred from the shapes."""
    from krea2_train.model import layouts

    return is_dcp_checkpoint(Path(source)) or layouts.index_checkpoint(Path(source)).config is not None


def load_checkpoint_weights(
    source: str | Path, lora_dtype: torch.dtype | None = None, *, check_digests: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights (diffusers keys) and Krea2DiT config of a DCP checkpoint or a safetensors checkpoint.

    ``lora_dtype``: the dtype a LoRA run's adapters are baked into (default: the base weight's).
    Pass the dtype the weights are used in: a small LoRA baked into bf16 weights is mostly
    rounded away (see :func:`~krea2_train.model.lora.bake_pairs`). A DCP checkpoint's model files
    are checked against their recorded digests first (:func:`check_model_digests`) unless
    ``check_digests`` is False (a caller that checked them already).
    """
    from krea2_train.model import layouts
    from krea2_train.model.dit import AUXILIARY_PREFIX

    source = Path(source)
    if is_dcp_checkpoint(source):
        config = read_checkpoint_config(source)  # refuses a DCP checkpoint outside a run
        if check_digests:
            check_model_digests(source)
        run_dir = run_dir_of(source)
        weights = {k: v for k, v in load_model_weights(source).items() if not k.startswith(AUXILIARY_PREFIX)}
        # a LoRA run's checkpoint holds the frozen base plus adapters: bake them in, so every
        # consumer (export, init_from, merge, sample) sees plain Krea2DiT weights
        from krea2_train.model.lora import bake_pairs
        from krea2_train.model.lora_commands import split_checkpoint_lora

        base, pairs = split_checkpoint_lora(weights, run_dir)
        return (bake_pairs(base, pairs, dtype=lora_dtype) if pairs else base), config
    weights, _ = layouts.load_state_dict(source)
    return weights, read_checkpoint_config(source)


def write_model_config(run_dir: str | os.PathLike, config: Mapping) -> Path:
    """Record the Krea2DiT keywords of a run (what :func:`load_model_config` reads)."""
    path = Path(run_dir) / MODEL_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    return write_text(path, json.dumps(values, indent=2, sort_keys=True) + "\n")


def model_config_differences(config: Mapping, reference: Mapping) -> dict[str, tuple]:
    """``{keyword: (config's value, reference's value)}`` for every Krea2DiT keyword that differs."""
    return {key: (config.get(key), reference.get(key)) for key in sorted(set(config) | set(reference))
            if config.get(key) != reference.get(key)}


def check_same_model_config(config: Mapping, reference: Mapping, name: str, reference_name: str) -> None:
    """Raise ``CheckpointError`` naming every Krea2DiT keyword on which ``config`` and ``reference`` differ."""
    from krea2_train.model.layouts import CheckpointError

    differing = model_config_differences(config, reference)
    if differing:
        # in the sentence's order: the value of ``name``, then that of ``reference_name``
        details = ", ".join(f"{key}: {ours!r} vs {theirs!r}" for key, (ours, theirs) in differing.items())
        raise CheckpointError(f"{name} has a different model config than {reference_name} ({details}); refusing to mix them")
