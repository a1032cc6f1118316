"""`--method`: the methods of optimization-based meta-learning, and a black-box meta-learner, as presets of
the training jobs' options.

| method   | what it sets (explicit options override the tunable ones)                                        |
|----------|--------------------------------------------------------------------------------------------------|
| maml     | nothing: the job's own defaults (exact second-order MAML, Finn et al. 2017)                      |
| fomaml   | `--order first` (first-order MAML)                                                               |
| metasgd  | one learned inner rate per parameter entry (Li et al. 2017), initialized to `--inner-lr`         |
| anil     | only the head (the last Linear layer) adapts; the body gets its exact meta-gradient (Raghu 2020) |
| mamlpp   | MAML++ (Antoniou et al. 2019): per-step, per-layer learned rates, `--steps 5`, the multi-step    |
|          | loss annealed over the first tenth of the job's default iterations (`--msl`), first-order        |
|          | meta-steps for the first third (`--first-order-until`), every meta-gradient entry clamped to     |
|          | ±10 before Adam (as its reference code does); few-shot jobs: `--bn per_step` (evaluation, like   |
|          | training and the reference code, normalizes with batch statistics), `--eval-steps 5`             |
| imaml    | `--order implicit` (Rajeswaran et al. 2019), `--steps 5` (sinusoid: 60),                          |
|          | and λ such that those proximal steps solve the inner problem: λ = 3 / (inner lr × steps); the    |
|          | steps are safeguarded per task (`inner_solver="backtracking"`), in training and evaluation       |
| cavia    | context parameters (Zintgraf et al. 2019): the model gets a context vector (`--context`),        |
|          | concatenated to the input (sinusoid) or through FiLM on the third conv block (few-shot), the     |
|          | only adapted parameters, from zero in every task; `--inner-lr 1.0`                               |
| blackbox | no inner loop: `fastmaml.blackbox.NeuralProcess` (sinusoid) or `SnailClassifier` (few-shot),     |
|          | trained by maximum likelihood on the same task stream                                            |

A method's defining settings cannot be contradicted (`check`: e.g. `--method blackbox --order implicit`,
`--method fomaml --order second`, learned rates with `--order implicit`, `--context` without CAVIA): such a
combination is a one-line `UserError`. `Learner` runs a method's inner loop in meta-training (`meta_step`)
and in evaluation (`adapt`), with the learned rates (`InnerRates`) that Meta-SGD and MAML++ add to the
optimizer and to the checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

import fastmaml
from fastmaml import context as ctx
from fastmaml.errors import NonFiniteError
from fastmaml.train.common import UserError, option_name

METHODS = ("maml", "fomaml", "metasgd", "anil", "mamlpp", "imaml", "cavia", "blackbox")
LABELS = {
    "maml": "MAML",
    "fomaml": "FOMAML",
    "metasgd": "Meta-SGD",
    "anil": "ANIL",
    "mamlpp": "MAML++",
    "imaml": "iMAML",
    "cavia": "CAVIA",
    "blackbox": "black-box",
}
LEARNED_RATES = {"metasgd": "per_parameter", "mamlpp": "per_step_layer"}
MAMLPP_STEPS = 5
# MAML++'s reference code (HowToTrainYourMAMLPytorch, `meta_update`) clamps every meta-gradient entry to
# [-10, 10] before its Adam step. Without it, one task whose inner loop diverges (its learned rates too large
# or negative for that task: loss 1e13 on the sinusoid, in the first-order phase) gives a meta-gradient that
# fills Adam's second-moment estimates for thousands of iterations, and every parameter, rates included,
# stops moving there (measured: docs/architecture.md, "MAML++ on the sinusoid").
MAMLPP_GRAD_CLAMP = 10.0
# iMAML's meta-gradient (I + H/λ)⁻¹ ∇L_q is the derivative of the *solution* of the proximal inner problem
# min L_s(φ) + λ/2 ‖φ − θ‖²; K proximal gradient steps at rate α reach it only where they contract: by
# (1 − αλ)^K ≤ exp(−αλK) in the directions the support loss leaves flat. The paper's Omniglot setting
# (α 0.1, λ 2, 16 steps) has αλK = 3.2; the preset keeps αλK = IMAML_CONTRACTION. With λ fixed at 1 and
# 5 steps at the sinusoid's α = 0.01 (αλK = 0.05) the steps stay next to θ, the implicit gradient is that of
# another function, and meta-training diverged. The sinusoid needs more steps, not a larger λ: fixed-rate
# steps are stable only while α(h + λ) < 2 over the support Hessian's eigenvalues h. And nothing in iMAML's
# meta-gradient sees the inner solver, so θ drifts to sharper tasks until some task's fixed-rate steps
# overflow (meta-iteration 6701 of 10,000 with 120 steps at α = 0.005). Since the meta-gradient depends only
# on the solution, the preset solves the inner problem with a safeguard instead (IMAML_SOLVER: per task, the
# rate halves while a step does not decrease the proximal objective), which needs no margin below the job's
# rate: 60 steps at α = 0.01 (λ = 5): docs/architecture.md, "iMAML's λ".
IMAML_SETTINGS = {"sinusoid": {"steps": 60}}  # at the job's rate; other jobs: 5 steps
IMAML_CONTRACTION = 3.0
IMAML_SOLVER = "backtracking"
CAVIA_INNER_LR = 1.0  # CAVIA's inner rate for the context (Zintgraf et al. 2019, regression and classification)
# the options of the inner loop: none applies to the black-box learner
INNER_LOOP_OPTIONS = (
    "order",
    "steps",
    "inner_lr",
    "msl",
    "first_order_until",
    "implicit_lambda",
    "cg_steps",
    "bn",
    "first_order",
    "context",
    "eval_steps",
)


def preset(method: str, job: str, default_iterations: int) -> Dict:
    """The option values `method` sets in `job` (whose default --iterations is `default_iterations`)."""
    few_shot = job != "sinusoid"
    if method == "fomaml":
        return {"order": "first"}
    if method == "imaml":
        return {"order": "implicit", "steps": 5, **IMAML_SETTINGS.get(job, {})}
    if method == "mamlpp":
        out = {
            "steps": MAMLPP_STEPS,
            "msl": max(1, default_iterations // 10),
            "first_order_until": default_iterations // 3,
        }
        if few_shot:
            out.update(bn="per_step", eval_steps=MAMLPP_STEPS)
        return out
    if method == "cavia":
        return {"inner_lr": CAVIA_INNER_LR}
    return {}


def apply(cfg: Dict, method: str, job: str, given: Iterable[str], default_iterations: int) -> Dict:
    """`cfg` (the job's settings: its defaults with the user's options on top) with `method`'s preset on
    the options the user did not give, then `check`ed. Returns a new dict with "method" recorded."""
    given = set(given)
    out = dict(cfg)
    for key, value in preset(method, job, default_iterations).items():
        if key not in given and not (key == "order" and "first_order" in given):
            out[key] = value
    out["method"] = method
    if method == "imaml" and "implicit_lambda" not in given:
        out["implicit_lambda"] = imaml_lambda(out["inner_lr"], out["steps"])
    check(out, given, job)
    return out


def imaml_lambda(inner_lr: float, steps: int) -> float:
    """iMAML's λ for `steps` proximal steps at `inner_lr`: αλK = IMAML_CONTRACTION (see IMAML_SETTINGS)."""
    return IMAML_CONTRACTION / (inner_lr * max(1, steps))


def _flag(key: str, cfg: Dict) -> str:
    if key == "first_order":
        return "--first-order"
    value = cfg.get(key)
    return f"{option_name(key)} {value}" if value is not None else option_name(key)


def check(cfg: Dict, given: Iterable[str], job: str) -> None:
    """A `UserError` for a combination that contradicts the method (the message names the options)."""
    given, method, order = set(given), cfg["method"], cfg.get("order")
    if method not in METHODS:
        raise UserError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "blackbox":
        clash = [k for k in INNER_LOOP_OPTIONS if k in given and not (job == "sinusoid" and k == "eval_steps")]
        if clash:
            raise UserError(
                f"--method blackbox {_flag(clash[0], cfg)}: the black-box learner reads the support set "
                "and has no inner loop (no inner steps, rates or meta-gradient order); drop "
                f"{option_name(clash[0]) if clash[0] != 'first_order' else '--first-order'}"
            )
    if "context" in given and method != "cavia":
        raise UserError(f"--context: context parameters belong to --method cavia (got --method {method})")
    if method == "fomaml" and order != "first":
        raise UserError(
            f"--method fomaml --order {order}: FOMAML is the first-order meta-gradient (--order "
            f"{order} is --method maml with that order)"
        )
    if method == "imaml" and order != "implicit":
        raise UserError(f"--method imaml --order {order}: iMAML is the implicit meta-gradient (--order implicit)")
    if method in LEARNED_RATES and order == "implicit":
        raise UserError(
            f"--method {method} --order implicit: the implicit meta-gradient does not depend on the "
            "path to φ_K, so learned inner rates get no gradient; use --order second, checkpoint or "
            "first"
        )
    if method == "mamlpp" and cfg.get("steps", 1) < 1:
        raise UserError("--method mamlpp --steps 0: MAML++ learns a rate per inner step; give at least one step")
    if order == "implicit":
        if cfg.get("msl"):
            raise UserError(
                "--msl: the implicit order has no per-step query losses; use --order second, checkpoint or first"
            )
        if cfg.get("first_order_until"):
            raise UserError(
                "--first-order-until: the implicit order has no first-order phase to anneal from; drop "
                "it or use --order second"
            )
    elif method != "blackbox":
        for key in ("implicit_lambda", "cg_steps"):
            if key in given:
                raise UserError(f"{option_name(key)}: applies to --order implicit (iMAML), not --order {order}")
    if job != "sinusoid" and method in ("cavia", "blackbox") and cfg.get("model") != "conv4":
        what = (
            "CAVIA's conv net is conv4 with FiLM"
            if method == "cavia"
            else "the black-box learner embeds images with conv4"
        )
        raise UserError(f"--method {method} --model {cfg.get('model')}: {what}; use --model conv4")


@contextlib.contextmanager
def meta_iteration(number: int) -> Iterator[None]:
    """Re-raises a `NonFiniteError` of meta-iteration `number` (1-based) with the number in its message, so
    that a diverged run (and its row in `fastmaml compare`) says when."""
    try:
        yield
    except NonFiniteError as exc:
        raise NonFiniteError(f"at meta-iteration {number}: {exc}", where=exc.where, step=exc.step) from exc


def head_names(model: nn.Module) -> List[str]:
    """ANIL's inner parameters: the last `nn.Linear` of the model (its head)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("--method anil: the model has no Linear head to adapt")
    return [linears[-1]]


class InnerRates(nn.Module):
    """Learned inner learning rates, a part of the checkpoint and of the optimizer.

    kind "per_parameter" (Meta-SGD): one rate per entry of every adapted parameter (a tensor shaped like it);
    "per_step_layer" (MAML++): one scalar per inner step and parameter tensor. All start at `init`.
    Evaluation with more steps than training uses the last step's rates for the later steps.
    """

    def __init__(self, named: Sequence[Tuple[str, torch.Tensor]], kind: str, steps: int, init: float):
        super().__init__()
        self.kind = kind
        self.names = [n for n, _ in named]
        if kind == "per_parameter":
            self.rates = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), init)) for _, p in named])
        elif kind == "per_step_layer":
            self.steps = steps
            self.rates = nn.ParameterList(
                [
                    nn.Parameter(torch.full((), init, dtype=p.dtype, device=p.device))
                    for _ in range(steps)
                    for _, p in named
                ]
            )
        else:
            raise ValueError(f"kind: expected 'per_parameter' or 'per_step_layer', got {kind!r}")

    def inner_lr(self, steps: int):
        """The `inner_lr` argument of `meta_step` / `adapt` for `steps` inner steps."""
        if self.kind == "per_parameter":
            return dict(zip(self.names, self.rates))
        n = len(self.names)
        return [
            {name: self.rates[min(j, self.steps - 1) * n + i] for i, name in enumerate(self.names)}
            for j in range(steps)
        ]

    def summary(self) -> Dict[str, float]:
        """The mean rate (per step for MAML++), for the metrics."""
        with torch.no_grad():
            if self.kind == "per_parameter":
                total = sum(float(r.sum()) for r in self.rates)
                return {"mean": total / sum(r.numel() for r in self.rates)}
            n = len(self.names)
            return {
                f"step_{j + 1}": float(torch.stack(list(self.rates[j * n : (j + 1) * n])).mean())
                for j in range(self.steps)
            }


class Learner:
    """A method's inner loop for one model: `meta_step` in meta-training, `adapt` in evaluation.

    cfg: the job's resolved settings (method, order, steps, inner_lr, msl, first_order_until,
    implicit_lambda, cg_steps and, in the few-shot jobs, bn). loss: "mse" or "cross_entropy".
    """

    def __init__(self, cfg: Dict, model: nn.Module, loss: str):
        self.cfg, self.loss = cfg, loss
        self.method = cfg["method"]
        if self.method == "blackbox":
            raise ValueError("the black-box learner has no inner loop")
        self.inner_params: Optional[List[str]] = None
        if self.method == "anil":
            self.inner_params = head_names(model)
        elif self.method == "cavia":
            self.inner_params = ctx.context_names(model)
        self.rates: Optional[InnerRates] = None
        if self.method in LEARNED_RATES:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.rates = InnerRates(named, LEARNED_RATES[self.method], cfg["steps"], cfg["inner_lr"])

    def parameters(self) -> List[nn.Parameter]:
        """The learned rates (none for most methods)."""
        return [] if self.rates is None else list(self.rates.parameters())

    def inner_lr(self, steps: int):
        return self.cfg["inner_lr"] if self.rates is None else self.rates.inner_lr(steps)

    def _common(self) -> Dict:
        cfg = self.cfg
        return dict(
            loss=self.loss,
            inner_params=self.inner_params,
            batch_norm=cfg.get("bn", "batch"),
            implicit_lambda=cfg.get("implicit_lambda", 1.0),
            cg_steps=cfg.get("cg_steps", 5),
            inner_solver=self.inner_solver,
        )

    @property
    def inner_solver(self) -> str:
        """How the implicit order takes its inner steps: iMAML's are safeguarded (IMAML_SOLVER)."""
        return IMAML_SOLVER if self.method == "imaml" else "sgd"

    @property
    def grad_clamp(self) -> Optional[float]:
        """The bound of every meta-gradient entry before the optimizer step (MAML++: 10), or None."""
        return MAMLPP_GRAD_CLAMP if self.method == "mamlpp" else None

    def clamp_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Clamps the `.grad` of `params` (the model's and the learned rates') to ±`grad_clamp`, in place; the
        jobs call it between the meta-gradient (all-reduced under torchrun) and the optimizer step."""
        bound = self.grad_clamp
        if bound is None:
            return
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.clamp_(-bound, bound)

    def order_at(self, iteration: int) -> str:
        """The meta-gradient order of meta-iteration `iteration` (0-based): first-order before
        `first_order_until`, then the configured order."""
        return "first" if iteration < self.cfg.get("first_order_until", 0) else self.cfg["order"]

    def meta_step(self, model: nn.Module, batch, iteration: int) -> "fastmaml.MetaResult":
        """One `fastmaml.meta_step` of meta-iteration `iteration` (0-based): its gradient goes into `.grad` of
        the model and of the learned rates."""
        steps, msl = self.cfg["steps"], self.cfg.get("msl", 0)
        weights = fastmaml.msl_weights(steps, iteration, msl) if msl and steps else None
        return fastmaml.meta_step(
            model,
            batch,
            inner_lr=self.inner_lr(steps),
            steps=steps,
            order=self.order_at(iteration),
            step_weights=weights,
            **self._common(),
        )

    def adapt(self, model: nn.Module, support_x, support_y, steps: int) -> "fastmaml.AdaptedModel":
        """The method's own inner loop for evaluation, without a graph: plain inner steps ("first"), or the
        proximal ones of iMAML. A task whose adaptation diverges gives non-finite predictions (and scores)
        instead of an error."""
        order = "implicit" if self.cfg["order"] == "implicit" else "first"
        with torch.no_grad():
            return fastmaml.adapt(
                model,
                support_x,
                support_y,
                inner_lr=self.inner_lr(steps),
                steps=steps,
                order=order,
                check_finite=False,
                **{**self._common(), "batch_norm": self.eval_batch_norm},
            )

    @property
    def eval_batch_norm(self) -> str:
        """The BatchNorm mode of evaluation: the training one, but MAML++ (`--bn per_step`) normalizes with
        the batch statistics of each support and query set, as in its training and as its reference code
        evaluates (`training=True` in every forward; the per-step running statistics are kept, not used)."""
        bn = self.cfg.get("bn", "batch")
        return "batch" if self.method == "mamlpp" and bn == "per_step" else bn

    def describe(self) -> str:
        """One line: what the inner loop runs."""
        cfg = self.cfg
        rate = {
            "per_parameter": "learned per-parameter rates",
            "per_step_layer": "learned per-step per-layer rates",
        }.get(self.rates.kind if self.rates is not None else "", f"inner lr {cfg['inner_lr']:g}")
        adapted = "all parameters" if self.inner_params is None else ", ".join(self.inner_params)
        extra = ""
        if cfg.get("msl"):
            extra += f", multi-step loss annealed over {cfg['msl']} iterations"
        if cfg.get("first_order_until"):
            extra += f", first-order before iteration {cfg['first_order_until']}"
        if self.grad_clamp is not None:
            extra += f", meta-gradient clamped to ±{self.grad_clamp:g}"
        if cfg["order"] == "implicit":
            extra += f", λ {cfg.get('implicit_lambda', 1.0):g}, {cfg.get('cg_steps', 5)} CG steps"
            if self.inner_solver != "sgd":
                extra += f", {self.inner_solver} inner steps"
        return (
            f"{LABELS[self.method]}: {cfg['steps']} inner step(s), {rate}, order {cfg['order']}, adapting "
            f"{adapted}{extra}"
        )
