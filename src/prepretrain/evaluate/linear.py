"""Linear probe on frozen features: logistic regression, or the MAE-style BatchNorm + linear head.

Two protocols, because the field reports both (facebookresearch/mae main_linprobe.py;
logistic regression on cached features as in CLIP, Radford et al. 2021, arXiv 2103.00020):

* ``method=logreg``: multinomial logistic regression with an L2 penalty on standardised
  cached features, solved full-batch with L-BFGS (convex, so the answer does not depend on a
  learning-rate schedule). The penalty is chosen on a validation split carved out of the
  training set; the test split is read only after the choice is made, by construction:
  :func:`select_l2` never receives it.
* ``method=mae_head``: the MAE reference's head, BatchNorm without affine parameters followed
  by a linear layer, trained with LARS at a large batch and a cosine schedule. It is meant for
  large datasets, where full-batch L-BFGS would not fit in memory; here it runs on the cached
  features (so without the reference's crop augmentation, which the cache rules out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..train.optim import lr_at
from .common import EvalConfig, EvalData, FrozenEncoder
from .features import LabeledFeatures
from .metrics import topk_accuracy


@dataclass
class ProbeConfig(EvalConfig):
    """Linear probe (``prepretrain probe``)."""

    stage_name = "probe"
    method: str = "logreg"  # logreg | mae_head
    # logreg
    val_fraction: float = 0.2  # share of each training class held out to choose l2
    l2_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # penalty on mean CE + l2/2 |W|^2
    max_iter: int = 1000  # L-BFGS iterations per fit
    # mae_head. MAE reference (ImageNet): blr 0.1, batch 16384, 90 epochs, 10 warmup, no weight decay.
    # LARS moves a weight by at most ~lr * trust(1e-3) * |w| per step, so the reference's ~7k steps at
    # lr 6.4 become a far larger lr for the few hundred steps of a small dataset (the CPU demo below).
    head_epochs: int = 90
    head_batch_size: int = 256
    head_blr: float = 100.0  # lr = head_blr * batch / 256 (reference: 0.1 at batch 16384)
    head_warmup_epochs: float = 10.0
    head_weight_decay: float = 0.0

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "val_fraction": "(0, 1)", "max_iter": "> 0", "head_epochs": "> 0", "head_batch_size": "> 0",
        "head_blr": "> 0", "head_warmup_epochs": ">= 0", "head_weight_decay": ">= 0",
    }
    choices = {"method": ("logreg", "mae_head")}

    def validate(self) -> None:
        super().validate()
        if not self.l2_grid or any(value < 0 for value in self.l2_grid):
            raise ConfigError("l2_grid", f"needs at least one value, all >= 0; got {self.l2_grid}")


# ------------------------------------------------------------------------- logistic regression


@dataclass
class LinearClassifier:
    """Scores = standardised features @ weight + bias; the standardisation is part of the model."""

    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, self.weight.dtype)
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def standardization(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std; the std floor keeps constant dimensions from exploding."""
    return x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-6)


def logistic_objective(weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                       l2: float) -> torch.Tensor:
    """Mean cross-entropy plus ``l2 / 2 * |W|^2`` (the bias is not penalised)."""
    return F.cross_entropy(z @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *,
                            max_iter: int = 1000, init: LinearClassifier | None = None,
                            stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> LinearClassifier:
    """Multinomial logistic regression by full-batch L-BFGS (strong-Wolfe line search).

    ``init`` warm-starts from a previous solution (a path of decreasing penalties converges in
    a few iterations each); ``stats`` fixes the standardisation (default: that of ``x``).
    """
    mean, std = stats if stats is not None else standardization(x)
    z = (x - mean) / std
    dim = x.shape[1]
    if init is not None:
        weight, bias = init.weight.clone(), init.bias.clone()
    else:
        weight, bias = torch.zeros(dim, num_classes, device=x.device), torch.zeros(num_classes, device=x.device)
    weight.requires_grad_()
    bias.requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = logistic_objective(weight, bias, z, y, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearClassifier(weight.detach(), bias.detach(), mean, std)


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (fit rows, validation rows): ``fraction`` of every class held out, at least one
    row left to fit on; classes with a single example are only fitted on."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    labels = labels.cpu()
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        count = 0 if len(rows) < 2 else min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held.append(rows[:count])
        fit.append(rows[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def select_l2(train: LabeledFeatures, num_classes: int, grid: tuple[float, ...] | list[float], *,
              val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> tuple[float, dict[str, float]]:
    """Choose the L2 penalty by top-1 on a validation split carved from ``train`` (never the test set).

    Penalties are tried from strongest to weakest with warm starts; on a tie the stronger one wins.
    Returns (best penalty, {penalty: validation top-1 %}).
    """
    fit_rows, val_rows = holdout_split(train.y, val_fraction, seed)
    fit, val = train.subset(fit_rows.to(train.y.device)), train.subset(val_rows.to(train.y.device))
    if len(val) == 0:
        raise ValueError("no validation rows could be held out (every class has a single example)")
    stats = standardization(fit.x)
    best_l2, best_accuracy, previous = None, -1.0, None
    table: dict[str, float] = {}
    for l2 in sorted(set(grid), reverse=True):
        previous = fit_logistic_regression(fit.x, fit.y, num_classes, l2, max_iter=max_iter, init=previous,
                                           stats=stats)
        accuracy = topk_accuracy(previous.scores(val.x), val.y, (1,))["top1"]
        table[f"{l2:g}"] = accuracy
        if accuracy > best_accuracy:
            best_l2, best_accuracy = l2, accuracy
    return float(best_l2), table


# ------------------------------------------------------------------------------- MAE head


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling, as the MAE linear-probe reference uses it.

    For every matrix (ndim > 1): add weight decay to the gradient, then rescale the update by
    ``trust_coefficient * |param| / |update|`` (1 when either norm is 0). Vectors (biases,
    norms) get neither. Then SGD with momentum: ``mu = momentum * mu + update; p -= lr * mu``.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - documented on the class
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    ratio = torch.where(
                        param_norm > 0,
                        torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one),
                        one,
                    )
                    update = update.mul(ratio)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                momentum = state["mu"]
                momentum.mul_(group["momentum"]).add_(update)
                param.add_(momentum, alpha=-group["lr"])
        return loss


class MAEProbeHead(nn.Module):
    """BatchNorm without affine parameters, then a linear layer (MAE reference linear probe).

    The BatchNorm standardises features whose scale differs wildly between encoders (MAE
    features are not normalised for linear use), without adding capacity to the probe.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def train_mae_head(train: LabeledFeatures, num_classes: int, *, epochs: int = 90, batch_size: int = 256,
                   blr: float = 0.1, warmup_epochs: float = 10.0, weight_decay: float = 0.0,
                   seed: int = 0) -> MAEProbeHead:
    """Train the MAE probe head on cached features: LARS, per-step warmup then cosine to 0."""
    device = train.x.device
    batch_size = min(batch_size, len(train))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = MAEProbeHead(train.x.shape[1], num_classes).to(device)
    peak_lr = blr * batch_size / 256
    optimizer = LARS(head.parameters(), lr=peak_lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps, warmup_steps = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).to(device)
        for start in range(0, len(train), batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:  # BatchNorm needs two samples; a trailing single row is dropped
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, peak_lr)
            loss = F.cross_entropy(head(train.x[rows]), train.y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


# ------------------------------------------------------------------------------ evaluator


def evaluate_probe(encoder: FrozenEncoder, data: EvalData, cfg: ProbeConfig) -> dict[str, Any]:
    """Linear probe top-1/top-5 (%) on the test split; the evaluator interface of ``probe``."""
    device = encoder.device
    train = encoder.features(data, "train").labeled(data.task, cfg.pool)
    train = LabeledFeatures(train.x.to(device), train.y.to(device), train.indices)
    results: dict[str, Any] = {"method": cfg.method, "pool": cfg.pool, "num_train": len(train)}
    if cfg.method == "logreg":
        best_l2, table = select_l2(train, data.num_classes, cfg.l2_grid, val_fraction=cfg.val_fraction,
                                   seed=cfg.seed, max_iter=cfg.max_iter)
        classifier = fit_logistic_regression(train.x, train.y, data.num_classes, best_l2, max_iter=cfg.max_iter)
        results.update({"l2": best_l2, "val_top1": max(table.values()), "l2_search": table})
        score = classifier.scores
    else:
        head = train_mae_head(train, data.num_classes, epochs=cfg.head_epochs, batch_size=cfg.head_batch_size,
                              blr=cfg.head_blr, warmup_epochs=cfg.head_warmup_epochs,
                              weight_decay=cfg.head_weight_decay, seed=cfg.seed)

        def score(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return head(x.to(device))

    # The test split is read only now, after every choice above is fixed.
    test = encoder.features(data, "test").labeled(data.task, cfg.pool)
    with torch.no_grad():
        results.update(topk_accuracy(score(test.x.to(device)).float().cpu(), test.y))
    results["num_test"] = len(test)
    return results
