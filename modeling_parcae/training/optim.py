"""The official optimiser recipe (``recpre/optim/muon_adamw.py``) from stock parts: ``torch.optim.Muon`` + ``AdamW``.

Routing follows the official ``MuonAdamW``: AdamW for embeddings (token and value embeddings), norms, the head,
biases, every tensor with fewer than two dimensions and the injection/readout parameters; Muon for every other 2-D
matrix (attention and MLP projections, and the value-embedding gates, as the official code does).

Known differences from the official optimiser (documented in docs/training.md): torch's Muon uses the classic
Newton-Schulz coefficients without NorMuon's second-moment re-scaling, and plain decoupled weight decay instead of
the official "cautious" mask. The learning-rate scale ``sqrt(max(1, rows/cols))`` is the same.
"""

from __future__ import annotations

import torch
from transformers.optimization import get_wsd_schedule

from modeling_parcae.training.recipe import TrainingRecipe

ADAMW_NAME_MARKERS = ("embed_tokens", "value_embeddings", "lm_head", "norm", "injection", "state_readout", "bias")


def uses_adamw(name: str, parameter: torch.Tensor) -> bool:
    """True when a parameter belongs to the AdamW group (official routing)."""
    return parameter.ndim < 2 or any(marker in name for marker in ADAMW_NAME_MARKERS)


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(muon, adamw) trainable parameters; tied weights appear once because ``named_parameters`` de-duplicates."""
    muon, adamw = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (adamw if uses_adamw(name, parameter) else muon).append(parameter)
    return muon, adamw


def build_optimizers(model: torch.nn.Module, recipe: TrainingRecipe) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] (Muon omitted when the model has no eligible matrix)."""
    muon_params, adamw_params = split_parameters(model)
    optimizers: list[torch.optim.Optimizer] = []
    if muon_params:
        optimizers.append(torch.optim.Muon(
            muon_params, lr=recipe.muon_lr, weight_decay=recipe.muon_weight_decay,
            momentum=recipe.muon_momentum_start, nesterov=True, ns_steps=recipe.muon_ns_steps,
        ))
    optimizers.append(torch.optim.AdamW(
        adamw_params, lr=recipe.adamw_lr, betas=tuple(recipe.betas), eps=recipe.eps,
        weight_decay=recipe.adamw_weight_decay,
    ))
    return optimizers


def build_schedulers(optimizers: list[torch.optim.Optimizer], recipe: TrainingRecipe,
                     total_steps: int) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """The trapezoid: optional linear warm-up, constant, then linear decay to 0 over ``cooldown_fraction``."""
    warmup = int(recipe.warmup_fraction * total_steps)
    decay = int(recipe.cooldown_fraction * total_steps)
    return [
        get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total_steps,
                         decay_type="linear", min_lr_ratio=0.0)
        for optimizer in optimizers
    ]


def apply_schedule(schedulers: list[torch.optim.lr_scheduler.LambdaLR]) -> None:
    """Set each optimizer's learning rate from its schedule at the scheduler's step, as ``scheduler.step`` does.

    A resumed optimizer carries the rate the saving run's schedule gave; once the run's length (and with it the
    schedule) changed, that rate belongs to another schedule: a finished 40-step run resumed to 50 steps would take
    its next step at the old schedule's final 0.
    """
    for scheduler in schedulers:
        rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate


def set_muon_step_hyperparameters(optimizer: torch.optim.Optimizer, recipe: TrainingRecipe, step: int,
                                  total_steps: int) -> None:
    """Muon weight decay 0.2 -> 0 linearly over the run and momentum warm-up 0.85 -> 0.95 (a function of the step,
    so a resumed run gets exactly the values of an uninterrupted one)."""
    warmup = max(recipe.muon_momentum_warmup_steps, 1)
    fraction = min(step / warmup, 1.0)
    momentum = recipe.muon_momentum_start + (recipe.muon_momentum - recipe.muon_momentum_start) * fraction
    weight_decay = recipe.muon_weight_decay * (1.0 - step / total_steps)
    for group in optimizer.param_groups:
        group["momentum"] = momentum
        group["weight_decay"] = weight_decay
