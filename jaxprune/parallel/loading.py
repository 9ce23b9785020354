"""Loading a Hugging Face checkpoint straight onto a mesh: each process reads only its own slices."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxprune.calibration.capture import plain_path
from jaxprune.core.params import Params
from jaxprune.parallel.distributed import MODEL, spec_for


class LazyTensor:
    """A checkpoint tensor not read yet: a memory-mapped HF array, transposed on read for kernels."""

    def __init__(self, array, transpose: bool):
        self.array, self.transpose = array, transpose
        self.shape = tuple(np.shape(array))[::-1] if transpose else tuple(np.shape(array))

    def read(self, index, dtype):
        a = self.array.T if self.transpose else self.array
        return np.ascontiguousarray(a[index], dtype=dtype or a.dtype)


def load_sharded(directory: str, mesh: Mesh, dtype=np.float32, on_read=None) -> Params:
    """Load a Hugging Face checkpoint directory straight onto `mesh` by the tensor-parallel rules.

    Each process reads (memory-mapped) only the slices its own devices hold
    (`jax.make_array_from_callback`), so in a multi-host run no process loads the whole
    model. `on_read(path, index, nbytes)` is called for every slice read (once per device). `dtype=None` keeps the
    stored dtype.
    """
    from jaxprune.io.hf import open_weights, read_config, validate_tree
    from jaxprune.io.names import build_tree
    config = read_config(directory)
    named = open_weights(directory)
    if config.tie_word_embeddings:
        named = {k: v for k, v in named.items() if not k.startswith("lm_head.")}
    validate_tree(config, build_tree(named, config.arch, lambda a, t: tuple(np.shape(a))[::-1 if t else 1]),
                  directory)
    lazy = Params(config, build_tree(named, config.arch, LazyTensor))
    model_size = mesh.shape.get(MODEL, 1)

    def place(keypath, t: LazyTensor):
        path = plain_path(keypath)
        sharding = NamedSharding(mesh, spec_for(path, t.shape, config, model_size))

        def read(index):
            out = t.read(index, dtype)
            if on_read is not None:
                on_read(path, index, out.nbytes)
            return out
        return jax.make_array_from_callback(t.shape, sharding, read)

    return jax.tree_util.tree_map_with_path(place, lazy, is_leaf=lambda x: isinstance(x, LazyTensor))
