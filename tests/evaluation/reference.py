"""Slow, obvious implementations that the fast metrics are checked against."""

from __future__ import annotations

import numpy as np


def reference_retrieval(embeddings, labels, ks, query_mask=None, groups=None):
    """Loop over queries, sort every reference by (distance, index), read the metrics off the list."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    queries = range(n) if query_mask is None else np.flatnonzero(query_mask)
    recalls = {k: [] for k in ks}
    p_at_1, r_prec, map_r = [], [], []
    excluded = 0
    for q in queries:
        refs = [r for r in range(n) if r != q and (query_mask is None or not query_mask[r])]
        if groups is not None:
            refs = [r for r in refs if groups[r] != groups[q]]
        refs = np.array(refs, dtype=np.int64)
        dist = ((x[refs] - x[q]) ** 2).sum(1)
        ranked = refs[np.argsort(dist, kind="stable")]
        relevant = labels[ranked] == labels[q]
        big_r = int(relevant.sum())
        if big_r == 0:
            excluded += 1
            continue
        for k in ks:
            recalls[k].append(bool(relevant[:k].any()))
        p_at_1.append(float(relevant[0]))
        r_prec.append(relevant[:big_r].sum() / big_r)
        hits = np.cumsum(relevant[:big_r])
        precision_at_i = hits / np.arange(1, big_r + 1)
        map_r.append((precision_at_i * relevant[:big_r]).sum() / big_r)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()}
    out.update({"precision@1": float(np.mean(p_at_1)), "r_precision": float(np.mean(r_prec)), "map@r": float(np.mean(map_r))})
    out["num_queries"] = len(p_at_1)
    out["num_excluded_queries"] = excluded
    return out


def reference_nmi(labels_true, labels_pred):
    """NMI (arithmetic mean) from its definition, with Python loops over the contingency table."""
    n = len(labels_true)
    classes, clusters = sorted(set(labels_true)), sorted(set(labels_pred))
    def entropy(values):
        counts = [sum(1 for v in labels_true if v == c) if values is labels_true else sum(1 for v in labels_pred if v == c) for c in (classes if values is labels_true else clusters)]
        return -sum(c / n * np.log(c / n) for c in counts if c)
    mutual = 0.0
    for c in classes:
        for k in clusters:
            joint = sum(1 for a, b in zip(labels_true, labels_pred) if a == c and b == k)
            if joint:
                pc = sum(1 for a in labels_true if a == c) / n
                pk = sum(1 for b in labels_pred if b == k) / n
                mutual += joint / n * np.log(joint / n / (pc * pk))
    h_true, h_pred = entropy(labels_true), entropy(labels_pred)
    return mutual / ((h_true + h_pred) / 2) if h_true + h_pred > 0 else 1.0
