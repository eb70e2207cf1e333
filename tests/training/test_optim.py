import pytest
import torch

from hpcml.config import OptimConfig
from hpcml.training.optim import build_optimizer, build_schedule


def _problem():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, x, y


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "gd"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_each_optimizer_and_schedule_reduces_loss(name, schedule):
    model, x, y = _problem()
    cfg = OptimConfig(name=name, lr={"sgd": 0.05, "gd": 0.5}.get(name, 0.01), schedule=schedule)
    opt = build_optimizer(model.parameters(), cfg, device=torch.device("cpu"))
    sched = build_schedule(opt, cfg, total_steps=60)
    loss_fn = torch.nn.CrossEntropyLoss()
    first = loss_fn(model(x), y).item()
    for _ in range(60):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
    assert loss_fn(model(x), y).item() < 0.8 * first


def test_momentum_defaults_resolved_in_config():
    assert OptimConfig(name="sgd").momentum == 0.9
    assert OptimConfig(name="gd").momentum == 0.0  # plain gradient descent unless asked
    assert OptimConfig(name="gd", momentum=0.5).momentum == 0.5
    opt = build_optimizer(
        [torch.nn.Parameter(torch.zeros(2))],
        OptimConfig(name="sgd", lr=0.01, nesterov=True),
        device=torch.device("cpu"),
    )
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"] is True


def test_schedule_shapes():
    p = [torch.nn.Parameter(torch.zeros(1))]
    lrs = {}
    for schedule in ("constant", "cosine", "onecycle"):
        cfg = OptimConfig(name="sgd", lr=0.1, schedule=schedule, warmup_fraction=0.25)
        opt = build_optimizer(p, cfg, device=torch.device("cpu"))
        sched = build_schedule(opt, cfg, total_steps=100)
        seen = []
        for _ in range(100):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
        lrs[schedule] = seen
    assert set(lrs["constant"]) == {0.1}
    assert lrs["cosine"][0] == pytest.approx(0.1) and lrs["cosine"][-1] < 1e-3
    assert max(lrs["onecycle"]) == pytest.approx(0.1, rel=1e-3)
    assert 20 <= lrs["onecycle"].index(max(lrs["onecycle"])) <= 26  # peak after the warm-up quarter
    assert lrs["onecycle"][0] < 0.01 and lrs["onecycle"][-1] < 1e-3


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 8, 100])
def test_onecycle_matches_torch_and_survives_short_runs(total):
    """The one-cycle factors equal torch's OneCycleLR wherever torch can compute them; runs of 4 steps
    at 25% warm-up (where OneCycleLR divides by zero) get a schedule too."""
    from hpcml.training.optim import one_cycle

    f = one_cycle(total, 0.25)
    assert f(total) == pytest.approx(1 / 25 / 1e4)
    if total >= 8:  # a warm-up of 2+ steps starts at the peak / 25
        assert f(0) == pytest.approx(1 / 25)
    assert max(f(s) for s in range(total + 1)) <= 1.0
    if total >= 5:  # torch's own schedule, where it works, as the independent reference
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=0.25,
                                                  cycle_momentum=False)  # fmt: skip
        for step in range(total):
            assert f(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-9), step
            opt.step()
            ref.step()


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_lean_fused_step_equals_torch_optimizer(name, monkeypatch):
    """The lean step (training/optim.py) gives torch's Adam/AdamW weights and state, bit for bit,
    including a parameter without a gradient and a resume through state_dict mid-way."""
    import copy

    from hpcml.training.optim import _LeanFusedStep

    torch_steps = []  # steps of ours that went through torch's own step (the lean path must take the rest)
    real = _LeanFusedStep._torch_step
    monkeypatch.setattr(
        _LeanFusedStep, "_torch_step", lambda self, c: (torch_steps.append(1), real(self, c))[1]
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    frozen = torch.nn.Parameter(torch.ones(4))  # never gets a gradient
    ours_net, ref_net = copy.deepcopy(net), copy.deepcopy(net)
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=0.1)
    ours = build_optimizer([*ours_net.parameters(), frozen], cfg, device=torch.device("cpu"))
    ref_cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    ref = ref_cls(
        [*ref_net.parameters(), frozen.detach().clone().requires_grad_()],
        lr=0.05,
        weight_decay=0.1,
        fused=True,
    )
    assert type(ours) is not ref_cls and isinstance(ours, ref_cls)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for i in range(7):
        for m, opt in ((ours_net, ours), (ref_net, ref)):
            torch.nn.functional.cross_entropy(m(x + i), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i == 3:  # a resume: a new optimizer loads the state and goes on with the lean step
            state = ours.state_dict()
            ours = build_optimizer([*ours_net.parameters(), frozen], cfg, device=torch.device("cpu"))
            ours.load_state_dict(state)
    for a, b in zip(ours_net.parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = ours.state_dict()["state"], ref.state_dict()["state"]
    assert sa.keys() == sb.keys() == {0, 1, 2, 3}  # the frozen parameter (4) has no state in either
    for k in sa:
        assert all(torch.equal(sa[k][f], sb[k][f]) for f in ("step", "exp_avg", "exp_avg_sq"))
    assert float(sa[0]["step"]) == 7.0
    assert len(torch_steps) == 1  # the first step makes the state; the other 6 (after a resume too) are lean
