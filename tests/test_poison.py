"""Non-finite values never cross a request boundary.

A poisoned adapter is loaded, run once in a batch with clean requests (the base model and a
clean adapter), and unloaded; then more clean requests run on the pages it left behind. The
clean requests' greedy tokens must be those of a clean engine (one that never saw the poison)
given the same requests, their log-probs finite; the poisoned request ends alone with
finish_reason "error"; afterwards every pool page is free. Run for each attention
implementation available on CPU: xla, the cpu backend (native decode kernel; skipped when it is
not built) and pallas in interpret mode.

Two poisons:
  huge  an adapter file whose values are all finite (it passes a finiteness check at load):
        A and B of q/v are 1e30, so the adapted q/k/v overflow to inf, and the K/V the
        request writes into its pages hold inf and NaN;
  nan   a clean adapter file, then one NaN written into its weights in the engine's host store
        after the load (what the pool pages it is copied into then hold): the case of a
        non-finite value that got past the load.
"""
import functools
import json
import os
import sys

import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
from lora_helpers import make_adapter, make_base  # noqa: E402

BACKENDS = ["xla", "cpu", pytest.param("pallas", marks=pytest.mark.slow)]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)


def _write_huge_adapter(path, cfg, rank: int = 2, value: float = 1e30):
    """A PEFT adapter on q_proj and v_proj whose every A and B value is `value` (finite)."""
    from safetensors.numpy import save_file
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(cfg.num_layers):
        for mod, out in (("q_proj", cfg.q_size), ("v_proj", cfg.kv_size)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = np.full((rank, cfg.hidden_size), value, np.float32)
            tensors[f"{key}.lora_B.weight"] = np.full((out, rank), value, np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "task_type": "CAUSAL_LM"}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from jaxserve.loader import load_config
    root = tmp_path_factory.mktemp("poison")
    base = make_base(str(root / "base"), seed=5)
    make_adapter(base, str(root / "clean"), seed=1, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj"])
    make_adapter(base, str(root / "other"), seed=2, r=2, lora_alpha=4,
                 target_modules=["q_proj", "v_proj"])
    _write_huge_adapter(root / "huge", load_config(str(root / "base")))
    return root


def _engine(root, backend):
    from jaxserve.engine import EngineConfig, LLMEngine
    # A small pool: the follow-up requests reuse the pages the poisoned request and adapter held.
    engine = LLMEngine(EngineConfig(model=str(root / "base"), dtype="float32", backend=backend,
                                    page_size=4, num_pages=26, max_num_seqs=4,
                                    max_prefill_tokens=16, max_model_len=64, max_lora_rank=8))
    engine.add_lora("clean", str(root / "clean"))
    return engine


def _run(engine, requests):
    """Add every (request_id, prompt, adapter) at once (one mixed batch) and run them to the end.
    Returns request_id -> (token_ids, finish_reason, logprobs, error)."""
    for rid, prompt, adapter in requests:
        engine.add_request(rid, prompt, PARAMS, adapter=adapter)
    done, lps = {}, {}
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            lps.setdefault(out.request_id, []).extend(out.new_logprobs or [])
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason, lps[out.request_id],
                                        getattr(out, "error", None))
    assert not engine.has_unfinished()
    return done


def _pages_not_finite(engine) -> set[int]:
    from jaxserve.model.kv_cache import values
    bad = set()
    for pool in (engine.runner.kv.k, engine.runner.kv.v):
        x = np.asarray(values(pool).astype(np.float32))          # [L, Hkv, N, S, D]
        bad |= set(np.flatnonzero(~np.isfinite(x).all(axis=(0, 1, 3, 4))).tolist())
    return bad


# The first batch mixes the poisoned request with clean ones; the second runs on what it left.
MIXED = [("base-a", [5, 17, 42, 9, 100, 7, 33], None),
         ("clean-a", [8, 8, 61, 200, 3, 77, 12, 90, 4], "clean")]
POISON = ("poison", [11, 22, 33, 44, 55, 66, 77, 88, 99, 110], "poison")
AFTER = [("base-b", [40, 41, 42, 43, 44], None),
         ("clean-b", [7, 6, 5, 4, 3, 2, 9, 10, 11, 250, 251], "clean"),
         ("base-c", [19, 18, 17, 16, 15, 14, 13, 12, 111, 112, 113, 114, 115], None),
         ("base-d", [60, 61, 62], None)]


@pytest.mark.parametrize("poison", ["huge", "nan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_adapter_does_not_reach_other_requests(models, backend, poison):
    if backend == "cpu":
        from jaxserve.backends.cpu import cpu_attention
        if not cpu_attention.available():
            pytest.skip(f"native CPU kernels not built: {cpu_attention.unavailable_reason()}")

    clean = _engine(models, backend)
    assert clean.runner.backend.name == backend
    ref = _run(clean, MIXED)
    ref.update(_run(clean, AFTER))

    engine = _engine(models, backend)
    if poison == "huge":
        engine.add_lora("poison", str(models / "huge"))
    else:
        engine.add_lora("poison", str(models / "other"))
        engine.loras.get("poison").weights.b["v_proj"][0, 0, 3] = np.nan
    got = _run(engine, MIXED + [POISON])
    poisoned_pages = _pages_not_finite(engine)
    assert poisoned_pages, "the poison never reached the pool (the test would prove nothing)"
    engine.remove_lora("poison")

    allocated = []
    alloc = engine.scheduler.allocator
    real_allocate = alloc.allocate

    def allocate(n):
        pages = real_allocate(n)
        allocated.extend(pages)
        return pages
    alloc.allocate = allocate
    got.update(_run(engine, AFTER))
    alloc.allocate = real_allocate
    assert poisoned_pages & set(allocated), "the clean requests never reused a poisoned page"

    for rid, _, _ in MIXED + AFTER:
        tokens, reason, lps, error = got[rid]
        assert (tokens, reason) == ref[rid][:2], rid
        assert error is None and len(lps) == len(tokens) and np.isfinite(lps).all(), rid
        np.testing.assert_allclose(lps, ref[rid][2], rtol=1e-4, atol=1e-5, err_msg=rid)

    tokens, reason, lps, error = got["poison"]
    assert reason == "error" and "non-finite" in error
    assert len(tokens) < PARAMS.max_tokens and np.isfinite(lps).all()

    engine.remove_lora("clean")
    alloc.check()
    stats = engine.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["num_running"] == stats["num_waiting"] == 0


# -- the server: the failed request alone gets an error -------------------------------------------
def test_server_answers_a_non_finite_request_with_an_error_alone():
    """On the fake runner, whose sequences with a prompt starting with "!" get NON_FINITE as
    their third token (what the sampler returns for a row of NaN logits): that request gets a
    422 "non_finite_logits" (a final error event when streaming), a request beside it its full
    text, and the pool is free after."""
    from server.config import ServerConfig
    from server_harness import ServerThread, parse_sse
    from test_server_fake import http
    from fake_runner import expected_text, fake_engine
    from jaxserve.sampling import NON_FINITE

    engine = fake_engine(max_num_seqs=4, num_pages=64, max_model_len=128)
    run = engine.runner.run

    def poisoned_run(plan):
        tokens, logprobs = run(plan)
        for i, seq in enumerate(plan.seqs):
            if tokens[i] is not None and chr(seq.prompt_token_ids[0]) == "!" \
                    and seq.num_total_tokens - seq.num_prompt_tokens == 3:
                tokens[i] = NON_FINITE
        return tokens, logprobs
    engine.runner.run = poisoned_run

    with ServerThread(engine, ServerConfig()) as srv:
        body = {"model": "fake-model", "max_tokens": 8, "temperature": 0}
        status, out = http(srv.url, "/v1/completions", {**body, "prompt": "!bad"})
        assert status == 422, out
        assert out["error"]["code"] == "non_finite_logits"
        assert out["error"]["type"] == "invalid_request_error" and "non-finite" in out["error"]["message"]

        status, raw = http(srv.url, "/v1/completions", {**body, "stream": True, "prompt": "!x"})
        assert status == 200
        events = parse_sse(raw)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "non_finite_logits"
        assert all("error" not in e for e in events[:-2])

        # S-LoRA's native endpoints: 422 with the same body; a last error event
        native = {"parameters": {"max_new_tokens": 8}}
        status, out = http(srv.url, "/generate", {**native, "inputs": "!bad"})
        assert status == 422, out
        assert out["error"]["code"] == "non_finite_logits"
        assert out["error"]["type"] == "invalid_request_error" and "non-finite" in out["error"]["message"]
        status, raw = http(srv.url, "/generate_stream", {**native, "inputs": "!x"})
        assert status == 200
        events = parse_sse(raw)
        assert events[-1]["code"] == "non_finite_logits" and "non-finite" in events[-1]["error"]
        assert events[-1]["finished"] is True and events[-1]["finish_reason"] == "error"
        assert all("error" not in e and not e["finished"] for e in events[:-1])
        assert len(events) == 3   # the two tokens before the poisoned third

        status, out = http(srv.url, "/v1/completions", {**body, "prompt": "fine"})
        assert status == 200 and out["choices"][0]["text"] == expected_text("fine", 8)
        stats = srv.stats()
        assert stats["num_free_pages"] == stats["num_total_pages"]


# -- each attention implementation: rows a query may not see never reach its output ------------
def _stale_nan(args, page_size):
    """make_case's inputs with every pool row that holds no sequence's token (past each kv_len,
    unused pages, the null page) set to NaN or inf."""
    import jax.numpy as jnp
    q, k, v, bt, lens, pos = args
    live = np.zeros(k.shape[1:3], bool)                                   # [pages, page_size]
    for b, L in enumerate(np.asarray(lens)):
        for j in range(int(L)):
            live[int(bt[b, j // page_size]), j % page_size] = True
    bad = np.where(np.arange(k.shape[1])[:, None] % 2 == 0, np.nan, np.inf)  # [pages, 1]
    stale = lambda x: jnp.asarray(np.where(live[None, :, :, None], np.asarray(x, np.float32),
                                           bad[None, :, :, None]), x.dtype)
    return (q, stale(k), stale(v), bt, lens, pos)


def _implementations(q_len):
    import jax
    from jaxserve.model.attention import paged_attention_xla
    from pallas_kernels import paged_attention as pa
    from pallas_kernels.paged_attention_tpu import paged_attention_tpu
    impls = {"xla": jax.jit(functools.partial(paged_attention_xla, scale=0.3)),
             "pallas": functools.partial(pa.paged_attention, scale=0.3, interpret=True),
             "pallas-gpu-tiles": functools.partial(pa.paged_attention, scale=0.3,
                                                   interpret=True, backend="gpu"),
             "tpu": functools.partial(paged_attention_tpu, scale=0.3, interpret=True,
                                      pages_per_block=2)}
    if q_len == 1:
        from jaxserve.backends.cpu import cpu_attention
        if cpu_attention.available():
            impls["cpu"] = jax.jit(functools.partial(cpu_attention.paged_decode_attention,
                                                     scale=0.3))
    return impls


@pytest.mark.parametrize("q_len", [1, 7])
def test_attention_selects_masked_rows_out(q_len):
    """Each implementation's output over a pool whose non-token rows hold NaN and inf equals
    (bit for bit) its output over the same pool with large finite garbage there."""
    import jax.numpy as jnp
    from jax.experimental.pallas import tpu as pltpu
    from test_kernels_attention import make_case
    S = 4
    args = make_case(3, batch=3, q_len=q_len, num_kv_heads=2, group=2, head_dim=16,
                     page_size=S, max_pages=5, dtype=jnp.float32)
    nan_args = _stale_nan(args, S)
    assert not np.isfinite(np.asarray(nan_args[1])).all()
    wrong = []
    for name, fn in _implementations(q_len).items():
        try:
            want, got = np.asarray(fn(*args)), np.asarray(fn(*nan_args))
        finally:
            pltpu.reset_tpu_interpret_mode_state()
        if not np.array_equal(got, want):
            wrong.append(f"{name}: {np.isnan(got).sum()} NaN of {got.size}")
    assert not wrong, wrong


def test_sampler_rows_are_independent():
    """A row of NaN (or +inf) logits samples NON_FINITE; the other rows' tokens and log-probs are
    those they get without it."""
    import jax
    import jax.numpy as jnp
    from jaxserve.sampling import NON_FINITE, SamplingInput, sample
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4, 300)).astype(np.float32)
    bad = logits.copy()
    bad[1, 17] = np.nan
    bad[3, 200] = np.inf
    for temperature in (0.0, 0.8):
        s = SamplingInput(temperature=jnp.full((4,), temperature, jnp.float32),
                          top_k=jnp.array([0, 5, 0, 0], jnp.int32),
                          top_p=jnp.array([1.0, 1.0, 0.9, 1.0], jnp.float32),
                          seeds=jnp.arange(4, dtype=jnp.uint32), counters=jnp.zeros((4,), jnp.int32))
        tok, lp = (np.asarray(x) for x in jax.jit(sample)(jnp.asarray(logits), s))
        btok, blp = (np.asarray(x) for x in jax.jit(sample)(jnp.asarray(bad), s))
        assert (btok[[1, 3]] == NON_FINITE).all() and (tok != NON_FINITE).all()
        np.testing.assert_array_equal(btok[[0, 2]], tok[[0, 2]])
        np.testing.assert_array_equal(blp[[0, 2]], lp[[0, 2]])
        assert np.isfinite(lp).all()


@pytest.mark.gpu
@pytest.mark.skipif(__import__("jax").default_backend() == "cpu", reason="needs a GPU or TPU")
@pytest.mark.parametrize("poison", ["huge", "nan"])
def test_poisoned_adapter_on_device(models, poison):
    """The same check with the Pallas kernels compiled for the device (scripts/device_check.py
    runs the gpu-marked tests)."""
    test_poisoned_adapter_does_not_reach_other_requests(models, "pallas", poison)
