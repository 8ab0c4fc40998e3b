"""The conditioning cache over ranks that share a sharded text encoder.

Rank 0 asks for a caption the cache holds (a hit), rank 1 for one it does not (a miss). The
encoder is FSDP-sharded over both ranks, so its forward is a collective: rank 1's miss must be
encoded with rank 0 taking part (``ConditioningCache.any_rank_misses``), or rank 1 waits in an
all-gather that rank 0 never joins. Each rank checks that its states equal the unsharded
encoder's and writes ``--out.<rank>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from krea2_train.conditioning.conditioner import build_conditioner  # noqa: E402
from krea2_train.data.cache import ConditioningCache  # noqa: E402
from krea2_train.parallel.distributed import any_rank_on_host, destroy_distributed, init_distributed  # noqa: E402
from krea2_train.parallel.mesh import build_parallel_dims  # noqa: E402
from krea2_train.parallel.parallelize import shard_frozen_module  # noqa: E402

CAPTIONS = ["a red circle above a blue square", "a green triangle on a white background"]
TIMEOUT_S = 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-encoder", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-lockstep", action="store_true", help="leave any_rank_misses unset (the failure)")
    args = parser.parse_args()
    info = init_distributed(timeout_s=TIMEOUT_S)
    conditioner = build_conditioner("pixel", args.text_encoder, max_text_tokens=64)
    caption = CAPTIONS[info.rank]
    with torch.no_grad():
        expected, expected_mask = conditioner.encode_text([caption])  # unsharded

    cache = ConditioningCache(args.cache, {"test": "cache_ranks"})
    if info.rank == 0:
        cache.open()
        cache.text_states([CAPTIONS[0]], conditioner.encode_text, torch.device("cpu"))  # rank 0's caption is a hit
    dist.barrier()
    cache.open()
    shard_frozen_module(conditioner.text_taps.text_model, build_parallel_dims(1, -1, 1, info.world_size))
    if not args.no_lockstep:
        cache.any_rank_misses = any_rank_on_host(TIMEOUT_S)
    hits_before = cache.hits
    with torch.no_grad():
        states, mask = cache.text_states([caption], conditioner.encode_text, torch.device("cpu"))
    dist.barrier()
    assert cache.hits - hits_before == (1 if info.rank == 0 else 0)
    length = int(expected_mask.sum())
    torch.testing.assert_close(states[:, :length], expected[:, :length], rtol=1e-5, atol=1e-5)
    assert torch.equal(mask[:, :length], expected_mask[:, :length])
    Path(f"{args.out}.{info.rank}").write_text("ok\n")
    destroy_distributed()


if __name__ == "__main__":
    main()
