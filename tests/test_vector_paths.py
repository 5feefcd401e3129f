"""The rule-21 and rule-24 CPU kernels' instruction-set paths (csrc/cpu/vector_isa.h): scalar,
AVX2 and AVX-512 (with the POPCNT instruction) must each give the reference's integers exactly.

The kernels run the widest path the CPU has; ``CROSSBAR_TORCH_CPU_VECTOR`` caps it (read on
every call). A path the CPU lacks falls back to the widest it has, so on such a machine a case
checks that path again. The shapes cross every blocking boundary of the kernels: inputs past a
32-column block, a 64-column trail piece, a 16-column AVX-512 tile and a 256 x 512 panel
(rule 21's trail read from tiles of U packed once per call, or, with
``CROSSBAR_TORCH_TRAIL_TILES=0`` as for layers too wide for them, copied as it goes);
filter counts that are not multiples of the 8, 4 or 2 filters the wide kernels take at once;
groups; chains of write-aware filters; filter weights.
"""
from __future__ import annotations

import pytest
import torch

from crossbar_torch import ops
from crossbar_torch.ops import feedback_reference as reference

from test_feedback import _case as _quantize_case
from test_feedback import _chains
from test_refine import _case as _refine_case

ENV = "CROSSBAR_TORCH_CPU_VECTOR"
TILES = "CROSSBAR_TORCH_TRAIL_TILES"  # "0": rule 21's kernel copies U's tiles as it goes
PATHS = ("scalar", "avx2", "avx512")


def _sort_index(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(k, generator=g) for _ in range(n)])


def _weights(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 2).clamp(1e-12, 1e12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out, k, groups", [(7, 33, 1), (19, 100, 1), (5, 161, 2), (11, 1, 1)])
def test_rule_21_paths_agree_with_the_reference(path, out, k, groups, monkeypatch):
    """Rule 21 alone: blocks of up to 32 filters through the trail, held cells."""
    bits, b, enc, L = 6, 1, 0, 1
    t, u, held, levels = _quantize_case(out, k, groups, bits, b, enc, L, out * k)
    want = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L)
    monkeypatch.setenv(ENV, path)
    for tiles in ("1", "0"):  # U's trail tiles packed once per call, or copied as it goes
        monkeypatch.setenv(TILES, tiles)
        assert torch.equal(ops.feedback_quantize(t, u, held, levels, bits, b, enc, L), want)


@pytest.mark.parametrize("out, k, groups, link, weighted, held_p, penalty", [
    (9, 100, 1, 0.9, False, 0.3, 2.0),  # a few long chains: one to five filters through a tile
    (19, 40, 1, 0.0, True, 0.0, 2.0),   # every filter its own chain, 19 in step, weighted
    (4, 72, 2, 0.6, True, 0.0, 2.0),    # chains that change group on the way
    (9, 90, 1, 0.9, False, 0.0, 0.1),   # windows of a few values (the scalar search)
    (9, 90, 1, 0.9, False, 0.0, 12.0),  # windows of 20 to 32 values (priced at once)
    (9, 90, 1, 0.9, False, 0.0, 40.0),  # windows past 32 values (the scalar search again)
])
def test_rule_23_paths_agree_with_the_reference(out, k, groups, link, weighted, held_p,
                                                penalty, monkeypatch):
    """Write-aware feedback: chains in step, held cells (rule 13's candidates) or none (the
    packed cell codes, a weight's window of values searched nearest first or, on the AVX-512
    path, priced at once: penalties that give windows of each kind); the reference once, then
    every path."""
    bits, b, enc = 8, 1, 0
    L = 1 if held_p else 0
    t, u, held, levels = _quantize_case(out, k, groups, bits, b, enc, L, k + out, held_p=held_p)
    n = out * groups
    pred, index = _chains(n, k, link), _sort_index(n, k, k)
    fw = _weights(n, out) if weighted else None
    want = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty,
                                       fw)
    for path in PATHS:
        for tiles in ("1", "0"):
            monkeypatch.setenv(ENV, path)
            monkeypatch.setenv(TILES, tiles)
            got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index,
                                        penalty, fw)
            assert torch.equal(got, want), (path, tiles)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out, k, groups, weighted", [
    (13, 300, 1, False),  # columns past the last 16-column tile, rows across panels
    (11, 530, 2, True),   # past a 512-column panel, groups, filters past the last 8
    (3, 40, 1, True),     # fewer filters than one AVX-512 set
])
def test_rule_24_paths_agree_with_the_reference(path, out, k, groups, weighted, monkeypatch):
    t, hs, q, _, index = _refine_case(out, k, groups, 8, out + k)
    n = out * groups
    pred = _chains(n, k, p=0.8)
    fw = _weights(n, k) if weighted else None
    monkeypatch.setenv(ENV, path)
    for penalty, sweeps in ((0.0, 1), (1.5, 3)):
        want = reference.feedback_refine(t, hs, q, pred, index, 8, 1, 0, penalty, sweeps, fw)
        got = ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, penalty, sweeps, fw)
        assert torch.equal(got, want)
        assert int((got != q).sum()) > 0  # the case exercises moves


def test_every_path_gives_the_same_integers_on_a_wide_layer(monkeypatch):
    """One ViT-sized row length (768 inputs, 24 filters in chains), every path: the same
    integers from rule 23 and from rule 24 (the reference would take minutes here)."""
    out, k = 24, 768
    t, u, held, levels = _quantize_case(out, k, 1, 8, 1, 0, 0, 5, held_p=0.0)
    pred, index = _chains(out, 6, p=0.9), _sort_index(out, k, 7)
    fw = _weights(out, 8)
    _, hs, _, _, _ = _refine_case(1, k, 1, 8, 9)
    results = []
    for path in PATHS:
        monkeypatch.setenv(ENV, path)
        q = ops.feedback_quantize(t, u, held, levels, 8, 1, 0, 0, pred, index, 3.0, fw)
        results.append((q, ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 3.0, 2, fw)))
    for q, r in results[1:]:
        assert torch.equal(q, results[0][0]) and torch.equal(r, results[0][1])
    assert int((results[0][1] != results[0][0]).sum()) > 0
