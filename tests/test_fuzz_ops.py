"""Fuzzing the compiled ops (torch.ops.crossbar_torch.*) for crashes, by hand and with hypothesis.

Every call runs in a child process, so that a segfault or an abort is caught (and named), not
only an exception: the cases of a test go to one child in a batch, the child announces each
case before running it, and when it dies the parent names the case that killed it and goes on
with the rest in a new child. Each case is a valid call of one op, changed in at most one way
(wrong dtype, rank or device, meta tensors, empty, non-contiguous or expanded (stride 0)
tensors, cell levels out of range, an index that is no permutation, a bad format, huge sizes),
with what must happen: it succeeds and (on the CPU) equals the reference, or it is refused with
a message that names the problem. Nothing may crash or hang.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossbar_torch.ops as ops
from crossbar_torch.encoding import cells_for, slices_for
from crossbar_torch.mapping import words_for

# The children import the crossbar_torch this process imported (the in-place build, or the
# sanitizer build `make sanitize` puts first on the path).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))

# ---- the child: runs a batch of cases, announcing each ---------------------------------------

WORKER = textwrap.dedent(r'''
    import json, math, sys
    import torch
    import crossbar_torch.ops as ops
    from crossbar_torch.ops import reference as ref
    from crossbar_torch.ops import analog_reference as aref
    from crossbar_torch.ops import feedback_reference as fref
    torch.set_num_threads(1)
    X = torch.ops.crossbar_torch
    DT = {"uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64,
          "float32": torch.float32, "float64": torch.float64, "bool": torch.bool,
          "int16": torch.int16}

    def T(dtype, shape, kind="zeros", lo=0, hi=2, layout="contig", device="cpu", seed=0,
          poke=None):
        """A tensor: kind zeros / rand (integers in [lo, hi)) / randn (times lo) / perm (rows of
        the last dim permuted) / bool; poke (pos, value | "dup"): one entry changed; layout
        contig / T (transposed storage) / slice (every other element) / expand (stride 0 along
        dim 0)."""
        g = torch.Generator().manual_seed(seed)
        dt, shape = DT[dtype], tuple(shape)
        n = math.prod(shape)
        if kind == "rand":
            x = torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dt)
        elif kind == "randn":
            x = (torch.randn(shape, generator=g) * lo).to(dt)
        elif kind == "perm":
            x = (torch.argsort(torch.rand(shape, generator=g), dim=-1) if n
                 else torch.zeros(shape, dtype=torch.int64)).to(dt)
        elif kind == "bool":
            x = (torch.rand(shape, generator=g) < 0.3).to(dt)
        else:
            x = torch.zeros(shape, dtype=dt)
        expand = layout == "expand" and len(shape) >= 1 and shape[0] > 1
        if expand:
            x = x.narrow(0, 0, 1).clone()
        if poke is not None and x.numel():
            pos, val = poke
            flat = x.view(-1)
            pos %= flat.numel()
            if val == "dup":  # the entry next to it in its row: no longer a permutation
                last = shape[-1]
                flat[pos] = flat[pos - pos % last + (pos % last + 1) % last]
            else:
                flat[pos] = val
        if expand:
            x = x.expand(shape)
        elif layout == "T" and len(shape) >= 2:
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif layout == "slice" and len(shape) >= 1:
            x = torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
        return x.to(device)

    def E(dtype, shape):
        """A huge tensor without memory: one element expanded (stride 0)."""
        return torch.zeros([1] * len(shape), dtype=DT[dtype]).expand(*shape)

    def CPU(name, *args):
        """The CPU kernel itself, whatever the devices (how a device mismatch reaches it)."""
        op = getattr(X, name).default
        return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)

    def same(a, b):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.cpu().contiguous(), b.cpu().contiguous()))

    REF = {"encode": ref.encode, "decode": ref.decode, "effective_weight": ref.effective_weight,
           "sort_and_encode": ref.sort_and_encode, "compensate": ref.compensate,
           "analog_matmul": aref.analog_matmul, "chain_order": ref.chain_order,
           "sort_index": ref.sort_index,
           "feedback_refine": lambda *a: fref.feedback_refine(*a, forms=True)}

    def check(op, args, got):
        """A call that succeeded: meta in, meta out; on the CPU, the reference's values."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            outs = got if isinstance(got, tuple) else (got,)
            assert all(o.is_meta for o in outs), "meta inputs gave a non-meta output"
            return
        if op in REF:
            want = REF[op](*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
            if isinstance(got, tuple):
                assert len(got) == len(want) and all(same(a, b) for a, b in zip(got, want)), \
                    f"{op} differs from the reference"
            else:
                assert same(got, want), f"{op} differs from the reference"

    results = {}
    cases = json.load(sys.stdin)
    for i, case in enumerate(cases):
        print(f"START {i}", flush=True)
        try:
            args = eval(case["args"])
            got = getattr(X, case["op"])(*args) if case["op"] != "eval" else None
            if case["op"] != "eval":
                check(case["op"], args, got)
            res = ["ok", ""]
        except AssertionError as e:
            res = ["wrong", str(e)]
        except Exception as e:  # noqa: BLE001 - every exception is reported to the parent
            res = [type(e).__name__, str(e).strip().splitlines()[0][:600] if str(e).strip()
                   else ""]
        print("DONE " + json.dumps([i] + res), flush=True)
''')


def run_batch(cases, timeout=120):
    """Runs the cases in child processes; returns one (kind, message) per case, where kind is
    "ok", an exception's type name, "wrong" (a result that differs from the reference),
    "CRASH" (the child died in this case) or "HANG"."""
    results = [None] * len(cases)
    start = 0
    env = dict(os.environ,
               PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    while start < len(cases):
        proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=PACKAGE_ROOT, env=env)
        try:
            out, err = proc.communicate(json.dumps(cases[start:]), timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            hung = True
        running = None
        for line in out.splitlines():
            if line.startswith("START "):
                running = start + int(line.split()[1])
            elif line.startswith("DONE "):
                i, kind, msg = json.loads(line[5:])
                results[start + i] = (kind, msg)
                running = None
        if running is None:
            if proc.returncode == 0 and not hung:
                break
            # died before announcing a case (import error?): blame the first case not done
            running = next(i for i in range(start, len(cases)) if results[i] is None)
        tail = " | ".join(err.strip().splitlines()[-3:])
        results[running] = ("HANG" if hung else "CRASH",
                            f"exit status {proc.returncode}; stderr: {tail}")
        start = running + 1
    return results


def assert_cases(cases):
    results = run_batch(cases)
    failures = []
    for case, (kind, msg) in zip(cases, results):
        expect = case["expect"]
        if kind in ("CRASH", "HANG", "wrong"):
            failures.append(f"{kind}: {case['op']}({case['args']}): {msg}")
        elif expect == "ok" and kind != "ok":
            failures.append(f"refused a valid call: {case['op']}({case['args']}): "
                            f"{kind}: {msg}")
        elif expect != "ok" and kind == "ok":
            failures.append(f"accepted (expected an error matching {expect!r}): "
                            f"{case['op']}({case['args']})")
        elif expect != "ok" and (kind not in ("RuntimeError", "ValueError", "TypeError")
                                 or expect.lower() not in msg.lower()):
            failures.append(f"unclear error (expected {expect!r}): {case['op']}({case['args']})"
                            f": {kind}: {msg}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(
        failures[:40])


def case(op, args, expect="ok"):
    return {"op": op, "args": args, "expect": expect}


# ---- hand cases ---------------------------------------------------------------------------

EMPTY_I64 = "T('int64', (0,))"
EMPTY_U8 = "T('uint8', (0,))"


def _pl(cells="T('uint8', (3, 5, 4), 'rand', 0, 2)", filter_index=EMPTY_I64, order=EMPTY_I64,
        pinned=EMPTY_U8, state="T('int64', (1, 4, 1, 1))", written="T('int64', (1, 4, 1))",
        stuck="T('int64', (1, 4, 1))", cell_writes="T('int32', (1, 4, 16))", tile_offset=0,
        rows=4, cols=16, B=3, b=1, e=0, initial=True, count=True, comp=0, window=0):
    """program_layer arguments (valid by default: 3 filters of 5 weights, 4 cells each)."""
    return (f"({cells}, {filter_index}, {order}, {pinned}, {state}, {written}, {stuck}, "
            f"{cell_writes}, {tile_offset}, {rows}, {cols}, {B}, {b}, {e}, {initial}, {count}, "
            f"{comp}, {window})")


HAND = [
    # decode: the example, levels of 200 in 1-bit cells; and every level >= 2**b
    case("decode", "(T('uint8', (1, 14), 'zeros', poke=(3, 200)), 8, 1, 0)", "level 200"),
    case("decode", "(T('uint8', (2, 3, 4), 'rand', 0, 4, poke=(5, 4)), 8, 2, 1)", "level 4"),
    case("decode", "(T('uint8', (5, 2), 'rand', 0, 16, poke=(0, 16)), 8, 4, 2)",
         "levels in [0, 15]"),
    case("decode", "(T('uint8', (5, 1), 'rand', 0, 256), 8, 8, 2)"),  # 8-bit cells: any level
    case("decode", "(T('uint8', (4, 14), 'rand', 0, 2, layout='expand', poke=(2, 7)), 8, 1, 0)",
         "level 7"),
    case("decode", "(T('uint8', (4, 14), 'rand', 0, 2, layout='T', poke=(9, 2)), 8, 1, 0)",
         "level 2"),
    case("decode", "(T('uint8', ()), 8, 1, 0)", "trailing cell axis"),
    case("decode", "(T('uint8', (0, 14)), 8, 1, 0)"),
    case("decode", "(T('uint8', (3, 14), device='meta'), 8, 1, 0)"),
    case("decode", "(T('int64', (3, 14), device='meta'), 8, 1, 0)", "cells must be Byte"),
    case("decode", "(T('uint8', (3, 5), device='meta'), 8, 1, 0)", "cells per weight"),
    case("decode", "(T('uint8', (3, 14)), 8, 0, 0)", "bits_per_cell"),
    case("decode", "(T('uint8', (3, 14)), 2**62, 1, 0)", "weight_bits"),
    case("decode", "(T('uint8', (3, 14)), 8, 1, -1)", "encoding"),
    case("decode", "(T('uint8', (3, 14), device='meta'), 8, 1, 7)", "encoding"),
    case("decode", "(E('uint8', (2**20, 2**20, 14)), 8, 1, 0)", "allocate"),
    # effective_weight: levels, permutations, devices
    case("effective_weight", "(T('uint8', (2, 3, 14), 'zeros', poke=(7, 200)), "
         "T('int64', (2, 3), 'perm'), T('float32', (2,), 'randn', 1.0), 8, 1, 0)", "level 200"),
    case("effective_weight", "(T('uint8', (2, 3, 14)), T('int64', (2, 3), 'perm', poke=(4, "
         "'dup')), T('float32', (2,), 'randn', 1.0), 8, 1, 0)", "not a permutation"),
    case("effective_weight", "(T('uint8', (2, 3, 14)), T('int64', (2, 3), 'perm', poke=(4, 3)),"
         " T('float32', (2,)), 8, 1, 0)", "index entries must be in"),
    case("effective_weight", "(T('uint8', (2, 3, 14)), T('int64', (2, 3), 'perm', poke=(1, -1)),"
         " T('float32', (2,)), 8, 1, 0)", "index entries must be in"),
    case("effective_weight", "(T('uint8', (2, 3, 14)), T('int64', (2, 3), 'perm', "
         "layout='expand'), T('float32', (2,), 'randn', 1.0, layout='slice'), 8, 1, 0)"),
    # a meta index with CPU cells: the dispatcher picks the fake kernel, which must refuse
    case("effective_weight", "(T('uint8', (2, 3, 14)), T('int64', (2, 3), device='meta'), "
         "T('float32', (2,)), 8, 1, 0)", "same device"),
    case("eval", "CPU('effective_weight', T('uint8', (2, 3, 14)), T('int64', (2, 3), 'perm'), "
         "T('float32', (2,), device='meta'), 8, 1, 0)", "scale is on meta"),
    case("effective_weight", "(E('uint8', (2**20, 2**20, 14)), E('int64', (2**20, 2**20)), "
         "E('float32', (2**20,)), 8, 1, 0)", "allocate"),
    # encode: range, huge outputs
    case("encode", "(T('int32', (3,), 'zeros', poke=(1, 128)), 8, 1, 0)", "symmetric range"),
    case("encode", "(E('int32', (2**31, 2**31)), 8, 1, 0)", "overflows int64"),
    case("encode", "(E('int32', (2**20, 2**20)), 8, 1, 0)", "allocate"),
    case("encode", "(T('int32', (3, 4), 'rand', -127, 128, layout='expand'), 8, 3, 1)"),
    case("encode", "(T('int32', (3, 4), device='meta'), 8, 3, 1)"),
    case("encode", "(T('int32', (3, 4), device='meta'), 8, 0, 1)", "bits_per_cell"),
    # sort_and_encode
    case("sort_and_encode", "(T('float32', (2, 3), 'randn', 1.0), T('float32', (2,), 'randn', "
         "1.0), T('int64', (2, 3), 'perm', poke=(0, 'dup')), 8, 1, 0)", "not a permutation"),
    case("sort_and_encode", "(T('float32', (2, 3), 'randn', 1.0, poke=(2, float('nan'))), "
         "T('float32', (2,), 'randn', 1.0), T('int64', (2, 3), 'perm'), 8, 1, 0)", "NaN or Inf"),
    case("sort_and_encode", "(T('float32', (2, 3)), T('float32', (2,), 'zeros'), "
         "T('int64', (2, 3), 'perm'), 8, 1, 0)", "scale contains 0"),
    case("sort_and_encode", "(E('float32', (2**31, 2**31)), E('float32', (2**31,)), "
         "E('int64', (2**31, 2**31)), 8, 1, 0)", "overflows int64"),
    case("sort_and_encode", "(E('float32', (2**20, 2**20)), E('float32', (2**20,)), "
         "E('int64', (2**20, 2**20)), 8, 1, 0)", "allocate"),
    # compensate
    case("compensate", "(T('uint8', (2, 4), 'rand', 0, 2, poke=(3, 9)), T('bool', (2, 4), "
         "'bool'), T('uint8', (2, 4)), 3, 1, 0, 1)", "cells hold level 9"),
    case("compensate", "(T('uint8', (2, 4)), T('bool', (2, 4), 'bool'), T('uint8', (2, 4), "
         "'rand', 0, 2, poke=(0, 255)), 3, 1, 0, 1)", "old hold level 255"),
    case("compensate", "(T('uint8', (2, 4)), T('bool', (2, 4), 'bool', layout='expand'), "
         "T('uint8', (2, 4), 'rand', 0, 2, layout='T'), 3, 1, 0, 1)"),
    case("compensate", "(T('uint8', (2, 4)), T('bool', (2, 3)), T('uint8', (2, 4)), 3, 1, 0, 1)",
         "must have the shape of cells"),
    case("compensate", "(T('uint8', (2, 4)), T('bool', (2, 4)), T('uint8', (2, 4)), 3, 1, 0, 5)",
         "compensate_slices"),
    case("compensate", "(T('uint8', (2, 4), device='meta'), T('bool', (2, 4)), "
         "T('uint8', (2, 4)), 3, 1, 0, 1)", "same device"),
    # program_layer
    case("program_layer", _pl()),
    case("program_layer", _pl(cells="T('uint8', (3, 5, 4), 'rand', 0, 2, poke=(6, 2))"),
         "level 2"),
    case("program_layer", _pl(tile_offset=2**63 - 1)),  # (offset + position) % pool overflowed
    case("program_layer", _pl(tile_offset=-1), "tile_offset"),
    case("program_layer", _pl(rows=2**62), "rows must be in"),
    case("program_layer", _pl(cols=2**63 - 1), "cols must be in"),
    case("program_layer", _pl(cols=-5), "cols must be in"),
    case("program_layer", _pl(window=2**62)),
    case("program_layer", _pl(window=-1), "window"),
    case("program_layer", _pl(order="T('int64', (2,), 'zeros')"), "order must be a permutation"),
    case("program_layer", _pl(order="T('int64', (2,), 'perm', poke=(0, 2**40))"),
         "order must be a permutation"),
    case("program_layer", _pl(filter_index="T('int64', (4,), 'zeros', poke=(3, -7))"),
         "filter_index"),
    case("program_layer", _pl(pinned="T('uint8', (3, 5, 4), 'zeros', poke=(0, 7))"),
         "pinned levels"),
    case("program_layer", _pl(pinned="T('uint8', (3, 5, 4), 'zeros', layout='expand')")),
    case("program_layer", _pl(stuck="T('int64', (1, 4, 1), 'rand', -2**40, 2**40, "
                                    "layout='expand')")),
    case("program_layer", _pl(state="E('int64', (1, 4, 1, 1))"),
         "state must be contiguous"),
    case("program_layer", _pl(cells="E('uint8', (2**20, 2**20, 4))"), "allocate"),
    # meta cells, the rest on the CPU: the fake kernel refuses the mixture
    case("program_layer", _pl(cells="T('uint8', (3, 5, 4), device='meta')"), "same device"),
]


def _am(x="T('float32', (3, 10), 'randn', 2.0)", g="T('float32', (4, 3, 5), 'rand', 0, 4)",
        sort_index="T('int64', (4, 5), 'perm')", cell_weight="T('float64', (3,), 'rand', -4, 5)",
        adc_steps="T('float64', (3,), 'rand', 1, 4)", groups=2, rows=2, input_bits=4,
        per_cycle=1, input_scale=0.5, adc_bits=3, g0=0.5, encoding_offset=1.0, signed=False):
    """analog_matmul arguments (valid by default: 3 input rows, 2 groups of 2 filters of 5
    weights, 3 cells; integer conductances, so that the reference's sums are exact)."""
    def num(v):  # a float the child can eval, nan and inf included
        return repr(v) if math.isfinite(v) else f"float({str(v)!r})"
    return (f"({x}, {g}, {sort_index}, {cell_weight}, {adc_steps}, {groups}, {rows}, "
            f"{input_bits}, {per_cycle}, {num(input_scale)}, {adc_bits}, {num(g0)}, "
            f"{num(encoding_offset)}, {signed})")


HAND += [
    case("analog_matmul", _am()),
    case("analog_matmul", _am(x="T('float32', (3, 10), 'randn', 2.0, layout='T')")),
    case("analog_matmul", _am(x="T('float32', (3, 10), 'randn', 2.0, layout='expand')",
                              g="T('float32', (4, 3, 5), 'rand', 0, 4, layout='slice')")),
    case("analog_matmul", _am(sort_index="T('int64', (4, 5), 'perm', layout='expand')",
                              adc_steps="T('float64', (3,), 'rand', 1, 4, layout='slice')")),
    case("analog_matmul", _am(x="T('float32', (3, 10), 'rand', -9, 9)", input_bits=0)),
    case("analog_matmul", _am(x="T('float32', (0, 10))")),
    case("analog_matmul", _am(x="T('float32', (3, 0))", g="T('float32', (4, 3, 0))",
                              sort_index="T('int64', (4, 0))")),
    case("analog_matmul", _am(g="T('float32', (4, 1, 5), 'rand', -4, 4)",
                              cell_weight="T('float64', (1,), 'rand', 1, 2)",
                              adc_steps="T('float64', (1,), 'rand', 1, 4)", signed=True)),
    case("analog_matmul", _am(adc_bits=0, adc_steps="T('float64', (3,), 'zeros')")),
    case("analog_matmul", _am(x="T('float32', (3, 10), 'randn', 2.0, poke=(4, float('nan')))"),
         "x contains NaN or Inf"),
    case("analog_matmul", _am(x="T('float32', (3, 10), 'rand', -9, 9, poke=(29, -float('inf')))",
                              input_bits=0), "x contains NaN or Inf"),
    case("analog_matmul", _am(g="T('float32', (4, 3, 5), 'rand', 0, 4, poke=(7, float('inf')))"),
         "g contains NaN or Inf"),
    case("analog_matmul", _am(cell_weight="T('float64', (3,), 'zeros', poke=(2, float('nan')))"),
         "cell_weight contains NaN or Inf"),
    case("analog_matmul", _am(sort_index="T('int64', (4, 5), 'perm', poke=(3, 5))"),
         "sort_index entries"),
    case("analog_matmul", _am(sort_index="T('int64', (4, 5), 'perm', poke=(3, -2**62))"),
         "sort_index entries"),
    case("analog_matmul", _am(adc_steps="T('float64', (3,), 'rand', 1, 4, poke=(1, 0.0))"),
         "adc_steps must be > 0"),
    case("analog_matmul", _am(x="T('float64', (3, 10))"), "x must be Float"),
    case("analog_matmul", _am(cell_weight="T('float32', (3,))"), "cell_weight must be Double"),
    case("analog_matmul", _am(g="T('float32', (4, 15))"), "g must have shape"),
    case("analog_matmul", _am(x="T('float32', (3, 11))"), "x.size(1)"),
    case("analog_matmul", _am(adc_steps="T('float64', (2,))"), "adc_steps.size(0)"),
    case("analog_matmul", _am(groups=0), "groups must be >= 1"),
    case("analog_matmul", _am(groups=2**62), "groups"),
    case("analog_matmul", _am(groups=-2**63), "groups must be >= 1"),
    case("analog_matmul", _am(rows=0), "rows must be >= 1"),
    case("analog_matmul", _am(rows=2**63 - 1)),
    case("analog_matmul", _am(input_bits=17), "input_bits must be in"),
    case("analog_matmul", _am(input_bits=-2**40), "input_bits must be in"),
    case("analog_matmul", _am(per_cycle=0), "input_bits_per_cycle must be in"),
    case("analog_matmul", _am(per_cycle=2**31), "input_bits_per_cycle must be in"),
    case("analog_matmul", _am(input_scale=0.0), "input_scale"),
    case("analog_matmul", _am(input_scale=1e-60), "input_scale"),
    case("analog_matmul", _am(input_scale=float('nan')), "input_scale"),
    case("analog_matmul", _am(input_scale=1e-30, input_bits=16)),  # everything clamps
    case("analog_matmul", _am(adc_bits=25), "adc_bits must be in"),
    case("analog_matmul", _am(adc_bits=24)),
    case("analog_matmul", _am(g0=-1.0), "g0 must be"),
    case("analog_matmul", _am(encoding_offset=float('inf')), "encoding_offset must be finite"),
    case("analog_matmul", _am(signed=True), "signed_weights needs one cell"),
    # meta tensors: the fake kernel; mixed with CPU ones: refused as a device mismatch
    case("analog_matmul", _am(*[f"T({d!r}, {sh!r}, device='meta')" for d, sh in (
        ("float32", (3, 10)), ("float32", (4, 3, 5)), ("int64", (4, 5)), ("float64", (3,)),
        ("float64", (3,)))])),
    case("analog_matmul", _am(g="T('float32', (4, 3, 5), device='meta')"), "same device"),
    case("eval", "CPU('analog_matmul', *" + _am(adc_steps="T('float64', (3,), device='meta')")
         + ")", "adc_steps is on meta"),
    # huge (expanded) inputs: the output's size overflows int64, or cannot be allocated
    case("analog_matmul", _am(x="E('float32', (2**40, 10))", g="E('float32', (2**24, 3, 5))",
                              sort_index="E('int64', (2**24, 5))"), "overflows int64"),
    case("analog_matmul", _am(x="E('float32', (2**30, 10))", g="E('float32', (2**20, 3, 5))",
                              sort_index="E('int64', (2**20, 5))"), "allocate"),
]

HAND += [
    case("chain_order", "(T('int64', (6, 3), 'rand', -2**62, 2**62), 2)"),
    case("chain_order", "(T('int64', (7, 2), 'rand', 0, 4), 6)"),  # many ties
    case("chain_order", "(T('int64', (0, 3)), 0)"),
    case("chain_order", "(T('int64', (1, 3), 'rand', -9, 9), 0)"),
    case("chain_order", "(T('int64', (5, 0)), 4)"),  # no bits: every distance 0
    case("chain_order", "(T('int64', (4, 2), 'rand', 0, 4, layout='T'), 1)"),
    case("chain_order", "(T('int64', (4, 2), 'rand', 0, 4, layout='slice'), 3)"),
    case("chain_order", "(T('int64', (4, 2), 'rand', 0, 4, layout='expand'), 1)"),
    case("chain_order", "(T('int64', (4, 2), device='meta'), 0)"),
    case("chain_order", "(T('int32', (4, 2)), 0)", "bits must be Long"),
    case("chain_order", "(T('int64', (4,)), 0)", "bits must have 2 dimensions"),
    case("chain_order", "(T('int64', (4, 2)), 4)", "start must be in"),
    case("chain_order", "(T('int64', (4, 2)), -2**63)", "start must be in"),
    case("chain_order", "(E('int64', (2**40, 1)), 0)", "allocate"),
    # sort_index: levels (counting sort), ties, keys that are not levels (comparison sort)
    case("sort_index", "(T('int32', (6, 9), 'rand', -127, 128),)"),
    case("sort_index", "(T('int32', (5, 40), 'rand', 0, 3),)"),  # many ties
    case("sort_index", "(T('int32', (4, 7), 'rand', -2**31, 2**31 - 1),)"),
    case("sort_index", "(T('int32', (3, 300), 'rand', -2**20, 2**20),)"),
    case("sort_index", "(T('int32', (0, 4)),)"),
    case("sort_index", "(T('int32', (4, 0)),)"),
    case("sort_index", "(T('int32', (4, 6), 'rand', -9, 9, layout='T'),)"),
    case("sort_index", "(T('int32', (4, 6), 'rand', -9, 9, layout='slice'),)"),
    case("sort_index", "(T('int32', (4, 6), 'rand', -9, 9, layout='expand'),)"),
    case("sort_index", "(T('int32', (4, 6), device='meta'),)"),
    case("sort_index", "(T('int64', (4, 6)),)", "key must be Int"),
    case("sort_index", "(T('int32', (4,)),)", "key must have 2 dimensions"),
    case("sort_index", "(E('int32', (2**40, 1)),)", "allocate"),
]



HAND += [
    # feedback_factor (rule 21's factor): a zero moment (every input unseen: made 1), layouts,
    # empty, meta; refused: no damping on a singular moment, NaN, dtype, rank, shape, damp
    case("feedback_factor", "(T('float32', (2, 6, 6)), 0.01)"),
    case("feedback_factor", "(T('float32', (2, 6, 6), layout='T'), 0.01)"),
    case("feedback_factor", "(T('float32', (2, 6, 6), layout='slice'), 0.01)"),
    case("feedback_factor", "(T('float32', (3, 6, 6), layout='expand'), 0.3)"),
    case("feedback_factor", "(T('float32', (1, 0, 0)), 0.01)"),
    case("feedback_factor", "(T('float32', (0, 4, 4)), 0.01)"),
    case("feedback_factor", "(T('float32', (2, 5, 5), device='meta'), 0.01)"),
    case("feedback_factor", "(T('float32', (1, 3, 3), 'rand', 1, 2), 0.0)", "not positive-def"),
    case("feedback_factor", "(T('float32', (1, 3, 3), poke=(4, float('nan'))), 0.01)",
         "NaN or Inf"),
    case("feedback_factor", "(T('float64', (1, 3, 3)), 0.01)", "moment must be Float"),
    case("feedback_factor", "(T('float32', (3, 3)), 0.01)", "moment must have shape (groups, K, K)"),
    case("feedback_factor", "(T('float32', (1, 3, 4)), 0.01)", "K = moment.size"),
    case("feedback_factor", "(T('float32', (1, 3, 3)), -1.0)", "damp must be"),
    case("feedback_factor", "(T('float32', (1, 3, 3)), float('nan'))", "damp must be"),
    case("feedback_factor", "(E('float32', (1, 2**16, 2**16)), 0.01)", "too large"),
]


def _fr(target="T('float64', (4, 6), 'randn', 3.0)", hs="T('float64', (2, 6, 6), 'randn', 1.0)",
        q="T('int32', (4, 6), 'rand', -5, 6)", pred="T('int64', (4,), 'rand', -1, 0)",
        index="T('int64', (4, 6), 'perm')", fmt="8, 1, 0", penalty="1.5", sweeps="2"):
    """feedback_refine's arguments (rule 24): every filter without a predecessor by default."""
    return f"({target}, {hs}, {q}, {pred}, {index}, {fmt}, {penalty}, {sweeps})"


HAND += [
    case("feedback_refine", _fr()),
    case("feedback_refine", _fr(pred="T('int64', (4,), 'rand', -1, 0, poke=(1, 0))")),  # a chain
    case("feedback_refine", _fr(target="T('float64', (0, 6))", q="T('int32', (0, 6))",
                                pred="T('int64', (0,))", index="T('int64', (0, 6))")),
    case("feedback_refine", _fr(target="T('float64', (4, 0))", hs="T('float64', (2, 0, 0))",
                                q="T('int32', (4, 0))", index="T('int64', (4, 0))")),
    case("feedback_refine", _fr(sweeps="0")),
    case("feedback_refine", _fr(penalty="0.0", fmt="3, 2, 2",
                                q="T('int32', (4, 6), 'rand', -3, 4)")),
    case("feedback_refine", _fr(target="T('float64', (4, 6), 'randn', 3.0, layout='T')",
                                hs="T('float64', (2, 6, 6), 'randn', 1.0, layout='slice')",
                                q="T('int32', (4, 6), 'rand', -5, 6, layout='expand')",
                                index="T('int64', (4, 6), 'perm', layout='expand')")),
    case("feedback_refine", _fr(target="T('float64', (4, 6), device='meta')",
                                hs="T('float64', (2, 6, 6), device='meta')",
                                q="T('int32', (4, 6), device='meta')",
                                pred="T('int64', (4,), device='meta')",
                                index="T('int64', (4, 6), device='meta')")),
    case("feedback_refine", _fr(target="T('float32', (4, 6))"), "target must be Double"),
    case("feedback_refine", _fr(q="T('int64', (4, 6))"), "q must be Int"),
    case("feedback_refine", _fr(hs="T('float64', (3, 6, 6))"), "multiple of the groups"),
    case("feedback_refine", _fr(q="T('int32', (4, 6), 'rand', -5, 6, poke=(3, 200))"),
         "symmetric range"),
    case("feedback_refine", _fr(index="T('int64', (4, 6), 'perm', poke=(2, 'dup'))"),
         "not a permutation"),
    case("feedback_refine", _fr(pred="T('int64', (4,), 'rand', -1, 0, poke=(0, 9))"),
         "pred[0] = 9"),
    case("feedback_refine", _fr(target="T('float64', (4, 6), 'randn', 3.0, poke=(5, math.nan))"),
         "target holds NaN"),
    case("feedback_refine", _fr(sweeps="101"), "sweeps must be in"),
    case("feedback_refine", _fr(penalty="-1.0"), "write_penalty"),
    case("feedback_refine", _fr(fmt="1, 1, 0"), "weight_bits"),
]

META_PL = case("program_layer", _pl(
    cells="T('uint8', (3, 5, 4), device='meta')", filter_index="T('int64', (0,), device='meta')",
    order="T('int64', (0,), device='meta')", pinned="T('uint8', (0,), device='meta')",
    state="T('int64', (1, 4, 1, 1), device='meta')", written="T('int64', (1, 4, 1), "
    "device='meta')", stuck="T('int64', (1, 4, 1), device='meta')",
    cell_writes="T('int32', (1, 4, 16), device='meta')"))
HAND.append(META_PL)


def test_hand_cases_never_crash_and_are_refused_clearly():
    assert_cases(HAND)


def test_the_harness_catches_a_crash():
    """A case that kills its child is reported as a CRASH of that case, and the cases after it
    still run."""
    cases = [case("eval", "(1,)"), case("eval", "__import__('os').abort()"),
             case("eval", "(2,)"), case("eval", "(1/0,)", "division")]
    results = run_batch(cases)
    assert [r[0] for r in results] == ["ok", "CRASH", "ok", "ZeroDivisionError"]
    assert "exit status" in results[1][1]


# ---- hypothesis: one valid call per op, changed in at most one way ------------------------

@st.composite
def formats(draw):
    B = draw(st.integers(2, 16))
    e = draw(st.integers(0, 2))
    b = draw(st.integers(1, 8))
    return B, b, e


BENIGN = ("none", "T", "slice", "expand", "meta", "empty")
BAD_SCALARS = {"weight_bits": [0, 1, 17, -3, 2**62], "bits_per_cell": [0, 9, -1, 2**40],
               "encoding": [3, -1, 2**31]}
OTHER_DTYPE = {"uint8": "int64", "int32": "int64", "int64": "int32", "float32": "float64",
               "bool": "uint8"}


@st.composite
def op_cases(draw):
    op = draw(st.sampled_from(["encode", "decode", "effective_weight", "sort_and_encode",
                               "compensate"]))
    B, b, e = draw(formats())
    c = cells_for(B, b, e)
    S = slices_for(B, b, e)
    qmax = 2 ** (B - 1) - 1
    out, K = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**20))
    mutation = draw(st.sampled_from(BENIGN + ("dtype", "rank", "mixed_device", "level",
                                              "index_dup", "index_range", "format")))
    if mutation == "empty":
        if draw(st.booleans()):
            out = 0
        else:
            K = 0
    # tensors: [name, dtype, shape, kind, lo, hi, layout, device, poke]
    if op == "encode":
        tensors = [["q", "int32", [out, K], "rand", -qmax, qmax + 1, "contig", "cpu", None]]
    elif op == "decode":
        tensors = [["cells", "uint8", [out, K, c], "rand", 0, 2 ** b, "contig", "cpu", None]]
    elif op == "effective_weight":
        tensors = [["cells", "uint8", [out, K, c], "rand", 0, 2 ** b, "contig", "cpu", None],
                   ["index", "int64", [out, K], "perm", 0, 0, "contig", "cpu", None],
                   ["scale", "float32", [out], "randn", 0.1, 0, "contig", "cpu", None]]
    elif op == "sort_and_encode":
        tensors = [["w", "float32", [out, K], "randn", 1.0, 0, "contig", "cpu", None],
                   ["scale", "float32", [out], "rand", 1, 5, "contig", "cpu", None],
                   ["index", "int64", [out, K], "perm", 0, 0, "contig", "cpu", None]]
    else:
        tensors = [["cells", "uint8", [out, K, c], "rand", 0, 2 ** b, "contig", "cpu", None],
                   ["held", "bool", [out, K, c], "bool", 0, 0, "contig", "cpu", None],
                   ["old", "uint8", [out, K, c], "rand", 0, 2 ** b, "contig", "cpu", None]]
    for t in tensors:
        t.append(seed)
    scalars = {"weight_bits": B, "bits_per_cell": b, "encoding": e}
    if op == "compensate":
        # the kernels search up to 21 bits per weight; the reference (Python, one assignment at
        # a time) it is compared with stays fast up to 8
        top = max(L for L in range(S + 1) if (c // S) * L * b <= 8)
        scalars["compensate_slices"] = draw(st.integers(0, top))
    expect = "ok"
    which = draw(st.integers(0, len(tensors) - 1))
    t = tensors[which]
    if mutation in ("T", "slice", "expand"):
        t[6] = mutation
    elif mutation == "meta":
        for u in tensors:
            u[7] = "meta"
    elif mutation == "dtype":
        t[1] = OTHER_DTYPE[t[1]]
        expect = f"{t[0]} must be"
    elif mutation == "rank":
        if op in ("encode",):  # any rank is valid
            t[2] = [2] + t[2]
        elif op in ("decode", "compensate"):  # any rank with a trailing cell axis
            for u in tensors:
                u[2] = [2] + u[2]
        else:
            t[2] = t[2] + [1]
            expect = "crossbar_torch"
    elif mutation == "mixed_device" and len(tensors) > 1:
        t[7] = "meta"
        expect = "same device"
    elif mutation == "level" and b < 8 and "cells" in [u[0] for u in tensors] and out and K:
        u = tensors[0] if op != "compensate" else tensors[draw(st.sampled_from([0, 2]))]
        level = draw(st.integers(2 ** b, 255))
        u[8] = (draw(st.integers(0, 10**6)), level)
        expect = f"hold level {level}"
    elif mutation in ("index_dup", "index_range") and "index" in [u[0] for u in tensors] \
            and out and K:
        u = next(u for u in tensors if u[0] == "index")
        pos = draw(st.integers(0, 10**6))
        if mutation == "index_dup" and K >= 2:
            u[8] = (pos, "dup")
            expect = "not a permutation"
        elif mutation == "index_range":
            u[8] = (pos, draw(st.sampled_from([-1, K, 2**40, -2**62])))
            expect = "index entries must be in"
    elif mutation == "format":
        name = draw(st.sampled_from(sorted(BAD_SCALARS)))
        scalars[name] = draw(st.sampled_from(BAD_SCALARS[name]))
        expect = name
    args = ", ".join([_render(u) for u in tensors] + [str(v) for v in scalars.values()])
    return case(op, f"({args},)", expect)


def _render(u):
    name, dtype, shape, kind, lo, hi, layout, device, poke, seed = u
    return (f"T({dtype!r}, {tuple(shape)!r}, {kind!r}, {lo!r}, {hi!r}, {layout!r}, "
            f"{device!r}, {seed}, {poke!r})")


@st.composite
def program_layer_cases(draw):
    B, b, e = draw(formats())
    c = cells_for(B, b, e)
    S = slices_for(B, b, e)
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(c, c * 3 + 70))
    pool = draw(st.integers(1, 3))
    words = words_for(cols)
    out, K = draw(st.integers(0, 5)), draw(st.integers(0, 9))
    seed = draw(st.integers(0, 2**20))
    comp_top = max(L for L in range(S + 1) if (c // S) * L * b <= 14)
    kw = dict(
        cells=f"T('uint8', {(out, K, c)}, 'rand', 0, {2 ** b}, seed={seed})",
        state=f"T('int64', {(pool, rows, b, words)}, 'rand', -2**62, 2**62, seed={seed})",
        written=f"T('int64', {(pool, rows, words)}, 'rand', -2**62, 2**62, seed={seed})",
        stuck=f"T('int64', {(pool, rows, words)}, 'rand', -2**62, 2**62, seed={seed + 1})",
        cell_writes=f"T('int32', {(pool, rows, cols)})", tile_offset=draw(st.integers(0, 2**63 - 1)),
        rows=rows, cols=cols, B=B, b=b, e=e, initial=draw(st.booleans()),
        count=draw(st.booleans()), comp=draw(st.integers(0, comp_top)),
        window=draw(st.sampled_from([0, 1, 3, 2**40])))
    if draw(st.booleans()) and out and K:
        kw["pinned"] = f"T('uint8', {(out, K, c)}, 'rand', 0, {2 ** b}, seed={seed})"
    mutation = draw(st.sampled_from(["none", "level", "stuck_layout", "cells_layout", "order",
                                     "bad_order", "filter_index", "state_dtype", "rows",
                                     "cols", "format"]))
    expect = "ok"
    F = cols // c
    tiles = (-(-out // F)) * (-(-K // rows)) if out and K else 0
    if mutation == "level" and b < 8 and out and K:
        level = draw(st.integers(2 ** b, 255))
        kw["cells"] = kw["cells"][:-1] + f", poke=({draw(st.integers(0, 10**6))}, {level}))"
        expect = f"hold level {level}"
    elif mutation == "stuck_layout":
        kw["stuck"] = kw["stuck"][:-1] + ", layout='expand')"
    elif mutation == "cells_layout":
        kw["cells"] = kw["cells"][:-1] + f", layout={draw(st.sampled_from(['T', 'slice']))!r})"
    elif mutation == "order":
        kw["order"] = f"T('int64', ({tiles},), 'perm', seed={seed})"
    elif mutation == "bad_order" and tiles:
        kw["order"] = f"T('int64', ({tiles},), 'zeros', poke=(0, {tiles}))"
        expect = "order must be a permutation"
    elif mutation == "filter_index" and out:
        nslots = (-(-out // F)) * F
        kw["filter_index"] = f"T('int64', ({nslots},), 'zeros', poke=(0, -2))"
        expect = "filter_index"
    elif mutation == "state_dtype":
        kw["state"] = kw["state"].replace("'int64'", "'int32'", 1)
        expect = "state must be Long"
    elif mutation == "rows":
        kw["rows"] = draw(st.sampled_from([0, -1, 2**21, 2**62]))
        expect = "rows must be in"
    elif mutation == "cols":
        kw["cols"] = draw(st.sampled_from([0, -1, 2**21, 2**63 - 1]))
        expect = "cols must be in"
    elif mutation == "format":
        name = draw(st.sampled_from(["B", "b", "e"]))
        kw[name] = {"B": 17, "b": 9, "e": 3}[name]
        expect = {"B": "weight_bits", "b": "bits_per_cell", "e": "encoding"}[name]
    return case("program_layer", _pl(**kw), expect)


@st.composite
def analog_matmul_cases(draw):
    """One valid analog_matmul call (integer conductances: the reference's sums are exact),
    changed in at most one way."""
    signed = draw(st.booleans())
    N, groups = draw(st.integers(0, 4)), draw(st.integers(1, 3))
    out, K = groups * draw(st.integers(0, 3)), draw(st.integers(0, 6))
    c = 1 if signed else draw(st.integers(1, 4))
    input_bits = draw(st.integers(1, 10)) if signed else draw(st.integers(0, 10))
    seed = draw(st.integers(0, 2**20))
    xkind = "'rand', -20, 21" if input_bits == 0 else "'randn', 3.0"
    glo = -3 if signed else 0
    kw = dict(x=f"T('float32', {(N, groups * K)}, {xkind}, seed={seed})",
              g=f"T('float32', {(out, c, K)}, 'rand', {glo}, 4, seed={seed})",
              sort_index=f"T('int64', {(out, K)}, 'perm', seed={seed})",
              cell_weight=f"T('float64', {(c,)}, 'rand', -8, 9, seed={seed})",
              adc_steps=f"T('float64', {(c,)}, 'rand', 1, 8, seed={seed})",
              groups=groups, rows=draw(st.integers(1, 4)), input_bits=input_bits,
              per_cycle=draw(st.integers(1, 16)), input_scale=draw(st.sampled_from([0.25, 0.3,
                                                                                   1.0, 7.5])),
              adc_bits=draw(st.integers(0, 24)), g0=draw(st.sampled_from([0.0, 0.5, 3.0])),
              encoding_offset=draw(st.sampled_from([0.0, 1.0, -2.5])), signed=signed)
    mutation = draw(st.sampled_from(BENIGN + ("dtype", "rank", "mixed_device", "index_range",
                                              "nan_x", "inf_g", "bad_step", "scalar")))
    tensors = ["x", "g", "sort_index", "cell_weight", "adc_steps"]
    dtypes = {"x": "float32", "g": "float32", "sort_index": "int64", "cell_weight": "float64",
              "adc_steps": "float64"}
    name = draw(st.sampled_from(tensors))
    expect = "ok"

    def add(key, text):  # one more keyword of the T(...) call of kw[key]
        kw[key] = kw[key][:-1] + f", {text})"

    if mutation in ("T", "slice", "expand"):
        add(name, f"layout={mutation!r}")
    elif mutation == "meta":
        for t in tensors:
            add(t, "device='meta'")
    elif mutation == "empty":
        kw["x"] = f"T('float32', {(0, groups * K)})"
    elif mutation == "dtype":
        other = {"float32": "float64", "float64": "float32", "int64": "int32"}[dtypes[name]]
        kw[name] = kw[name].replace(repr(dtypes[name]), repr(other), 1)
        expect = f"{name} must be"
    elif mutation == "rank":
        kw[name] = f"T({dtypes[name]!r}, (2, 1, 1, 1))"
        expect = f"{name} must have"
    elif mutation == "mixed_device":
        add(name, "device='meta'")
        expect = "same device"
    elif mutation == "index_range" and out and K:
        add("sort_index", f"poke=({draw(st.integers(0, 10**6))}, "
                          f"{draw(st.sampled_from([-1, K, 2**40, -2**62]))})")
        expect = "sort_index entries"
    elif mutation == "nan_x" and N and K:
        bad = draw(st.sampled_from(["float('nan')", "float('inf')", "-float('inf')"]))
        add("x", f"poke=({draw(st.integers(0, 10**6))}, {bad})")
        expect = "x contains NaN or Inf"
    elif mutation == "inf_g" and out and c and K:
        add("g", f"poke=({draw(st.integers(0, 10**6))}, float('inf'))")
        expect = "g contains NaN or Inf"
    elif mutation == "bad_step" and kw["adc_bits"] > 0:
        add("adc_steps", f"poke=({draw(st.integers(0, 10**6))}, "
                         f"{draw(st.sampled_from([0.0, -1.0]))})")
        expect = "adc_steps must be > 0"
    elif mutation == "scalar":
        field, value, expect = draw(st.sampled_from([
            ("groups", 0, "groups"), ("groups", -5, "groups"), ("rows", 0, "rows"),
            ("rows", -2**63, "rows"), ("input_bits", 17, "input_bits"),
            ("input_bits", -1, "input_bits"), ("per_cycle", 0, "input_bits_per_cycle"),
            ("per_cycle", 2**62, "input_bits_per_cycle"), ("adc_bits", 25, "adc_bits"),
            ("adc_bits", -1, "adc_bits"), ("g0", -0.5, "g0"),
            ("encoding_offset", float("nan"), "encoding_offset")]))
        kw[field] = value
    return case("analog_matmul", _am(**kw), expect)


@st.composite
def chain_order_cases(draw):
    """One valid chain_order call (narrow values: many equal distances, the tie-break decides),
    changed in at most one way."""
    out, W = draw(st.integers(0, 40)), draw(st.integers(0, 5))
    lo, hi = draw(st.sampled_from([(0, 2), (0, 16), (-2**62, 2**62)]))
    layout = draw(st.sampled_from(["contig", "T", "slice", "expand"]))
    start = draw(st.integers(0, max(out - 1, 0)))
    expect = "ok"
    mutation = draw(st.sampled_from(["none", "none", "start", "dtype"]))
    if mutation == "start" and out:
        start, expect = draw(st.sampled_from([out, -1, 2**62])), "start must be in"
    dtype = "int32" if mutation == "dtype" else "int64"
    if dtype == "int32":
        lo, hi, expect = 0, 16, "bits must be Long"
    bits = (f"T({dtype!r}, {(out, W)}, 'rand', {lo}, {hi}, layout={layout!r}, "
            f"seed={draw(st.integers(0, 2**20))})")
    return case("chain_order", f"({bits}, {start})", expect)


@st.composite
def sort_index_cases(draw):
    """One sort_index call: keys over a level range (counting sort, many ties) or a wide one
    (comparison sort), any layout, at most one wrong dtype."""
    out, k = draw(st.integers(0, 12)), draw(st.integers(0, 70))
    lo, hi = draw(st.sampled_from([(0, 2), (-127, 128), (-2**15, 2**15), (-2**31, 2**31 - 1)]))
    layout = draw(st.sampled_from(["contig", "T", "slice", "expand"]))
    dtype, expect = draw(st.sampled_from([("int32", "ok")] * 4 + [("int16", "key must be Int")]))
    key = (f"T({dtype!r}, {(out, k)}, 'rand', {max(lo, -2**15) if dtype == 'int16' else lo}, "
           f"{min(hi, 2**15 - 1) if dtype == 'int16' else hi}, layout={layout!r}, "
           f"seed={draw(st.integers(0, 2**20))})")
    return case("sort_index", f"({key},)", expect)


FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _collect(strategy, n):
    cases = []

    @settings(FUZZ, max_examples=n)
    @given(strategy)
    def collect(c):
        cases.append(c)

    collect()
    return cases


def test_fuzz_ops_with_hypothesis():
    assert_cases(_collect(op_cases(), 400))


def test_fuzz_program_layer_with_hypothesis():
    assert_cases(_collect(program_layer_cases(), 150))


def test_fuzz_analog_matmul_with_hypothesis():
    assert_cases(_collect(analog_matmul_cases(), 250))


def test_fuzz_chain_order_with_hypothesis():
    assert_cases(_collect(chain_order_cases(), 150))


def test_fuzz_sort_index_with_hypothesis():
    assert_cases(_collect(sort_index_cases(), 150))


def test_decode_refuses_levels_out_of_range_in_process():
    """The issue's example in-process too: 1-bit cells holding 200 are refused, naming it."""
    cells = torch.zeros(2, 14, dtype=torch.uint8)
    cells[1, 3] = 200
    with pytest.raises(RuntimeError, match=r"decode: cells hold level 200 .*\[0, 1\]"):
        ops.decode(cells, 8, 1, 0)
    index = torch.arange(3).expand(2, 3).contiguous()
    with pytest.raises(RuntimeError, match="effective_weight: cells hold level 200"):
        ops.effective_weight(cells[:, None].expand(2, 3, 14), index, torch.ones(2), 8, 1, 0)
