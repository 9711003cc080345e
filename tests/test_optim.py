"""longctx/optim.py against torchtitan 0.2.2's own builders (installed for the benchmarks): the lr of
every step under several schedules, including its edge cases, and the optimizer's weights and state
after a few steps under every implementation."""

import pytest
import torch
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import LRScheduler as TitanLRScheduler
from torchtitan.config import Optimizer as TitanOptimizer

from longctx.optim import build_lr_schedule, build_optimizer

# The schedules step without optimizer steps here; torch warns that the first lr would be skipped.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")

# (lr_scheduler fields, training.steps)
SCHEDULES = {
    "warmup then linear decay": (dict(warmup_steps=2), 10),
    "cosine over the last half, floor 0.1": (dict(warmup_steps=5, decay_ratio=0.5, decay_type="cosine", min_lr_factor=0.1), 20),
    "sqrt over the last 30%": (dict(warmup_steps=3, decay_ratio=0.3, decay_type="sqrt", min_lr_factor=0.2), 12),
    "warmup longer than the run": (dict(warmup_steps=30), 10),
    "constant": (dict(warmup_steps=0, decay_ratio=0.0), 6),
    "warmup + decay longer than the run": (dict(warmup_steps=4, decay_ratio=0.9, decay_type="cosine"), 8),
    "total_steps set": (dict(warmup_steps=2, total_steps=7, decay_ratio=0.5), 7),
}


def one_parameter() -> torch.nn.Module:
    return torch.nn.Linear(2, 1, bias=False)


def lrs(optimizer, schedule, steps: int) -> list[float]:
    """The lr of each of `steps` optimizer steps, and the one after the last (the schedule steps
    after each optimizer step, as in train_step)."""
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        schedule.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_lr_of_every_step_is_torchtitans(case):
    fields, steps = SCHEDULES[case]
    config = TitanLRScheduler(**fields)
    optimizer = torch.optim.AdamW(one_parameter().parameters(), lr=1e-3)
    ours = lrs(optimizer, build_lr_schedule(optimizer, config, steps), steps)
    titans = build_optimizers([one_parameter()], TitanOptimizer(lr=1e-3), None)
    theirs = lrs(titans.optimizers[0], build_lr_schedulers(titans, config, steps), steps)
    assert ours == theirs
    assert len(set(ours)) > 1 or case == "constant", "a schedule that never moves tests nothing"


@pytest.mark.parametrize("decay_type", ["linear", "sqrt", "cosine"])
def test_lr_past_the_schedule_stays_at_its_last_value(decay_type):
    """training.steps beyond lr_scheduler.total_steps: torchtitan extrapolates the curve (a negative
    lr for linear, back up for cosine); ours holds the last step's value."""
    config = TitanLRScheduler(warmup_steps=1, total_steps=6, decay_type=decay_type, min_lr_factor=0.1)
    optimizer = torch.optim.AdamW(one_parameter().parameters(), lr=1.0)
    seen = lrs(optimizer, build_lr_schedule(optimizer, config, 12), 12)
    titans = build_optimizers([one_parameter()], TitanOptimizer(lr=1.0), None)
    assert seen[:7] == lrs(titans.optimizers[0], build_lr_schedulers(titans, config, 12), 6)
    assert seen[6:] == [pytest.approx(0.1)] * 7


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
@pytest.mark.parametrize("implementation", ["fused", "foreach", "for-loop"])
def test_optimizer_steps_as_torchtitans(name, implementation):
    config = TitanOptimizer(name=name, lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.3, implementation=implementation)
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    titan_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    titan_model.load_state_dict(ours_model.state_dict())
    ours = build_optimizer(ours_model, config)
    titans = build_optimizers([titan_model], config, None)
    assert type(ours) is type(titans.optimizers[0]) and ours.defaults == titans.optimizers[0].defaults
    for step in range(3):
        inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((ours_model, ours), (titan_model, titans)):
            optimizer.zero_grad()
            model(inputs).square().sum().backward()
            optimizer.step()
    for (name_, p), q in zip(ours_model.named_parameters(), titan_model.parameters()):
        assert torch.equal(p, q), name_
        for key, value in titans.optimizers[0].state[q].items():
            assert torch.equal(ours.state[p][key], value), f"{name_} {key}"

