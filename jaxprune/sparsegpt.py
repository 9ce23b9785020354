"""SparseGPT's OBS solver (Frantar & Alistarh 2023, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot"), blocked and jit-compiled.

Follows the reference implementation step for step: H = 2/n sum X X^T in float32;
dead inputs (zero diagonal) get diagonal 1 and their weights zeroed; damping of
1% of the mean diagonal; the upper Cholesky factor of H^-1; columns (inputs) in
blocks of 128, the mask of each block chosen from w^2 / diag(Hinv)^2 (over the
whole block for unstructured sparsity, per group of M inputs for N:M, chosen when
the group is reached); the OBS error propagated within and after each block.

Blocks run in `lax.fori_loop` and columns in an inner `lax.fori_loop`, so compile
time does not grow with the width. Where the reference keeps exactly the entries
above a threshold (and so prunes extra entries on ties), we prune exactly
`int(block_size * sparsity)` per block with deterministic tie-breaking.

Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))         # kernel [in, out]
    >>> new_w, mask = prune_kernel(w, hessian(x), 0.5)
    >>> float((new_w == 0).mean())
    0.5
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .masks import keep_top


def hessian(x):
    """H = 2/n X^T X (float32) from inputs x [..., in] (n = number of tokens)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return 2.0 / x.shape[0] * (x.T @ x)


def block_counts(n_out: int, n_in: int, sparsity: float, blocksize: int = 128) -> tuple[int, int]:
    """Entries pruned in a full block and in the last block: int(rows * columns * sparsity)."""
    last = n_in - (-(-n_in // blocksize) - 1) * blocksize
    return int(n_out * blocksize * sparsity), int(n_out * last * sparsity)


def prune_kernel(kernel, H, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                 blocksize: int = 128, percdamp: float = 0.01):
    """SparseGPT on one dense kernel [in, out] with the Hessian H [in, in] of its inputs.

    Args:
      kernel: weights `[in, out]` (any float dtype; solved in float32).
      H: `hessian(inputs)` summed/averaged over calibration tokens.
      sparsity: fraction pruned (unstructured); ignored when `nm` is given.
      nm: (N, M) keeps N of every M consecutive inputs of each output.
      blocksize: columns per block (the reference's 128). For N:M, M must divide it.
      percdamp: damping as a fraction of the mean Hessian diagonal.

    Returns:
      (new_kernel [in, out] in kernel's dtype with zeros where pruned, keep-mask [in, out] bool).
    """
    k_full, k_last = block_counts(kernel.shape[1], kernel.shape[0], sparsity, blocksize)
    return solve(kernel, H, k_full, k_last, nm=nm, blocksize=blocksize, percdamp=percdamp)


@partial(jax.jit, static_argnames=("nm", "blocksize", "percdamp"))
def solve(kernel, H, k_full, k_last, nm=None, blocksize: int = 128, percdamp: float = 0.01):
    """`prune_kernel` with the per-block prune counts given (traced: one compilation for any sparsity)."""
    W = kernel.astype(jnp.float32).T  # reference layout: rows = outputs, columns = inputs
    rows, cols = W.shape
    H = H.astype(jnp.float32)
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(jnp.where(dead, 1.0, 0.0))
    W = jnp.where(dead[None, :], 0.0, W)
    damp = percdamp * jnp.mean(jnp.diag(H))
    H = H + damp * jnp.eye(cols, dtype=jnp.float32)
    L = jnp.linalg.cholesky(H)
    Hinv_full = jax.scipy.linalg.cho_solve((L, True), jnp.eye(cols, dtype=jnp.float32))
    Hinv = jnp.linalg.cholesky(Hinv_full).T  # upper factor: Hinv = U, H^-1 = U^T U

    # Pad the input axis to whole blocks; padded columns are inert (zero weight,
    # identity Hessian, never chosen for pruning).
    nblocks = -(-cols // blocksize)
    pad = nblocks * blocksize - cols
    Wp = jnp.pad(W, ((0, 0), (0, pad)))
    Hp = jnp.pad(Hinv, ((0, pad), (0, pad))) + jnp.diag(jnp.concatenate([jnp.zeros(cols), jnp.ones(pad)]))
    valid = jnp.arange(nblocks * blocksize) < cols
    mask_p = jnp.zeros_like(Wp, dtype=bool)  # True = pruned

    def block(b, carry):
        Wp, mask_p = carry
        i1 = b * blocksize
        W1 = jax.lax.dynamic_slice(Wp, (0, i1), (rows, blocksize))
        H1 = jax.lax.dynamic_slice(Hp, (i1, i1), (blocksize, blocksize))
        d1 = jnp.diag(H1)
        v1 = jax.lax.dynamic_slice(valid, (i1,), (blocksize,))
        if nm is None:
            # exact count per block (see block_counts); padded columns score +inf
            k = jnp.where(b == nblocks - 1, k_last, k_full)
            score = jnp.where(v1[None, :], W1 ** 2 / d1[None, :] ** 2, jnp.inf)
            M1 = ~keep_top(score.reshape(-1), score.size - k).reshape(W1.shape)
        else:
            M1 = jnp.zeros_like(W1, dtype=bool)

        def column(i, c):
            W1, M1, E1 = c
            if nm is not None:
                n, m = nm
                def choose(M1):
                    g = jax.lax.dynamic_slice(W1, (0, i), (rows, m)) ** 2 / \
                        jax.lax.dynamic_slice(d1, (i,), (m,))[None, :] ** 2
                    prune = ~keep_top(g, n, axis=1)
                    return jax.lax.dynamic_update_slice(M1, prune, (0, i))
                M1 = jax.lax.cond(i % m == 0, choose, lambda M: M, M1)
            w = W1[:, i]
            d = H1[i, i]
            q = jnp.where(M1[:, i], 0.0, w)
            err = (w - q) / d
            W1 = W1 - err[:, None] * H1[i, :][None, :]  # H1 upper triangular: only columns >= i move
            W1 = W1.at[:, i].set(q)
            E1 = E1.at[:, i].set(err)
            return W1, M1, E1

        W1, M1, E1 = jax.lax.fori_loop(0, blocksize, column, (W1, M1, jnp.zeros_like(W1)))
        # Propagate to every later column: rows i1:i1+B of the upper factor are zero before i1.
        Hrows = jax.lax.dynamic_slice(Hp, (i1, 0), (blocksize, Hp.shape[1]))
        later = jnp.arange(Hp.shape[1]) >= i1 + blocksize
        Wp = Wp - jnp.where(later[None, :], E1 @ Hrows, 0.0)
        Wp = jax.lax.dynamic_update_slice(Wp, W1, (0, i1))
        mask_p = jax.lax.dynamic_update_slice(mask_p, M1, (0, i1))
        return Wp, mask_p

    Wp, mask_p = jax.lax.fori_loop(0, nblocks, block, (Wp, mask_p))
    keep = ~mask_p[:, :cols]
    new_w = jnp.where(keep, Wp[:, :cols], 0.0)
    return new_w.T.astype(kernel.dtype), keep.T
