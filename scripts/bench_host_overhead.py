"""Host overhead of the serving loop: how long the device waits for the host each step.

The real engine (scheduler, step builder, output processor with the default model's tokenizer,
stop strings) runs on a fake device: a thread that takes launched steps in order and spends a
fixed `--device-ms` on each (sleeping, so it holds no core or GIL, like a GPU), then hands
back the sampled tokens (ids of real text, so detokenization does real work). Every request
decodes for the whole run, at batch 64 and 256 by default.

For each batch and loop (sync: plan -> build -> launch -> wait -> process, one after another;
overlap: the engine's default, step N+1 launched before step N is processed) it prints:
  period      wall time per step
  device      the fake device's time per step (--device-ms)
  idle        time per step the device waited for work: the host's critical path
  host        engine-thread CPU time per step, and its parts: schedule, build (padded arrays,
              feed indices), process (scheduler update, detokenize, stop checks)
and writes JSON (--out).

  python scripts/bench_host_overhead.py                     # batch 64 and 256, 10 ms device
  python scripts/bench_host_overhead.py --batch 256 --device-ms 5 --steps 300
  python scripts/bench_host_overhead.py --model DIR --load-format dummy --dtype bfloat16
        # the real device instead of the fake one (scripts/device_check.py on a GPU): step
        # period of each loop against the device time of the same decode step run back to back
  PYTHONPATH=/path/to/old/checkout python scripts/bench_host_overhead.py --loops sync
        # the same measurement on an engine from before overlapped steps (sync loop only)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if os.environ.get("PYTHONPATH"):     # an other checkout's engine (see above) comes first
    sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])

CACHE: dict = {}    # EngineConfig fields from --[no-]enable-prefix-caching

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps "
        "aloud: ninety-one, ninety-two. Outside, gulls wheeled over the harbour while fishing "
        "boats — red, blue, and one startling yellow — rocked at their moorings. Café owners "
        "stacked chairs; a radio played 1960s jazz. «Bonsoir», said someone. 東京 and 北京 are "
        "far away, he thought, lighting the lamp as the fog rolled in. ")


class FakeDevice:
    """A device that runs launched steps in launch order, each for `seconds`, independently of
    the host (as a GPU does): a step launched at t starts at max(t, the previous step's end)
    and ends `seconds` later; waiting for it sleeps until then. Idle time is the gap before a
    step starts that the device spent with nothing launched. (A thread that sleeps would
    need the GIL back to finish its step, and the host thread holds it while it works.)"""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.free_at = time.perf_counter()
        self.reset()

    def launch(self) -> float:
        """Queue a step; returns when it will be done."""
        now = time.perf_counter()
        if now > self.free_at:
            if self.steps or self.counting:
                self.idle_s += now - self.free_at
            self.free_at = now
        self.free_at += self.seconds
        self.steps += 1
        return self.free_at

    @staticmethod
    def wait(done_at: float) -> None:
        while (left := done_at - time.perf_counter()) > 0:
            time.sleep(left)

    def reset(self) -> None:
        self.idle_s, self.steps, self.counting = 0.0, 0, True


class FakeDeviceRunner:
    """The runner interface (launch / collect / run) on a FakeDevice. launch builds the step's
    padded arrays with the real StepBuilder and resolves device-fed input tokens as the real
    runner does; the tokens a step samples are text ids chosen by (sequence, output index)."""

    def __init__(self, builder, device: FakeDevice, text_ids: list[int]):
        self.builder, self.device, self.text_ids = builder, device, text_ids
        self.num_steps = 0

    def launch(self, plan, prev=None, feed=True):
        feed_index = {}
        for built in self.builder.build(plan):
            for row, seq_id in getattr(built, "from_device", ()):   # as ModelRunner.launch
                _ = prev["feed_index"][seq_id]
            for j, i in enumerate(built.seqs):
                if built.samples[j]:
                    feed_index[plan.seqs[i].seq_id] = len(feed_index)
        tokens = []
        for i, seq in enumerate(plan.seqs):
            # (an engine from before overlapped steps counts no pending tokens: --before)
            k = (seq.num_total_tokens - seq.num_prompt_tokens - 1
                 if hasattr(seq, "num_total_tokens") else seq.num_output_tokens)
            tokens.append(self.text_ids[(seq.seq_id * 7 + k) % len(self.text_ids)]
                          if plan.samples(i) else None)
        self.num_steps += 1
        return {"done_at": self.device.launch(), "tokens": tokens, "feed_index": feed_index}

    def collect(self, launched):
        self.device.wait(launched["done_at"])
        t = launched["tokens"]
        return t, [None if x is None else -1.0 for x in t]

    def run(self, plan):
        return self.collect(self.launch(plan))


def _timed(obj, name: str, acc: collections.Counter, key: str) -> None:
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        t = time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            acc[key] += time.thread_time() - t
    setattr(obj, name, wrapped)


def measure(batch: int, overlap: bool, device_ms: float, steps: int, tokenizer, cfg) -> dict:
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.step_builder import StepBuilder
    from jaxserve.tokenizer import Tokenizer
    device = FakeDevice(device_ms / 1e3)
    prompt_len = 128
    max_len = prompt_len + steps + 64
    loop = {} if not hasattr(EngineConfig, "async_scheduling") else dict(
        async_scheduling=overlap)
    ecfg = EngineConfig(max_num_seqs=batch, num_pages=batch * (-(-max_len // 16)) + 8,
                        page_size=16, max_model_len=max_len, max_prefill_tokens=2048,
                        scheduler="fcfs", **loop, **CACHE)
    builder = StepBuilder(page_size=16, max_num_seqs=batch, max_prefill_tokens=2048,
                          max_model_len=max_len, bucket_pages=(False, False))
    text_ids = tokenizer.encode(TEXT * 4)
    runner = FakeDeviceRunner(builder, device, text_ids)
    if not loop:          # the engine before overlapped steps called run() only
        assert not overlap
        runner = types.SimpleNamespace(run=runner.run, builder=builder)
    engine = LLMEngine(ecfg, runner=runner, tokenizer=Tokenizer(tokenizer.hf, tokenizer.eos_ids),
                       model_config=cfg, model_name="bench")
    if loop and not overlap:   # a runner with launch is overlapped unless the config says no
        assert not engine.overlap
    params = SamplingParams(max_tokens=steps + 32, ignore_eos=True, stop=["zzqx", "\n\n\n"])
    for i in range(batch):
        engine.add_request(f"h{i}", text_ids[i % 50: i % 50 + prompt_len], params)
    while engine.scheduler.num_waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    parts: collections.Counter = collections.Counter()
    _timed(engine.scheduler, "schedule", parts, "schedule")
    _timed(runner.builder, "build", parts, "build")
    if hasattr(engine, "_process"):
        _timed(engine, "_process", parts, "process")
    device.reset()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        engine.step()
    cpu = time.thread_time() - c0
    wall = time.perf_counter() - t0
    n = device.steps or 1
    ms = lambda x: round(x * 1e3 / steps, 3)  # noqa: E731
    return {"batch": batch, "loop": "overlap" if overlap else "sync", "steps": steps,
            "period_ms": ms(wall), "device_ms": device_ms,
            "idle_ms": round(device.idle_s * 1e3 / n, 3),
            "host_cpu_ms": ms(cpu), **{f"{k}_ms": ms(v) for k, v in sorted(parts.items())},
            "period_over_device": round(wall / steps / (device_ms / 1e3), 3)}


def measure_real(batch: int, loops: list[str], steps: int, args) -> list[dict]:
    """The engine on the real device (args.model), one engine per batch: the step period of
    each loop, and the device time of its decode step (the last one it built, run `steps`
    times back to back: dispatch pipelined, no host work between)."""
    import jax
    import numpy as np
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.sampling_params import SamplingParams
    prompt_len = args.prompt_len
    max_len = prompt_len + (steps + 8) * len(loops) + 64
    extra = dict(backend="xla", layer_loop="scan") if args.cpu_smoke else {}
    engine = LLMEngine(EngineConfig(
        model=args.model, load_format=args.load_format, dtype=args.dtype, max_num_seqs=batch,
        max_model_len=max_len, max_prefill_tokens=max(2048, prompt_len), scheduler="fcfs",
        **extra, **CACHE))
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_len - prompt_len, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", rng.integers(3, vocab, prompt_len).tolist(), params)
    while engine.scheduler.num_waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    last = {}
    build = engine.runner.builder.build

    def keep(plan):
        calls = build(plan)
        last.update({"decode": c for c in calls if not c.is_prefill})
        return calls
    engine.runner.builder.build = keep
    rows = []
    for loop in loops:
        engine.overlap = loop == "overlap"     # the loop switches between steps
        for _ in range(3):
            engine.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        period = (time.perf_counter() - t0) / steps
        rows.append({"batch": batch, "loop": loop, "steps": steps,
                     "period_ms": round(period * 1e3, 3)})
    runner, built = engine.runner, last["decode"]
    tokens = runner._launch(built)[0]
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner._launch(built)[0]
    jax.block_until_ready((tokens, runner.kv.k))
    device = (time.perf_counter() - t0) / steps
    for r in rows:
        r.update(device_ms=round(device * 1e3, 3), bucket=list(built.shape[:4]),
                 period_over_device=round(r["period_ms"] / 1e3 / device, 3))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--device-ms", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--loops", nargs="+", default=["sync", "overlap"], choices=["sync", "overlap"])
    p.add_argument("--out", default="bench_host_overhead.json")
    p.add_argument("--model", default=None,
                   help="run on the real device with this model (HF directory) instead")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None, help="the engine's prefix caching on/off (default: its default)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="with --model on CPU: the accelerator's step (xla, one scanned program)")
    args = p.parse_args(argv)
    if args.enable_prefix_caching is not None:
        CACHE["enable_prefix_caching"] = args.enable_prefix_caching
    if args.model:
        rows = []
        for b in args.batch:
            rows += measure_real(b, args.loops, args.steps, args)
            for r in rows[-len(args.loops):]:
                print(f"batch {b:4d} {r['loop']:8s} period {r['period_ms']:8.3f} ms  device "
                      f"{r['device_ms']:8.3f} ms  period/device {r['period_over_device']:.3f}",
                      flush=True)
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=1)
        return 0
    from jaxserve.loader import default_model_path, load_config
    from jaxserve.tokenizer import Tokenizer, eos_token_ids, load_tokenizer
    path = default_model_path()
    hf = load_tokenizer(types.SimpleNamespace(tokenizer_dir=os.path.dirname(path),
                                              gguf_file=os.path.basename(path)))
    tokenizer = Tokenizer(hf, eos_token_ids(hf))
    cfg = load_config(None)
    rows = []
    for b in args.batch:
        for loop in args.loops:
            rows.append(measure(b, loop == "overlap", args.device_ms, args.steps, tokenizer, cfg))
            r = rows[-1]
            print(f"batch {b:4d} {loop:8s} period {r['period_ms']:7.2f} ms  device "
                  f"{r['device_ms']:5.1f}  idle {r['idle_ms']:6.2f}  host cpu {r['host_cpu_ms']:6.2f}"
                  f" (schedule {r.get('schedule_ms', 0):.2f}, build {r.get('build_ms', 0):.2f},"
                  f" process {r.get('process_ms', 0):.2f})  period/device "
                  f"{r['period_over_device']:.3f}", flush=True)
    print()
    print("| batch | loop | step period ms | device ms | device idle ms (host critical path) |"
          " host CPU ms | schedule | build | process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['loop']} | {r['period_ms']:.2f} | {r['device_ms']:.1f} | "
              f"{r['idle_ms']:.2f} | {r['host_cpu_ms']:.2f} | {r.get('schedule_ms', 0):.2f} | "
              f"{r.get('build_ms', 0):.2f} | {r.get('process_ms', 0):.2f} |")
    with open(args.out, "w") as f:
        json.dump({"device_ms": args.device_ms, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
