"""The few-shot training jobs end to end through the CLI, on a tiny budget."""
import json

import pytest
import torch

from fastmaml import cli
from fastmaml.train import fewshot

TINY = ["--meta-batch", "2", "--hidden", "8", "--query", "2", "--val-every", "2", "--val-episodes", "4",
        "--eval-batch", "3", "--no-progress"]


def train(out, *extra):
    return cli.main(["train", "fewshot-demo", "--out", str(out), *TINY, *extra])


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


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(tmp_path / "empty", "--iterations", "2", "--resume")
    train(tmp_path, "--iterations", "2", "--test-episodes", "0")
    with pytest.raises(ValueError, match="--resume.*inner_lr: checkpoint 0.4, now 0.1"):
        train(tmp_path, "--iterations", "4", "--test-episodes", "0", "--inner-lr", "0.1", "--resume")


def test_per_step_batch_norm_evaluates_more_steps_than_training(tmp_path):
    train(tmp_path, "--iterations", "2", "--test-episodes", "3", "--bn", "per_step", "--eval-steps", "3")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["bn"] == "per_step" and 0 <= m["test"]["accuracy"] <= 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert state["1.step_running_mean"].shape == (2, 8)
    assert float(state["1.step_running_mean"].abs().sum()) > 0  # meta-training updated the statistics


def test_real_dataset_jobs_need_data_and_presets_follow_the_paper(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        cli.main(["train", "omniglot", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="images_background"):
        cli.main(["train", "omniglot", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    o, mi = fewshot.PRESETS["omniglot"], fewshot.PRESETS["miniimagenet"]
    assert (o["meta_batch"], o["inner_lr"], o["steps"], o["eval_steps"], o["hidden"]) == (32, 0.4, 1, 3, 64)
    assert (mi["meta_batch"], mi["inner_lr"], mi["steps"], mi["eval_steps"], mi["hidden"]) == (4, 0.01, 5, 10, 32)
    assert o["meta_lr"] == mi["meta_lr"] == 1e-3 and o["test_episodes"] == mi["test_episodes"] == 600


def test_bad_option_values_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--ways"):
        train(tmp_path, "--ways", "0")
    with pytest.raises(ValueError, match="--inner-lr"):
        train(tmp_path, "--inner-lr", "-1")


def test_miniimagenet_job_runs_on_a_folder_in_the_published_layout(tmp_path):
    """The real-data job end to end: train.csv / val.csv / test.csv + images/, 2-way episodes."""
    import csv

    from PIL import Image

    data = tmp_path / "mini"
    (data / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n_classes in (("train", 3), ("val", 2), ("test", 2)):
        with open(data / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for c in range(n_classes):
                label = f"n{split}{c:05d}"
                for k in range(3):
                    pixels = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
                    name = f"{label}{k + 1:08d}.jpg"
                    Image.fromarray(pixels).save(data / "images" / name)
                    w.writerow([name, label])
    out = tmp_path / "run"
    assert cli.main(["train", "miniimagenet", "--data", str(data), "--out", str(out), "--ways", "2",
                     "--shots", "1", "--query", "1", "--meta-batch", "2", "--iterations", "2", "--steps", "1",
                     "--eval-steps", "2", "--hidden", "4", "--val-every", "2", "--val-episodes", "2",
                     "--test-episodes", "2", "--eval-batch", "2", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["job"] == "miniimagenet" and m["config"]["inner_lr"] == pytest.approx(0.01)
    assert 0 <= m["test"]["accuracy"] <= 1 and m["test"]["episodes"] == 2
