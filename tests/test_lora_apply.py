"""The engine's XLA LoRA path (one slot per batch row) against the kernels' reference, with
garbage (NaN) rows past each row's rank and base-model rows (rank 0) in the batch, for decode
(T == 1) and prefill (T > 1), which take different expand formulations."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.lora.apply import lora_by_row_xla
from pallas_kernels.lora import gathered_lora_ref


@pytest.mark.parametrize("T", [1, 7])
def test_by_row_matches_reference_with_garbage_rows(T):
    rng = np.random.default_rng()
    B, R, din, dout = 6, 32, 48, 40
    ranks = rng.choice([0, 4, 8, 16, 32], size=B).astype(np.int32)
    ranks[0] = 0   # a base-model row
    a = rng.normal(size=(B, R, din)).astype(np.float32)
    b = rng.normal(size=(B, R, dout)).astype(np.float32)
    for i in range(B):   # what a pool page holds past an adapter's rank is unspecified
        a[i, ranks[i]:] = np.nan
        b[i, ranks[i]:] = np.nan
    x = rng.normal(size=(B, T, din)).astype(np.float32)
    scales = rng.uniform(0.5, 2.0, size=B).astype(np.float32)
    got = np.asarray(lora_by_row_xla(*(jnp.asarray(v) for v in (x, a, b, ranks, scales))))
    # The reference over flat tokens: token t of row i uses slot i (-1 for a base row).
    idx = np.repeat(np.where(ranks > 0, np.arange(B), -1), T).astype(np.int32)
    want = np.asarray(gathered_lora_ref(jnp.asarray(x.reshape(B * T, din)), jnp.asarray(np.nan_to_num(a)),
                                        jnp.asarray(np.nan_to_num(b)), jnp.asarray(idx),
                                        jnp.asarray(ranks), jnp.asarray(scales))).reshape(B, T, dout)
    assert np.isfinite(got).all()
    assert (got[0] == 0).all()
    # f32 sums of <= 48 products of O(1) values: 1e-4 absolute leaves ~100x margin over rounding.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
