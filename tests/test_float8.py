"""krea2_train.parallel.float8: layer selection, capability and fallback, torchao on CPU, the TE backend.

torchao's float8 training runs on CPU with torch 2.13 (a CPU ``_scaled_mm``), so conversion, dispatch
and numerics are checked here; speed is not (see docs/benchmarks.md for the GPU measurements).
transformer_engine cannot be installed without CUDA: its backend is checked against a fake module.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from krea2_train.config.schema import Float8Config
from krea2_train.model import build_model
from krea2_train.parallel import float8 as float8_module
from krea2_train.parallel.float8 import (
    Float8UnavailableError,
    apply_float8,
    convert_to_float8,
    float8_unavailable_reason,
    select_float8_linears,
)

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import train_tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")


def skip_unless_cpu_scaled_mm(recipe: str) -> None:
    """torch 2.11's CPU ``_scaled_mm`` takes per-tensor scales only (2.13's takes rowwise ones too);
    the rowwise recipe's CPU checks need it. CUDA's ``_scaled_mm`` is not affected."""
    if recipe != "rowwise":
        return
    a = torch.ones(16, 32).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm has no rowwise scaling")


BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate", "ff.up", "ff.down")


def block_fqns(*blocks: int) -> list[str]:
    return [f"transformer_blocks.{b}.{name}" for b in blocks for name in BLOCK_LINEARS]


def enabled(**overrides) -> Float8Config:
    return Float8Config(enabled=True, **overrides)


def float8_linears(model: nn.Module) -> list[str]:
    from torchao.float8.float8_linear import Float8Linear

    return [fqn for fqn, module in model.named_modules() if isinstance(module, Float8Linear)]


@contextlib.contextmanager
def capable(monkeypatch, reason: str | None):
    """Pretend the device can (reason None) or cannot run float8."""
    monkeypatch.setattr(float8_module, "float8_unavailable_reason", lambda device: reason)
    yield


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def test_default_selection_is_exactly_the_block_projections():
    model = build_model("tiny")
    selection = select_float8_linears(model, enabled())
    assert list(selection.converted) == block_fqns(0, 1)
    assert selection.skipped == ()


def test_default_excludes_keep_edges_modulation_text_and_norms_even_with_a_catch_all_include():
    model = build_model("tiny")
    assert select_float8_linears(model, enabled(include=[".*"])).converted == tuple(block_fqns(0, 1))


def test_filters_change_the_selection_as_documented():
    model = build_model("tiny", num_layers=4)
    assert list(select_float8_linears(model, enabled(keep_first_last_blocks=True)).converted) == block_fqns(1, 2)
    attention_only = select_float8_linears(model, enabled(exclude=[r"\.ff\."])).converted
    assert list(attention_only) == [f for f in block_fqns(0, 1, 2, 3) if ".attn." in f]
    # dropping the text-fusion exclude converts its projections; its 4 -> 1 layer collapse is skipped for its dims
    with_text = select_float8_linears(model, enabled(include=[".*"], exclude=[r"(^|\.)img_in$", "final_layer", "time_", "txt_in"]))
    assert [f for f in with_text.converted if f.startswith("text_fusion.")] == [
        f"text_fusion.{kind}_blocks.{i}.{name}" for kind in ("layerwise", "refiner") for i in (0, 1) for name in BLOCK_LINEARS
    ]
    assert with_text.skipped == ("text_fusion.projector",)


def test_dims_not_divisible_by_16_or_by_16_tp_are_skipped():
    model = build_model("tiny", intermediate_size=200)
    selection = select_float8_linears(model, enabled())
    assert list(selection.skipped) == [f for f in block_fqns(0, 1) if ".ff." in f]
    assert list(selection.converted) == [f for f in block_fqns(0, 1) if ".attn." in f]
    # tp = 4: every dim must be a multiple of 64; to_k/to_v (128 -> 64) still are, at tp = 8 they are not
    assert select_float8_linears(build_model("tiny"), enabled(), tp=4).skipped == ()
    tp8 = select_float8_linears(build_model("tiny"), enabled(), tp=8)
    assert list(tp8.skipped) == [f for f in block_fqns(0, 1) if f.endswith(("to_k", "to_v"))]


def test_bad_filters_and_empty_selections_are_errors():
    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"float8.include: '\(' is not a regular expression"):
        select_float8_linears(model, enabled(include=["("]))
    with pytest.raises(ValueError, match="select no convertible Linear layer"):
        convert_to_float8(model, enabled(keep_first_last_blocks=True))  # the tiny model has 2 blocks
    with pytest.raises(ValueError, match="float8.recipe must be one of"):
        convert_to_float8(model, enabled(recipe="blockwise"))
    with pytest.raises(ValueError, match="float8.backend must be one of"):
        convert_to_float8(model, enabled(backend="msamp"))


# ---------------------------------------------------------------------------------------------
# Capability and fallback
# ---------------------------------------------------------------------------------------------


def test_capability_needs_cuda_sm89(monkeypatch):
    assert "this run's device is 'cpu'" in float8_unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert float8_unavailable_reason(torch.device("cuda")) == (
        "float8 training needs compute capability >= 8.9; NVIDIA A100 has 8.0"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert float8_unavailable_reason(torch.device("cuda")) is None


def test_disabled_or_absent_config_changes_nothing():
    model = build_model("tiny")
    assert apply_float8(model, None) is None
    assert apply_float8(model, Float8Config(enabled=False, allow_fallback=False)) is None
    assert float8_linears(model) == []


def test_without_a_capable_gpu_the_fallback_warns_and_keeps_the_base_precision(caplog):
    model = build_model("tiny")
    with caplog.at_level(logging.WARNING, logger="krea2_train.parallel.float8"):
        assert apply_float8(model, enabled(allow_fallback=True), base_dtype=torch.bfloat16) is None
    assert float8_linears(model) == []
    (record,) = caplog.records
    assert "FLOAT8 REQUESTED BUT NOT AVAILABLE" in record.message and "Training in bfloat16 instead" in record.message


def test_without_a_capable_gpu_and_no_fallback_the_run_refuses():
    with pytest.raises(Float8UnavailableError, match="Set float8.allow_fallback=true to train in the base precision"):
        apply_float8(build_model("tiny"), enabled(allow_fallback=False))


def test_with_a_capable_device_the_selected_layers_are_converted(monkeypatch, caplog):
    model = build_model("tiny")
    with capable(monkeypatch, None), caplog.at_level(logging.INFO, logger="krea2_train.parallel.float8"):
        selection = apply_float8(model, enabled(allow_fallback=False))
    assert float8_linears(model) == list(selection.converted) == block_fqns(0, 1)
    assert "torchao tensorwise scaling on 16 Linear layers, 40 kept in float32" in caplog.text


# ---------------------------------------------------------------------------------------------
# torchao on CPU: dispatch and numerics
# ---------------------------------------------------------------------------------------------


class Float8MatmulCounter(TorchDispatchMode):
    """Counts matmuls whose two operands are both float8 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.operand_dtypes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torchao.float8 import Float8TrainingTensor

        if func is torch.ops.aten.mm.default and all(isinstance(a, Float8TrainingTensor) for a in args[:2]):
            self.operand_dtypes[(args[0]._data.dtype, args[1]._data.dtype)] += 1
        return func(*args, **(kwargs or {}))


def fp32_reference(bf16_inputs: bool = False) -> tuple[nn.Module, dict, torch.Tensor]:
    """The tiny reference model after an fp32 forward and backward on batch 0: model, batch, loss.

    ``bf16_inputs``: the DiT's float inputs rounded to bf16 first, as a bf16 run's DiT gets them.
    """
    reference = train_tiny.build_reference_model()
    if bf16_inputs:
        reference.register_forward_pre_hook(
            lambda module, args: tuple(a.bfloat16().float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        )
    batch = train_tiny.global_batch(0, reference.config)
    reference_loss = train_tiny.flow_matching_loss(reference, batch)
    reference_loss.backward()
    return reference, batch, reference_loss


def assert_close_to_reference(model, loss, reference, reference_loss, *, loss_rtol: float) -> None:
    """The loss within ``loss_rtol`` and the whole gradient (after backward) within 5% of the fp32 model's."""
    torch.testing.assert_close(loss, reference_loss, rtol=loss_rtol, atol=0)
    names = [name for name, _ in reference.named_parameters()]
    grads = torch.cat([model.get_parameter(name).grad.flatten() for name in names])
    reference_grads = torch.cat([reference.get_parameter(name).grad.flatten() for name in names])
    assert (grads - reference_grads).norm() / reference_grads.norm() < 0.05


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_converted_tiny_model_trains_on_cpu_with_float8_matmuls(recipe):
    skip_unless_cpu_scaled_mm(recipe)
    reference, batch, reference_loss = fp32_reference()

    model = train_tiny.build_reference_model()
    convert_to_float8(model, enabled(recipe=recipe))
    with Float8MatmulCounter() as counter:
        loss = train_tiny.flow_matching_loss(model, batch)
        loss.backward()
    # forward, grad_input and grad_weight matmuls of the 16 converted layers, all in float8
    assert sum(counter.operand_dtypes.values()) == 3 * 16
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    # tensorwise keeps torchao's default e5m2 for gradients; rowwise uses e4m3 throughout
    expected_dtypes = {(e4m3, e4m3)} if recipe == "rowwise" else {(e4m3, e4m3), (e5m2, e4m3)}
    assert set(counter.operand_dtypes) == expected_dtypes
    # float8 rounding: the loss agrees closely; the whole gradient within a few percent (measured:
    # 1.6e-2 tensorwise, 1.3e-2 rowwise; single small tensors reach 0.3)
    assert_close_to_reference(model, loss, reference, reference_loss, loss_rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# With FSDP2: parallelize_dit wiring and float8 all-gather
# ---------------------------------------------------------------------------------------------


def test_parallelize_dit_converts_before_sharding(world_of_one, monkeypatch):
    from torch.distributed.tensor import DTensor

    from krea2_train.parallel.mesh import build_parallel_dims
    from krea2_train.parallel.parallelize import parallelize_dit

    skip_unless_cpu_scaled_mm("rowwise")
    model = train_tiny.build_reference_model()
    with capable(monkeypatch, None):
        parallelize_dit(model, build_parallel_dims(1, -1, 1, 1), float8=enabled(recipe="rowwise"), fsdp=True)
    assert float8_linears(model) == block_fqns(0, 1)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    loss = train_tiny.flow_matching_loss(model, train_tiny.global_batch(0, model.config))
    loss.backward()
    assert all(torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_one_rank_float8_under_autocast_keeps_fp32_master_weights_and_gradients(world_of_one, monkeypatch, recipe):
    """The one-rank path (no FSDP2; bf16 by autocast hooks) with float8: the converted layers take
    bf16 activations against fp32 weights, as on a GPU, and the gradients land in fp32."""
    from torchao.float8.float8_linear import Float8Linear

    from krea2_train.parallel.mesh import build_parallel_dims
    from krea2_train.parallel.parallelize import parallelize_dit

    skip_unless_cpu_scaled_mm(recipe)
    reference, batch, reference_loss = fp32_reference(bf16_inputs=True)

    model = train_tiny.build_reference_model()
    with capable(monkeypatch, None):
        parallelize_dit(
            model, build_parallel_dims(1, -1, 1, 1), param_dtype=torch.bfloat16, float8=enabled(recipe=recipe), fsdp=False
        )
    assert float8_linears(model) == block_fqns(0, 1)
    input_dtypes = Counter()
    for module in model.modules():
        if isinstance(module, Float8Linear):
            module.register_forward_pre_hook(lambda module, args: input_dtypes.update([args[0].dtype]))
    with Float8MatmulCounter() as counter:
        loss = train_tiny.flow_matching_loss(model, batch)
        loss.backward()
    assert sum(counter.operand_dtypes.values()) == 3 * 16
    assert input_dtypes[torch.bfloat16] > 0  # activations from autocast matmuls, weights still fp32
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}
    # bf16 elsewhere in the block loosens the agreement a little against the float8-only check above
    assert_close_to_reference(model, loss, reference, reference_loss, loss_rtol=5e-3)


def test_fsdp_float8_all_gather_precomputes_weight_scales_before_each_forward(world_of_one):
    from torch.distributed.fsdp import fully_shard
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from krea2_train.parallel.mesh import build_parallel_dims, fsdp_mesh

    model = train_tiny.build_reference_model()
    convert_to_float8(model, enabled(recipe="tensorwise"), fsdp_sharded=True)
    mesh = fsdp_mesh(build_parallel_dims(1, -1, 1, 1))
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    weights = [model.get_submodule(fqn).weight for fqn in block_fqns(0, 1)]
    assert all(isinstance(w._local_tensor, WeightWithDynamicFloat8CastTensor) for w in weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        loss = train_tiny.flow_matching_loss(model, train_tiny.global_batch(step, model.config))
        for w in weights:  # the scale the forward used: float8 max / amax of the weight as it was
            expected = torch.finfo(torch.float8_e4m3fn).max / w.full_tensor().abs().max().double()
            torch.testing.assert_close(w._local_tensor._precomputed_scale.double().reshape(()), expected, rtol=1e-6, atol=0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------
# transformer_engine backend, with a fake module
# ---------------------------------------------------------------------------------------------


class FakeTELinear(nn.Module):
    """Stands in for transformer_engine.pytorch.Linear; records whether fp8 autocast was active."""

    calls_in_autocast: list[bool] = []

    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=params_dtype, device=device)) if bias else None

    def forward(self, x):
        FakeTELinear.calls_in_autocast.append(FakeTE.active_recipe is not None)
        return F.linear(x, self.weight, self.bias)


class FakeTE:
    active_recipe = None
    recipes_seen: list = []

    @staticmethod
    @contextlib.contextmanager
    def fp8_autocast(enabled, fp8_recipe):
        assert enabled
        FakeTE.recipes_seen.append(fp8_recipe)
        FakeTE.active_recipe = fp8_recipe
        try:
            yield
        finally:
            FakeTE.active_recipe = None


class FakeCurrentScaling:
    pass


class FakeBlockScaling:
    pass


@pytest.fixture
def fake_transformer_engine(monkeypatch):
    package = types.ModuleType("transformer_engine")
    te_pytorch = types.ModuleType("transformer_engine.pytorch")
    te_pytorch.Linear = FakeTELinear
    te_pytorch.fp8_autocast = FakeTE.fp8_autocast
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Float8CurrentScaling = FakeCurrentScaling
    recipe.Float8BlockScaling = FakeBlockScaling
    for name, module in [
        ("transformer_engine", package),
        ("transformer_engine.pytorch", te_pytorch),
        ("transformer_engine.common", common),
        ("transformer_engine.common.recipe", recipe),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    FakeTELinear.calls_in_autocast = []
    FakeTE.recipes_seen = []
    return recipe


@pytest.mark.parametrize("recipe, recipe_class", [("tensorwise", FakeCurrentScaling), ("rowwise", FakeBlockScaling)])
def test_transformer_engine_backend_swaps_the_selection_and_runs_forward_in_fp8_autocast(
    fake_transformer_engine, monkeypatch, recipe, recipe_class
):
    reference = train_tiny.build_reference_model()
    batch = train_tiny.global_batch(0, reference.config)
    model = train_tiny.build_reference_model()
    with capable(monkeypatch, None):
        selection = apply_float8(model, enabled(backend="transformer_engine", recipe=recipe))
    swapped = [fqn for fqn, module in model.named_modules() if isinstance(module, FakeTELinear)]
    assert swapped == list(selection.converted) == block_fqns(0, 1)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)

    loss = train_tiny.flow_matching_loss(model, batch)
    torch.testing.assert_close(loss, train_tiny.flow_matching_loss(reference, batch), rtol=1e-6, atol=0)
    assert FakeTELinear.calls_in_autocast == [True] * 16
    assert len(FakeTE.recipes_seen) == 1 and isinstance(FakeTE.recipes_seen[0], recipe_class)
    loss.backward()
    assert model.get_submodule("transformer_blocks.0.attn.to_q").weight.grad is not None


def test_transformer_engine_errors(fake_transformer_engine, monkeypatch):
    with capable(monkeypatch, None):
        with pytest.raises(ValueError, match="does not compose with this trainer's tensor-parallel plan"):
            apply_float8(build_model("tiny"), enabled(backend="transformer_engine"), tp=2)
        monkeypatch.delattr(fake_transformer_engine, "Float8BlockScaling")
        with pytest.raises(ImportError, match="needs transformer_engine.common.recipe.Float8BlockScaling"):
            apply_float8(build_model("tiny"), enabled(backend="transformer_engine", recipe="rowwise"))
        monkeypatch.setitem(sys.modules, "transformer_engine", None)
        monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
        with pytest.raises(ImportError, match="float8.backend=transformer_engine, but transformer_engine.pytorch cannot be imported"):
            apply_float8(build_model("tiny"), enabled(backend="transformer_engine"))
