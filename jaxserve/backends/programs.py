"""How a step runs on the device: one scanned program, or one call per layer.

Either way a compiled step is called as step(params, kv, step_input, sampling_input) ->
(tokens [B], logprobs [B], kv), with the pool donated; a step whose input carries
`score_targets` (prompt logprobs, jaxserve/scoring.py) takes the logits of every position and
returns (tokens, logprobs, kv, PromptScores).

  scan       the whole step is one program, a lax.scan over the stacked layer params (one
             compiled layer body; GPU/TPU, tensor parallel)
  per-layer  an embedding call, one call per layer over per-layer params, a head call and a
             sampling call. On XLA:CPU a scan copies each layer's weight slice out of the stack
             before its matmuls; a call costs tens of microseconds of launch overhead.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxserve import sharding
from jaxserve.model import llama
from jaxserve.model.kv_cache import KVPages, StepInput
from jaxserve.model.params import Params
from jaxserve.sampling import SamplingInput, sample
from jaxserve.scoring import at_index, prompt_scores


def _whole_step(cfg, backend, logits_shardings, params: Params, kv: KVPages, step: StepInput,
                samp: SamplingInput):
    scoring = step.score_targets is not None
    logits, kv = llama.forward(params, cfg, backend, step, kv, all_logits=scoring)
    if scoring:
        every, logits = logits, at_index(logits, step.logits_index)
    for s in logits_shardings:   # tp: vocab-split logits, all-gathered once before sampling
        logits = jax.lax.with_sharding_constraint(logits, s)
    tokens, logprobs = sample(logits, samp)
    if scoring:
        return tokens, logprobs, kv, prompt_scores(every, step.score_targets)
    return tokens, logprobs, kv


def _embed(cfg, params: Params, step: StepInput):
    """Token embeddings, the step's RoPE tables (once, for all the layer calls) and the step
    (given without its LoRA batch) back as device arrays for the layer calls: the call's own
    transfer of its host arguments replaces a separate device_put of the step."""
    return llama.embed(params, cfg, step), llama.step_rope(cfg, step), step


def _top(params: Params) -> Params:
    """The params the embedding and head calls read: without the layers (a call's host cost
    grows with the arrays it is passed)."""
    return dataclasses.replace(params, layers=None)


def _head(cfg, backend, params: Params, x, step: StepInput):
    """The logits at each row's logits_index; with score targets also the PromptScores."""
    if step.score_targets is None:
        return llama.head(params, cfg, backend, x, step)
    every = llama.head(params, cfg, backend, x, step, all_logits=True)
    return at_index(every, step.logits_index), prompt_scores(every, step.score_targets)


class _LayerByLayer:
    """A compiled step run as separate device calls: embed, each layer, the head, sampling.
    Head and sampling are two calls: in one program XLA:CPU ran the vocabulary matmul ~2x
    slower (docs/benchmarks.md)."""

    def __init__(self, embed, layer, logits, sample_fn, layer_ids):
        self.embed, self.layer, self.logits, self.sample = embed, layer, logits, sample_fn
        self.layer_ids = layer_ids

    def __call__(self, params: Params, kv, step, samp):
        top = _top(params)
        x, rope, meta = self.embed(top, dataclasses.replace(step, lora=None))
        # On device once, not once per layer call.
        lora = None if step.lora is None else jax.device_put(step.lora)
        step = dataclasses.replace(meta, rope=rope, lora=lora)
        for lp, i in zip(params.layers, self.layer_ids):
            x, kv = self.layer(lp, x, kv, i, step)
        logits = self.logits(top, x, step)
        if step.score_targets is not None:
            logits, scores = logits
            tokens, logprobs = self.sample(logits, samp)
            return tokens, logprobs, kv, scores
        tokens, logprobs = self.sample(logits, samp)
        return tokens, logprobs, kv


class StepPrograms:
    """Compiles steps for one backend and model: `compile` lowers and compiles for the shapes
    of the given inputs; the caller keeps the results (jaxserve/runner.py)."""

    def __init__(self, backend, cfg, params: Params, kv: KVPages):
        """params, kv: the prepared params and the pool (their shardings under tp)."""
        self.backend, self.cfg = backend, cfg
        run_cfg = backend.run_config
        if backend.layer_loop == "scan":
            mesh = backend.mesh
            shardings = {}
            if mesh is not None:
                rep = sharding.replicated(mesh)
                kv_sh = jax.tree.map(lambda a: a.sharding, kv)
                shardings = dict(in_shardings=(jax.tree.map(lambda a: a.sharding, params), kv_sh,
                                               rep, rep),
                                 out_shardings=(rep, rep, kv_sh))
            whole = functools.partial(
                _whole_step, run_cfg, backend,
                sharding.logits_shardings(mesh, cfg) if mesh is not None else ())
            self._step = jax.jit(whole, donate_argnums=(1,), **shardings)
            self._score_step = self._step
            if mesh is not None:   # one more output (the PromptScores, replicated)
                shardings["out_shardings"] += (rep,)
                self._score_step = jax.jit(whole, donate_argnums=(1,), **shardings)
        else:
            self._layer_ids = [jnp.int32(i) for i in range(cfg.num_layers)]
            self._embed = jax.jit(functools.partial(_embed, run_cfg))
            self._layer = jax.jit(functools.partial(llama.decoder_layer, run_cfg, backend),
                                  donate_argnums=(1, 2))
            self._logits = jax.jit(functools.partial(_head, run_cfg, backend))
            self._sample = jax.jit(sample)

    def compile(self, params: Params, kv: KVPages, step: StepInput, samp: SamplingInput):
        if self.backend.layer_loop == "scan":
            prog = self._step if step.score_targets is None else self._score_step
            return prog.lower(params, kv, step, samp).compile()
        bare, top = dataclasses.replace(step, lora=None), _top(params)
        x, rope, _ = jax.eval_shape(self._embed, top, bare)
        lstep = dataclasses.replace(step, rope=rope)   # as _LayerByLayer passes it on
        logits = jax.eval_shape(self._logits, top, x, lstep)
        if step.score_targets is not None:
            logits = logits[0]
        return _LayerByLayer(
            self._embed.lower(top, bare).compile(),
            self._layer.lower(params.layers[0], x, kv, self._layer_ids[0], lstep).compile(),
            self._logits.lower(top, x, lstep).compile(),
            self._sample.lower(logits, samp).compile(),
            self._layer_ids)
