"""`jaxserve serve` (and `python -m server`): argument parsing and the process entry point.

The engine arguments (--model, --scheduler, --fair-weights, ...) belong to jaxserve.cli; this
module adds the server's own and builds ServerConfig / AsyncEngineConfig from them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("jaxserve.server")

WARMUP_MODES = ("auto", "full", "off")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxserve.async_engine import AsyncEngineConfig   # defaults: the configs'
    from server.config import ServerConfig
    g = p.add_argument_group("server")
    g.add_argument("--host", default=ServerConfig.host)
    g.add_argument("--port", type=int, default=ServerConfig.port)
    g.add_argument("--served-model-name", default=ServerConfig.served_model_name,
                   help="the base model's id in the API (default: the checkpoint's name)")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="adapters loaded at start-up (operator-chosen paths)")
    g.add_argument("--lora-root", default=ServerConfig.lora_root, metavar="DIR",
                   help="allow runtime adapter loading (/v1/load_lora_adapter, lora_dir) only "
                        "from directories below DIR; without it runtime loading by path is off")
    g.add_argument("--api-keys", default=None, metavar="FILE",
                   help="one 'KEY [CLIENT [WEIGHT]]' per line; unknown keys get 401; CLIENT is "
                        "the fairness identity, WEIGHT its VTC weight")
    g.add_argument("--max-waiting", type=int, default=AsyncEngineConfig.max_waiting,
                   help="requests admitted but without a first token; beyond it: 429")
    g.add_argument("--shutdown-grace", type=float, default=AsyncEngineConfig.shutdown_grace_s,
                   help="seconds in-flight requests may finish on shutdown before being aborted")
    g.add_argument("--warmup", default=ServerConfig.warmup, choices=WARMUP_MODES,
                   help="compile every step program before listening (full), or compile each "
                        "when first needed (off); auto: full on GPU/TPU, off on CPU, where the "
                        "full set takes many minutes (docs/benchmarks.md, 'Warm-up')")


def parse_lora_modules(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules expects NAME=PATH, got {item!r}")
        out.append((name, path))
    return tuple(out)


def read_api_keys(path: str) -> tuple[tuple[tuple[str, str], ...], dict[str, float]]:
    """((key, client), ...) and {client: weight} from a keys file ('#' starts a comment)."""
    keys, weights = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 3:
                raise ValueError(f"{path}:{lineno}: expected 'KEY [CLIENT [WEIGHT]]'")
            key = parts[0]
            client = parts[1] if len(parts) > 1 else f"client{len(keys)}"
            if len(parts) == 3:
                try:
                    weights[client] = float(parts[2])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: weight {parts[2]!r} is not a number") from None
                if not weights[client] > 0:
                    raise ValueError(f"{path}:{lineno}: weight must be positive")
            keys.append((key, client))
    if not keys:
        raise ValueError(f"{path} holds no API keys")
    if len({k for k, _ in keys}) != len(keys):
        raise ValueError(f"{path} lists a key twice")
    return tuple(keys), weights


def build_configs(args):
    """(EngineConfig, AsyncEngineConfig, ServerConfig) from parsed arguments."""
    import dataclasses

    from jaxserve.async_engine import AsyncEngineConfig
    from jaxserve.cli import engine_config_from_args
    from server.config import ServerConfig

    engine_cfg = engine_config_from_args(args)
    api_keys: tuple = ()
    if args.api_keys:
        api_keys, key_weights = read_api_keys(args.api_keys)
        if key_weights:  # --fair-weights wins where both name a client
            merged = {**key_weights, **dict(engine_cfg.fair_weights)}
            engine_cfg = dataclasses.replace(engine_cfg, fair_weights=tuple(sorted(merged.items())))
    server_cfg = ServerConfig(host=args.host, port=args.port,
                              served_model_name=args.served_model_name, model_path=args.model,
                              api_keys=api_keys, lora_root=args.lora_root,
                              lora_modules=parse_lora_modules(args.lora_modules),
                              shutdown_grace_s=args.shutdown_grace, warmup=args.warmup)
    async_cfg = AsyncEngineConfig(max_waiting=args.max_waiting,
                                  shutdown_grace_s=args.shutdown_grace)
    return engine_cfg, async_cfg, server_cfg


def run(args) -> int:
    from aiohttp import web

    from jaxserve.async_engine import AsyncEngine
    from jaxserve.engine import LLMEngine
    from server.app import create_app

    engine_cfg, async_cfg, server_cfg = build_configs(args)
    log.warning("loading %s ...", engine_cfg.model or "the embedded default model")
    engine = LLMEngine(engine_cfg)
    app = create_app(AsyncEngine(engine, async_cfg), server_cfg)
    backend = engine.runner.backend
    print(f"jaxserve: {backend.describe()} [{backend.why}]", file=sys.stderr, flush=True)
    warmup(engine, server_cfg)
    kv = engine.runner.kv
    print("jaxserve: " + (engine.memory_plan.describe() if engine.memory_plan is not None else
                          f"KV pool: {kv.num_pages:,} pages of {kv.page_size} tokens "
                          "(--num-pages / --kv-cache-gb, or the CPU default)"),
          file=sys.stderr, flush=True)
    print(f"jaxserve: serving {engine.model_name} on http://{server_cfg.host}:{server_cfg.port} "
          f"(OpenAI API under /v1)", file=sys.stderr, flush=True)
    # SIGINT/SIGTERM -> aiohttp's graceful shutdown, which runs AsyncEngine.shutdown.
    web.run_app(app, host=server_cfg.host, port=server_cfg.port, print=None,
                handler_cancellation=True, shutdown_timeout=server_cfg.shutdown_grace_s + 5,
                handle_signals=True)
    return 0


def warmup(engine, server_cfg) -> None:
    """Compile every step program the engine can use before the server listens (vLLM, too,
    listens only once its engine is ready): the builder's bucket set, with its LoRA buckets
    when adapters can be served (--lora-modules or --lora-root). Progress every ~10%."""
    import jax
    mode = server_cfg.warmup
    if mode == "auto":
        mode = "off" if jax.default_backend() == "cpu" else "full"
    if mode == "off":
        return
    runner = engine.runner
    lora = bool(server_cfg.lora_modules or server_cfg.lora_root)
    shapes = runner.builder.shapes(lora=lora)
    every = max(1, len(shapes) // 10)
    print(f"jaxserve: warm-up: compiling {len(shapes)} step programs"
          f"{' (with LoRA)' if lora else ''} before listening", file=sys.stderr, flush=True)

    def progress(done, total, seconds):
        if done % every == 0 and done < total:
            print(f"jaxserve: warm-up: {done}/{total} programs, {seconds:.0f} s",
                  file=sys.stderr, flush=True)

    dropped = runner.num_programs_dropped
    _, seconds = runner.warmup(lora=lora, shapes=shapes, on_progress=progress)
    print(f"jaxserve: warm-up: {len(shapes)} programs in {seconds:.1f} s", file=sys.stderr,
          flush=True)
    if runner.num_programs_dropped > dropped:
        log.warning("warm-up: %d programs were dropped to stay under vm.max_map_count; they "
                    "are read back from the compilation cache when met",
                    runner.num_programs_dropped - dropped)


def main(argv: list[str] | None = None) -> int:
    from jaxserve.cli import add_engine_arguments
    p = argparse.ArgumentParser(prog="python -m server", description="jaxserve HTTP server")
    p.add_argument("--log-level", default="WARNING")
    add_engine_arguments(p)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from jaxserve.cli import set_jax_memory_fraction
    set_jax_memory_fraction(args)
    from jaxserve import compile_cache
    compile_cache.enable(args.compilation_cache_dir)   # before anything compiles
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2
