"""Small helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

import torch

from krea2_train.model import build_model


def randomise_(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Random values in every parameter, the zero-initialised tables and norms included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def random_tiny_model(seed: int = 0) -> torch.nn.Module:
    """The tiny Krea2DiT with every parameter random (a fresh init predicts exactly zero)."""
    torch.manual_seed(seed)
    return randomise_(build_model("tiny"), seed + 1)


def save_perturbed_tiny_base(path, scale: float = 0.05) -> torch.nn.Module:
    """The tiny Krea2DiT (seed 0) with Gaussian noise of ``scale`` added to every parameter, saved
    in the original layout at ``path``: a stand-in for released weights. Returns the model."""
    from krea2_train.model.layouts import save_model

    torch.manual_seed(0)
    base = build_model("tiny")
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    save_model(base, path, layout="original")
    return base


def krea2_error(argv: list[str], capsys) -> str:
    """Run ``krea2 ARGV``, which must fail with a user error (exit 1, one ``krea2: error:``
    message, no traceback); returns the message."""
    from krea2_train.cli import main

    capsys.readouterr()
    assert main(argv) == 1
    printed = capsys.readouterr().err
    assert printed.startswith("krea2: error: ") and "Traceback" not in printed, printed
    return printed
