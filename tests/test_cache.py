"""The conditioning cache: encoders run once per entry, cached conditioning gives the same loss,
variable-length text taps are re-padded without changing the DiT, and a changed identity empties it."""

import pytest
import torch

from krea2_train.conditioning.conditioner import build_conditioner, text_length
from krea2_train.conditioning.tiny import build_tiny_text_encoder
from krea2_train.data.cache import ConditioningCache, pad_text_states
from krea2_train.model import build_model
from krea2_train.model.patchify import position_ids


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text_encoder")
    build_tiny_text_encoder(directory, seed=0)
    return build_conditioner("pixel", directory, max_text_tokens=16)


class Counting:
    def __init__(self, encode):
        self.encode, self.calls = encode, 0

    def __call__(self, inputs):
        self.calls += len(inputs)
        return self.encode(inputs)


def _identity(resolution=64):
    return {"encoder": "tiny", "resolution": resolution}


def test_entries_are_encoded_once_and_read_back_identically(tmp_path, conditioner):
    cache = ConditioningCache(tmp_path / "cache", _identity())
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    encode_images, encode_text = Counting(conditioner.encode_images), Counting(conditioner.encode_text)
    captions = ["a red circle", "", "two green squares above a large blue triangle"]
    first_tokens, grid = cache.image_tokens(torch.tensor([5, 6, 7]), images, encode_images)
    first_text, first_mask = cache.text_states(captions, encode_text, torch.device("cpu"))
    again_tokens, again_grid = cache.image_tokens(torch.tensor([7, 5, 6]), images[[2, 0, 1]], encode_images)
    again_text, again_mask = cache.text_states(captions, encode_text, torch.device("cpu"))
    assert (encode_images.calls, encode_text.calls) == (3, 3)
    assert again_grid == grid and torch.equal(again_tokens, first_tokens[[2, 0, 1]])
    assert torch.equal(again_text, first_text) and torch.equal(again_mask, first_mask)
    direct_tokens, _ = conditioner.encode_images(images)
    assert torch.equal(first_tokens, direct_tokens)
    _, direct_mask = conditioner.encode_text(captions)
    assert first_mask.sum(1).tolist() == direct_mask.sum(1).tolist()  # variable lengths kept
    assert first_mask.shape[1] == text_length(int(direct_mask.sum(1).max()))


def test_an_entry_cut_short_by_a_crash_is_recomputed(tmp_path, conditioner):
    """Entries are published without fsync; one left empty or short by a node crash is a miss."""
    cache = ConditioningCache(tmp_path / "cache", _identity())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    encode_images, encode_text = Counting(conditioner.encode_images), Counting(conditioner.encode_text)
    first_tokens, grid = cache.image_tokens(torch.tensor([1, 2]), images, encode_images)
    first_text, _ = cache.text_states(["a red circle", "a blue square"], encode_text, torch.device("cpu"))
    latents = sorted((tmp_path / "cache" / "latents").iterdir())
    texts = sorted((tmp_path / "cache" / "text").iterdir())
    latents[1].write_bytes(latents[1].read_bytes()[:50])  # short
    texts[0].write_bytes(b"")  # empty
    again_tokens, again_grid = cache.image_tokens(torch.tensor([1, 2]), images, encode_images)
    again_text, _ = cache.text_states(["a red circle", "a blue square"], encode_text, torch.device("cpu"))
    assert (encode_images.calls, encode_text.calls) == (3, 3)  # the two broken entries, once each
    assert again_grid == grid and torch.equal(again_tokens, first_tokens)
    assert torch.equal(again_text, first_text)
    assert latents[1].stat().st_size == latents[0].stat().st_size  # rewritten whole


def test_repadded_text_gives_the_same_dit_output(conditioner):
    captions = ["a red circle", "", "two green squares above a large blue triangle"]
    states, mask = conditioner.text_taps.encode(captions)  # the template's layout: padding inside the sequence
    assert not all(m[: int(m.sum())].all() for m in mask)
    repadded, new_mask = pad_text_states([s[m] for s, m in zip(states, mask)])
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, t = torch.randn(3, 16, 64), torch.rand(3)
    direct = model(x, states, t, position_ids(states.shape[1], 4, 4), mask)
    cached = model(x, repadded, t, position_ids(repadded.shape[1], 4, 4), new_mask)
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)


def test_changed_encoder_or_resolution_invalidates(tmp_path, conditioner):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cache = ConditioningCache(tmp_path, _identity(64))
    cache.image_tokens(torch.tensor([1, 2]), images, conditioner.encode_images)
    cache.text_states(["a"], conditioner.encode_text, torch.device("cpu"))
    assert len(cache) == 3
    assert len(ConditioningCache(tmp_path, _identity(64))) == 3  # same identity: kept
    assert len(ConditioningCache(tmp_path, _identity(128))) == 0  # resolution changed: emptied
    assert len(ConditioningCache(tmp_path, {"encoder": "other", "resolution": 128})) == 0


def test_run_identity_follows_text_encoder_files(tmp_path):
    from krea2_train.config import load_config

    config = load_config("stage/sft", [f"runs_root={tmp_path}", "conditioning_cache.enabled=true"])
    encoder = tmp_path / config.run_name / "text_encoder"
    encoder.mkdir(parents=True)
    (encoder / "config.json").write_text("{}")
    cache = ConditioningCache.for_run(config)
    cache.open()
    (cache.directory / "text" / "entry.safetensors").write_bytes(b"x")
    assert len(ConditioningCache.for_run(config)) == 1
    (encoder / "config.json").write_text('{"changed": true}')
    assert len(ConditioningCache.for_run(config)) == 0


@pytest.mark.slow
def test_ranks_sharing_a_sharded_text_encoder_encode_misses_together(tmp_path):
    """One rank hits, the other misses: with the encoder sharded over both, the miss is encoded
    with every rank taking part. Without that, the missing rank waits in an all-gather the other
    never joins (a hang on NCCL; here gloo's timeout)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    text_encoder = build_tiny_text_encoder(tmp_path / "text_encoder", seed=0)
    script = Path(__file__).parent / "distributed" / "cache_ranks.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    out = tmp_path / "ok"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "--text-encoder", str(text_encoder), "--cache", str(tmp_path / "cache"), "--out", str(out)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (tmp_path / "ok.0").exists() and (tmp_path / "ok.1").exists()
