"""An independent, deliberately naive implementation of DESIGN.md's Semantics, written from the
rules (python ints and lists, one cell at a time), shared by no code with the package. The
tests hold crossbar_torch's numbers to it exactly. Only the stuck-mask draw is shared by
definition (the package documents it: numpy default_rng([seed, crossbar]).random((rows, cols))
compared with reprogram_fraction), since rule 7 leaves the random generator open.
"""
import math

import numpy as np


def quantize_rows(w, bits, per_channel=True):
    """w: numpy float array (out, K). Rule 2 in float32."""
    w = np.asarray(w, dtype=np.float32)
    qmax = 2 ** (bits - 1) - 1
    out = []
    scales = []
    tensor_amax = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    for row in w:
        amax = np.float32(np.abs(row).max()) if row.size else np.float32(0)
        if not per_channel:
            amax = tensor_amax
        s = np.float32(1.0) if amax == 0 else np.float32(amax / np.float32(qmax))
        q = [int(min(qmax, max(-qmax, np.round(np.float32(x / s))))) for x in row]  # half-even
        out.append(q)
        scales.append(s)
    return out, scales


def slices(bits, b, encoding):
    m = bits - 1 if encoding == "differential" else bits
    return math.ceil(m / b)


def encode_one(q, bits, b, encoding):
    S = slices(bits, b, encoding)
    mask = (1 << b) - 1
    if encoding == "differential":
        pos, neg = max(q, 0), max(-q, 0)
        return [(pos >> (i * b)) & mask for i in range(S)] + [(neg >> (i * b)) & mask for i in range(S)]
    word = q % (1 << bits) if encoding == "twos_complement" else q + 2 ** (bits - 1) - 1
    return [(word >> (i * b)) & mask for i in range(S)]


def decode_one(cells, bits, b, encoding):
    S = slices(bits, b, encoding)
    if encoding == "differential":
        pos = sum(cells[i] << (i * b) for i in range(S))
        neg = sum(cells[S + i] << (i * b) for i in range(S))
        return pos - neg
    word = sum(cells[i] << (i * b) for i in range(S))
    if encoding == "twos_complement":
        value = 0
        for bit in range(bits):
            if (word >> bit) & 1:
                value += -(2 ** bit) if bit == bits - 1 else 2 ** bit
        return value
    return word - (2 ** (bits - 1) - 1)


def sort_row(q, key):
    idx = list(range(len(q)))
    if key == "none":
        return idx
    k = (lambda i: -abs(q[i])) if key == "magnitude" else (lambda i: -q[i])
    return sorted(idx, key=lambda i: (k(i), i))


def stuck_of(cfg, crossbar):
    """Stuck cells of one crossbar, as a set of (row, col)."""
    b, bits, enc = cfg["bits_per_cell"], cfg["weight_bits"], cfg["encoding"]
    S = slices(bits, b, enc)
    c = 2 * S if enc == "differential" else S
    L, p = cfg["stuck_slices"], cfg["reprogram_fraction"]
    if L == 0 or p >= 1.0:
        return set()
    u = np.random.default_rng([cfg["seed"], crossbar]).random((cfg["rows"], cfg["cols"]))
    F = cfg["cols"] // c
    out = set()
    for r in range(cfg["rows"]):
        for col in range(F * c):
            if (col % c) % S < L and u[r, col] >= p:
                out.add((r, col))
    return out


def simulate(layers, cfg):
    """layers: list of (name, float weight matrix (out, K)); cfg: dict of CrossbarConfig fields.
    Returns counts per rule 8 and effective integer weights per rule 9 (original order)."""
    bits, b, enc = cfg["weight_bits"], cfg["bits_per_cell"], cfg["encoding"]
    S = slices(bits, b, enc)
    c = 2 * S if enc == "differential" else S
    rows, cols, pool = cfg["rows"], cfg["cols"], cfg["pool"]
    F = cols // c
    sv = cfg["stuck_value"]
    stuck = [stuck_of(cfg, x) for x in range(pool)]
    level = [[[0] * cols for _ in range(rows)] for _ in range(pool)]
    if sv == 1:
        for x in range(pool):
            for (r, col) in stuck[x]:
                level[x][r][col] = 1
    written = [set() for _ in range(pool)]
    prepared = []
    for name, w in layers:
        q, s = quantize_rows(w, bits, cfg["quant"] == "per_channel")
        idx = [sort_row(row, cfg["sort"]) for row in q]
        prepared.append((name, q, s, idx))

    def one_pass(count_cells):
        t = 0
        stats = {"writes": 0, "sets": 0, "resets": 0, "pulses": 0, "rows": 0,
                 "per_slice": [0] * S, "layers": [], "eff": []}
        cell_w = {}
        for name, q, s, idx in prepared:
            out, K = len(q), len(q[0]) if q else 0
            lw = 0
            eff = [[None] * K for _ in range(out)]
            for sec in range(math.ceil(K / rows) if K else 0):
                for blk in range(math.ceil(out / F) if out else 0):
                    x = t % pool
                    t += 1
                    row_written = set()
                    for o in range(blk * F, min(out, (blk + 1) * F)):
                        for kp in range(sec * rows, min(K, (sec + 1) * rows)):
                            r = kp - sec * rows
                            cells = encode_one(q[o][idx[o][kp]], bits, b, enc)
                            held = []
                            for i in range(c):
                                col = (o % F) * c + i
                                old = level[x][r][col]
                                new = cells[i]
                                if (r, col) in stuck[x]:
                                    if sv == "initial" and (r, col) not in written[x]:
                                        pass
                                    else:
                                        new = old
                                written[x].add((r, col))
                                if new != old:
                                    stats["writes"] += 1
                                    lw += 1
                                    stats["sets" if new > old else "resets"] += 1
                                    stats["pulses"] += abs(new - old)
                                    stats["per_slice"][i % S] += 1
                                    row_written.add(r)
                                    cell_w[(x, r, col)] = cell_w.get((x, r, col), 0) + 1
                                level[x][r][col] = new
                                held.append(new)
                            eff[o][idx[o][kp]] = decode_one(held, bits, b, enc)
                    stats["rows"] += len(row_written)
            stats["layers"].append((name, lw))
            stats["eff"].append(eff)
        stats["max_cell"] = max(cell_w.values()) if cell_w else 0
        stats["tiles"] = t
        return stats

    first = one_pass(False)
    second = one_pass(True)
    return {"tiles": first["tiles"], "initial_writes": first["writes"],
            "writes_per_pass": second["writes"], "set_writes_per_pass": second["sets"],
            "reset_writes_per_pass": second["resets"], "pulses_per_pass": second["pulses"],
            "rows_programmed_per_pass": second["rows"], "per_slice": second["per_slice"],
            "layers": second["layers"], "max_cell_writes_per_pass": second["max_cell"],
            "q_eff": second["eff"], "scales": [p[2] for p in prepared]}
