import math

import pytest
import torch

from fedopt.errors import ConfigError
from fedopt.optimizers import make_server_optimizer

X0, D = [1.0, -2.0], [0.5, -0.25]


def step(name, **kw):
    opt = make_server_optimizer(name, **kw)
    x = torch.tensor(X0, dtype=torch.float64)
    opt.step(x, torch.tensor(D, dtype=torch.float64))
    return opt, x.tolist()


def test_fedavg_step():
    _, x = step("fedavg", lr=0.5)
    assert x == pytest.approx([1.25, -2.125])


def test_fedavgm_two_steps():
    opt, x = step("fedavgm", lr=1.0, momentum=0.9)
    assert x == pytest.approx([1.5, -2.25])
    xt = torch.tensor(x, dtype=torch.float64)
    opt.step(xt, torch.tensor(D, dtype=torch.float64))
    # m = 0.9*0.5 + 0.5 = 0.95 ; 0.9*-0.25 - 0.25 = -0.475
    assert xt.tolist() == pytest.approx([2.45, -2.725])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_first_step_by_hand(name):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    _, x = step(name, lr=lr, beta1=b1, beta2=b2, tau=tau)
    want = []
    for x0, d in zip(X0, D):
        m = (1 - b1) * d
        v0 = tau**2
        if name == "fedadam":
            v = b2 * v0 + (1 - b2) * d * d
        elif name == "fedyogi":
            v = v0 - (1 - b2) * d * d * math.copysign(1, v0 - d * d)
        else:
            v = v0 + d * d
        want.append(x0 + lr * m / (math.sqrt(v) + tau))
    assert x == pytest.approx(want, rel=1e-12)


def test_state_round_trips_for_resume():
    opt, _ = step("fedadam", lr=0.1)
    other = make_server_optimizer("fedadam", lr=0.1)
    other.load_state_dict(opt.state_dict())
    a, b = torch.tensor(X0, dtype=torch.float64), torch.tensor(X0, dtype=torch.float64)
    d = torch.tensor(D, dtype=torch.float64)
    opt.step(a, d)
    other.step(b, d)
    assert torch.equal(a, b)


def test_bad_server_options_name_the_field():
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        make_server_optimizer("sgdx")
    with pytest.raises(ConfigError, match="beta1"):
        make_server_optimizer("fedadam", beta1=1.5)
    with pytest.raises(ConfigError, match="learning rate"):
        make_server_optimizer("fedavg", lr=0)
