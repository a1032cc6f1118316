"""`--method` in the training jobs and `fastmaml compare`: every method runs end to end on tiny settings,
resumes bit for bit, records itself in the checkpoint; its preset yields to explicit options; a
combination that contradicts it is a one-line error."""

import json

import pytest
import torch

from fastmaml.cli import main
from fastmaml.train import common, methods

SINUSOID = ["--eval-tasks", "3", "--eval-query", "4", "--meta-batch", "3", "--shots", "4", "--quiet"]
FEWSHOT = [
    "--meta-batch",
    "2",
    "--hidden",
    "8",
    "--query",
    "1",
    "--val-every",
    "2",
    "--val-episodes",
    "2",
    "--eval-batch",
    "2",
    "--test-episodes",
    "2",
    "--quiet",
]
PARAMETRIZED = {"metasgd", "mamlpp"}  # methods whose learned inner rates are part of the checkpoint


def sinusoid(out, *options):
    return main(["train", "sinusoid", "--out", str(out), *SINUSOID, *map(str, options)])


def fewshot(out, *options):
    return main(["train", "fewshot-demo", "--out", str(out), *FEWSHOT, *map(str, options)])


def assert_same_state(a, b, parts):
    for part in parts:
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)


@pytest.mark.parametrize("method", methods.METHODS)
def test_sinusoid_method_runs_resumes_bitwise_and_is_recorded(tmp_path, method):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert sinusoid(straight, "--method", method, "--iterations", 4) == 0
    assert sinusoid(split, "--method", method, "--iterations", 2) == 0
    torch.manual_seed(123)
    assert sinusoid(split, "--method", method, "--iterations", 4, "--resume") == 0
    a, b = (common.load_checkpoint(d / common.CHECKPOINT) for d in (straight, split))
    assert a["config"]["method"] == b["config"]["method"] == method and b["iteration"] == 4
    assert ("inner_rates" in a) == (method in PARAMETRIZED)
    assert_same_state(a, b, ["model", "baseline"] + (["inner_rates"] if method in PARAMETRIZED else []))
    assert a["history"] == b["history"]
    ma, mb = (json.loads((d / common.METRICS).read_text()) for d in (straight, split))
    label = methods.LABELS[method]
    assert ma["method"] == method and ma["eval"] == mb["eval"] and set(ma["eval"]) == {label, "pretrained"}
    assert ma["seconds_per_meta_step"] > 0
    if method == "blackbox":  # no inner steps: one prediction from the support, the same at every k
        assert "before" not in ma["eval"][label] and ma["eval"][label]["after_1"] == ma["eval"][label]["after_10"]
    else:
        assert ma["eval"][label]["before"]["mean"] > 0


@pytest.mark.parametrize("method", methods.METHODS)
def test_fewshot_method_runs_resumes_bitwise_and_is_recorded(tmp_path, method):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert fewshot(straight, "--method", method, "--iterations", 3) == 0
    assert fewshot(split, "--method", method, "--iterations", 2) == 0
    torch.manual_seed(123)
    assert fewshot(split, "--method", method, "--iterations", 3, "--resume") == 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, split))
    assert a["config"]["method"] == b["config"]["method"] == method and b["iteration"] == 3
    assert_same_state(a, b, ["model"] + (["inner_rates"] if method in PARAMETRIZED else []))
    assert a["history"] == b["history"]
    m = json.loads((straight / "metrics.json").read_text())
    assert m["method"] == method and 0 <= m["test"]["accuracy"] <= 1 and m["seconds_per_meta_step"] > 0
    best = torch.load(straight / "best.pt", weights_only=False)
    assert best["method"] == method and ("inner_rates" in best) == (method in PARAMETRIZED)


def test_presets_set_what_the_method_means_and_explicit_options_override(tmp_path):
    assert sinusoid(tmp_path / "a", "--method", "mamlpp", "--steps", 2, "--iterations", 1) == 0
    cfg = common.load_checkpoint(tmp_path / "a" / common.CHECKPOINT)["config"]
    assert cfg["steps"] == 2 and cfg["msl"] == 1000 and cfg["first_order_until"] == 3333
    assert sinusoid(tmp_path / "b", "--method", "imaml", "--iterations", 1) == 0
    cfg = common.load_checkpoint(tmp_path / "b" / common.CHECKPOINT)["config"]
    assert cfg["order"] == "implicit" and cfg["steps"] == 5
    assert sinusoid(tmp_path / "c", "--method", "cavia", "--context", 3, "--iterations", 1) == 0
    ckpt = common.load_checkpoint(tmp_path / "c" / common.CHECKPOINT)
    assert ckpt["config"]["inner_lr"] == 1.0 and ckpt["model"]["0.context"].shape == (3,)
    assert torch.count_nonzero(ckpt["model"]["0.context"]) == 0, "CAVIA's context stays zero"
    assert fewshot(tmp_path / "d", "--method", "mamlpp", "--iterations", 1, "--eval-steps", 2) == 0
    cfg = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=False)["config"]
    assert cfg["bn"] == "per_step" and cfg["steps"] == 5 and cfg["eval_steps"] == 2
    assert fewshot(tmp_path / "e", "--method", "fomaml", "--first-order", "--iterations", 1) == 0


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "run, options, message",
    [
        (
            sinusoid,
            ["--method", "blackbox", "--order", "implicit"],
            "--method blackbox --order implicit: the black-box",
        ),
        (sinusoid, ["--method", "blackbox", "--steps", "3"], "--method blackbox --steps 3"),
        (sinusoid, ["--method", "fomaml", "--order", "second"], "--method fomaml --order second"),
        (sinusoid, ["--method", "imaml", "--order", "first"], "--method imaml --order first"),
        (sinusoid, ["--method", "metasgd", "--order", "implicit"], "--method metasgd --order implicit"),
        (sinusoid, ["--context", "4"], "--context: context parameters belong to --method cavia"),
        (sinusoid, ["--cg-steps", "4"], "--cg-steps: applies to --order implicit"),
        (sinusoid, ["--method", "imaml", "--msl", "3"], "--msl: the implicit order has no per-step query losses"),
        (fewshot, ["--method", "blackbox", "--bn", "per_step"], "--method blackbox --bn per_step"),
        (fewshot, ["--method", "cavia", "--model", "resnet12"], "--method cavia --model resnet12"),
        (fewshot, ["--method", "bogus"], "argument --method: invalid choice: 'bogus'"),
    ],
)
def test_contradicting_combinations_are_one_line_errors(tmp_path, capsys, run, options, message):
    try:
        code = run(tmp_path, "--iterations", 1, *options)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_compare_sinusoid_writes_one_table_and_one_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "sinusoid",
                "--methods",
                "maml,cavia,blackbox",
                "--iterations",
                "3",
                "--out",
                str(out),
                *SINUSOID,
            ]
        )
        == 0
    )
    summary = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["MAML", "CAVIA", "black-box", "pretrained"]
    assert summary["columns"] == ["after_1", "after_10"]
    for row, method in zip(summary["rows"], ("maml", "cavia", "blackbox")):
        metrics = json.loads((out / method / common.METRICS).read_text())
        label = methods.LABELS[method]
        assert row["cells"]["after_1"] == [
            metrics["eval"][label]["after_1"]["mean"],
            metrics["eval"][label]["after_1"]["ci95"],
        ]
        assert row["seconds_per_meta_step"] == metrics["seconds_per_meta_step"] > 0
    table = (out / "comparison.md").read_text()
    assert table.startswith("| method | MSE after 1 step | MSE after 10 steps | time / meta-step")
    assert "| CAVIA |" in table
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert "| black-box |" in capsys.readouterr().out


def test_compare_fewshot_and_refusals(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            ["compare", "fewshot-demo", "--methods", "anil,blackbox", "--iterations", "2", "--out", str(out), *FEWSHOT]
        )
        == 0
    )
    summary = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["ANIL", "black-box"]
    assert all(0 <= r["cells"]["test_accuracy"][0] <= 1 for r in summary["rows"])
    assert (out / "learning_curves.png").is_file() and "test accuracy" in (out / "comparison.md").read_text()
    capsys.readouterr()
    assert main(["compare", "sinusoid", "--method", "maml", "--out", str(out)]) == 2
    assert "list them with --methods" in error_line(capsys)
    assert (
        main(["compare", "sinusoid", "--methods", "fomaml,imaml", "--order", "second", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--method fomaml --order second" in error_line(capsys)
    assert not (tmp_path / "x").exists(), "every combination is checked before anything runs"
    with pytest.raises(SystemExit):
        main(["compare", "sinusoid", "--methods", "maml,maml"])


def test_learned_rates_under_torchrun_end_like_one_process(tmp_path):
    """2 gloo ranks (meta-batch 5: 3 + 2 tasks) end where one process ends, within the float32
    summation-order bound of tests/test_distributed_jobs.py: Meta-SGD's learned inner rates are all-reduced
    like the meta-gradient."""
    from test_distributed_jobs import SINUSOID as RANKS
    from test_distributed_jobs import checkpoint, close, metrics, run_ok, same_stream

    reference, out = tmp_path / "one", tmp_path / "two"
    assert main([*RANKS, "--method", "metasgd", "--iterations", "6", "--out", str(reference)]) == 0
    run_ok([*RANKS, "--method", "metasgd", "--iterations", "6", "--out", out])
    a, b = checkpoint(reference), checkpoint(out)
    same_stream(a, b)
    assert b["config"]["method"] == "metasgd"
    for key in ("model", "optimizer", "baseline", "inner_rates"):
        close(a[key], b[key], key)
    close(metrics(reference)["eval"], metrics(out)["eval"], "eval")
