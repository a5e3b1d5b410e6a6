"""`LowRankLinear`'s eager call: same math as the op, no custom-op dispatch, checks kept, op under tracing."""
import pytest
import torch

from lrinfer.factors import FactorPair
from lrinfer.runtime.kernels.ops import lowrank_linear_reference
from lrinfer.runtime.nn import LowRankLinear


def _module(rank2=0, bias=True):
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(24, 6, generator=g), torch.randn(16, 6, generator=g)
    U2, V2 = (torch.randn(24, rank2, generator=g), torch.randn(16, rank2, generator=g)) if rank2 else (None, None)
    return LowRankLinear.from_factors(FactorPair(U, V, U2, V2), torch.randn(24, generator=g) if bias else None)


@pytest.mark.parametrize("rank2", [0, 3])
def test_eager_matches_float64_reference(rank2):
    m = _module(rank2)
    x = torch.randn(2, 5, 16)
    ref = lowrank_linear_reference(x.double(), m.V.double(), m.U.double(), m.bias.double(),
                                   None if not rank2 else m.V2.double(), None if not rank2 else m.U2.double())
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_eager_call_skips_the_op_dispatch():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    m, x, seen = _module(), torch.randn(3, 16), []
    with Ops():   # a dispatch mode is tracing: the call must go through the registered op
        m(x)
    assert any("lrinfer.lowrank_linear" in s for s in seen)
    from lrinfer.runtime.kernels import ops
    assert not ops.needs_registered_op(x)   # plain eager: no op dispatch


def test_compile_traces_the_op():
    m, graphs = _module(), []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    f = torch.compile(m, backend=backend, fullgraph=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(f(x), m(x))
    assert any("lrinfer.lowrank_linear" in g for g in graphs)


def test_checks_survive_the_fast_path():
    m = _module()
    m(torch.randn(2, 16))
    with pytest.raises(ValueError, match="x has 15 features"):
        m(torch.randn(2, 15))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="V is on cpu but x is on meta"):
        m(torch.randn(2, 16, device="meta"))
    m.double()   # `.to()` re-checks and the call follows the new dtype
    assert m(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64
    m.U = torch.nn.Parameter(torch.randn(24, 5, dtype=torch.float64))   # a new factor is checked again
    with pytest.raises(ValueError, match="V has 6 columns but U has 5"):
        m(torch.randn(2, 16, dtype=torch.float64))
