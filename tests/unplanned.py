"""The reference of the plan tests: `meta_step` without a plan (validated and planned at every call), with
`meta_step`'s defaults for the options a test leaves out."""

from fastmaml.calls import unplanned_meta_step

DEFAULTS = dict(
    inner_lr=0.01,
    steps=1,
    order="second",
    loss="mse",
    inner_params=None,
    backend="auto",
    batch_norm="batch",
    implicit_lambda=1.0,
    cg_steps=5,
    inner_solver="sgd",
    evaluate_before=True,
    check_finite=True,
    task_chunk=None,
    step_weights=None,
)


def reference(model, tasks, update_running_stats=True, **options):
    """The unplanned meta_step on `model` and `tasks` (options: those of `meta_step`)."""
    return unplanned_meta_step(model, tasks, update_running_stats=update_running_stats, **dict(DEFAULTS, **options))
