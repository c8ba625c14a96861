"""What prefix caching costs when nothing is reused, offline and in one process (the HTTP
benchmark's run-to-run noise on this VM is larger than the effect): 64 distinct 256-token
prompts, 32 output tokens, on two engines of the embedded model, caching off and on, alternated
three times (each engine warmed on other prompts first); median output tok/s of each.

  .venv/bin/python scripts/bench_prefix_nohit.py
"""
import random, time, statistics
from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.loader import load_model
from jaxserve.sampling_params import SamplingParams
rng = random.Random(0)
def prompts(): return [[rng.randrange(100, 40000) for _ in range(256)] for _ in range(64)]
p = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
engines = {}
for on in (False, True):
    engines[on] = LLMEngine(EngineConfig(dtype="bfloat16", enable_prefix_caching=on))
    engines[on].generate(prompts(), p)   # warm-up: compiles the shapes
res = {False: [], True: []}
for r in range(3):
    for on in ((False, True) if r % 2 == 0 else (True, False)):
        ps = prompts()
        t = time.perf_counter(); engines[on].generate(ps, p); dt = time.perf_counter() - t
        res[on].append(64 * 32 / dt)
        st = engines[on].stats()["prefix_cache"]
        print(f"caching {'on ' if on else 'off'} {64*32/dt:7.1f} output tok/s  ({dt:.2f} s, hits {st['hits']})", flush=True)
m = {k: statistics.median(v) for k, v in res.items()}
print(f"median off {m[False]:.1f} on {m[True]:.1f} on/off {m[True]/m[False]:.3f}")
