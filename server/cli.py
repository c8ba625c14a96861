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
                   help="one 'KEY [CLIENT [WEIGHT]] [role=admin|metrics]' per line; unknown keys "
                        "get 401; CLIENT is the fairness identity, WEIGHT its VTC weight; keys "
                        "without a role are tenants")
    g.add_argument("--admin-api-keys", default=None, metavar="FILE",
                   help="keys (same format) with the admin role: adapter load/unload, loading "
                        "by lora_dir, /metrics")
    g.add_argument("--allow-tenant-adapters", action="store_true",
                   help="tenants may load adapters (below --lora-root) that only they can see, "
                        "use and unload")
    g.add_argument("--max-adapters-per-tenant", type=int,
                   default=ServerConfig.max_adapters_per_tenant, metavar="N",
                   help="adapters one tenant may hold loaded (with --allow-tenant-adapters)")
    g.add_argument("--max-loaded-adapters", type=int, default=ServerConfig.max_loaded_adapters,
                   metavar="N", help="adapters loaded in all, start-up modules included "
                                     "(default: no cap)")
    g.add_argument("--max-adapter-host-bytes", type=parse_bytes,
                   default=ServerConfig.max_adapter_host_bytes, metavar="BYTES",
                   help="host memory all loaded adapters may take, e.g. 2G, 512M (binary "
                        "units; default: no cap)")
    g.add_argument("--metrics-max-clients", type=int, default=ServerConfig.metrics_max_clients,
                   metavar="N", help="per-client series in /metrics: the N clients with the "
                                     "most traffic, the rest summed as client=\"other\"")
    g.add_argument("--max-waiting", type=int, default=AsyncEngineConfig.max_waiting,
                   help="requests admitted but without a first token; beyond it: 429")
    g.add_argument("--shutdown-grace-s", "--shutdown-grace", dest="shutdown_grace", type=float,
                   default=AsyncEngineConfig.shutdown_grace_s, metavar="S",
                   help="on SIGTERM/SIGINT: stop admission (503), let in-flight requests finish "
                        "for S seconds, then cut the rest with partial output (a second signal "
                        "cuts at once)")
    g.add_argument("--header-read-timeout-s", type=float,
                   default=ServerConfig.header_read_timeout_s, metavar="S",
                   help="close a new connection whose first request headers are not complete "
                        "within S seconds")
    g.add_argument("--body-read-timeout-s", type=float, default=ServerConfig.body_read_timeout_s,
                   metavar="S", help="a request body not complete within S seconds: 408, closed")
    g.add_argument("--keep-alive-timeout-s", type=float,
                   default=ServerConfig.keep_alive_timeout_s, metavar="S",
                   help="close a kept-alive connection idle for S seconds")
    g.add_argument("--max-connections", type=int, default=ServerConfig.max_connections,
                   metavar="N", help="open connections served at once; more get 503 and are "
                                     "closed")
    g.add_argument("--stream-stall-timeout-s", type=float,
                   default=ServerConfig.stream_stall_timeout_s, metavar="S",
                   help="abort a streamed request (freeing its decode slot) when its client "
                        "has not taken a write for S seconds")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="the chat template (a Jinja file, or the template itself) instead of "
                        "the model's")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests send their own 'chat_template' (refused otherwise, as "
                        "in vLLM: a template is code the server runs)")
    g.add_argument("--tool-call-parser", default=None, choices=("hermes", "llama3_json",
                                                                "mistral"),
                   help="the model's tool-call format, read from its output into tool_calls "
                        "(hermes: Qwen / Hermes <tool_call>; llama3_json: Llama 3.1+; "
                        "mistral: [TOOL_CALLS])")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="allow tool_choice \"auto\" (the model decides whether to call a "
                        "tool); needs --tool-call-parser")
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


def parse_bytes(text: str) -> int:
    """A byte count: an integer, optionally with a binary unit K, M, G or T (2G = 2 * 2**30)."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if t and t[-1] in "KMGT":
        scale, t = 1024 ** ("KMGT".index(t[-1]) + 1), t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if not 0 <= value * scale < 2 ** 63:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    return int(value * scale)


ROLES = ("admin", "metrics", "tenant")


def read_api_keys(path: str) -> tuple[tuple[tuple[str, str], ...], dict[str, float]]:
    """((key, client), ...) and {client: weight} from a keys file ('#' starts a comment)."""
    keys, weights, _ = read_key_file(path)
    return keys, weights


def read_key_file(path: str, role: str | None = None
                  ) -> tuple[tuple[tuple[str, str], ...], dict[str, float], dict[str, str]]:
    """((key, client), ...), {client: weight} and {key: role} from a keys file: one
    'KEY [CLIENT [WEIGHT]]' per line, plus an optional 'role=admin|metrics|tenant' token
    anywhere after KEY ('#' starts a comment). `role` forces every key's role (the
    --admin-api-keys file)."""
    keys, weights, roles = [], {}, {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            options = [p for p in parts[1:] if p.startswith("role=")]
            parts = [p for p in parts if p not in options]
            if len(parts) > 3 or len(options) > 1:
                raise ValueError(f"{path}:{lineno}: expected 'KEY [CLIENT [WEIGHT]] [role=ROLE]'")
            key_role = options[0].removeprefix("role=") if options else "tenant"
            if key_role not in ROLES:
                raise ValueError(f"{path}:{lineno}: role must be one of {', '.join(ROLES)}, "
                                 f"got {key_role!r}")
            roles[parts[0]] = role or key_role
            key = parts[0]
            client = parts[1] if len(parts) > 1 else f"{role or 'client'}{len(keys)}"
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
    return tuple(keys), weights, roles


def build_configs(args):
    """(EngineConfig, AsyncEngineConfig, ServerConfig) from parsed arguments."""
    import dataclasses

    from jaxserve.async_engine import AsyncEngineConfig
    from jaxserve.cli import engine_config_from_args
    from server.chat import load_chat_template
    from server.config import ServerConfig

    engine_cfg = engine_config_from_args(args)
    api_keys, key_weights, roles = (), {}, {}
    for path, role in ((args.api_keys, None), (args.admin_api_keys, "admin")):
        if path:
            keys, weights, file_roles = read_key_file(path, role)
            if {k for k, _ in keys} & {k for k, _ in api_keys}:
                raise ValueError(f"{path} lists a key that another keys file lists too")
            api_keys, key_weights, roles = api_keys + keys, {**key_weights, **weights}, \
                {**roles, **file_roles}
    if api_keys:
        if key_weights:  # --fair-weights wins where both name a client
            merged = {**key_weights, **dict(engine_cfg.fair_weights)}
            engine_cfg = dataclasses.replace(engine_cfg, fair_weights=tuple(sorted(merged.items())))
    server_cfg = ServerConfig(host=args.host, port=args.port,
                              served_model_name=args.served_model_name, model_path=args.model,
                              api_keys=api_keys, lora_root=args.lora_root,
                              key_roles=tuple((k, r) for k, r in roles.items() if r != "tenant"),
                              allow_tenant_adapters=args.allow_tenant_adapters,
                              max_adapters_per_tenant=args.max_adapters_per_tenant,
                              max_loaded_adapters=args.max_loaded_adapters,
                              max_adapter_host_bytes=args.max_adapter_host_bytes,
                              metrics_max_clients=args.metrics_max_clients,
                              lora_modules=parse_lora_modules(args.lora_modules),
                              shutdown_grace_s=args.shutdown_grace, warmup=args.warmup,
                              header_read_timeout_s=args.header_read_timeout_s,
                              body_read_timeout_s=args.body_read_timeout_s,
                              keep_alive_timeout_s=args.keep_alive_timeout_s,
                              max_connections=args.max_connections,
                              stream_stall_timeout_s=args.stream_stall_timeout_s,
                              chat_template=load_chat_template(args.chat_template),
                              trust_request_chat_template=args.trust_request_chat_template,
                              tool_call_parser=args.tool_call_parser,
                              enable_auto_tool_choice=args.enable_auto_tool_choice)
    async_cfg = AsyncEngineConfig(max_waiting=args.max_waiting,
                                  shutdown_grace_s=args.shutdown_grace)
    return engine_cfg, async_cfg, server_cfg


def run(args) -> int:
    """Serve; with --distributed (every process of a jax.distributed group runs this), process
    0 serves and the others replay its device calls (jaxserve/distributed.py)."""
    from jaxserve import distributed
    from jaxserve.engine import LLMEngine

    engine_cfg, async_cfg, server_cfg = build_configs(args)
    multi = distributed.enabled(getattr(args, "distributed", False))
    channel = leader = None
    if multi:   # every process of the group runs this; process 0 serves, the others follow
        distributed.check_group(engine_cfg)
        # joined before loading: a process that stops while loading stops the group
        channel = distributed.join() if distributed.is_follower() else distributed.Leader()
    log.warning("loading %s ...", engine_cfg.model or "the embedded default model")
    try:
        engine = LLMEngine(engine_cfg)
    except Exception as e:
        if channel is not None:
            distributed.fail_forming(channel, e)
        raise
    if multi and distributed.is_follower():
        return distributed.follow(engine, channel)
    if multi:
        leader = channel
        leader.start(engine)
        print(f"jaxserve: distributed: process 0 of {leader.num_followers + 1}; the others "
              f"replay its steps (step channel port {leader.port})", file=sys.stderr, flush=True)
    try:
        return _serve(engine, async_cfg, server_cfg)
    finally:
        if leader is not None:
            leader.close()


def _serve(engine, async_cfg, server_cfg) -> int:
    import asyncio

    from jaxserve.async_engine import AsyncEngine
    from server.app import create_app, serve

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
    # Serves until SIGTERM/SIGINT, then drains (server/app.py serve).
    asyncio.run(serve(app, server_cfg))
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
    from jaxserve.sharding import initialize_distributed
    initialize_distributed(True if args.distributed else None)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2
