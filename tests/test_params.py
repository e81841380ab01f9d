import pytest
import torch
from torch import nn

from fedopt.errors import ConfigError
from fedopt.params import ParamSpec


def bn_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    m.train()
    m(torch.randn(16, 4))  # move the running statistics away from their initial values
    return m


def test_round_trip_is_bit_exact_for_every_parameter_and_buffer():
    m = bn_model()
    spec = ParamSpec.from_module(m, buffers="average")
    vec = spec.flatten(m)
    assert vec.is_contiguous() and vec.numel() == spec.size
    restored = spec.unflatten(vec)
    for name, t in m.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(restored[name], t), name
    # load into a fresh model: every float entry equal bit for bit, integer counters untouched
    fresh = bn_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    spec.load_into(fresh, vec)
    for (name, a), b in zip(m.state_dict().items(), fresh.state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a, b), name


def test_buffers_local_excludes_running_stats_and_counters_never_travel():
    m = bn_model()
    avg = ParamSpec.from_module(m, buffers="average")
    loc = ParamSpec.from_module(m, buffers="local")
    assert "1.running_mean" in avg.names and "1.running_var" in avg.names
    assert "1.running_mean" not in loc.names
    assert all("num_batches_tracked" not in n for n in avg.names)
    assert loc.size == avg.size - 16


def test_float64_model_gets_a_float64_vector_and_round_trips_exactly():
    m = nn.Linear(3, 2).double()
    spec = ParamSpec.from_module(m)
    assert spec.dtype == "float64"
    vec = spec.flatten(m)
    assert torch.equal(spec.unflatten(vec)["weight"], m.weight.detach())


def test_half_precision_entries_round_trip_exactly_through_float32():
    m = nn.Linear(5, 5).to(torch.bfloat16)
    spec = ParamSpec.from_module(m)
    out = spec.unflatten(spec.flatten(m))
    assert out["weight"].dtype == torch.bfloat16 and torch.equal(out["weight"], m.weight.detach())


def test_spec_dict_round_trip_and_validation():
    spec = ParamSpec.from_module(bn_model())
    assert ParamSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError):
        ParamSpec.from_dict({"dtype": "float32", "entries": [["w", [-1], "float32"]]})
    with pytest.raises(ConfigError):
        ParamSpec.from_dict({"dtype": "int8", "entries": []})


def test_wrong_vector_length_is_refused():
    m = bn_model()
    spec = ParamSpec.from_module(m)
    with pytest.raises(ConfigError, match="spec needs"):
        spec.load_into(m, torch.zeros(spec.size + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_binding_loads_and_reads_like_the_spec(dtype):
    m = bn_model().to(dtype)
    spec = ParamSpec.from_module(m)
    b = spec.bind(m)
    assert b.viewed == (dtype == torch.float32)
    vec = torch.randn(spec.size).to(dtype).to(spec.torch_dtype)
    b.load(vec)
    assert torch.equal(spec.flatten(m), vec) and torch.equal(b.read(), vec)
    # training through an optimizer moves the bound vector
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(8, 4).to(dtype)).sum().backward()
    opt.step()
    assert torch.equal(b.read(), spec.flatten(m)) and not torch.equal(b.read(), vec)
