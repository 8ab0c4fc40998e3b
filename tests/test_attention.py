"""SDPA kernel choice for the DiT's attention (``parallel.attention_backends``)."""

import pytest
import torch

from krea2_train.config import ConfigError, load_config
from krea2_train.model import model_config
from krea2_train.model.dit import grouped_query_attention
from krea2_train.parallel.attention import attention_backends, attention_shapes, check_attention_backends, parse_backends


def _attention_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 10, 4, 16, generator=generator)
    key, value = torch.randn(2, 10, 2, 16, generator=generator), torch.randn(2, 10, 2, 16, generator=generator)
    mask = torch.arange(10)[None, :] < torch.tensor([[7], [10]])
    return query, key, value, mask


def test_backend_names_parse_in_order_and_bad_names_are_refused():
    from torch.nn.attention import SDPBackend

    assert parse_backends(None) is None
    assert parse_backends("cudnn, efficient") == [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    assert parse_backends(["math"]) == [SDPBackend.MATH]
    for bad, message in (("fast", "unknown attention backend"), ([], "name at least one"), ("math,math", "repeat")):
        with pytest.raises(ValueError, match=message):
            parse_backends(bad)


def test_the_choice_restricts_sdpa_while_it_holds_and_is_undone_after():
    query, key, value, mask = _attention_inputs()
    reference = grouped_query_attention(query, key, value, mask)
    with attention_backends(["math"]):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        torch.testing.assert_close(grouped_query_attention(query, key, value, mask), reference, rtol=1e-5, atol=1e-6)
    with attention_backends(["efficient"]), pytest.raises(RuntimeError):  # no CPU kernel: the choice is enforced
        grouped_query_attention(query, key, value, mask)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    with attention_backends(None):
        assert torch.backends.cuda.flash_sdp_enabled()


def test_a_choice_that_cannot_run_is_refused_before_training_with_the_reason():
    config = model_config("tiny", text_hidden_dim=96, text_num_attention_heads=2, text_num_key_value_heads=1)
    assert attention_shapes(config) == [(32, 4, 2), (48, 2, 1)]  # the joint blocks and the text fusion
    check_attention_backends(["flash", "math"], torch.device("cpu"), torch.float32, config)
    check_attention_backends(None, torch.device("cpu"), torch.float32, config)
    with pytest.raises(ValueError, match=r"\['cudnn'\].*on cpu in torch.float32 with head dim 32"):
        check_attention_backends(["cudnn"], torch.device("cpu"), torch.float32, config)


def test_config_key_is_validated():
    assert load_config("stage/pretrain_256", ["parallel.attention_backends=[cudnn,efficient,math]"]).parallel.attention_backends == [
        "cudnn", "efficient", "math"
    ]
    with pytest.raises(ConfigError, match="parallel.attention_backends.*unknown attention backend"):
        load_config("stage/pretrain_256", ["parallel.attention_backends=[cuda]"])
