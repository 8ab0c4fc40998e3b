"""The log output every krea2 process shares: libraries' known noise left out, progress lines."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from krea2_train.logs import Progress, format_duration

NOISE_SCRIPT = textwrap.dedent(
    """
    import logging
    from krea2_train.logs import setup_logging
    setup_logging(0)
    setup_logging(0)  # a second setup adds no second filter
    so = "/venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
    logging.getLogger("torchao").warning(f"Failed to load {so}: Could not load this library: {so}")
    logging.getLogger("torchao").warning("a torchao warning that matters")
    logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton, on systems without Triton certain kernels will not work")
    logging.getLogger("torch.utils._pytree").warning(
        "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.", "KernelPreference")
    logging.getLogger("torch.utils._pytree").warning("another pytree warning")
    print(len(logging.getLogger("torchao").filters))
    """
)


def test_known_library_noise_is_left_out_and_other_warnings_are_kept():
    result = subprocess.run([sys.executable, "-c", NOISE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "a torchao warning that matters" in output and "another pytree warning" in output
    assert "Failed to load" not in output and "Detected no triton" not in output and "Enum subclass" not in output
    assert output.strip().endswith("1")


def test_progress_lines_give_rate_and_eta_at_most_every_period(caplog):
    logger = logging.getLogger("krea2_train.test_progress")
    progress = Progress("packed", total=100, unit="images", logger=logger, every_s=0.0)
    progress.began -= 10.0  # 10 s of work so far
    with caplog.at_level(logging.INFO, logger=logger.name):
        progress.update(25)  # 2.5 images/s: 75 left take 30 s
        progress.update(100)  # the last unit: the work's own end line follows
        progress.every_s = 3600.0
        progress.update(50)  # within the period
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("packed 25/100  2.5") and line.endswith("eta 0m30s")
    assert format_duration(3725) == "1h02m" and format_duration(185) == "3m05s" and format_duration(-5) == "0m00s"
