"""The few-shot training jobs end to end through the CLI, on a tiny budget."""

import json
import re

import pytest
import torch

from fastmaml import cli
from fastmaml.train import fewshot

from dataset_files import write_miniimagenet, write_omniglot

TINY = [
    "--meta-batch",
    "2",
    "--hidden",
    "8",
    "--query",
    "2",
    "--val-every",
    "2",
    "--val-episodes",
    "4",
    "--eval-batch",
    "3",
    "--quiet",
]


def train(out, *extra):
    return cli.main(["train", "fewshot-demo", "--out", str(out), *TINY, *extra])


def error_line(capsys) -> str:
    """The single line a user error prints on stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def refused(capsys, run, *args) -> str:
    """Runs a CLI call that must fail with a one-line error and exit status 2; returns the line."""
    try:
        code = run(*args)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    return error_line(capsys)


def test_demo_writes_metrics_checkpoints_and_plots(tmp_path, capsys):
    assert train(tmp_path, "--iterations", "3", "--test-episodes", "6") == 0
    for name in ("metrics.json", "best.pt", "checkpoint.pt", "loss.png", "accuracy.png"):
        assert (tmp_path / name).is_file(), name
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["job"] == "fewshot-demo" and m["config"]["meta_batch"] == 2 and m["config"]["steps"] == 1
    assert m["chance"] == pytest.approx(0.2)
    for key in ("test", "random_init_baseline"):
        assert 0 <= m[key]["accuracy"] <= 1 and m[key]["ci95"] > 0 and m[key]["episodes"] == 6
    assert [it for it, _ in m["history"]["query_loss_after"]] == [1, 2, 3]
    assert [it for it, _ in m["history"]["val_accuracy"]] == [2, 3]
    assert m["best"]["iteration"] in (2, 3) and m["seconds_per_meta_step"] > 0
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["iteration"] == m["best"]["iteration"]
    assert "test accuracy" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, "--iterations", "4", "--test-episodes", "0")
    train(resumed, "--iterations", "2", "--test-episodes", "0")
    train(resumed, "--iterations", "4", "--test-episodes", "0", "--resume")
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    for name, value in a["model"].items():
        assert torch.allclose(value.double(), b["model"][name].double(), rtol=1e-5, atol=1e-7), name
    (ia, la), (ib, lb) = (zip(*h["history"]["query_loss_after"]) for h in (a, b))
    assert ia == ib and la == pytest.approx(lb, rel=1e-5)
    assert json.loads((resumed / "metrics.json").read_text())["iterations_done"] == 4


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path, capsys):
    assert "--resume: the folder" in refused(capsys, train, tmp_path / "empty", "--iterations", "2", "--resume")
    train(tmp_path, "--iterations", "2", "--test-episodes", "0")
    capsys.readouterr()
    line = refused(
        capsys, train, tmp_path, "--iterations", "4", "--test-episodes", "0", "--inner-lr", "0.1", "--resume"
    )
    assert "--resume:" in line and "--inner-lr 0.1 (checkpoint: 0.4)" in line


def test_per_step_batch_norm_evaluates_more_steps_than_training(tmp_path):
    train(tmp_path, "--iterations", "2", "--test-episodes", "3", "--bn", "per_step", "--eval-steps", "3")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["bn"] == "per_step" and 0 <= m["test"]["accuracy"] <= 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert state["1.step_running_mean"].shape == (2, 8)
    assert float(state["1.step_running_mean"].abs().sum()) > 0  # meta-training updated the statistics


def test_real_dataset_jobs_need_data_and_presets_follow_the_paper(tmp_path, capsys):
    assert "--data: the omniglot job needs the dataset folder" in refused(
        capsys, cli.main, ["train", "omniglot", "--out", str(tmp_path)]
    )
    assert "images_background" in refused(
        capsys, cli.main, ["train", "omniglot", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]
    )
    o, mi = fewshot.PRESETS["omniglot"], fewshot.PRESETS["miniimagenet"]
    assert (o["meta_batch"], o["inner_lr"], o["steps"], o["eval_steps"], o["hidden"]) == (32, 0.4, 1, 3, 64)
    assert (mi["meta_batch"], mi["inner_lr"], mi["steps"], mi["eval_steps"], mi["hidden"]) == (4, 0.01, 5, 10, 32)
    assert o["meta_lr"] == mi["meta_lr"] == 1e-3 and o["test_episodes"] == mi["test_episodes"] == 600


def test_bad_option_values_name_the_option(tmp_path, capsys):
    assert "argument --ways: expected a positive integer, got '0'" in refused(capsys, train, tmp_path, "--ways", "0")
    assert "argument --inner-lr: expected a positive number" in refused(capsys, train, tmp_path, "--inner-lr", "-1")
    assert "argument --val-classes: expected a positive integer" in refused(
        capsys, train, tmp_path, "--val-classes", "0"
    )
    assert re.search(
        r"--train-classes, --val-classes: 500 \+ 100 .* 600 demo classes",
        refused(capsys, train, tmp_path, "--train-classes", "500"),
    )


def test_help_lists_only_the_options_of_the_job(capsys):
    for job, has_data, has_classes in (
        ("fewshot-demo", False, True),
        ("omniglot", True, True),
        ("miniimagenet", True, False),
    ):
        with pytest.raises(SystemExit):
            cli.main(["train", job, "--help"])
        text = capsys.readouterr().out
        assert ("--data" in text) == has_data and ("--cache-dir" in text) == has_data, job
        assert ("--train-classes" in text) == has_classes and ("--val-classes" in text) == has_classes, job
        for shared in ("--checkpoint-every", "--log-every", "--quiet", "--threads", "--resume", "--device"):
            assert shared in text, (job, shared)
        assert "--no-progress" not in text  # the old name still works but is not advertised


# The real-data jobs on folders generated in the published layouts (the readers' tests' generators):
# 2-way 1-shot, 1 query, 4 filters, validation every 2 iterations.
REAL_TINY = [
    "--ways",
    "2",
    "--shots",
    "1",
    "--query",
    "1",
    "--meta-batch",
    "2",
    "--hidden",
    "4",
    "--steps",
    "1",
    "--eval-steps",
    "2",
    "--val-every",
    "2",
    "--val-episodes",
    "2",
    "--eval-batch",
    "2",
    "--quiet",
]


def train_real(job, data, out, *extra):
    return cli.main(["train", job, "--data", str(data), "--out", str(out), *REAL_TINY, *extra])


def check_run(out, job, iterations, test_episodes):
    """Trained `iterations`, validated every 2, kept checkpoints, tested, wrote metrics and curves."""
    for name in ("loss.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["job"] == job and m["iterations_done"] == iterations
    assert [it for it, _ in m["history"]["query_loss_after"]] == list(range(1, iterations + 1))
    assert [it for it, _ in m["history"]["val_accuracy"]] == list(range(2, iterations + 1, 2))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["iteration"] == iterations
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["iteration"] == m["best"]["iteration"] and best["val_accuracy"] == m["best"]["val_accuracy"]
    for key in ("test", "random_init_baseline"):
        assert 0 <= m[key]["accuracy"] <= 1 and m[key]["ci95"] >= 0 and m[key]["episodes"] == test_episodes
    return m


def test_omniglot_job_end_to_end_with_split_options_and_resume(tmp_path, capsys):
    """images_background/ + images_evaluation/ (8 characters of 4 PNGs): the preset split needs 1623
    characters and says which options to lower; --train-classes / --val-classes make it fit; --resume
    from iteration 2 to 4 gives bit for bit the uninterrupted run."""
    data = tmp_path / "omniglot"
    assert write_omniglot(data) == 8
    assert re.search(
        r"--train-classes, --val-classes: 1100 \+ 100 .* the 8 characters",
        refused(capsys, train_real, "omniglot", data, tmp_path / "refused"),
    )
    assert "validation split has 1; lower --ways or raise --val-classes" in refused(
        capsys, train_real, "omniglot", data, tmp_path / "refused", "--train-classes", "5", "--val-classes", "1"
    )
    split = ["--train-classes", "4", "--val-classes", "2", "--test-episodes", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_real("omniglot", data, straight, "--iterations", "4", *split) == 0
    m = check_run(straight, "omniglot", 4, 4)
    assert (m["config"]["train_classes"], m["config"]["val_classes"], m["config"]["inner_lr"]) == (4, 2, 0.4)
    assert "omniglot: 2-way 1-shot test accuracy" in capsys.readouterr().out

    train_real("omniglot", data, resumed, "--iterations", "2", *split)
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["iteration"] == 2
    capsys.readouterr()
    assert "--train-classes 3 (checkpoint: 4)" in refused(
        capsys, train_real, "omniglot", data, resumed, "--iterations", "4", *split, "--train-classes", "3", "--resume"
    )
    assert train_real("omniglot", data, resumed, "--iterations", "4", *split, "--resume") == 0
    r = check_run(resumed, "omniglot", 4, 4)
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, resumed))
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert a["history"] == b["history"] and (r["best"], r["test"]) == (m["best"], m["test"])


def test_miniimagenet_job_end_to_end(tmp_path, capsys):
    """train.csv / val.csv / test.csv + images/ (3 / 2 / 2 classes of 3 JPEGs); the split options do not exist."""
    data = tmp_path / "mini"
    labels = iter(f"n{c:08d}" for c in range(7))
    write_miniimagenet(
        data,
        split_labels={split: [next(labels) for _ in range(n)] for split, n in (("train", 3), ("val", 2), ("test", 2))},
    )
    assert "unrecognized arguments: --val-classes 1" in refused(
        capsys, train_real, "miniimagenet", data, tmp_path / "refused", "--val-classes", "1"
    )
    out = tmp_path / "run"
    assert train_real("miniimagenet", data, out, "--iterations", "2", "--test-episodes", "3") == 0
    m = check_run(out, "miniimagenet", 2, 3)
    assert m["config"]["inner_lr"] == pytest.approx(0.01) and "train_classes" not in m["config"]


def test_maml_plus_plus_schedule(tmp_path, monkeypatch, capsys):
    """--msl anneals the multi-step loss weights (fastmaml.msl_weights) and --first-order-until runs
    first-order meta-steps before that iteration; a checkpoint written before these options existed
    resumes as a run without them."""
    calls = []
    real = fewshot.fastmaml.meta_step

    def spy(*args, **kwargs):
        calls.append((kwargs["order"], kwargs["step_weights"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(fewshot.fastmaml, "meta_step", spy)
    train(
        tmp_path, "--iterations", "3", "--test-episodes", "0", "--steps", "2", "--msl", "4", "--first-order-until", "2"
    )
    assert [order for order, _ in calls] == ["first", "first", "second"]
    assert [w for _, w in calls] == [pytest.approx(w) for w in ([0.5, 0.5], [0.375, 0.625], [0.25, 0.75])]
    calls.clear()
    old = tmp_path / "old"
    train(old, "--iterations", "2", "--test-episodes", "0")
    state = torch.load(old / "checkpoint.pt", weights_only=False)
    for key in ("msl", "first_order_until"):
        del state["config"][key]
    del state["checksum"]  # (checkpoints of that time had no checksum either)
    torch.save(state, old / "checkpoint.pt")
    assert train(old, "--iterations", "3", "--test-episodes", "0", "--resume") == 0
    assert calls[-1] == ("second", None)
    capsys.readouterr()
    assert "argument --msl: expected a non-negative integer" in refused(capsys, train, tmp_path, "--msl", "-1")
    assert "--msl: the implicit order has no per-step query losses" in refused(
        capsys, train, tmp_path, "--msl", "5", "--order", "implicit"
    )


def test_resnet12_model_option(tmp_path, capsys):
    """--model resnet12 trains ResNet-12 (on the fused engine) with the widths given, and resumes with them."""
    out = tmp_path / "resnet"
    args = ["--model", "resnet12", "--widths", "3,4,3,4", "--iterations", "2", "--test-episodes", "0"]
    assert train(out, *args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model"] == "resnet12" and m["config"]["widths"] == [3, 4, 3, 4]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["model"]["features.3.conv3.weight"].shape[0] == 4
    assert "other settings" in refused(
        capsys,
        train,
        out,
        "--model",
        "resnet12",
        "--widths",
        "4,4,4,4",
        "--iterations",
        "3",
        "--test-episodes",
        "0",
        "--resume",
    )
    assert "--widths" in refused(capsys, train, tmp_path / "bad", "--model", "resnet12", "--widths", "3,4")


def test_norm_option(tmp_path, capsys):
    """--norm group trains conv4 with GroupNorm (on the fused engine) and resumes only with it; --norm applies to
    conv4 alone and not with BatchNorm's statistics modes."""
    out = tmp_path / "gn"
    args = ["--norm", "group", "--iterations", "2", "--test-episodes", "0"]
    assert train(out, *args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["norm"] == "group"
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert "1.weight" in state["model"] and "1.running_mean" not in state["model"]  # GroupNorm: no statistics
    assert "other settings" in refused(capsys, train, out, "--iterations", "3", "--test-episodes", "0", "--resume")
    assert train(tmp_path / "plain", "--norm", "none", "--iterations", "1", "--test-episodes", "0") == 0
    assert "--bn per_step" in refused(capsys, train, tmp_path / "b", "--norm", "group", "--bn", "per_step")
    assert "--norm group: applies to --model conv4" in refused(
        capsys, train, tmp_path / "c", "--norm", "group", "--model", "resnet12", "--widths", "4,4,4,4"
    )
    assert "--hidden" in refused(capsys, train, tmp_path / "d", "--norm", "group", "--hidden", "6")
