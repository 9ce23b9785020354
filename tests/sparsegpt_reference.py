"""SparseGPT in plain numpy, transcribed from the algorithm (reference layout W [out, in])."""

import numpy as np


def sparsegpt_numpy(W, H, sparsity=0.5, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor
    mask = np.zeros_like(W, dtype=bool)  # True = pruned
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1 ** 2 / np.diag(Hinv1)[None, :] ** 2
            k = int(tmp.size * sparsity)
            order = np.argsort(tmp.ravel(), kind="stable")  # ties: the lower index is pruned
            mask1 = np.zeros(tmp.size, bool)
            mask1[order[:k]] = True
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = np.zeros_like(W1, dtype=bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i:i + prune_m] ** 2 / np.diag(Hinv1)[i:i + prune_m][None, :] ** 2
                order = np.argsort(tmp, axis=1, kind="stable")  # prune the m - n smallest
                for r in range(rows):
                    mask1[r, i + order[r, :prune_m - prune_n]] = True
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~mask
