"""The training jobs as a user sees them: progress off a terminal (log lines with iteration, loss,
accuracy, rate and ETA; validation and test progress), metrics.json and plots rewritten as the run
goes, a final summary naming every file, one-line errors with exit status 2 for user errors (and
tracebacks for everything else), and one vocabulary of options for every job."""

import argparse
import json
import re
import sys

import pytest

from fastmaml import cli
from fastmaml.train import common, fewshot, sinusoid

from dataset_files import write_omniglot

SINUSOID = [
    "train",
    "sinusoid",
    "--meta-batch",
    "4",
    "--shots",
    "5",
    "--eval-tasks",
    "4",
    "--eval-query",
    "8",
    "--eval-steps",
    "1",
]
DEMO = [
    "train",
    "fewshot-demo",
    "--meta-batch",
    "2",
    "--hidden",
    "4",
    "--query",
    "1",
    "--val-every",
    "2",
    "--val-episodes",
    "2",
    "--eval-batch",
    "1",
]
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
ETA = r"ETA \d+:\d\d:\d\d"


def one_line_error(capsys, argv) -> str:
    """Runs the CLI: exit status 2 and a single stderr line, no traceback; returns the line."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_sinusoid_progress_lines_off_a_terminal(tmp_path, capsys):
    """Captured output is not a terminal: log lines (here one per iteration) instead of a bar."""
    assert cli.main([*SINUSOID, "--iterations", "5", "--log-every", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = re.findall(
        rf"^sinusoid: (\d+)/5 it \(\d+%\)  loss {NUMBER}  pretrained {NUMBER}  {NUMBER} it/s  {ETA}$", out, re.M
    )
    assert [int(i) for i in lines] == [1, 2, 3, 4, 5], out
    assert re.search(
        r"^sinusoid: starting at iteration 0 of 5 on cpu \(MAML: .*\); checkpoint every 1000 iterations", out, re.M
    ), out
    assert re.search(rf"^evaluation: 4/4 evaluations \(100%\)  {NUMBER} evaluations/s  {ETA}$", out, re.M), out
    for name in (common.CHECKPOINT, common.METRICS, sinusoid.FIGURE, sinusoid.LEARNING_CURVE):
        assert re.search(rf"^  \w[\w ]*  {re.escape(str(tmp_path / name))}$", out, re.M), name


def test_progress_line_every_n_seconds(tmp_path, capsys):
    """With a long --log-every only the line at the end of training appears; --quiet prints no progress."""
    assert cli.main([*SINUSOID, "--iterations", "4", "--log-every", "3600", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^sinusoid: (\d+)/4 it", out, re.M) == ["4"]
    assert cli.main([*SINUSOID, "--iterations", "2", "--quiet", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "it/s" not in out and "ETA" not in out and str(tmp_path / "q" / common.METRICS) in out


def test_progress_is_a_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main([*SINUSOID, "--iterations", "3", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "it/s" not in captured.out and "3/3" in captured.err  # tqdm draws on stderr


def test_fewshot_progress_validation_test_and_summary(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert (
        cli.main([*DEMO, "--iterations", "2", "--test-episodes", "2", "--log-every", "0", "--out", str(out_dir)]) == 0
    )
    out = capsys.readouterr().out
    train_lines = re.findall(
        rf"^fewshot-demo: (\d)/2 it \(\d+%\)  loss {NUMBER}  acc {NUMBER}(?:  val {NUMBER})?  "
        rf"{NUMBER} it/s  {ETA}$",
        out,
        re.M,
    )
    assert train_lines == ["1", "2"], out
    assert "fewshot-demo: validation at iteration 2 (2 episodes)" in out
    assert re.search(rf"^validation at iteration 2: 2/2 episodes \(100%\)  {NUMBER} episodes/s  {ETA}$", out, re.M)
    assert re.search(
        r"^fewshot-demo: validation at iteration 2: accuracy [\d.]+% \(best [\d.]+% at iteration 2\)", out, re.M
    )
    assert re.search(rf"^test: 4/4 episodes \(100%\)  {NUMBER} episodes/s  {ETA}$", out, re.M), out
    assert "fewshot-demo: 5-way 1-shot test accuracy" in out
    for name in (common.CHECKPOINT, common.BEST, common.METRICS, fewshot.LOSS_PLOT, fewshot.ACCURACY_PLOT):
        assert re.search(rf"^  \w[\w ]*  {re.escape(str(out_dir / name))}$", out, re.M), name


def test_fewshot_without_test_still_prints_progress_and_summary(tmp_path, capsys):
    assert cli.main([*DEMO, "--iterations", "2", "--test-episodes", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "validation at iteration 2: accuracy" in out and "no test: --test-episodes 0" in out
    assert str(tmp_path / common.METRICS) in out


def test_metrics_and_plots_rewritten_at_every_validation(tmp_path, monkeypatch):
    written = []
    real_json, real_plot = common.write_json, common.plot_curves

    def spy_json(path, obj):
        if path.name == common.METRICS:
            written.append(("metrics", obj["iterations_done"], obj["status"], len(obj["history"]["val_accuracy"])))
        real_json(path, obj)

    def spy_plot(history, path, **kwargs):
        written.append((path.name, max((p[-1][0] for p in history.values() if p), default=0)))
        real_plot(history, path, **kwargs)

    monkeypatch.setattr(common, "write_json", spy_json)
    monkeypatch.setattr(common, "plot_curves", spy_plot)
    assert cli.main([*DEMO, "--iterations", "4", "--test-episodes", "0", "--quiet", "--out", str(tmp_path)]) == 0
    assert written == [
        ("metrics", 2, "training", 1),
        ("loss.png", 2),
        ("accuracy.png", 2),
        ("metrics", 4, "training", 2),
        ("loss.png", 4),
        ("accuracy.png", 4),
        ("metrics", 4, "done", 2),
        ("loss.png", 4),
        ("accuracy.png", 4),
    ]


def test_sinusoid_metrics_and_learning_curve_rewritten_with_each_checkpoint(tmp_path, monkeypatch):
    written = []
    real_json, real_plot = common.write_json, common.plot_curves
    monkeypatch.setattr(
        common,
        "write_json",
        lambda path, obj: (written.append(("metrics", obj["iteration"], obj["status"])), real_json(path, obj)),
    )
    monkeypatch.setattr(
        common,
        "plot_curves",
        lambda history, path, **kw: (
            written.append((path.name, len(next(iter(history.values()))))),
            real_plot(history, path, **kw),
        ),
    )
    assert cli.main([*SINUSOID, "--iterations", "4", "--checkpoint-every", "2", "--quiet", "--out", str(tmp_path)]) == 0
    assert written == [
        ("metrics", 2, "training"),
        (sinusoid.LEARNING_CURVE, 2),
        ("metrics", 4, "training"),
        (sinusoid.LEARNING_CURVE, 4),
        (sinusoid.LEARNING_CURVE, 4),
        ("metrics", 4, "done"),
    ]
    assert json.loads((tmp_path / common.METRICS).read_text())["status"] == "done"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            [*SINUSOID, "--device", "cuda:99"],
            r"fastmaml train sinusoid: error: --device cuda:99: (CUDA is not available "
            r"here|this machine has \d+ CUDA device)",
        ),
        ([*DEMO, "--device", "cuda:99"], r"fastmaml train fewshot-demo: error: --device cuda:99: "),
        (
            [*SINUSOID, "--device", "gpu0"],
            r"fastmaml train sinusoid: error: argument --device: expected a torch device",
        ),
        (
            [*SINUSOID, "--meta-batch", "0"],
            r"error: argument --meta-batch: expected a positive integer, got '0' "
            r"\(see fastmaml train sinusoid --help\)",
        ),
        ([*DEMO, "--data", "x"], r"error: unrecognized arguments: --data x"),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, argv, expected):
    assert re.search(expected, one_line_error(capsys, [*argv, "--out", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()  # refused before creating anything


def test_resume_errors_are_one_line(tmp_path, capsys):
    line = one_line_error(capsys, [*DEMO, "--resume", "--out", str(tmp_path / "nowhere")])
    assert f"--resume: the folder {tmp_path / 'nowhere'} does not exist" in line
    line = one_line_error(capsys, [*DEMO, "--resume", "--out", str(tmp_path)])
    assert f"--resume: no checkpoint in {tmp_path} (checkpoint.pt is missing)" in line
    assert cli.main([*SINUSOID, "--iterations", "2", "--quiet", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    line = one_line_error(
        capsys, [*SINUSOID, "--iterations", "4", "--meta-lr", "0.01", "--resume", "--out", str(tmp_path)]
    )
    assert "--meta-lr 0.01 (checkpoint: 0.001)" in line and "another --out" in line


def test_dataset_errors_are_one_line_with_the_path(tmp_path, capsys):
    line = one_line_error(
        capsys, ["train", "omniglot", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    )
    assert f"the folder {tmp_path / 'missing'} does not exist" in line
    data = tmp_path / "omniglot"
    write_omniglot(data)
    broken = sorted(data.rglob("*.png"))[5]
    broken.write_bytes(broken.read_bytes()[:60])
    line = one_line_error(
        capsys,
        [
            "train",
            "omniglot",
            "--data",
            str(data),
            "--train-classes",
            "4",
            "--val-classes",
            "2",
            "--ways",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert f"cannot decode the image {broken}" in line


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sinusoid.fastmaml, "meta_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([*SINUSOID, "--iterations", "2", "--quiet", "--out", str(tmp_path)])


def test_every_job_shares_the_same_options(capsys):
    """The shared options are defined once (common.SHARED_OPTIONS) and every job has them, with the
    same types; a job may only change their defaults and wording."""
    shared = [flag for flag, _, _ in common.SHARED_OPTIONS] + ["--resume", "--quiet"]
    for job in cli.TRAIN_JOBS:
        parser = cli.build_parser(["train", job])
        for name in ("train", job):
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        actions = {flag: a for a in parser._actions for flag in a.option_strings}
        for flag in shared:
            assert flag in actions, (job, flag)
        for flag, kwargs, _ in common.SHARED_OPTIONS:
            if "type" in kwargs:
                assert actions[flag].type is kwargs["type"], (job, flag)
        assert actions["--no-progress"].dest == "quiet"  # the old name of --quiet still works
