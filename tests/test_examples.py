"""Every script in examples/ runs to the end (tiny settings through its own flags), in a fresh interpreter from
the source tree. examples/distributed_maml.py also runs on two ranks in tests/test_distributed_jobs.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_CONV = ["--iterations", "2", "--meta-batch", "2", "--hidden", "4"]
RUNS = {
    # script: (arguments, a line its output must contain)
    "l2l_maml_omniglot.py": (TINY_CONV, "meta-test accuracy"),
    "anil_class_backbone.py": (TINY_CONV + ["--steps", "2"], "meta-test accuracy"),
    "higher_style_loop.py": (["--iterations", "2", "--meta-batch", "3"], "iteration 2: query loss after 2 steps"),
    "torchopt_style_loop.py": (["--iterations", "2", "--meta-batch", "3"], "iteration 2: query loss before"),
    "custom_loss.py": (["--iterations", "2", "--meta-batch", "3"], "loss=huber: torch.func program"),
    "functional_training_loop.py": (["--iterations", "2", "--meta-batch", "3"], "agrees to"),
    "distributed_maml.py": (["--iterations", "2", "--meta-batch", "3"], "iteration 2: meta-loss"),
}


def test_every_example_is_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUNS)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script):
    args, expected = RUNS[script]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout, out.stdout[-3000:]
