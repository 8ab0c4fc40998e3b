"""Loader throughput: samples/s of one rank's ShardLoader (decode to float tensors included).

Writes temporary PNG shards of shapes-world images at each resolution, then times a full epoch
after the first batch (worker start-up excluded). The target ("at least 5x what the tiny model's
training step consumes") needs the trainer's step rate, so this reports samples/s only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from krea2_train.arguments import non_negative_int, positive_int
from krea2_train.data.buckets import make_buckets
from krea2_train.data.loader import LoaderConfig, ShardLoader
from krea2_train.data.plan import Manifest, ShardInfo
from krea2_train.data.shapes import make_sample
from krea2_train.data.shards import ShardWriter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loader-resolutions", type=positive_int, nargs="+", default=[256, 64], help="pixels (default 256 64)")
    parser.add_argument("--loader-samples", type=positive_int, default=512, help="samples per resolution (default 512)")
    parser.add_argument("--loader-batch", type=positive_int, default=32, help="global batch size (default 32)")
    parser.add_argument("--loader-workers", type=non_negative_int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("--loader-image-format", default="png", choices=["png", "webp", "jpeg"])


def write_bench_shards(out_dir: Path, resolution: int, samples: int, image_format: str, shard_size: int = 128) -> Manifest:
    """Square shapes-world shards (one bucket) of ``samples`` images at ``resolution``."""
    bucket = make_buckets(resolution, 16, ["1:1"])[0]
    shards = []
    for number, start in enumerate(range(0, samples, shard_size)):
        path = out_dir / f"r{resolution}-{number}.arrow"
        with ShardWriter(path, resolution=resolution, bucket=bucket, image_format=image_format) as writer:
            for index in range(start, min(samples, start + shard_size)):
                image, captions, facts = make_sample(index, resolution)
                writer.write(index, image.resize((bucket.width, bucket.height)), captions, facts)
            written = writer.close()
        shards.append(ShardInfo(number, str(path), bucket.name, bucket.width, bucket.height, written.num_samples, written.sha256))
    return Manifest(shards)


def time_epoch_after_first_batch(manifest: Manifest, batch: int, workers: int) -> tuple[int, float]:
    """Samples read after the first batch to the end of the epoch, and the seconds they took."""
    loader = ShardLoader(manifest, LoaderConfig(global_batch_size=batch, num_workers=workers))
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for item in iterator:
        count += item.images.shape[0]
    return count, time.perf_counter() - start


def loader_samples_per_s(manifest: Manifest, batch: int, workers: int) -> float:
    count, seconds = time_epoch_after_first_batch(manifest, batch, workers)
    return count / seconds


def run(args: argparse.Namespace) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="krea2-bench-loader-") as tmp:
        for resolution in args.loader_resolutions:
            manifest = write_bench_shards(Path(tmp), resolution, args.loader_samples, args.loader_image_format)
            rate = loader_samples_per_s(manifest, args.loader_batch, args.loader_workers)
            results.append({
                "bench": "data_loader",
                "metric": f"samples_per_s_{resolution}px_{args.loader_workers}workers_{args.loader_image_format}",
                "value": rate,
                "unit": "samples/s",
                "target": ">= 5x the tiny model's training consumption (computed by the caller)",
                "met": None,
            })
    return results


if __name__ == "__main__":
    from krea2_train.bench import module_main

    raise SystemExit(module_main(__spec__.name))
