"""`--method` in the training jobs and `fastmaml compare`: every method runs end to end on tiny settings,
resumes bit for bit, records itself in the checkpoint; its preset yields to explicit options; a
combination that contradicts it is a one-line error."""

import json

import pytest
import torch

import fastmaml
from fastmaml.cli import build_parser, main
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


def parse(argv):
    return build_parser(argv).parse_args(argv)


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
    assert cfg["order"] == "implicit" and cfg["steps"] == 60 and cfg["inner_lr"] == 0.01
    assert cfg["implicit_lambda"] == pytest.approx(5.0)
    assert sinusoid(tmp_path / "b2", "--method", "imaml", "--implicit-lambda", 2, "--iterations", 1) == 0
    assert common.load_checkpoint(tmp_path / "b2" / common.CHECKPOINT)["config"]["implicit_lambda"] == 2
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


def test_mamlpp_clamps_the_meta_gradient_so_one_exploding_task_cannot_stall_adam():
    """MAML++ on the sinusoid stalled: a task whose inner loop blew up (query MSE 1e13, learned rates too large
    or negative for it) filled Adam's second-moment estimates, and for thousands of iterations no parameter
    moved. The job clamps every meta-gradient entry to ±10 before Adam, as MAML++'s reference code does; one
    meta-batch with a task 100 times larger than the others leaves Adam's second moments at most
    (1 − β2) · 10²."""
    from fastmaml.train import sinusoid as job

    args = job.resolve(parse(["train", "sinusoid", "--method", "mamlpp", *SINUSOID]))
    state = job.new_state(args, torch.device("cpu"))
    batch = job.SinusoidSampler(0).sample(3, 4, 4)
    batch = type(batch)(
        batch.support_x,
        batch.support_y * torch.tensor([100.0, 1, 1]).view(3, 1, 1),
        batch.query_x,
        batch.query_y * torch.tensor([100.0, 1, 1]).view(3, 1, 1),
    )
    state.sampler.sample = lambda *a: batch
    job._train_iteration(state, args, torch.device("cpu"))
    seconds = [s["exp_avg_sq"] for s in state.optimizer.state.values()]
    assert len(seconds) == sum(len(g["params"]) for g in state.optimizer.param_groups)  # the rates too
    beta2 = state.optimizer.param_groups[0]["betas"][1]
    assert max(float(v.max()) for v in seconds) <= (1 - beta2) * methods.MAMLPP_GRAD_CLAMP**2 * (1 + 1e-6)
    # the same batch without the clamp (any other method) fills them: what the test would have seen before
    maml = job.new_state(job.resolve(parse(["train", "sinusoid", *SINUSOID])), torch.device("cpu"))
    maml.sampler.sample = lambda *a: batch
    job._train_iteration(maml, args, torch.device("cpu"))
    assert max(float(s["exp_avg_sq"].max()) for s in maml.optimizer.state.values()) > 1e3 * (1 - beta2) * 100


def test_learned_per_step_rates_beyond_the_trained_steps_reuse_the_last_step():
    """MAML++ learns K per-step rates; evaluation with more steps (10 after 5) runs steps K..9 with step K's
    rates, as the MAML++ reference code indexes its per-step rates."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    rates = methods.InnerRates(list(model.named_parameters()), "per_step_layer", 3, 0.01)
    with torch.no_grad():
        for i, r in enumerate(rates.rates):
            r.fill_(i)
    lrs = rates.inner_lr(7)
    names = [n for n, _ in model.named_parameters()]
    for j, step in enumerate(lrs):
        assert list(step) == names
        assert [step[n].item() for n in names] == [min(j, 2) * len(names) + i for i in range(len(names))]
        assert all(step[n] is lrs[min(j, 2)][n] for n in names)


def _imaml_sinusoid_preset():
    """The sinusoid job's iMAML preset over the job's defaults, and its MLP (seed 0)."""
    from fastmaml.train import sinusoid as job

    cfg = methods.apply(
        {"steps": 1, "order": "second", "inner_lr": 0.01, "implicit_lambda": 1.0, "cg_steps": 5},
        "imaml",
        "sinusoid",
        [],
        10000,
    )
    torch.manual_seed(0)
    return cfg, job.sinusoid_mlp()


def test_imaml_preset_lambda_makes_the_proximal_steps_reach_the_inner_solution():
    """iMAML's meta-gradient is the derivative of the proximal problem's solution φ*; the preset's λ makes its K
    steps at its rate get there (αλK = 3): on sinusoid tasks φ_K is within 0.3 ‖θ − φ*‖ of φ*,
    where the earlier preset (λ 1, 5 steps: αλK = 0.05) stopped next to θ, most of the way from φ*."""
    from fastmaml.train import sinusoid as job

    cfg, model = _imaml_sinusoid_preset()
    sx, sy, _, _ = job.SinusoidSampler(1).sample(6, 10, 1)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def phi(lam, steps, lr):
        kw = dict(inner_lr=lr, steps=steps, order="implicit", implicit_lambda=lam, loss="mse")
        kw["inner_solver"] = methods.IMAML_SOLVER
        with torch.no_grad():
            params = fastmaml.adapt(model, sx, sy, **kw).params
        return torch.cat([params[n].flatten(1) for n, _ in model.named_parameters()], 1)

    def distance_left(lam, steps, lr):
        """‖φ_K − φ*‖ / ‖θ − φ*‖ per task, φ* from 1000 steps at 0.01 (αλ·1000 ≥ 10)."""
        solution = phi(lam, 1000, 0.01)
        return (phi(lam, steps, lr) - solution).norm(dim=1) / (theta - solution).norm(dim=1)

    preset = distance_left(cfg["implicit_lambda"], cfg["steps"], cfg["inner_lr"])
    before = distance_left(1.0, 5, 0.01)
    assert preset.max() < 0.3, preset
    assert before.min() > 0.7, before


def test_imaml_learner_safeguards_its_inner_steps():
    """The iMAML preset's proximal steps, at the job's rate, overflow on a task of high curvature (support inputs
    ×30); its `Learner` takes them with the backtracking solver, in evaluation and in meta-training."""
    from fastmaml.train import sinusoid as job

    cfg, model = _imaml_sinusoid_preset()
    sx, sy, qx, qy = job.SinusoidSampler(1).sample(4, 10, 10)
    sx = sx.clone()
    sx[2] *= 30
    learner = methods.Learner(cfg, model, "mse")
    kw = dict(inner_lr=cfg["inner_lr"], order="implicit", implicit_lambda=cfg["implicit_lambda"], loss="mse")
    with torch.no_grad():
        plain = fastmaml.adapt(model, sx, sy, steps=cfg["steps"], check_finite=False, **kw).phi
        safe = learner.adapt(model, sx, sy, cfg["steps"]).phi
    assert not torch.isfinite(plain[2]).all() and torch.isfinite(safe).all()
    assert "backtracking inner steps" in learner.describe()
    result = learner.meta_step(model, (sx, sy, qx, qy), 0)
    assert torch.isfinite(result.query_loss_after).all()


def test_sinusoid_table_says_how_many_tasks_diverged():
    """Meta-SGD's rates, learned for one step, overflow on some held-out tasks when applied ten times: the
    table says on how many, with the median over all tasks, instead of "nan ± nan"."""
    from fastmaml.train import compare
    from fastmaml.train import sinusoid as job

    table = job.summarize({"after_1": [0.1, 0.2, 0.3], "after_10": [0.1, float("inf"), float("nan"), 0.2, 0.05]})
    assert table["after_1"]["diverged"] == 0 and table["after_10"]["diverged"] == 2
    assert table["after_10"]["median"] == pytest.approx(0.2) and table["after_10"]["tasks"] == 5
    assert "diverges on 2/5 tasks (median 0.200)" in job.format_table({"Meta-SGD": table}, [1, 10])
    metrics = {"eval": {"Meta-SGD": table, "pretrained": table}, "label": "Meta-SGD", "eval_description": "."}
    metrics["config"] = {"eval_steps": [1, 10]}
    text = compare.format_table(compare.summarize("sinusoid", {"metasgd": metrics}))
    assert "| Meta-SGD | 0.200 ± 0.113 | diverges on 2/5 tasks (median 0.200) |" in text and "nan" not in text
    # the learning curves: a moving median, which one blown-up iteration (MAML++: 1e30) does not flatten
    assert compare.moving_median([2.0, 1e30, 1.0, 1.0], 3) == [(1, 2.0), (2, 5e29), (3, 2.0), (4, 1.0)]


def test_fewshot_demo_runs_on_one_thread_by_default():
    """On the 2-core CPU with the other core busy, two torch threads made a fewshot-demo meta-step 3× (fused
    engine) to 44× (autograd loop) slower than one; the demo defaults to one, --threads still overrides."""
    assert parse(["train", "fewshot-demo"]).threads == 1
    assert parse(["compare", "fewshot-demo"]).threads == 1
    assert parse(["train", "fewshot-demo", "--threads", "2"]).threads == 2
    assert parse(["train", "omniglot"]).threads is None


def test_mamlpp_evaluates_with_batch_statistics_like_its_training():
    """MAML++'s few-shot preset (`--bn per_step`) trains with batch statistics and keeps per-step running
    ones; evaluating with the running ones put a network at 86.9% (batch statistics) to chance (20.6%) on the
    same validation episodes. Its evaluation normalizes with the batch statistics, as its training and its
    reference code do: running statistics set to nonsense change nothing. Other methods keep the library's
    `per_step` meaning (the running statistics in eval mode)."""
    from models import classification_tasks, small_cnn

    torch.manual_seed(0)
    model = small_cnn().float()
    fastmaml.add_per_step_stats(model, 2)
    sx, sy, qx, _ = (t.float() if t.is_floating_point() else t for t in classification_tasks(T=2))
    cfg = {"method": "mamlpp", "steps": 2, "inner_lr": 0.1, "order": "second", "bn": "per_step"}
    mamlpp, maml = (
        methods.Learner(cfg, model, "cross_entropy"),
        methods.Learner({**cfg, "method": "maml"}, model, "cross_entropy"),
    )
    model.eval()
    reference = fastmaml.adapt(
        model, sx, sy, inner_lr=mamlpp.inner_lr(3), steps=3, loss="cross_entropy", batch_norm="batch"
    )(qx)
    for name, buffer in model.named_buffers():
        if "step_running" in name:
            buffer.fill_(50.0)
    assert torch.allclose(mamlpp.adapt(model, sx, sy, 3)(qx), reference.detach(), atol=1e-5)
    assert not torch.allclose(maml.adapt(model, sx, sy, 3)(qx), reference.detach(), atol=1e-2)


def test_a_diverged_method_says_at_which_meta_iteration(tmp_path, capsys):
    """iMAML's sinusoid run diverged thousands of iterations in; the row (here the error, every method having
    diverged) names the meta-iteration."""
    code = main(
        ["compare", "sinusoid", "--methods", "maml", "--inner-lr", "1e30", "--iterations", "2", "--out", str(tmp_path)]
        + SINUSOID
    )
    assert code == 2
    assert "MAML diverged in meta-training: at meta-iteration 1: non-finite" in capsys.readouterr().out
