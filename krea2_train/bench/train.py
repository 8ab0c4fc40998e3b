"""Training-step throughput and MFU of Krea2DiT, against diffusers' Krea2Transformer2DModel.

``krea2 bench train`` times full training steps (forward, flow-matching MSE loss, backward,
gradient clipping, AdamW step) on random inputs of the right shapes, after warm-up steps, and
reports images/s, joint tokens/s, achieved TFLOP/s, MFU and peak memory, with a forward /
backward / optimizer breakdown.

Ours runs as the trainer runs it on one GPU: ``build_model`` + ``parallelize_dit`` on a one-rank
mesh (no FSDP2 on one rank: fp32 master weights with forward under ``torch.autocast`` to
``param_dtype``; activation checkpointing and per-block ``torch.compile`` as asked) and the trainer's own optimizer (``train.trainer.build_optimizer``:
torchtitan's ``OptimizersContainer``, AdamW fused on CUDA, foreach on CPU, the default
``optim`` config). ``--reference diffusers`` builds ``Krea2Transformer2DModel`` with the same
configuration and runs it the way a diffusers training script does: fp32 weights under
``torch.autocast`` for bf16, its own attention path (key/value heads repeated, SDPA with the
padding mask), ``enable_gradient_checkpointing()`` whenever ours checkpoints activations,
``compile_repeated_blocks`` when ours compiles, ``--fp8`` on the same Linear layers (through
``parallel.float8``), the same optimizer container, and clipping by ``torch.nn.utils.clip_grad_norm_``
as accelerate does (ours clips as the trainer does: inside fused AdamW's step on CUDA, see
``parallel.grads``). The two are built, timed and
freed one after the other, so their memory never overlaps. Peak memory is the CUDA allocator's
peak on GPU; on CPU it is the process's peak RSS so far, so the reference's (timed second)
includes ours'.

Inputs: latents and text states in the compute dtype (the trainer's stages cast them, as
diffusers' training scripts cast ``model_input`` to ``weight_dtype``), the timestep and the loss
target in fp32. ``--res`` is the nominal resolution, 16 px per image token (256 -> 256 tokens). Each
caption has ``--caption-tokens`` real tokens (128). The reference gets them padded to
``--text-len`` tokens (512), as ``Krea2Pipeline.encode_prompt`` pads them. Ours gets what the
trainer's ``Conditioner`` makes of the same captions (``--text compact``): real tokens first,
padding cut to a multiple of 64 (128 tokens); ``--text padded`` gives ours the reference's
512-token sequence instead, for an equal-work comparison. Both run with a key-padding mask.

``--lora RANK`` times LoRA fine-tuning of ours as the lora stage runs it: the model built in the
compute dtype, LoRA injected into the default targets, the base frozen; only the adapters train.
Its model FLOPs are 2x the forward's (no weight gradients for the base), and the reference is off.

``--sdpa cudnn,efficient`` restricts ours to those SDPA kernels in that priority order
(``parallel.attention_backends`` in the trainer); the reference keeps torch's choice.

Model FLOPs come from :mod:`krea2_train.model.flops` (3x the forward's matmuls, no credit for
recomputation) on the sequence each model computes, so each model's MFU is on its own work and
the speedup is in images/s. MFU is reported against the measured dense matmul rate of the device
in the same dtype and, on known GPUs in bf16, against the data-sheet peak. Times use
``perf_counter`` around whole steps with one device synchronisation at the end; the per-phase
breakdown uses CUDA events on GPU. On GPU one more step, untimed, runs under
``torch.cuda.set_sync_debug_mode("warn")`` and ``{model}_host_syncs_per_step`` counts the host
syncs it reported.

On a shared CPU, set ``OMP_NUM_THREADS=1``: the tiny model's small ops otherwise stall for
milliseconds waiting on a busy second OpenMP thread, which swamps the measurement.

Defaults depend on the device: on CPU the ``tiny`` preset at 256 px, batch 2, fp32, 1 warm-up and
3 timed steps; on CUDA ``bench_full_width`` at 512 px, batch 4, bf16, 5 warm-up and 20 timed steps.
"""

from __future__ import annotations

import argparse
import functools
import gc
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from krea2_train.arguments import non_negative_int, positive_int
from krea2_train.bench import bench_row
from krea2_train.bench.gpu import measured_matmul_flops, spec_peak_flops, synchronize
from krea2_train.conditioning.conditioner import text_length
from krea2_train.errors import UsageError
from krea2_train.model.flops import PIXELS_PER_TOKEN, image_tokens_at, training_flops
from krea2_train.model.patchify import position_ids
from krea2_train.model.presets import PRESETS, build_model, count_parameters, model_config
from krea2_train.parallel.attention import SDPA_BACKENDS, attention_backends, check_attention_backends
from krea2_train.train.metrics import HostSyncCounter

BENCH = "train"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FLOP_REPORT_PRESET = "krea2_medium"
FLOP_REPORT_RESOLUTIONS = (256, 512, 1024)
DEFAULTS = {
    "cpu": dict(preset="tiny", res=256, batch=2, dtype="fp32", warmup=1, steps=3),
    "cuda": dict(preset="bench_full_width", res=512, batch=4, dtype="bf16", warmup=5, steps=20),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    parser.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="model preset (cpu: tiny, cuda: bench_full_width)"
    )
    parser.add_argument("--res", type=positive_int, default=None, help="nominal resolution in px, 16 px per token (cpu: 256, cuda: 512)")
    parser.add_argument("--batch", type=positive_int, default=None, help="images per step (cpu: 2, cuda: 4)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="compute dtype (cpu: fp32, cuda: bf16)")
    parser.add_argument("--text-len", type=positive_int, default=512, help="padded text tokens per sample (default 512)")
    parser.add_argument("--caption-tokens", type=positive_int, default=128, help="real (unpadded) text tokens per sample (default 128)")
    parser.add_argument(
        "--text", default="compact", choices=["compact", "padded"],
        help="ours' text: compact (as the trainer's Conditioner: padding cut to a multiple of 64) or padded (--text-len, equal work)",
    )
    parser.add_argument(
        "--sdpa", default=None, metavar="NAMES",
        help=f"SDPA kernels for ours in priority order, comma-separated from {', '.join(SDPA_BACKENDS)} (default: torch's choice)",
    )
    parser.add_argument("--ac", default="none", choices=["none", "selective", "full"], help="activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument(
        "--fsdp", action="store_true",
        help="wrap ours in FSDP2 on its one-rank mesh: what each rank of a sharded run computes and copies, minus the communication",
    )
    parser.add_argument("--fp8", action="store_true", help="float8 training of the block linears (CUDA, sm89+)")
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"], help="torchao float8 scaling")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps first (cpu: 1, cuda: 5)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps (cpu: 3, cuda: 20)")
    parser.add_argument("--reference", default=None, choices=["diffusers", "none"],
                        help="also time diffusers' model (default: diffusers, none with --lora)")
    parser.add_argument("--lora", type=non_negative_int, default=0, metavar="RANK",
                        help="LoRA fine-tuning of ours at this rank, as the lora stage runs it: the base frozen in the compute"
                             " dtype, the default targets trained (default 0: full training)")
    parser.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------
# Settings and inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    device: torch.device
    preset: str
    resolution: int
    batch: int
    dtype: str
    text_len: int
    caption_tokens: int
    text: str
    sdpa: str | None
    ac: str
    compile: bool
    fsdp: bool
    fp8: bool
    fp8_recipe: str
    warmup: int
    steps: int
    reference: str
    seed: int
    lora: int = 0

    @property
    def image_tokens(self) -> int:
        return image_tokens_at(self.resolution)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def text_tokens(self, name: str) -> int:
        """Text sequence length ``name`` ("ours" or "diffusers") computes."""
        if name == "ours" and self.text == "compact":
            return min(self.text_len, text_length(self.caption_tokens))
        return self.text_len

    @property
    def float8(self):
        """The trainer's float8 config for ``--fp8`` (refusing, never falling back), or None."""
        from krea2_train.config.schema import Float8Config

        return Float8Config(enabled=True, recipe=self.fp8_recipe, allow_fallback=False) if self.fp8 else None

    def describe(self) -> str:
        return (
            f"{self.device.type} preset={self.preset} res={self.resolution} batch={self.batch} dtype={self.dtype} "
            f"text={self.caption_tokens}/{self.text_len} ours_text={self.text} sdpa={self.sdpa or 'default'} "
            f"ac={self.ac} compile={self.compile} fsdp={self.fsdp} "
            f"fp8={self.fp8_recipe if self.fp8 else False} lora={self.lora or False} "
            f"steps={self.warmup}+{self.steps}"
        )


class BenchSettingsError(UsageError, ValueError):
    """A bench setting that cannot work; the message names the flag."""


def resolve_settings(args: argparse.Namespace) -> BenchSettings:
    """Fill the device-dependent defaults and validate every size (clear errors on bad input)."""
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise BenchSettingsError("--device cuda was asked for but torch sees no CUDA device")
    defaults = DEFAULTS[device_type]
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    settings = BenchSettings(
        device=torch.device(device_type),
        preset=pick("preset"),
        resolution=pick("res"),
        batch=pick("batch"),
        dtype=pick("dtype"),
        text_len=args.text_len,
        caption_tokens=args.caption_tokens,
        text=args.text,
        sdpa=args.sdpa,
        ac=args.ac,
        compile=args.compile,
        fsdp=args.fsdp,
        fp8=args.fp8,
        fp8_recipe=args.fp8_recipe,
        warmup=pick("warmup"),
        steps=pick("steps"),
        reference=args.reference or ("none" if args.lora else "diffusers"),
        seed=args.seed,
        lora=args.lora,
    )
    try:
        image_tokens_at(settings.resolution)  # validates the resolution
    except ValueError as error:
        raise BenchSettingsError(f"--res: {error}") from None
    # --batch, --steps, --text-len, --caption-tokens, --warmup and --lora are range-checked by the parser
    if settings.caption_tokens > settings.text_len:
        raise BenchSettingsError(f"--caption-tokens {settings.caption_tokens} exceeds --text-len {settings.text_len}")
    if settings.lora and settings.reference == "diffusers":
        raise BenchSettingsError("--lora times ours only (diffusers trains LoRA through peft, which this bench does not build): use --reference none")
    if settings.lora and settings.fp8:
        raise BenchSettingsError("--lora with --fp8: the lora stage refuses float8 training (its base can be stored in float8 instead)")
    if settings.fp8:
        check_float8_available(settings.device)
    check_attention_backends(settings.sdpa, settings.device, settings.torch_dtype, model_config(settings.preset))
    return settings


@dataclass(frozen=True)
class StepInputs:
    """One training batch of random data with the model's shapes.

    latents, target ``[B, N, C]``; text_states ``[B, L, K, T]``; timestep ``[B]``;
    position_ids ``[L + N, 3]``; text_mask ``[B, L]`` (the first ``caption_tokens`` are real).
    Every model sees the same numbers; only ``L`` differs (padding).
    """

    latents: torch.Tensor
    text_states: torch.Tensor
    timestep: torch.Tensor
    position_ids: torch.Tensor
    text_mask: torch.Tensor
    target: torch.Tensor


def make_inputs(config: dict, settings: BenchSettings, text_len: int | None = None) -> StepInputs:
    """Inputs with the text cut (or padded) to ``text_len`` tokens (default ``--text-len``)."""
    device, batch, full_len = settings.device, settings.batch, settings.text_len
    text_len = full_len if text_len is None else text_len
    side = settings.resolution // PIXELS_PER_TOKEN
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=generator)  # noqa: E731
    latent_shape = (batch, side * side, config["in_channels"])
    latents = randn(*latent_shape)
    text_states = randn(batch, full_len, config["num_text_layers"], config["text_hidden_dim"])[:, :text_len]
    text_mask = (torch.arange(text_len, device=device) < settings.caption_tokens).expand(batch, text_len)
    return StepInputs(  # latents and text in the compute dtype, as the trainer's stages and diffusers' scripts pass them
        latents=latents.to(settings.torch_dtype),
        text_states=text_states.to(settings.torch_dtype).contiguous(),
        timestep=torch.rand(batch, device=device, generator=generator),
        position_ids=position_ids(text_len, side, side, device=device),
        text_mask=text_mask.contiguous(),
        target=randn(*latent_shape),
    )


# ---------------------------------------------------------------------------------------------
# float8
# ---------------------------------------------------------------------------------------------


def check_float8_available(device: torch.device) -> None:
    """Raise before any model is built unless float8 training can run on ``device`` (CUDA sm89+)."""
    from krea2_train.parallel.float8 import Float8UnavailableError, float8_unavailable_reason

    reason = float8_unavailable_reason(device)
    if reason is not None:
        raise Float8UnavailableError(f"--fp8: {reason}")


# ---------------------------------------------------------------------------------------------
# The two models, built as their users run them
# ---------------------------------------------------------------------------------------------


@dataclass
class Trainee:
    """A model ready to train: ``forward(inputs) -> velocity [B, N, C]``, its optimizer, its parameters."""

    name: str
    model: torch.nn.Module
    forward: Callable[[StepInputs], torch.Tensor]
    optimizer: object
    parameters: list[torch.nn.Parameter]
    clip: Callable[[list[torch.nn.Parameter], float], torch.Tensor]


def build_optimizer_for(model: torch.nn.Module, device: torch.device):
    """The trainer's AdamW container with the default ``optim`` settings (the schedule is not stepped)."""
    from krea2_train.config.schema import RunConfig
    from krea2_train.train.trainer import build_optimizer

    optimizers, _ = build_optimizer(model, RunConfig(), device)
    return optimizers


def build_ours(settings: BenchSettings) -> Trainee:
    """``build_model`` + ``parallelize_dit`` on a one-rank mesh, as ``Trainer._build_model`` does on one GPU."""
    from krea2_train.parallel.mesh import build_parallel_dims
    from krea2_train.parallel.parallelize import parallelize_dit
    from krea2_train.train.trainer import clip_networks

    torch.manual_seed(settings.seed)
    if settings.lora:  # as LoRAStage.prepare_model: LoRA injected, the base frozen in the compute dtype
        from krea2_train.config.schema import LoRAConfig
        from krea2_train.model.lora import LoRASpec, cast_base, freeze_base, inject_lora

        # built in the compute dtype, never in fp32 (the 12.9B model is 52 GB in fp32, 26 GB in bf16)
        model = build_model(settings.preset, device="meta", dtype=settings.torch_dtype).to_empty(device=settings.device)
        model.init_weights()
        inject_lora(model, LoRASpec(rank=settings.lora, alpha=float(settings.lora), targets=tuple(LoRAConfig().targets)))
        freeze_base(model)
        cast_base(model, settings.dtype)
    else:
        model = build_model(settings.preset, device=settings.device)
    model = parallelize_dit(
        model,
        build_parallel_dims(dp_replicate=1, dp_shard=1, tp=1, world_size=1),
        activation_checkpoint=settings.ac,
        compile=settings.compile,
        param_dtype=settings.torch_dtype,
        reduce_dtype=torch.float32,
        float8=settings.float8,
        fsdp=settings.fsdp or None,
    )

    def forward(inputs: StepInputs) -> torch.Tensor:
        return model(inputs.latents, inputs.text_states, inputs.timestep, inputs.position_ids, inputs.text_mask)

    optimizer = build_optimizer_for(model, settings.device)

    def clip(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return clip_networks([parameters], max_norm, optimizer)

    params = [p for p in model.parameters() if p.requires_grad]
    return Trainee("ours", model, forward, optimizer, params, clip)


def build_reference(settings: BenchSettings) -> Trainee:
    """``diffusers.Krea2Transformer2DModel``: fp32 weights, autocast for bf16, its own attention."""
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        model = Krea2Transformer2DModel(**model_config(settings.preset))
    model.train()
    if settings.fp8:  # the same Linear layers as ours (the module paths are the same)
        from krea2_train.parallel.float8 import convert_to_float8

        convert_to_float8(model, settings.float8)
    if settings.ac != "none":
        model.enable_gradient_checkpointing()
    if settings.compile:
        model.compile_repeated_blocks(fullgraph=True)
    device_type, dtype = settings.device.type, settings.torch_dtype

    def forward(inputs: StepInputs) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext():
            return model(
                inputs.latents,
                inputs.text_states,
                inputs.timestep,
                inputs.position_ids,
                encoder_attention_mask=inputs.text_mask,
                return_dict=False,
            )[0]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer_for(model, settings.device)
    return Trainee("diffusers", model, forward, optimizer, params, torch.nn.utils.clip_grad_norm_)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class PhaseClock:
    """Marks between step phases: CUDA events on GPU (no host sync), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.on_cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, start: int, end: int) -> float:
        """Seconds between marks ``start`` and ``end`` (call after synchronising)."""
        if self.on_cuda:
            return self.marks[start].elapsed_time(self.marks[end]) / 1e3
        return self.marks[end] - self.marks[start]


def train_step(trainee: Trainee, inputs: StepInputs, clock: PhaseClock, max_grad_norm: float = 1.0) -> None:
    """Forward, flow-matching MSE, backward, clip, AdamW step; marks the clock after each phase."""
    clock.mark()
    velocity = trainee.forward(inputs)
    loss = F.mse_loss(velocity.float(), inputs.target)
    clock.mark()
    loss.backward()
    clock.mark()
    trainee.clip(trainee.parameters, max_grad_norm)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad()
    clock.mark()


@dataclass(frozen=True)
class StepTiming:
    seconds_per_step: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    peak_memory_bytes: int
    memory_kind: str  # "cuda_allocated" or "process_rss"
    host_syncs_per_step: int | None  # counted on CUDA in one untimed step; None on CPU


def count_host_syncs(trainee: Trainee, inputs: StepInputs, device: torch.device) -> int | None:
    """Host-device synchronisations in one more, untimed training step (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with HostSyncCounter(device) as syncs:
        train_step(trainee, inputs, PhaseClock(device))
    synchronize(device)
    return syncs.count


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib * (1 if sys.platform == "darwin" else 1024), "process_rss"


def time_training(build: Callable[[BenchSettings], Trainee], settings: BenchSettings, inputs: StepInputs) -> StepTiming:
    """Build a trainee, run ``warmup`` then ``steps`` timed steps, free it; return the timing."""
    device = settings.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainee = build(settings)
    for _ in range(settings.warmup):
        train_step(trainee, inputs, PhaseClock(device))
    clock = PhaseClock(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(settings.steps):
        train_step(trainee, inputs, clock)
    synchronize(device)
    elapsed = time.perf_counter() - start
    phases = [sum(clock.seconds(4 * step + phase, 4 * step + phase + 1) for step in range(settings.steps)) for phase in range(3)]
    memory, memory_kind = peak_memory(device)
    host_syncs = count_host_syncs(trainee, inputs, device)
    del trainee
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    steps = settings.steps
    return StepTiming(elapsed / steps, phases[0] / steps, phases[1] / steps, phases[2] / steps, memory, memory_kind, host_syncs)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def _row(metric: str, value, unit: str, target: str | None = None, met: bool | None = None) -> dict:
    return bench_row(BENCH, metric, value, unit, target, met)


def step_model_flops(name: str, settings: BenchSettings) -> float:
    """Model FLOPs of one step: 3x the forward's matmuls, or with ``--lora`` 2x (the frozen base's
    weights get no gradients; the LoRA matmuls are not counted)."""
    flops = training_flops(model_config(settings.preset), settings.image_tokens, settings.text_tokens(name), settings.batch)
    return flops * 2 / 3 if settings.lora else flops


def timing_rows(name: str, timing: StepTiming, settings: BenchSettings, matmul_flops: float, spec_flops: float | None) -> list[dict]:
    text_tokens = settings.text_tokens(name)
    step_flops = step_model_flops(name, settings)
    achieved = step_flops / timing.seconds_per_step
    joint_tokens = settings.batch * (text_tokens + settings.image_tokens)
    rows = [
        _row(f"{name}_text_tokens", text_tokens, "tokens"),
        _row(f"{name}_model_flops_per_step", step_flops / 1e12, "TFLOP"),
        _row(f"{name}_step_time", timing.seconds_per_step * 1e3, "ms"),
        _row(f"{name}_forward_time", timing.forward_s * 1e3, "ms"),
        _row(f"{name}_backward_time", timing.backward_s * 1e3, "ms"),
        _row(f"{name}_optimizer_time", timing.optimizer_s * 1e3, "ms"),
        _row(f"{name}_images_per_s", settings.batch / timing.seconds_per_step, "images/s"),
        _row(f"{name}_joint_tokens_per_s", joint_tokens / timing.seconds_per_step, "tokens/s"),
        _row(f"{name}_achieved", achieved / 1e12, "TFLOP/s"),
        _row(f"{name}_mfu_vs_measured_matmul", achieved / matmul_flops, "fraction", *_mfu_target(name, settings, achieved / matmul_flops)),
    ]
    compute_flops = step_flops / (timing.forward_s + timing.backward_s)  # without the optimizer, which a sharded run divides
    rows.append(_row(f"{name}_mfu_forward_backward_vs_measured_matmul", compute_flops / matmul_flops, "fraction"))
    if spec_flops is not None:
        rows.append(_row(f"{name}_mfu_vs_spec_peak", achieved / spec_flops, "fraction"))
    rows.append(_row(f"{name}_peak_memory_{timing.memory_kind}", timing.peak_memory_bytes / 2**30, "GiB"))
    if timing.host_syncs_per_step is not None:
        rows.append(_row(f"{name}_host_syncs_per_step", timing.host_syncs_per_step, "syncs"))
    return rows


def _at_target_setting(settings: BenchSettings) -> bool:
    """Issue 7's throughput targets are set for bf16 at 1024 px on a GPU."""
    return settings.device.type == "cuda" and settings.dtype == "bf16" and settings.resolution == 1024 and not settings.fp8


def _mfu_target(name: str, settings: BenchSettings, mfu: float) -> tuple[str | None, bool | None]:
    if name != "ours" or not _at_target_setting(settings):
        return None, None
    return ">= 0.50 of the measured matmul rate (bf16, 1024 px)", mfu >= 0.5


def speedup_row(settings: BenchSettings, ours: StepTiming, reference: StepTiming) -> dict:
    """Images/s of ours over the reference's (the batch is the same, so reference time / our time)."""
    speedup = reference.seconds_per_step / ours.seconds_per_step
    work = "ours with compacted text" if settings.text == "compact" else "equal work"
    if _at_target_setting(settings):
        return _row("speedup_ours_vs_diffusers", speedup, "x", f">= 1.5 (bf16, 1024 px; {work})", speedup >= 1.5)
    return _row("speedup_ours_vs_diffusers", speedup, "x", f"none at this setting ({work})", None)


@functools.cache
def meta_parameter_count(preset: str) -> int:
    """Parameters of a preset, counted on the meta device (no memory, no initialisation cost)."""
    return count_parameters(build_model(preset, device="meta"))


def flop_report_rows() -> list[dict]:
    """Params and training FLOPs per image of the 12.9B model (built on the meta device, no memory)."""
    config = model_config(FLOP_REPORT_PRESET)
    params = meta_parameter_count(FLOP_REPORT_PRESET)
    rows = [_row(f"{FLOP_REPORT_PRESET}_parameters", params / 1e9, "billion")]
    for resolution in FLOP_REPORT_RESOLUTIONS:
        flops = training_flops(config, image_tokens_at(resolution), text_tokens=512)
        rows.append(_row(f"{FLOP_REPORT_PRESET}_train_flops_per_image_{resolution}px_text512", flops / 1e12, "TFLOP"))
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    settings = resolve_settings(args)
    config = model_config(settings.preset)
    matmul_flops = measured_matmul_flops(settings.device, settings.torch_dtype)
    spec_flops = spec_peak_flops(settings.device, settings.torch_dtype)
    rows = [
        _row("setup", settings.describe(), ""),
        _row(f"measured_{settings.dtype}_matmul_rate", matmul_flops / 1e12, "TFLOP/s"),
    ]
    if spec_flops is not None:
        rows.append(_row("spec_bf16_dense_peak", spec_flops / 1e12, "TFLOP/s"))

    from krea2_train.parallel.distributed import init_distributed

    owns_process_group = not dist.is_initialized()
    init_distributed()
    try:
        with attention_backends(settings.sdpa):  # ours only: the reference keeps torch's choice
            ours = time_training(build_ours, settings, make_inputs(config, settings, settings.text_tokens("ours")))
        rows += timing_rows("ours", ours, settings, matmul_flops, spec_flops)
        if settings.reference == "diffusers":
            reference = time_training(build_reference, settings, make_inputs(config, settings, settings.text_tokens("diffusers")))
            rows += timing_rows("diffusers", reference, settings, matmul_flops, spec_flops)
            rows.append(speedup_row(settings, ours, reference))
    finally:
        if owns_process_group:
            dist.destroy_process_group()
    return rows + flop_report_rows()


if __name__ == "__main__":
    from krea2_train.bench import module_main

    raise SystemExit(module_main(__spec__.name))
