"""krea2_train.parallel: meshes, FSDP2 + TP parity with one process, activation checkpointing, compile.

The multi-process tests launch tests/distributed/train_tiny.py under torchrun (gloo, CPU) and compare
per-step losses, gradient norms and final weights with the same training run in this process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor
from torchtitan.distributed import ParallelDims

from krea2_train.parallel import compat
from krea2_train.parallel.distributed import init_distributed
from krea2_train.parallel.grads import all_ranks_finite, clip_grad_norm_, total_grad_norm
from krea2_train.parallel.mesh import build_parallel_dims, data_parallel_rank_size, fsdp_mesh, tp_mesh
from krea2_train.parallel.parallelize import parallelize_dit, shard_frozen_module

SCRIPT = Path(__file__).parent / "distributed" / "train_tiny.py"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tiny = _load_script()




@pytest.fixture(scope="module")
def reference_run(world_of_one):
    return train_tiny.train()


# ---------------------------------------------------------------------------------------------
# Meshes and process groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "degrees, message",
    [
        ((1, 2, 2, 8), r"dp_replicate \(1\) x dp_shard \(2\) x tp \(2\) = 4, but world_size is 8"),
        ((1, -1, 3, 8), r"dp_shard=-1 needs world_size \(8\) divisible by dp_replicate \(1\) x tp \(3\)"),
        ((0, -1, 1, 8), r"dp_replicate must be a positive integer"),
        ((1, 0, 1, 8), r"dp_shard must be a positive integer or -1"),
    ],
)
def test_build_parallel_dims_rejects_bad_degrees(degrees, message):
    with pytest.raises(ValueError, match=message):
        build_parallel_dims(*degrees)


def test_incomplete_torchrun_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="incomplete distributed environment.*WORLD_SIZE"):
        init_distributed()


def test_single_process_world_builds_meshes(world_of_one):
    assert (world_of_one.rank, world_of_one.world_size, world_of_one.device.type) == (0, 1, "cpu")
    assert compat.mesh_device_type() == "cpu"
    parallel_dims = build_parallel_dims(1, -1, 1, 1)
    assert parallel_dims.dp_shard == 1
    assert fsdp_mesh(parallel_dims).size() == 1
    assert tp_mesh(parallel_dims) is None
    assert data_parallel_rank_size(parallel_dims) == (0, 1)
    with pytest.raises(ValueError, match="world_size=2 but the process group has 1 ranks"):
        build_parallel_dims(1, 2, 1, 2)


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------


def _params_with_grads(seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in ((3, 4), (5,), (2, 2, 2))]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    params.append(nn.Parameter(torch.zeros(2)))  # no gradient: ignored
    return params


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_matches_torch_on_plain_tensors(norm_type):
    ours, theirs = _params_with_grads(0), _params_with_grads(0)
    our_norm = clip_grad_norm_(ours, 0.5, norm_type)
    their_norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    torch.testing.assert_close(our_norm, their_norm)
    assert our_norm > 0.5  # clipping was active
    for a, b in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(total_grad_norm(ours, norm_type), torch.tensor(0.5), rtol=1e-5, atol=0)


def test_a_network_without_gradients_has_a_zero_norm_on_its_own_device():
    """clip_networks stacks the networks' norms: a network that got no gradient this step must not
    give a CPU zero next to CUDA norms (the meta device stands in for CUDA here)."""
    from krea2_train.train.trainer import clip_networks

    trained = torch.nn.Parameter(torch.ones(3, device="meta"))
    trained.grad = torch.ones(3, device="meta")
    idle = torch.nn.Parameter(torch.ones(3, device="meta"))
    assert total_grad_norm([idle]).device.type == "meta"
    assert clip_networks([[trained], [idle]], 1.0).device.type == "meta"


def test_a_clip_in_the_fused_step_updates_as_clipping_in_place():
    """``into=`` a fused AdamW leaves the gradients alone and the step applies the clip: the weights
    after steps with the clip active (large gradients) and idle (small) match clipping in place.
    Adam divides out a constant gradient scale, so only clips that differ between steps show."""
    runs = {}
    for mode in ("in place", "in step"):
        params = [nn.Parameter(torch.ones(shape)) for shape in ((3, 4), (5,))]
        optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
        for step, magnitude in enumerate((30.0, 0.01, 5.0)):
            generator = torch.Generator().manual_seed(step)
            grads = [magnitude * torch.randn(p.shape, generator=generator) for p in params]
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            norm = clip_grad_norm_(params, 1.0, into=optimizer if mode == "in step" else None)
            torch.testing.assert_close(norm, total_grad_norm(params) if mode == "in step" else norm)
            if mode == "in step":
                for param, grad in zip(params, grads):
                    assert torch.equal(param.grad, grad)  # untouched: the step divides by grad_scale
                assert optimizer.grad_scale.item() == pytest.approx(max(1.0, norm.item() / 1.0), rel=1e-6)
            optimizer.step()
            optimizer.zero_grad()
        runs[mode] = [p.detach() for p in params]
    for in_place, in_step in zip(runs["in place"], runs["in step"]):
        torch.testing.assert_close(in_step, in_place, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="does not take a grad scale"):
        clip_grad_norm_(_params_with_grads(0), 1.0, into=torch.optim.AdamW(_params_with_grads(0), foreach=True))


def test_clip_networks_clips_in_the_step_only_for_one_network_and_a_fused_optimizer():
    from krea2_train.train.trainer import clip_networks

    def network(seed):
        params = _params_with_grads(seed)[:3]
        return params, [p.grad.clone() for p in params]

    (one, one_grads), (other, other_grads) = network(0), network(1)
    fused = torch.optim.AdamW([*one, *other], fused=True)
    clip_networks([[*one, *other]], 0.5, fused)
    assert all(torch.equal(p.grad, g) for p, g in zip([*one, *other], [*one_grads, *other_grads]))
    assert fused.grad_scale > 1
    del fused.grad_scale
    clip_networks([one, other], 0.5, fused)  # two networks, two clips: in place, one each
    assert not hasattr(fused, "grad_scale")
    torch.testing.assert_close(total_grad_norm(one), torch.tensor(0.5))
    torch.testing.assert_close(total_grad_norm(other), torch.tensor(0.5))
    (one, one_grads), _ = network(0), None
    clip_networks([one], 0.5, torch.optim.AdamW(one, foreach=True))  # not fused: in place
    torch.testing.assert_close(total_grad_norm(one), torch.tensor(0.5))


def test_all_ranks_finite():
    assert all_ranks_finite(torch.tensor(3.0))
    assert not all_ranks_finite(torch.tensor(float("nan")))
    assert not all_ranks_finite(torch.tensor([1.0, float("inf")]))


def test_clip_grad_norm_rejects_non_positive_max_norm():
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_grad_norm_(_params_with_grads(0), 0.0)


# ---------------------------------------------------------------------------------------------
# parallelize_dit in one process: FSDP2 on a 1-rank mesh, activation checkpointing, compile
# ---------------------------------------------------------------------------------------------


def test_parallelize_dit_shards_parameters_and_rejects_bad_input(world_of_one):
    parallel_dims = build_parallel_dims(1, -1, 1, 1)
    model = train_tiny.build_reference_model()
    with pytest.raises(ValueError, match="activation_checkpoint must be one of"):
        parallelize_dit(model, parallel_dims, activation_checkpoint="sometimes")
    tp_dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, ep=1, world_size=2)
    with pytest.raises(NotImplementedError, match="compile with activation checkpointing and tensor parallelism"):
        parallelize_dit(model, tp_dims, activation_checkpoint="full", compile=True)
    parallelize_dit(model, parallel_dims, fsdp=True)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize_dit(model, parallel_dims)
    plain = train_tiny.build_reference_model()
    parallelize_dit(plain, parallel_dims)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize_dit(plain, parallel_dims)


def test_one_rank_trains_without_fsdp_exactly_as_with_it(world_of_one, reference_run):
    """One rank skips FSDP2 (nothing to shard, only copies): same losses, gradients and weights."""
    model = train_tiny.build_reference_model()
    parallelize_dit(model, build_parallel_dims(1, -1, 1, 1))
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    sharded = train_tiny.train(fsdp=True)
    assert sharded["losses"] == pytest.approx(reference_run["losses"], rel=1e-6)
    for name, grad in reference_run["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, weight in reference_run["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_one_rank_low_precision_is_autocast_around_forward(world_of_one):
    """Without FSDP2 a bf16 param dtype is ``torch.autocast``: fp32 master weights, bf16 matmuls,
    and the context is gone after forward, also after a forward that raised."""
    model = train_tiny.build_reference_model()
    auxiliary = train_tiny.build_reference_model()
    model.auxiliary = torch.nn.ModuleDict({"fake_score": auxiliary})  # a whole DiT, as TDM attaches
    parallelize_dit(model, build_parallel_dims(1, -1, 1, 1), param_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = train_tiny.global_batch(0, model.config)
    for dit in (model, auxiliary):
        velocity = dit(batch["x0"], batch["text"], batch["t"], train_tiny.position_ids(), batch["text_mask"])
        assert velocity.dtype == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="position_ids has"):
        model(batch["x0"][:, :3], batch["text"], batch["t"], train_tiny.position_ids(), batch["text_mask"])
    assert not torch.is_autocast_enabled("cpu")
    loss = train_tiny.flow_matching_loss(model, batch)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_one_rank_and_fsdp_give_the_time_embedding_the_same_timestep(world_of_one):
    """FSDP2's root casts the DiT's float inputs to the param dtype; the one-rank path does the
    same, so both (and the samplers, which pass t in the model dtype) embed a bf16-rounded t."""
    seen = {}
    for fsdp in (False, True):
        model = train_tiny.build_reference_model()
        model.time_embed.register_forward_pre_hook(lambda module, args, fsdp=fsdp: seen.update({fsdp: args[0].dtype}))
        parallelize_dit(model, build_parallel_dims(1, -1, 1, 1), param_dtype=torch.bfloat16, fsdp=fsdp)
        batch = train_tiny.global_batch(0, model.config)
        assert batch["t"].dtype == torch.float32
        model(batch["x0"], batch["text"], batch["t"], train_tiny.position_ids(), batch["text_mask"])
    assert seen == {False: torch.bfloat16, True: torch.bfloat16}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_identical_losses_and_gradients(world_of_one, reference_run, mode):
    model = train_tiny.build_reference_model()
    parallelize_dit(model, build_parallel_dims(1, -1, 1, 1), activation_checkpoint=mode)
    assert all(isinstance(block, CheckpointWrapper) for block in model.transformer_blocks)
    run = train_tiny.train(activation_checkpoint=mode, steps=2)
    assert run["losses"] == reference_run["losses"][:2]
    assert run["grads"].keys() == reference_run["grads"].keys()
    for name, grad in run["grads"].items():
        torch.testing.assert_close(grad, reference_run["grads"][name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_compiled_checkpointed_blocks_match_eager(world_of_one, reference_run):
    run = train_tiny.train(compile=True, activation_checkpoint="selective", steps=2)
    torch.testing.assert_close(run["losses"], reference_run["losses"][:2], rtol=1e-5, atol=0)
    for name, grad in run["grads"].items():
        reference = reference_run["grads"][name]
        torch.testing.assert_close(grad, reference, rtol=0, atol=1e-5 * reference.abs().max().item(), msg=name)


def test_shard_frozen_module_keeps_outputs_and_freezes(world_of_one):
    class TinyDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 8)
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            x = self.norm(self.embed(x))
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    decoder = TinyDecoder().train()
    inputs = torch.tensor([[0, 3, 4], [1, 1, 2]])
    expected = decoder(inputs).detach()
    decoder_class = type(decoder)
    shard_frozen_module(decoder, build_parallel_dims(1, -1, 1, 1))
    assert not decoder.training
    assert type(decoder) is decoder_class  # the root keeps its class (transformers keys output capture on it)
    sharded = {name for name, p in decoder.named_parameters() if isinstance(p, DTensor)}
    assert sharded == {name for name, _ in decoder.named_parameters() if not name.startswith("norm.")}
    assert not any(p.requires_grad for p in decoder.parameters())
    with torch.no_grad():
        torch.testing.assert_close(decoder(inputs), expected)
    with pytest.raises(ValueError, match="no nn.ModuleList named 'layers'"):
        shard_frozen_module(nn.Linear(2, 2), build_parallel_dims(1, -1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Multi-process parity (torchrun, gloo)
# ---------------------------------------------------------------------------------------------


def _torchrun(nproc: int, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(SCRIPT), "--out", str(out), *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, args",
    [
        (2, ("--dp-shard", "2")),
        (2, ("--dp-replicate", "2", "--dp-shard", "1")),
        (2, ("--dp-shard", "1", "--tp", "2")),
        (4, ("--dp-shard", "2", "--tp", "2")),
        (4, ("--dp-shard", "2", "--tp", "2", "--optimizer", "fused")),
    ],
    ids=["fsdp2", "hsdp2", "tp2", "fsdp2xtp2", "fsdp2xtp2-clip-in-fused-step"],
)
def test_multi_process_training_matches_one_process(tmp_path, reference_run, nproc, args):
    run = _torchrun(nproc, tmp_path, *args)
    torch.testing.assert_close(run["losses"], reference_run["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(run["grad_norms"], reference_run["grad_norms"], rtol=1e-5, atol=0)
    assert run["weights"].keys() == reference_run["weights"].keys()
    for name, weight in run["weights"].items():
        torch.testing.assert_close(weight, reference_run["weights"][name], rtol=1e-4, atol=1e-4, msg=name)
    for name, grad in run["grads"].items():
        reference = reference_run["grads"][name]
        torch.testing.assert_close(grad, reference, rtol=0, atol=1e-5 * reference.abs().max().item(), msg=name)


def test_each_stage_of_one_process_leaves_the_exception_hook_as_it_found_it():
    """torch wraps sys.excepthook at every process-group init; `krea2 demo` inits one per stage."""
    script = (
        "import sys\n"
        "from krea2_train.parallel.distributed import destroy_distributed, init_distributed\n"
        "original = sys.excepthook\n"
        "for _ in range(3):\n"
        "    init_distributed(timeout_s=60)\n"
        "    assert sys.excepthook is not original\n"
        "    destroy_distributed()\n"
        "    assert sys.excepthook is original\n"
        "init_distributed(timeout_s=60)\n"
        "raise RuntimeError('boom')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "[rank0]: RuntimeError: boom" in result.stderr
    assert "[rank0]: [rank0]:" not in result.stderr
