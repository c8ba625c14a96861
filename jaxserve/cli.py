"""The `jaxserve` command: generate, bench, serve, simulate, build-kernels. Argument parsing lives
only here (and in the sub-packages' `add_arguments`); everything else takes frozen configs, whose
defaults are the flags' defaults."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jaxserve.lora.cli_args import add_lora_arguments, lora_engine_kwargs, register_loras


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from jaxserve.engine import DTYPE_CHOICES, EngineConfig as C   # defaults: the config's
    from jaxserve.loader import LOAD_FORMATS
    from scheduler.cost import DEFAULT_CACHED_TOKEN_WEIGHT
    from scheduler.scheduler import EVICTION_ORDERS
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=C.model,
                   help="HF checkpoint directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default=C.dtype, choices=list(DTYPE_CHOICES),
                   help="weights, activations and KV pool (auto: bfloat16 on GPU/TPU and on CPUs "
                        "with AMX, float32 on other CPUs; the engine logs its choice)")
    g.add_argument("--load-format", default=C.load_format, choices=list(LOAD_FORMATS),
                   help="auto: the checkpoint's weights; dummy: random weights made on the "
                        "devices, --model needs only config.json and a tokenizer (benchmarks)")
    g.add_argument("--page-size", type=int, default=C.page_size)
    g.add_argument("--num-pages", type=int, default=C.num_pages,
                   help="KV pool pages (default: from --kv-cache-gb)")
    g.add_argument("--kv-cache-gb", type=float, default=C.kv_cache_gb,
                   help="KV pool GiB per device (default: planned from --gpu-memory-utilization "
                        "on GPU/TPU, 1 GiB on CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=C.gpu_memory_utilization,
                   help="fraction of each GPU/TPU's memory for weights, KV pool and activations: "
                        "the pool gets what the weights and the largest step leave (also sets "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION unless it is set)")
    g.add_argument("--max-num-seqs", type=int, default=C.max_num_seqs)
    g.add_argument("--max-prefill-tokens", type=int, default=C.max_prefill_tokens,
                   help="prompt tokens per step (longer prompts are prefilled in chunks)")
    g.add_argument("--max-num-batched-tokens", type=int, default=C.max_num_batched_tokens,
                   help="tokens per step: the running decodes (one each) first, then prefill "
                        "chunks (at most --max-prefill-tokens). Lower it to shorten the steps "
                        "that carry a prefill (running streams' inter-token latency) at the "
                        "cost of time to first token (default: --max-prefill-tokens + "
                        "--max-num-seqs, so decodes never shorten a prefill chunk)")
    g.add_argument("--no-mixed-steps", dest="mixed_steps", action="store_false",
                   help="a step is all prefill (prefill first) or all decode, instead of running "
                        "decodes and prefill chunks together (an arrival then pauses the streams "
                        "for its prefill step)")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="wait for each step's tokens before planning the next (default: the next "
                        "step is planned and launched while the device runs this one)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=C.enable_prefix_caching,
                   help="reuse the KV pages of prompt prefixes already computed (same tokens, same "
                        "adapter, same cache_salt); cached pages stay in the pool until it needs "
                        "them (default: on)")
    g.add_argument("--cache-eviction-order", default=C.cache_eviction_order,
                   choices=list(EVICTION_ORDERS),
                   help="when the pool is full, evict idle LoRA adapters before cached prefix "
                        "pages (adapters-first: reloading an adapter page is a copy, a prefix "
                        "page is prefill to recompute) or the reverse (default: %(default)s)")
    g.add_argument("--cached-token-weight", type=float, default=C.cached_token_weight,
                   help="VTC schedulers: the charge of a prompt token served from the prefix "
                        "cache, as a fraction of a computed prompt token's (default: "
                        f"{DEFAULT_CACHED_TOKEN_WEIGHT}; docs/fairness.md)")
    g.add_argument("--max-model-len", type=int, default=C.max_model_len)
    g.add_argument("--backend", default=C.backend, choices=["auto", "xla", "pallas", "cpu"],
                   help="device backend (jaxserve/backends): pallas = Pallas attention and LoRA "
                        "kernels; cpu = native XLA:CPU kernels; xla = plain XLA anywhere "
                        "(auto: pallas on GPU/TPU, cpu on CPU when its kernels build, else xla)")
    g.add_argument("--layer-loop", default=C.layer_loop, choices=["auto", "scan", "per-layer"],
                   help="scan: one program per step; per-layer: one device call per layer "
                        "(auto: the backend's choice: per-layer for cpu without --tp)")
    g.add_argument("--scheduler", default=C.scheduler,
                   help="admission policy: fcfs, vtc, wvtc, vtc-oracle, vtc-predict, lcf, rpm")
    g.add_argument("--fair-weights", default=None, help="client=weight,... for weighted VTC")
    g.add_argument("--seed", type=int, default=C.seed)
    g.add_argument("--tp", type=int, default=C.tp, help="tensor-parallel degree (devices in the mesh)")
    g.add_argument("--dp", type=int, default=C.dp,
                   help="data-parallel replicas, each on --tp devices with its own KV pool, all "
                        "planned by one scheduler (global VTC counters and adapter placement); "
                        "--dp x --tp must be the device count (docs/parallelism.md)")
    g.add_argument("--ep", type=int, default=C.ep,
                   help="expert parallelism for mixture-of-experts models: 1 splits each expert "
                        "over the --tp devices; --ep equal to --tp places whole experts, "
                        "num_experts / tp per device (like vLLM's --enable-expert-parallel)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() from JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID (or TPU/SLURM auto-detection)")
    from jaxserve.compile_cache import add_argument as add_cache_argument
    add_cache_argument(g)


def parse_fair_weights(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, sep, w = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(w)
            if out[name.strip()] <= 0:
                raise ValueError
        except ValueError:
            raise SystemExit(f"jaxserve: error: --fair-weights expects client=positive_number,..., got {part!r}")
    return out


def engine_config_from_args(args):
    from jaxserve.engine import EngineConfig
    return EngineConfig(
        model=args.model, dtype=args.dtype, load_format=args.load_format,
        page_size=args.page_size, num_pages=args.num_pages,
        kv_cache_gb=args.kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_prefill_tokens=args.max_prefill_tokens, max_model_len=args.max_model_len,
        mixed_steps=args.mixed_steps, max_num_batched_tokens=args.max_num_batched_tokens,
        async_scheduling=args.async_scheduling,
        enable_prefix_caching=args.enable_prefix_caching,
        cache_eviction_order=args.cache_eviction_order,
        cached_token_weight=args.cached_token_weight, backend=args.backend, layer_loop=args.layer_loop, scheduler=args.scheduler,
        fair_weights=tuple(sorted(parse_fair_weights(args.fair_weights).items())), seed=args.seed,
        **lora_engine_kwargs(args),
        tp=args.tp, ep=args.ep, dp=args.dp)


def _cmd_generate(args) -> int:
    from jaxserve.engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()),
                            ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    from jaxserve.replicas import refuse_remote
    refuse_remote(args.dp, args.tp, "generate")
    engine = LLMEngine(engine_config_from_args(args))
    adapter = register_loras(engine, args)
    prompt = engine.tokenizer.chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    out = engine.generate([prompt], params, adapter=adapter)[0]
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "prompt_tokens": out.num_prompt_tokens, "completion_tokens": len(out.token_ids),
                          **({"logprobs": out.new_logprobs} if args.logprobs else {})}))
    else:
        print(out.text)
    return 0


def _cmd_bench(args) -> int:
    from jaxserve.bench import run_bench
    return run_bench(args)


def _cmd_build_kernels(args) -> int:
    from jaxserve.backends.cpu import build_kernels
    return build_kernels()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxserve", description="JAX LLM serving engine")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True)

    from jaxserve.sampling_params import SamplingParams
    g = sub.add_parser("generate", help="generate text for one prompt")
    add_engine_arguments(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)        # longer than the API's default
    g.add_argument("--temperature", type=float, default=0.0)    # greedy, unlike the API's default
    g.add_argument("--top-k", type=int, default=SamplingParams.top_k)
    g.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", action="store_true")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, ...)")
    add_lora_arguments(g)
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("bench", help="offline decode throughput (optionally beside HF transformers)")
    add_engine_arguments(b)
    from jaxserve.bench import add_bench_arguments
    add_bench_arguments(b)
    b.set_defaults(func=_cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_arguments(s)
    try:
        from server.cli import add_arguments as add_server_arguments, run as run_server
        add_server_arguments(s)
        s.set_defaults(func=run_server)
    except ImportError as e:  # the server package is optional until it lands
        s.set_defaults(func=lambda a, e=e: (print(f"jaxserve: serve unavailable: {e}", file=sys.stderr), 2)[1])

    k = sub.add_parser("build-kernels", help="build the native CPU kernels into the cache "
                       "(make install does this); prints what it built or why not")
    k.set_defaults(func=_cmd_build_kernels)

    m = sub.add_parser("simulate", help="fairness simulator (VTC and baselines) over a cost model")
    from scheduler.simulate_cli import add_arguments as add_sim_arguments, run as run_sim
    add_sim_arguments(m)
    m.set_defaults(func=run_sim)
    return p


def set_jax_memory_fraction(args) -> None:
    """JAX's GPU allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION of each GPU when its backend
    starts (at the first jax call, after this): set it to --gpu-memory-utilization, the fraction
    the memory plan budgets, unless the environment sets it."""
    util = getattr(args, "gpu_memory_utilization", None)
    if util is not None and 0 < util <= 1:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{util:g}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    set_jax_memory_fraction(args)
    if hasattr(args, "compilation_cache_dir"):   # before anything compiles
        from jaxserve import compile_cache
        compile_cache.enable(args.compilation_cache_dir)
    if getattr(args, "distributed", False) or os.environ.get("JAXSERVE_DISTRIBUTED"):
        from jaxserve.sharding import initialize_distributed
        initialize_distributed(True if getattr(args, "distributed", False) else None)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        # Bad input (checkpoint, config, request): a message naming the problem, no traceback.
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
