"""CPU and CUDA kernels agree bit for bit (issue 19's GPU check): the ops tests/test_ops.py does
not parametrize over the device (compensate, feedback_quantize with and without rule 23's write
penalty and rule 25's filter weights, analog_matmul) on random inputs of odd sizes. Without a CUDA device they skip;
``make gpu-check`` runs them where a GPU exists."""
import pytest
import torch

import crossbar_torch.ops as ops
from crossbar_torch.encoding import cells_for, slices_for
from crossbar_torch.ops import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda(*ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("B,b,e,L", [(8, 1, 0, 2), (8, 1, 1, 3), (8, 2, 2, 2), (6, 3, 0, 1),
                                     (5, 1, 1, 5), (4, 1, 2, 0)])
def test_compensate_cpu_cuda_equal(B, b, e, L):
    g = torch.Generator().manual_seed(B * 31 + L)
    c, S = cells_for(B, b, e), slices_for(B, b, e)
    q = torch.randint(-(2 ** (B - 1) - 1), 2 ** (B - 1), (257, 3), generator=g, dtype=torch.int32)
    cells = ref.encode(q, B, b, e)
    old = torch.randint(0, 2 ** b, cells.shape, generator=g, dtype=torch.uint8)
    held = (torch.rand(cells.shape, generator=g) < 0.4) & ((torch.arange(c) % S) < L)
    cpu = ops.compensate(cells, held, old, B, b, e, L)
    assert torch.equal(ops.compensate(*_cuda(cells, held, old), B, b, e, L).cpu(), cpu)


@pytest.mark.parametrize("out,k,groups", [(5, 7, 1), (6, 33, 2), (1, 1, 1)])
def test_feedback_quantize_cpu_cuda_equal(out, k, groups):
    from test_feedback import _case
    for bits, b, enc, L in [(8, 1, 0, 1), (6, 2, 1, 1), (5, 1, 2, 2)]:
        t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed=out * k)
        cpu = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L)
        gpu = ops.feedback_quantize(*_cuda(t, u, held, levels), bits, b, enc, L)
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("out,k,groups", [(6, 7, 1), (10, 33, 2), (1, 1, 1)])
def test_write_aware_feedback_cpu_cuda_equal(out, k, groups):
    """Rule 23: the CUDA kernel runs the chains wave by wave; the CPU one chain by chain."""
    from test_feedback import _case, _chains
    for bits, b, enc, L in [(8, 1, 0, 1), (6, 2, 1, 1), (5, 1, 2, 0)]:
        t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed=out * k)
        n = t.shape[0]
        pred = _chains(n, seed=k)
        g = torch.Generator().manual_seed(out)
        index = torch.stack([torch.randperm(k, generator=g) for _ in range(n)])
        cpu = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, 1.5)
        gpu = ops.feedback_quantize(*_cuda(t, u, held, levels), bits, b, enc, L,
                                    *_cuda(pred, index), 1.5)
        assert torch.equal(gpu.cpu(), cpu)
        # rule 25: each filter's own penalty, copied to the device beside the waves
        a = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 3 - 1.5)
        cpu = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, 1.5, a)
        gpu = ops.feedback_quantize(*_cuda(t, u, held, levels), bits, b, enc, L,
                                    *_cuda(pred, index), 1.5, a.cuda())
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("signed,adc_bits,input_bits", [(False, 5, 4), (False, 0, 6),
                                                        (True, 6, 5)])
def test_analog_matmul_cpu_cuda_equal(signed, adc_bits, input_bits):
    from test_analog_op import call, make_args
    a = make_args(N=37, out=6, groups=2, K=19, rows=7, c=1 if signed else 5,
                  input_bits=input_bits, per_cycle=2, adc_bits=adc_bits, signed=signed, seed=3)
    acc, pmax = call(a)
    g = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    acc_g, pmax_g = call(g)
    assert torch.equal(acc_g.cpu(), acc) and torch.equal(pmax_g.cpu(), pmax)


def test_output_gains_on_the_device_equal_the_hosts():
    """Rule 26 on a GPU: the gains stay on the device (summed there) and equal the host's up to
    the float32 arithmetic of the two devices' kernels."""
    import copy

    import torch.nn as nn

    import crossbar_torch as xb
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).eval()
    x = torch.randn(9, 6)
    cfg = xb.CrossbarConfig(rows=8, cols=28, feedback="hessian", write_penalty=1.0,
                            filter_weight="gain")
    cpu = xb.convert(copy.deepcopy(model), cfg)
    gpu = xb.convert(copy.deepcopy(model).cuda(), cfg)
    want = xb.calibrate_gains(cpu, run=lambda m: m(x).sum(0))
    got = xb.calibrate_gains(gpu, run=lambda m: m(x.cuda()).sum(0))
    for name, layer in xb.crossbar_layers(gpu):
        assert layer.output_gain.is_cuda
        assert torch.allclose(got[name], want[name], rtol=1e-4)
