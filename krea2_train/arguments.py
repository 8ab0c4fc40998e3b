"""Argument types for the command-line parsers: a value out of range is refused by argparse
itself (``krea2 ...: error: argument --steps: must be a positive integer, got 0``, exit 2),
before any work."""

from __future__ import annotations

import argparse


def help_text(docstring: str) -> str:
    """A module docstring as a parser's description: reStructuredText's ``literal`` marks dropped
    (argparse prints text as it is)."""
    return docstring.replace("``", "")


def _number(kind: type, text: str, ok, wanted: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda value: value > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda value: value >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda value: value > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda value: value >= 0, "a number >= 0")


def int_in_range(low: int, high: int):
    """An argument type: an integer from ``low`` to ``high``, both included."""

    def parse(text: str) -> int:
        return _number(int, text, lambda value: low <= value <= high, f"an integer from {low} to {high}")

    return parse


def image_resolution(text: str) -> int:
    """An image side in pixels that the model's token grid divides (16 px per token)."""
    from krea2_train.model.flops import PIXELS_PER_TOKEN

    return _number(int, text, lambda value: value > 0 and value % PIXELS_PER_TOKEN == 0, f"a positive multiple of {PIXELS_PER_TOKEN} px")


def torch_device(text: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (torch {torch.__version__})")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
