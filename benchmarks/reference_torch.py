"""The reference one-shot procedure in PyTorch, as a same-machine timing peer for oneshot.py.

Written from the algorithms of locuslab/wanda and IST-DASLab/sparsegpt (not their
code): layer by layer, one calibration sample at a time (batch 1, as the
reference runs), forward hooks on every linear layer of the block, a first pass
for statistics, pruning, then a second pass of the pruned layer for the next
layer's input. Wanda keeps a running mean of squared input norms per feature and
prunes the first int(in * s) of a stable ascending sort per output row (N:M:
the N smallest of each group of M); SparseGPT accumulates H = 2/n sum x x^T and
runs the blocked OBS solver. Magnitude needs no calibration: per weight matrix, the
threshold is the int(numel * s)-th entry of a sort of |W| (N:M: the N largest |W| of each
group of M). Returns the pruned `transformers` model.
"""

from __future__ import annotations

import math

import torch


def _layer_inputs(model, calib):
    with torch.no_grad():
        x = model.model.embed_tokens(calib)
    pos = torch.arange(calib.shape[1])[None]
    emb = model.model.rotary_emb(x, pos)
    return [x[i:i + 1] for i in range(len(x))], emb, pos


def _run(layer, inps, emb, pos):
    with torch.no_grad():
        return [layer(h, position_embeddings=emb, position_ids=pos)[0].reshape(h.shape) for h in inps]


def _linears(layer):
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _wanda_mask(W, norms, sparsity, nm):
    metric = W.abs() * norms.sqrt()[None, :]
    prune = torch.zeros_like(W, dtype=torch.bool)
    if nm:
        n, m = nm
        for g in range(0, W.shape[1], m):
            idx = torch.topk(metric[:, g:g + m], m - n, dim=1, largest=False)[1]
            prune.scatter_(1, g + idx, True)
    else:
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, :int(W.shape[1] * sparsity)]
        prune.scatter_(1, idx, True)
    return prune


def _sparsegpt(W, H, sparsity, nm, blocksize=128, percdamp=0.01):
    W = W.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if nm is None:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / torch.diag(Hinv1)[i:i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def _magnitude_mask(W, sparsity, nm):
    metric = W.abs()
    if nm:
        return _wanda_mask(W, torch.ones(W.shape[1], dtype=W.dtype), sparsity, nm)
    thresh = torch.sort(metric.flatten())[0][int(W.numel() * sparsity)]
    return metric <= thresh


def prune(model, calib, method: str, sparsity: float = 0.5, nm=None):
    """Prune `model` (a transformers Llama) in place; `calib` int64 [n, seqlen] (unused by magnitude)."""
    if method == "magnitude":
        with torch.no_grad():
            for layer in model.model.layers:
                for m in _linears(layer).values():
                    m.weight[_magnitude_mask(m.weight, sparsity, nm)] = 0
        return model
    inps, emb, pos = _layer_inputs(model, calib)
    for layer in model.model.layers:
        lin = _linears(layer)
        state = {n: {"n": 0, "stat": None} for n in lin}

        def hook(name):
            def add(mod, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                s, k = state[name], x.shape[0]
                if method == "wanda":
                    new = torch.norm(x, p=2, dim=0) ** 2
                    s["stat"] = new / (s["n"] + k) if s["stat"] is None else s["stat"] * s["n"] / (s["n"] + k) + new / (s["n"] + k)
                else:
                    x = math.sqrt(2 / (s["n"] + k)) * x
                    prev = 0 if s["stat"] is None else s["stat"] * s["n"] / (s["n"] + k)
                    s["stat"] = prev + x.T @ x
                s["n"] += k
            return add

        handles = [m.register_forward_hook(hook(n)) for n, m in lin.items()]
        _run(layer, inps, emb, pos)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, m in lin.items():
                if method == "wanda":
                    m.weight[_wanda_mask(m.weight, state[n]["stat"], sparsity, nm)] = 0
                else:
                    m.weight.copy_(_sparsegpt(m.weight.data, state[n]["stat"], sparsity, nm))
        inps = _run(layer, inps, emb, pos)
    return model
