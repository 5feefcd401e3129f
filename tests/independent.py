"""An independent, deliberately naive implementation of docs/semantics.md (rules 1 to 13),
written from the rules (python ints and lists, one cell at a time), sharing no code with the
package. The tests hold crossbar_torch's numbers to it exactly. Only what the rules leave open
is taken from the project's documented choices (docs/semantics.md):

* the stuck-mask draw: numpy default_rng([seed, crossbar]).random((rows, cols)) >= p;
* decoding a level the encoding never writes (a compensated top cell of a partial slice):
  every cell adds level * 2**(i*b) (the shift-and-add); two's complement then subtracts
  2**B times bit B-1 of that sum (the top bit weighs -2**(B-1));
* rule 13 compensates the weights that hold a cell now: stuck, and never written (0 / 1) or
  already written once ("initial"); a stuck cell under its first write is free;
* the chain placement (the project's own filter_order, beyond rule 11).
"""
import fnmatch
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
        for bit in range(word.bit_length()):
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


def placement(q, idx, cfg, F):
    """Rule 11: blocks[j][f] = the filter in slot f of column block j, or None (unused)."""
    out = len(q)
    nb = math.ceil(out / F) if out else 0
    blocks = [[None] * F for _ in range(nb)]
    order_kind = cfg.get("filter_order", "natural")
    if order_kind == "natural":
        for o in range(out):
            blocks[o // F][o % F] = o
        return blocks
    if order_kind == "profile":
        ranking = sorted(range(out), key=lambda o: (-sum(abs(v) for v in q[o]), o))
    else:  # chain: nearest neighbour over the bits of the encoded sorted rows
        bits, b, enc = cfg["weight_bits"], cfg["bits_per_cell"], cfg["encoding"]
        vec = []
        for o in range(out):
            v = []
            for kp in range(len(q[o])):
                for level in encode_one(q[o][idx[o][kp]], bits, b, enc):
                    v.extend((level >> p) & 1 for p in range(b))
            vec.append(v)
        first = sorted(range(out), key=lambda o: (-sum(abs(v) for v in q[o]), o))[0]
        ranking, left = [first], set(range(out)) - {first}
        while left:
            last = vec[ranking[-1]]
            nxt = min(left, key=lambda o: (sum(a != z for a, z in zip(vec[o], last)), o))
            ranking.append(nxt)
            left.remove(nxt)
    for r, o in enumerate(ranking):
        blocks[r % nb][r // nb] = o
    return blocks


def high_values(bits, b, enc, L):
    """Rule 13: every integer h the slices >= L can hold, with those cells' levels."""
    S = slices(bits, b, enc)
    mask = (1 << b) - 1
    if L >= S:
        return [(0, {})]
    if enc == "differential":
        hb = bits - 1 - L * b
        out = []
        for h in range(-(2 ** hb - 1), 2 ** hb):
            pos, neg = max(h, 0), max(-h, 0)
            cells = {}
            for i in range(L, S):
                cells[i] = (pos >> ((i - L) * b)) & mask
                cells[S + i] = (neg >> ((i - L) * b)) & mask
            out.append((h, cells))
        return out
    hb = bits - L * b
    values = range(-(2 ** (hb - 1)), 2 ** (hb - 1)) if enc == "twos_complement" else range(2 ** hb)
    out = []
    for h in values:
        word = h % (2 ** hb)
        out.append((h, {i: (word >> ((i - L) * b)) & mask for i in range(L, S)}))
    return out


def compensated(q, old, held, bits, b, enc, L):
    """Rule 13 for one weight: old = its cells' current levels, held = the cells that keep
    them. Search every level assignment of the free cells of slices < L, the high part h
    nearest (ties even); smallest error, then fewest writes, then the smallest assignment."""
    S = slices(bits, b, enc)
    c = len(old)
    L = min(L, S)
    free = [i for i in range(c) if not held[i] and i % S < L]
    highs = high_values(bits, b, enc, L)
    unit = 2 ** (L * b)
    best = None
    for x in range(2 ** (b * len(free))):
        low = [old[i] if held[i] else 0 for i in range(c)]
        for n, i in enumerate(free):
            low[i] = (x >> (n * b)) & ((1 << b) - 1)
        for i in range(c):
            if i % S >= L:
                low[i] = 0
        d = decode_one(low, bits, b, enc)
        # h nearest to (q - d) / unit among the representable ones, ties to the even h
        h, high = min(highs, key=lambda hc: (abs(hc[0] * unit + d - q), hc[0] % 2))
        cells = list(low)
        for i, v in high.items():
            cells[i] = v
        err = abs(decode_one(cells, bits, b, enc) - q)
        writes = sum(cells[i] != old[i] for i in range(c))
        if best is None or (err, writes) < best[0]:
            best = ((err, writes), cells)
    return best[1]


def simulate(layers, cfg):
    """layers: list of (name, float weight matrix (out, K)); cfg: dict of CrossbarConfig fields.
    Returns counts per rule 8, effective integer weights per rule 9 (original order) and the
    tile order of each layer (rules 6 and 12; tile id s * n_blocks + j)."""
    bits, b, enc = cfg["weight_bits"], cfg["bits_per_cell"], cfg["encoding"]
    S = slices(bits, b, enc)
    c = 2 * S if enc == "differential" else S
    rows, cols, pool = cfg["rows"], cfg["cols"], cfg["pool"]
    F = cols // c
    sv = cfg["stuck_value"]
    L = cfg["stuck_slices"]
    greedy = cfg.get("schedule", "section_major") == "greedy"
    window = cfg.get("schedule_window", 256)
    compensate = cfg.get("compensate", False) and L > 0
    stuck = [stuck_of(cfg, x) for x in range(pool)]
    level = [[[0] * cols for _ in range(rows)] for _ in range(pool)]
    if sv == 1:
        for x in range(pool):
            for (r, col) in stuck[x]:
                level[x][r][col] = 1
    written = [set() for _ in range(pool)]
    # rule 22: each layer's own stucking and compensation (every matching pattern, in order)
    per_layer = {}
    for name, _ in layers:
        lc = dict(cfg)
        for pattern, changes in (cfg.get("layer_overrides") or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                lc.update(changes)
        per_layer[name] = ([stuck_of(lc, x) for x in range(pool)],
                           lc.get("compensate", False) and lc["stuck_slices"] > 0,
                           lc["stuck_slices"])
    prepared = []
    for name, w in layers:
        q, s = quantize_rows(w, bits, cfg["quant"] == "per_channel")
        idx = [sort_row(row, cfg["sort"]) for row in q]
        prepared.append((name, q, s, idx, placement(q, idx, cfg, F)))
    orders = {}

    last_write = [dict() for _ in range(pool)]  # (r, col) -> pass of the cell's last write
    cell_noise = {}  # (layer, o, original k, i) -> (eps_p, nu) of pass 1 (rule 19)

    normals = {}

    def normal(x, *tag):
        if (x, *tag) not in normals:
            normals[(x, *tag)] = np.random.default_rng([cfg.get("seed", 0), x, *tag]) \
                .standard_normal((rows, cols))
        return normals[(x, *tag)]

    def one_pass(count_cells, offset=(0, 0), pass_no=0):
        """One pass; ``offset`` (rule 14) moves logical cell (r, col) of every tile to physical
        cell ((r + a) mod rows, (col + b) mod cols)."""
        t = 0
        stats = {"writes": 0, "sets": 0, "resets": 0, "pulses": 0, "set_pulses": 0, "rows": 0,
                 "per_slice": [0] * S, "layers": [], "eff": []}
        cell_w = {}
        for name, q, s, idx, blocks in prepared:
            out, K = len(q), len(q[0]) if q else 0
            nb = len(blocks)
            ns = math.ceil(K / rows) if K and out else 0
            lw = 0
            eff = [[None] * K for _ in range(out)]

            def covered(tile):
                """(row, col, plain target level, filter, k', cell) of every covered cell."""
                sec, blk = divmod(tile, nb)
                for f, o in enumerate(blocks[blk]):
                    if o is None:
                        continue
                    for kp in range(sec * rows, min(K, (sec + 1) * rows)):
                        cells = encode_one(q[o][idx[o][kp]], bits, b, enc)
                        for i in range(c):
                            yield ((kp - sec * rows + offset[0]) % rows,
                                   (f * c + i + offset[1]) % cols, cells[i], o, kp, i)

            def program(tile, x):
                nonlocal lw
                row_written = set()
                weights = {}
                for r, col, target, o, kp, i in covered(tile):
                    weights.setdefault((o, kp), []).append((r, col, target))
                for (o, kp), cells in weights.items():
                    old = [level[x][r][col] for r, col, _ in cells]
                    lstuck, lcomp, lL = per_layer[name]
                    held = [(r, col) in lstuck[x] and (sv != "initial" or (r, col) in written[x])
                            for r, col, _ in cells]
                    if lcomp and any(held):
                        new = compensated(q[o][idx[o][kp]], old, held, bits, b, enc, lL)
                    else:
                        new = [old[i] if held[i] else cells[i][2] for i in range(c)]
                    for i, (r, col, _) in enumerate(cells):
                        written[x].add((r, col))
                        if new[i] != old[i] and count_cells:
                            lcell = layer_cells.setdefault(name, {})
                            lcell[(x, r, col)] = lcell.get((x, r, col), 0) + 1
                        if new[i] != old[i]:
                            stats["writes"] += 1
                            lw += 1
                            stats["sets" if new[i] > old[i] else "resets"] += 1
                            stats["pulses"] += abs(new[i] - old[i])
                            stats["set_pulses"] += max(new[i] - old[i], 0)
                            stats["per_slice"][i % S] += 1
                            row_written.add(r)
                            cell_w[(x, r, col)] = cell_w.get((x, r, col), 0) + 1
                        level[x][r][col] = new[i]
                        if new[i] != old[i]:
                            last_write[x][(r, col)] = pass_no
                        if pass_no == 1:
                            t_last = last_write[x].get((r, col), -1)
                            eps = 0.0 if t_last < 0 else normal(x, t_last, 1)[r, col]
                            nu = max(0.0, cfg.get("drift_nu", 0.0) + cfg.get(
                                "drift_nu_std", 0.0) * normal(x, 2)[r, col])
                            cell_noise[(name, o, idx[o][kp], i)] = (eps, nu)
                    eff[o][idx[o][kp]] = decode_one(new, bits, b, enc)
                stats["rows"] += len(row_written)

            tiles = nb * ns
            if name in orders:                       # later passes replay the first pass
                order = orders[name]
            elif not greedy:
                order = list(range(tiles))
            else:
                order, left = [], list(range(tiles))
                for p in range(tiles):
                    x = (t + p) % pool

                    def distance(tile):
                        return sum(level[x][r][col] != target
                                   for r, col, target, _, _, _ in covered(tile))

                    pick = min(left[:window], key=lambda tile: (distance(tile), tile))
                    left.remove(pick)
                    order.append(pick)
                    program(pick, x)
            if name not in orders and greedy:
                t += tiles
            else:
                for tile in order:
                    program(tile, t % pool)
                    t += 1
            orders[name] = order
            stats["layers"].append((name, lw))
            stats["eff"].append(eff)
        stats["cells"] = cell_w
        stats["tiles"] = t
        return stats

    # rule 14: the steady passes of one wear-levelling period, offsets per pass
    wl = cfg.get("wear_leveling", "none")
    period = {"none": 1, "rotate_rows": rows}.get(wl, rows * cols // math.gcd(rows, cols))

    def offset(t):
        return {"none": (0, 0), "rotate_rows": (t % rows, 0)}.get(wl, (t % rows, t % cols))

    layer_cells = {}
    first = one_pass(False)
    passes = [one_pass(True, offset(t), t) for t in range(1, period + 1)]

    def avg(v):
        return v if period == 1 else v / period

    def total(key):
        return avg(sum(p[key] for p in passes))

    cells = {}
    for p in passes:
        for cell, n in p["cells"].items():
            cells[cell] = cells.get(cell, 0) + n
    second = passes[0]
    return {"tiles": first["tiles"], "initial_writes": first["writes"],
            "writes_per_pass": total("writes"), "set_writes_per_pass": total("sets"),
            "reset_writes_per_pass": total("resets"), "pulses_per_pass": total("pulses"),
            "set_pulses_per_pass": total("set_pulses"),
            "rows_programmed_per_pass": total("rows"),
            "per_slice": [avg(sum(p["per_slice"][i] for p in passes)) for i in range(S)],
            "layers": [(name, avg(sum(dict(p["layers"])[name] for p in passes)))
                       for name, _ in second["layers"]],
            "max_cell_writes_per_pass": avg(max(cells.values())) if cells else 0,
            # per physical cell (crossbar, row, col): writes over the period (rule 15)
            "cell_period_writes": cells, "period": period,
            "layer_cell_period_writes": layer_cells, "cell_noise": cell_noise,
            "q_eff": second["eff"], "scales": [p[2] for p in prepared],
            "orders": [orders[p[0]] for p in prepared]}


# ---- rule 21: error-feedback programming ----------------------------------------------------

def allowed_values(held_levels, bits, b, enc, L):
    """Every value a weight decodes to with the cells of ``held_levels`` (level, or None for a
    free cell) held: each assignment of its free cells in slices < L, each high part of rule 13
    in the slices >= L, the whole cell list decoded; restricted to [-qmax, qmax] when any value
    lies there."""
    S = slices(bits, b, enc)
    c = len(held_levels)
    L = min(L, S)
    free = [i for i in range(c) if held_levels[i] is None and i % S < L]
    values = set()
    for x in range(2 ** (b * len(free))):
        cells = [held_levels[i] if held_levels[i] is not None and i % S < L else 0
                 for i in range(c)]
        for n, i in enumerate(free):
            cells[i] = (x >> (n * b)) & ((1 << b) - 1)
        for _, high in high_values(bits, b, enc, L):
            full = list(cells)
            for i, v in high.items():
                full[i] = v
            values.add(decode_one(full, bits, b, enc))
    qmax = 2 ** (bits - 1) - 1
    inside = {v for v in values if -qmax <= v <= qmax}
    return sorted(inside or values)


def nearest_value(t, values):
    """Rule 21: nearest t; ties to the even value, then the smaller."""
    return min(values, key=lambda v: (abs(float(v) - t), v % 2 != 0, v))


def feedback_factor(h, damp):
    """Rule 21's factor (numpy float64): U unit upper triangular and D diagonal with
    U D U^T = H + lambda I, U's strict upper triangle above D on the diagonal. Computed another
    way than the project's (which factorises the reversed matrix): the upper Cholesky factor R
    of the inverse (R^T R = (H + lambda I)^-1) has R^-1 (R^-1)^T = H + lambda I, so
    U = R^-1 diag(R) and D = diag(R)^-2."""
    h = np.array(h, dtype=np.float64)
    d = np.diag(h).copy()
    d[d == 0] = 1.0
    d = d + damp * d.mean()
    np.fill_diagonal(h, d)
    r = np.linalg.cholesky(np.linalg.inv(h)).T
    u = np.linalg.inv(r) * np.diag(r)[None, :]
    u = np.triu(u, 1)
    np.fill_diagonal(u, np.diag(r) ** -2.0)
    return u


def feedback_row(t, u, held_levels, bits, b, enc, L):
    """One filter: t (list of float64 targets), u (K x K), held_levels[k]: the weight's cells
    (level or None). Returns the chosen integers."""
    t = [float(x) for x in t]
    t0 = list(t)
    K = len(t)
    qmax = 2 ** (bits - 1) - 1
    out = []
    for k in range(K):
        cells = held_levels[k] if held_levels is not None else None
        if cells is None or all(lv is None for lv in cells):
            values = range(-qmax, qmax + 1)
        else:
            values = allowed_values(cells, bits, b, enc, L)
        v = nearest_value(t[k], values)
        out.append(v)
        e = float(v) - t0[k]  # the error against the weight's own target
        for j in range(k + 1, K):
            t[j] = t[j] - float(np.float64(e) * np.float64(u[k][j]))
    return out


# ---- rule 23: write-aware feedback -----------------------------------------------------------

def realizations(held_levels, bits, b, enc, L):
    """Every (value, cells) a weight can be programmed to: without held cells the rule-3
    encoding of each integer of [-qmax, qmax]; with them, each assignment of the free low cells
    and each high part of rule 13, restricted to [-qmax, qmax] when any value lies there. In
    increasing free-cell assignment, then increasing high part."""
    qmax = 2 ** (bits - 1) - 1
    S = slices(bits, b, enc)
    if held_levels is None or all(lv is None for lv in held_levels):
        return [(v, encode_one(v, bits, b, enc)) for v in range(-qmax, qmax + 1)]
    c = len(held_levels)
    L = min(L, S)
    free = [i for i in range(c) if held_levels[i] is None and i % S < L]
    out = []
    for x in range(2 ** (b * len(free))):
        cells = [held_levels[i] if held_levels[i] is not None and i % S < L else 0
                 for i in range(c)]
        for n, i in enumerate(free):
            cells[i] = (x >> (n * b)) & ((1 << b) - 1)
        for _, high in high_values(bits, b, enc, L):
            full = list(cells)
            for i, v in high.items():
                full[i] = v
            out.append((decode_one(full, bits, b, enc), full))
    inside = [r for r in out if -qmax <= r[0] <= qmax]
    return inside or out


def write_aware_layer(t_rows, u_groups, held_rows, bits, b, enc, L, pred, index, penalty,
                      weights=None):
    """Rule 23 for one layer: filters after their predecessors; each weight the realization
    of least (t - v)^2 + penalty * (cells not held that differ from what the predecessor chose
    at the same sorted position); ties nearer, even, smaller value, first realization. Returns
    the chosen integers per filter (original order). Rule 25: filter o pays
    ``penalty / weights[o]`` per write."""
    out = len(t_rows)
    K = len(t_rows[0]) if out else 0
    per = out // len(u_groups)
    chosen, result = {}, [None] * out
    done = set()
    while len(done) < out:
        for o in range(out):
            if o in done or (pred[o] >= 0 and pred[o] not in done):
                continue
            t = [float(x) for x in t_rows[o]]
            t0 = list(t)
            u = u_groups[o // per]
            ref = chosen.get(pred[o]) if pred[o] >= 0 else None
            lam = float(penalty) if weights is None else float(penalty) / float(weights[o])
            sorted_cells = [None] * K
            vals = []
            for k in range(K):
                p = index[o].index(k)
                hl = held_rows[o][k] if held_rows is not None else None
                best = None
                for v, cells in realizations(hl, bits, b, enc, L):
                    writes = 0
                    if ref is not None:
                        writes = sum(1 for i, lv in enumerate(cells)
                                     if (hl is None or hl[i] is None) and lv != ref[p][i])
                    e = t[k] - float(v)
                    key = (e * e + lam * float(writes), abs(e), v % 2 != 0, v)
                    if best is None or key < best[0]:
                        best = (key, v, cells)
                v = best[1]
                vals.append(v)
                sorted_cells[p] = best[2]
                e = float(v) - t0[k]
                for j in range(k + 1, K):
                    t[j] = t[j] - float(np.float64(e) * np.float64(u[k][j]))
            chosen[o] = sorted_cells
            result[o] = vals
            done.add(o)
    return result


# ---- rule 24: refinement sweeps ---------------------------------------------------------------

def refine_layer(t_rows, hs_groups, q_rows, bits, b, enc, pred, index, penalty, sweeps,
                 weights=None):
    """Rule 24 for one layer, a weight at a time: from rule 21's / 23's integers ``q_rows``,
    ``sweeps`` sweeps; each visits the filters of even chain depth, then of odd depth, sorted
    position by sorted position, and moves a weight by the delta in -3..3 of least cost
    ((2 delta) g + delta^2 Hs[k][k]) + penalty * (change of the cells differing from the
    predecessor's and the successor's at that position) when that cost is below 0 (ties: smaller
    |delta|, then negative). Returns the integers per filter (original order). Rule 25: the
    error part of filter o's cost is multiplied by ``weights[o]``."""
    out = len(q_rows)
    K = len(q_rows[0]) if out else 0
    if not out or not K:
        return [list(r) for r in q_rows]
    qmax = 2 ** (bits - 1) - 1
    per = out // len(hs_groups)
    q = [[int(v) for v in r] for r in q_rows]
    succ = [-1] * out
    for o in range(out):
        if pred[o] >= 0:
            succ[pred[o]] = o
    depth = []
    for o in range(out):
        d, x = 0, pred[o]
        while x >= 0:
            d, x = d + 1, pred[x]
        depth.append(d)
    g = []
    for o in range(out):
        hs = hs_groups[o // per]
        row = []
        for j in range(K):
            acc = 0.0
            for k in range(K):
                acc = acc + (float(q[o][k]) - float(t_rows[o][k])) * float(hs[k][j])
            row.append(acc)
        g.append(row)

    def differing(v, r, p):
        mine = encode_one(v, bits, b, enc)
        theirs = encode_one(q[r][index[r][p]], bits, b, enc)
        return sum(1 for x, y in zip(mine, theirs) if x != y)

    for _ in range(sweeps):
        for parity in (0, 1):
            for p in range(K):
                for o in range(out):
                    if depth[o] % 2 != parity:
                        continue
                    hs = hs_groups[o // per]
                    k = index[o][p]
                    c = q[o][k]
                    best = None
                    for delta in (-1, 1, -2, 2, -3, 3):
                        v = c + delta
                        if not -qmax <= v <= qmax:
                            continue
                        dw = 0
                        for r in (pred[o], succ[o]):
                            if r >= 0:
                                dw += differing(v, r, p) - differing(c, r, p)
                        err = (2.0 * delta) * g[o][k] + float(delta * delta) * float(hs[k][k])
                        if weights is not None:
                            err = float(weights[o]) * err
                        cost = err + float(penalty) * float(dw)
                        if cost < 0 and (best is None or cost < best[0]):
                            best = (cost, delta)
                    if best is not None:
                        delta = best[1]
                        q[o][k] = c + delta
                        for j in range(K):
                            g[o][j] = g[o][j] + float(delta) * float(hs[k][j])
    return q


# ---- rules 25 and 26: filter weights -----------------------------------------------------------

def filter_weights(scales, gains=None):
    """Rule 25's a[o] (``gains`` None) or rule 26's, from the float32 scales and float64 gains
    as Python floats: u = s^2 (times the gain), over the lower median of the positive u (all
    of them under rule 25), clamped into [1e-12, 1e12]; all 1 when no u is positive."""
    u = [float(s) * float(s) for s in scales]
    if gains is not None:
        u = [x * float(g) for x, g in zip(u, gains)]
    positive = sorted(x for x in u if x > 0)
    if not u:
        return []
    if not positive:
        return [1.0] * len(u)
    m = positive[(len(positive) - 1) // 2]
    return [min(max(x / m, 1e-12), 1e12) for x in u]


# ---- the packed storage of cells (docs/checkpoints.md) ------------------------------------------

def pack_by_hand(levels, b):
    """uint8 (..., c) levels -> the packed bytes (..., ceil(c / (8 // s))), s the smallest
    power of two >= b: cell j of a weight in byte j // (8 // s), bits (j % (8 // s)) * s
    upward. Flags pack as b = 1."""
    import torch
    s = 1
    while s < b:
        s *= 2
    per = 8 // s
    *lead, c = levels.shape
    width = -(-c // per)
    out = []
    for row in levels.reshape(-1, c).tolist():
        bytes_ = [0] * width
        for j, level in enumerate(row):
            bytes_[j // per] |= int(level) << ((j % per) * s)
        out.append(bytes_)
    return torch.tensor(out, dtype=torch.uint8).reshape(*lead, width)
