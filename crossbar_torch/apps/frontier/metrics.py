"""What a frontier row measures, as pure functions: the weight error of a converted model, the
Pareto front, the paired top-1 drop and its interval (with the per-image record it reads,
:func:`encode_bits`), and the fidelity of sentence embeddings."""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn

from ...nn.modules import crossbar_layers
from ...quantization import quantize_with_scale

@torch.no_grad()
def weight_error(model: nn.Module) -> dict:
    """``sum |q_eff - q| / sum |q|`` over every crossbar weight of ``model``.

    ``q``: the rule-2 quantization of the layer's current weight with its (fixed) scales, the
    value programming aims for; ``q_eff``: what its cells decode to (rule 9). Returns
    ``{"weight_error", "abs_error", "abs_target", "weights"}`` (the sums are integers).
    """
    num = den = n = 0
    for _, layer in crossbar_layers(model):
        cfg = layer.config
        w = layer.matrix_weight().detach().to(torch.float32).cpu()
        q = quantize_with_scale(w, layer.scale.cpu(), cfg.weight_bits).to(torch.int64)
        q_eff = layer.effective_q().cpu().to(torch.int64)
        num += int((q_eff - q).abs().sum())
        den += int(q.abs().sum())
        n += q.numel()
    return {"weight_error": num / den if den else 0.0, "abs_error": num, "abs_target": den,
            "weights": n}


def pareto_front(points: Sequence[tuple]) -> List[int]:
    """Indices of the Pareto-optimal points ``(x, y)`` maximizing x and minimizing y, in
    increasing x. A point is dropped when another is at least as good in both and better in
    one; equal points are all kept. Points with a non-finite coordinate are left out."""
    ok = [i for i, (x, y) in enumerate(points)
          if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    front = []
    for i in ok:
        xi, yi = points[i]
        dominated = any(points[j][0] >= xi and points[j][1] <= yi
                        and (points[j][0] > xi or points[j][1] < yi) for j in ok)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))



Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


def encode_bits(bits: Sequence) -> str:
    """Per-image 0/1 flags as hexadecimal: image ``i``'s flag is bit ``3 - i % 4`` of hex
    digit ``i // 4`` (the first image is the first digit's most significant bit; the last
    digit is padded with zeros). ``"1011" + "1"`` -> ``"b8"``. :func:`decode_bits` inverts it."""
    flags = [1 if b else 0 for b in bits]
    flags += [0] * (-len(flags) % 4)
    return "".join("%x" % (flags[i] * 8 + flags[i + 1] * 4 + flags[i + 2] * 2 + flags[i + 3])
                   for i in range(0, len(flags), 4))


def decode_bits(text: str, n: int) -> List[int]:
    """The ``n`` flags :func:`encode_bits` wrote as ``text``; raises ValueError when ``text``
    is not hexadecimal of exactly ``ceil(n / 4)`` digits."""
    if len(text) != (n + 3) // 4 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise ValueError(f"top1_bits: expected {(n + 3) // 4} hex digits for {n} images, "
                         f"got {text[:20]!r}{'...' if len(text) > 20 else ''}")
    return [(int(c, 16) >> (3 - j)) & 1 for c in text for j in range(4)][:n]


def paired_top1_drop(ref: Sequence, row: Sequence, z: float = Z95) -> dict:
    """The top-1 drop of ``row`` from ``ref`` (points) with its paired confidence interval,
    from the per-image correctness of both on the same ``n`` images.

    ``lost`` = images ``ref`` gets right and ``row`` wrong, ``gained`` = the opposite (the
    discordant pairs; images both get right or both wrong say nothing about the difference).
    ``drop = 100 (lost - gained) / n``. The interval is the Bonett-Price adjusted Wald
    interval for a difference of paired proportions (Bonett & Price 2012, J. Educ. Behav.
    Stat. 37:479; recommended by Fagerland, Lydersen & Laake 2014, Stat. Methods Med. Res.):
    with ``pl = (lost + 1) / (n + 2)`` and ``pg = (gained + 1) / (n + 2)``,
    ``100 [(pl - pg) +- z sqrt((pl + pg - (pl - pg)^2) / (n + 2))]``, ``z`` = 1.96 for 95%.
    Unlike the plain normal interval of the mean paired difference it does not collapse to
    zero width when no image changes (0 lost, 0 gained on 500 images: -0.55 .. +0.55 points).
    Returns ``{"drop", "low", "high", "lost", "gained", "n"}``.
    """
    if len(ref) != len(row) or not len(ref):
        raise ValueError(f"paired_top1_drop: need the same non-zero number of images, got "
                         f"{len(ref)} and {len(row)}")
    n = len(ref)
    lost = sum(1 for a, b in zip(ref, row) if a and not b)
    gained = sum(1 for a, b in zip(ref, row) if b and not a)
    pl, pg = (lost + 1) / (n + 2), (gained + 1) / (n + 2)
    half = z * math.sqrt((pl + pg - (pl - pg) ** 2) / (n + 2))
    return {"drop": 100.0 * (lost - gained) / n, "low": 100.0 * (pl - pg - half),
            "high": 100.0 * (pl - pg + half), "lost": lost, "gained": gained, "n": n}



@torch.no_grad()
def embedding_fidelity(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    """How well sentence embeddings ``emb`` (n, d) keep the float ones ``ref`` (n, d), in
    double precision:

    * ``cosine_mean`` / ``cosine_min``: cosine similarity of each sentence's two embeddings;
    * ``nn_agreement`` (percent) / ``nn_agreement_count``: the sentences whose nearest other
      sentence (largest cosine similarity, itself excluded) is the same under ``emb`` as under
      ``ref``; a tie goes to the lowest index, under both. Needs n >= 2.
    """
    if ref.shape != emb.shape or ref.dim() != 2:
        raise ValueError(f"embedding_fidelity: shapes {tuple(ref.shape)} and "
                         f"{tuple(emb.shape)} must be equal (n, d)")
    n = ref.shape[0]
    if n < 2:
        raise ValueError(f"embedding_fidelity: nearest neighbours need 2 sentences, got {n}")
    cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=-1)
    r = torch.nn.functional.normalize(ref.double(), dim=-1)
    e = torch.nn.functional.normalize(emb.double(), dim=-1)

    def nearest(x):
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(-1)  # the first maximal index on ties

    agree = int((nearest(r) == nearest(e)).sum())
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "nn_agreement": 100.0 * agree / n, "nn_agreement_count": agree}


