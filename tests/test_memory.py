"""Memory (issue 19): the narrow stored sort index, state dicts of the int64 format loading into
it, and no memory held across configurations (by reference, and as the process's peak RSS)."""
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
from crossbar_torch import ops
from crossbar_torch.quantization import index_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMP = dict(sort="value", filter_order="chain", stuck_slices=2, reprogram_fraction=0.25,
            compensate=True)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10)).eval()


def test_index_dtype_is_the_narrowest_that_holds_k():
    assert index_dtype(1) == torch.int16
    assert index_dtype(32768) == torch.int16   # indices 0 .. 32767
    assert index_dtype(32769) == torch.int32
    assert torch.iinfo(torch.int16).max == 32767


@pytest.mark.parametrize("k, dtype", [(48, torch.int16), (32769, torch.int32)])
def test_sort_index_is_stored_narrow_and_decodes_as_the_int64_one(k, dtype):
    torch.manual_seed(1)
    lin = nn.Linear(k, 3)
    layer = xb.convert(lin, xb.CrossbarConfig(sort="value")).eval()
    assert layer.sort_index.dtype == dtype
    assert layer.state_dict()["sort_index"].dtype == dtype
    # the independent reference: the int64 rule-4 index of the quantized weights, through the op
    q, s = xb.quantization.quantize(lin.weight.detach().float(), layer.config)
    index64 = xb.quantization.sort_index(q, layer.config)
    assert index64.dtype == torch.int64
    assert torch.equal(layer.sort_index.long(), index64)
    cfg = layer.config
    want = ops.effective_weight(layer.held_cells(), index64, s, cfg.weight_bits, cfg.bits_per_cell,
                                cfg.encoding_id)
    assert torch.equal(layer.effective_weight(), want)


def _old_format(state_dict, c=14):
    """A state dict as the format before issue 19 saved it: sort_index int64, cells one level
    a byte (out, K, c), stuck bool (out, K, c) (8-bit differential, 1-bit cells: c = 14)."""
    old = {}
    for key, v in state_dict.items():
        if key.endswith("sort_index"):
            v = v.to(torch.int64)
            assert v.dtype == torch.int64
        elif key.endswith(".cells"):
            v = _unpack_by_hand(v, c)
        elif key.endswith(".stuck"):
            v = _unpack_by_hand(v, c).bool() if v.numel() else torch.zeros(0, dtype=torch.bool)
        old[key] = v.clone() if isinstance(v, torch.Tensor) else v
    return old


def _unpack_by_hand(packed, c):
    """1-bit cells: cell j of a weight is bit j % 8 of its byte j // 8 (docs/checkpoints.md)."""
    return torch.stack([(packed[..., j // 8] >> (j % 8)) & 1 for j in range(c)], -1)


@pytest.mark.parametrize("fields", [{}, COMP])
def test_state_dict_of_the_old_format_loads_packed_and_narrowed_with_the_same_weights(fields, tmp_path):
    cfg = xb.CrossbarConfig(**fields)
    src = xb.convert(small_model(), cfg).eval()
    old = _old_format(src.state_dict())
    dst = xb.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(8 * 4 * 4, 10)).eval(), cfg).eval()
    torch.save(old, tmp_path / "old.pt")  # a file as the format before the change wrote it
    dst.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    x = torch.randn(2, 3, 4, 4)
    for name in ("0", "3"):
        a, b = getattr(src, name), getattr(dst, name)
        assert b.sort_index.dtype == torch.int16  # converted on load
        assert torch.equal(a.sort_index, b.sort_index)
        assert torch.equal(a.cells, b.cells) and torch.equal(a.stuck, b.stuck)
        assert b.cells.shape[2] == 2 and b.stuck.shape[-1] == (2 if fields else 0)  # packed
        assert torch.equal(b.held_cells(), old[f"{name}.cells"])  # the saved levels
        if fields:
            assert torch.equal(b.stuck_cells(), old[f"{name}.stuck"])
        assert torch.equal(a.effective_weight(), b.effective_weight())
    assert torch.equal(src(x), dst(x))
    assert xb.reprogram_report(dst).to_dict() == xb.reprogram_report(src).to_dict()


def test_int64_sort_index_that_is_not_a_permutation_is_refused_before_narrowing():
    # 65536 + i wraps to i in int16, which would make the row a permutation again: the check
    # must see the saved int64 values, before the cast
    src = xb.convert(small_model(), xb.CrossbarConfig()).eval()
    old = _old_format(src.state_dict())
    old["3.sort_index"][0, 0] += 65536
    assert torch.equal(old["3.sort_index"].to(torch.int16), src.state_dict()["3.sort_index"])
    dst = xb.convert(small_model(), xb.CrossbarConfig()).eval()
    with pytest.raises(RuntimeError, match="crossbar layer 3: buffer 'sort_index' is not a "
                                           "permutation of each row: row 0"):
        dst.load_state_dict(old)


def test_a_converted_and_reported_model_is_freed_by_reference_counting_alone():
    """Nothing the library builds holds a converted model (no reference cycle, no cache keyed
    by model or config): dropping the last reference frees it at once, without the garbage
    collector, after convert, report, an eval forward (which caches effective weights) and a
    training step."""
    gc.collect()
    gc.disable()
    try:
        model = small_model()
        x = torch.randn(2, 3, 4, 4)
        for fields in ({}, COMP):
            xm = xb.convert(model, xb.CrossbarConfig(**fields))
            report = xb.reprogram_report(xm)
            str(report), report.to_dict()
            with torch.no_grad():
                xm(x)
            xm.train()
            xm(x).sum().backward()
            refs = [weakref.ref(o) for o in (xm, xm[0], xm[0].cells, xm[3].weight, report,
                                             xm.crossbar_program)]
            del xm, report
            assert [r() is None for r in refs] == [True] * len(refs), fields
    finally:
        gc.enable()


SWEEP = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    import crossbar_torch as xb

    def peak_gib():  # the high-water mark of the resident set since the process started
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20

    keep = sys.argv[1] == "keep"
    torch.manual_seed(0)
    # big enough that three kept models show (cells and stuck flags are packed since issue 19)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)]).eval()
    kept, peaks = [], []
    for seed in range(4):  # four configurations: the same stucking, other stuck cells
        cfg = xb.CrossbarConfig(sort="value", filter_order="chain", stuck_slices=2,
                                reprogram_fraction=0.25, seed=seed)
        xm = xb.convert(model, cfg)
        report = xb.reprogram_report(xm)
        with torch.no_grad():
            xm(torch.randn(8, 2048))
        if keep:  # what a leak would do: the control that shows the measure can fail
            kept.append(xm)
        del xm, report
        peaks.append(peak_gib())
    print(json.dumps(peaks))
""")


def _sweep_peaks(mode):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SWEEP, mode], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_four_configurations_in_one_process_hold_the_peak_of_one():
    """Peak RSS (VmHWM: the whole process, every allocator included) after converting,
    reporting and running four configurations one after the other, against after the first
    (the ratio the issue asks for, <= 1.2). The same loop keeping every converted model alive
    must exceed it, or the model would be too small for the measure to see anything."""
    peaks = _sweep_peaks("drop")
    assert peaks[-1] / peaks[0] <= 1.2, peaks
    leaked = _sweep_peaks("keep")
    assert leaked[-1] / leaked[0] > 1.2, leaked


def test_the_free_heap_is_returned_once_enough_was_said_freed(monkeypatch):
    """heap.release_free_memory trims after TRIM_AFTER_BYTES said freed, not on every call
    (a trim walks the heap), and is a no-op where there is no malloc_trim."""
    from crossbar_torch import heap
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append(1) or (lambda pad: 0))
    monkeypatch.setattr(heap, "_freed", [0])
    step = heap.TRIM_AFTER_BYTES // 4
    for _ in range(3):
        heap.release_free_memory(step)
    assert calls == []
    heap.release_free_memory(step)
    assert calls == [1]
    heap.release_free_memory(step)
    assert calls == [1]  # counting starts again
    heap.release_free_memory()  # no size: now
    assert calls == [1, 1]
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)  # no glibc
    heap.release_free_memory()
