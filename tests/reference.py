"""Plain, loop-based float64 reference for the Reformer attention kinds.

Written position by position from the specification only (not from the
library code), so that it can be checked line by line:

* ``ref_hash``            -- angular LSH bucket ids, with round offsets
* ``ref_lsh_attention``   -- shared-QK LSH attention over sorted chunks
* ``ref_full_attention``  -- shared-QK full attention
* ``ref_local_attention`` -- chunked local attention with separate q, k, v

Everything loops over batch, head, round, query position and key; no
vectorised tricks.  All arithmetic is done in float64.
"""

import math

import numpy as np

MASK_VALUE = -1e9  # causal / padding mask (replaces the logit)
SELF_VALUE = -1e5  # key at the query's own position (replaces the logit)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def _factors(num_buckets):
    """Return the list of bucket factors: [nb] for an int, list(tuple) else."""
    if isinstance(num_buckets, (tuple, list)):
        return [int(f) for f in num_buckets]
    return [int(num_buckets)]


def _first_argmax(values):
    """Index of the largest value; the first such index wins on ties."""
    best = 0
    for idx in range(1, len(values)):
        if values[idx] > values[best]:
            best = idx
    return best


def _logsumexp(logits):
    m = max(logits)
    total = 0.0
    for x in logits:
        total += math.exp(x - m)
    return m + math.log(total)


def _softmax_weighted_sum(logits, vectors):
    """Return (logsumexp(logits), sum_k softmax(logits)_k * vectors[k]).

    The softmax is exp(l - max) / sum(exp(l - max)): forming exp(l - logsumexp) instead
    would lose ulp(|logit|) of precision, ~1e-7 at the -1e9 mask value even in float64.
    """
    m = max(logits)
    weights = [math.exp(logit - m) for logit in logits]
    total = sum(weights)
    out = np.zeros(len(vectors[0]), dtype=np.float64)
    for w, vec in zip(weights, vectors):
        out += (w / total) * vec
    return m + math.log(total), out


def _key_norm(vec):
    """knorm = x / sqrt(mean(x**2) + 1e-6) / sqrt(D)."""
    d = len(vec)
    mean_sq = 0.0
    for a in vec:
        mean_sq += float(a) * float(a)
    mean_sq /= d
    return vec / math.sqrt(mean_sq + 1e-6) / math.sqrt(d)


def _dot(a, b):
    total = 0.0
    for x, y in zip(a, b):
        total += float(x) * float(y)
    return total


def _check_keep(keep, batch, length):
    if keep is None:
        return None
    keep = np.asarray(keep, dtype=bool)
    assert keep.shape == (batch, length), keep.shape
    return keep


# ---------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------

def ref_hash(x, rotations, num_buckets, keep=None):
    """Bucket ids with round offsets, shape (batch, heads, num_hashes, length).

    For head h, round r, position t: y = x[b,h,t,:] @ R[h,:,r,:].
    Int num_buckets: bucket = argmax([y, -y]).
    Tuple of factors (b1, b2, ...): factor k uses the next b_k/2 entries of
    y, a_k = argmax([y_k, -y_k]); bucket = a1 + b1*a2 + b1*b2*a3 + ...
    N = product of factors.  With a mask, padded positions get bucket N and
    P = N + 1, else P = N.  Round r adds r*P.
    """
    x = np.asarray(x, dtype=np.float64)
    rotations = np.asarray(rotations, dtype=np.float64)
    batch, heads, length, dim = x.shape
    r_heads, r_dim, num_hashes, half = rotations.shape
    assert r_heads == heads and r_dim == dim
    factors = _factors(num_buckets)
    for f in factors:
        assert f % 2 == 0, "bucket factors must be even"
    assert sum(factors) == 2 * half, (factors, half)
    total_buckets = 1
    for f in factors:
        total_buckets *= f
    keep = _check_keep(keep, batch, length)
    per_round = total_buckets + 1 if keep is not None else total_buckets

    out = np.zeros((batch, heads, num_hashes, length), dtype=np.int64)
    for b in range(batch):
        for h in range(heads):
            for r in range(num_hashes):
                for t in range(length):
                    if keep is not None and not keep[b, t]:
                        bucket = total_buckets
                    else:
                        # y_e = sum_d x[d] * R[h, d, r, e]
                        y = []
                        for e in range(half):
                            acc = 0.0
                            for d in range(dim):
                                acc += x[b, h, t, d] * rotations[h, d, r, e]
                            y.append(acc)
                        bucket = 0
                        stride = 1
                        start = 0
                        for f in factors:
                            part = y[start:start + f // 2]
                            start += f // 2
                            a = _first_argmax(part + [-p for p in part])
                            bucket += stride * a
                            stride *= f
                    out[b, h, r, t] = bucket + r * per_round
    return out


# ---------------------------------------------------------------------------
# full (shared-QK) attention
# ---------------------------------------------------------------------------

def ref_full_attention(qk, v, causal=False, keep=None):
    """Shared-QK full attention; keys are the normalised qk vectors."""
    qk = np.asarray(qk, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, heads, length, dim = qk.shape
    keep = _check_keep(keep, batch, length)
    out = np.zeros(v.shape, dtype=np.float64)
    for b in range(batch):
        for h in range(heads):
            knorm = [_key_norm(qk[b, h, j]) for j in range(length)]
            for i in range(length):
                logits = []
                values = []
                for j in range(length):
                    logit = _dot(qk[b, h, i], knorm[j])
                    if causal and j > i:
                        logit = MASK_VALUE
                    if keep is not None and not keep[b, j]:
                        logit = MASK_VALUE
                    if j == i:
                        logit = SELF_VALUE
                    logits.append(logit)
                    values.append(v[b, h, j])
                _, out[b, h, i] = _softmax_weighted_sum(logits, values)
    return out


# ---------------------------------------------------------------------------
# LSH attention
# ---------------------------------------------------------------------------

def ref_lsh_attention(qk, v, rotations, num_buckets, chunk_length,
                      num_chunks_before=1, num_chunks_after=0, causal=False,
                      keep=None, duplicate_correction=False):
    """Shared-QK LSH attention, following the specification item by item."""
    qk = np.asarray(qk, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, heads, length, dim = qk.shape
    keep = _check_keep(keep, batch, length)

    if length <= chunk_length:
        return ref_full_attention(qk, v, causal=causal, keep=keep)

    assert length % chunk_length == 0
    num_hashes = np.asarray(rotations).shape[2]
    buckets = ref_hash(qk, rotations, num_buckets, keep=keep)
    num_slots = num_hashes * length
    num_chunks = num_slots // chunk_length
    assert num_chunks * chunk_length == num_slots

    out = np.zeros(v.shape, dtype=np.float64)
    for b in range(batch):
        for h in range(heads):
            knorm = [_key_norm(qk[b, h, j]) for j in range(length)]

            # 1. sorted slots: items (r, t) ordered by bucket*L + t
            items = []
            for r in range(num_hashes):
                for t in range(length):
                    key = int(buckets[b, h, r, t]) * length + t
                    items.append((key, r, t))
            items.sort()
            slots = [(r, t) for (_, r, t) in items]

            # 2. the window (list of (r', j) items) of every slot
            def window_of(slot_index):
                c = slot_index // chunk_length
                window = []
                for offset in range(-num_chunks_before, num_chunks_after + 1):
                    cc = (c + offset) % num_chunks
                    for s2 in range(cc * chunk_length, (cc + 1) * chunk_length):
                        window.append(slots[s2])
                return window

            windows = [window_of(s) for s in range(num_slots)]

            # 3. duplicate counts M[i][j]: occurrences of position j among
            #    the window items of all slots of query position i
            counts = [dict() for _ in range(length)]
            for s in range(num_slots):
                _, i = slots[s]
                for (_, j) in windows[s]:
                    counts[i][j] = counts[i].get(j, 0) + 1

            # 4. per-slot logsumexp z and output o
            slot_z = {}  # (r, i) -> z
            slot_o = {}  # (r, i) -> o
            for s in range(num_slots):
                r, i = slots[s]
                logits = []
                values = []
                for (_, j) in windows[s]:
                    logit = _dot(qk[b, h, i], knorm[j])
                    if duplicate_correction and num_hashes > 1:
                        logit -= math.log(counts[i][j])
                    if causal and j > i:
                        logit = MASK_VALUE
                    if keep is not None and not keep[b, j]:
                        logit = MASK_VALUE
                    if j == i:
                        logit = SELF_VALUE
                    logits.append(logit)
                    values.append(v[b, h, j])
                z, o = _softmax_weighted_sum(logits, values)
                slot_z[(r, i)] = z
                slot_o[(r, i)] = o

            # 5. combine the rounds of every position: softmax over z_r
            for i in range(length):
                zs = [slot_z[(r, i)] for r in range(num_hashes)]
                os_ = [slot_o[(r, i)] for r in range(num_hashes)]
                _, out[b, h, i] = _softmax_weighted_sum(zs, os_)
    return out


# ---------------------------------------------------------------------------
# local attention
# ---------------------------------------------------------------------------

def ref_local_attention(q, k, v, chunk_length, num_chunks_before=1,
                        num_chunks_after=0, causal=False, keep=None):
    """Chunked local attention with separate q, k, v (no self mask)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, heads, length, dim = q.shape
    keep = _check_keep(keep, batch, length)
    scale = 1.0 / math.sqrt(dim)

    def keys_seen_by(i):
        if length <= chunk_length:
            return list(range(length))
        assert length % chunk_length == 0
        num_chunks = length // chunk_length
        c = i // chunk_length
        keys = []
        for offset in range(-num_chunks_before, num_chunks_after + 1):
            cc = (c + offset) % num_chunks
            keys.extend(range(cc * chunk_length, (cc + 1) * chunk_length))
        return keys

    out = np.zeros(v.shape, dtype=np.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                logits = []
                values = []
                for j in keys_seen_by(i):
                    logit = _dot(q[b, h, i], k[b, h, j]) * scale
                    if causal and j > i:
                        logit = MASK_VALUE
                    if keep is not None and not keep[b, j]:
                        logit = MASK_VALUE
                    logits.append(logit)
                    values.append(v[b, h, j])
                _, out[b, h, i] = _softmax_weighted_sum(logits, values)
    return out
