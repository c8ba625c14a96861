"""Families' tiny checkpoints and PEFT adapters under tensor (and expert) parallelism, in a
fresh process with simulated CPU devices (the device count is fixed before JAX starts, so
tests/test_families.py runs this as a subprocess and reads one JSON object from its last line):
    python tests/family_tp_check.py '[{"kind": K, "path": P, "adapter": A, "prompts": [[...]],
                                       "runs": ["2x1", "4x4"]}, ...]'
    -> {K: {"devices": 8, "2x1": {"base": [[tokens], ...], "lora": [...]}, ...}, ...}
Each run is the real engine (tests/family_check.engine_greedy) at that tp and ep. A kind whose
runs raise reports {"error": traceback}; the other kinds still run.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from tests.family_check import Tiny, engine_greedy  # noqa: E402


def main(argv):
    result = {}
    for job in json.loads(argv[0]):
        t = Tiny(job["kind"], job["path"], job["adapter"], hf=None, peft=None,
                 prompts=job["prompts"])
        res = result[t.kind] = {"devices": jax.device_count()}
        try:
            for run in job["runs"]:
                tp, ep = (int(x) for x in run.split("x"))
                # one page per sequence: one prefill and one decode program per run (the
                # sharded step's layer math is what differs from tp=1; paging is the same code
                # at every tp)
                res[run] = engine_greedy(t, tp=tp, ep=ep, page_size=96)
        except Exception:
            res["error"] = traceback.format_exc()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
