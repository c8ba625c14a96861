"""Device backends: one object, chosen at engine start, owns everything device-specific.

  xla     plain XLA: every platform, tensor parallel (jaxserve/backends/base.py)
  pallas  Pallas attention and LoRA kernels (GPU, TPU; interpret mode on CPU)
  cpu     XLA:CPU with native kernels (jaxserve/backends/cpu/): the only module that uses them
`select` resolves `auto` and logs which backend runs and why.
"""
from __future__ import annotations

import logging

import jax

from jaxserve.backends.base import LAYER_LOOPS, XlaBackend

NAMES = ("auto", "xla", "pallas", "cpu")
log = logging.getLogger("jaxserve.backends")


def select(name: str, cfg, dtype, *, tp: int = 1, layer_loop: str = "auto",
           interpret: bool | None = None, ep: int = 1, devices=None):
    """The backend `name` for a model `cfg` in `dtype` on a tp-device mesh (tp > 1: a mesh is
    made here), a mixture of experts' experts split over it by whole experts when ep = tp
    (jaxserve.sharding.check_parallel refuses other ep). auto: pallas on GPU/TPU; on CPU the cpu backend when its kernels load and the
    step is unsharded, else xla. An explicit `cpu` that cannot run falls back to xla with a
    warning saying why. layer_loop auto: per-layer on CPU without tensor parallelism, else scan.
    devices: the tp devices to run on (a data-parallel replica's, jaxserve/replicas.py): a mesh
    over them is made even at tp 1, so the cpu backend (unsharded, default device) is not used."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose from {NAMES}")
    if layer_loop not in ("auto",) + LAYER_LOOPS:
        raise ValueError(f"unknown layer loop {layer_loop!r}; choose from "
                         f"{('auto',) + LAYER_LOOPS}")
    from jaxserve.backends.cpu import backend as cpu
    platform = jax.default_backend()
    why = f"--backend {name}"
    if name == "auto":
        if platform != "cpu":
            name, why = "pallas", f"auto on {platform}"
        else:
            reason = (cpu.unavailable_reason(tp) if devices is None else
                      "a data-parallel replica runs on a mesh of its own devices")
            name, why = ("cpu", "auto on cpu") if reason is None else (
                "xla", f"auto on cpu; native kernels unused: {reason}")
    elif name == "cpu":
        reason = (cpu.unavailable_reason(tp) if devices is None else
                  "a data-parallel replica runs on a mesh of its own devices")
        if reason is not None:
            log.warning("backend 'cpu' unavailable (%s): using 'xla'", reason)
            name, why = "xla", f"--backend cpu unavailable: {reason}"
    from jaxserve import sharding
    sharding.check_parallel(cfg, tp, ep)      # before any device or mesh is touched
    mesh = None
    if devices is not None:
        mesh = sharding.make_mesh(tp, devices)
    elif tp > 1:
        mesh = sharding.make_mesh(tp)
    if layer_loop == "auto":   # XLA:CPU: a scan copies each layer's weights out of the stack
        layer_loop = "per-layer" if platform == "cpu" and mesh is None else "scan"
    if name == "cpu":
        backend = cpu.CpuBackend(cfg, dtype, layer_loop=layer_loop)
    elif name == "pallas":
        from jaxserve.backends.pallas import PallasBackend
        backend = PallasBackend(cfg, dtype, mesh=mesh, layer_loop=layer_loop, interpret=interpret,
                                ep=ep)
    else:
        backend = XlaBackend(cfg, dtype, mesh=mesh, layer_loop=layer_loop, ep=ep)
    backend.why = why
    log.info("%s [%s]", backend.describe(), why)
    return backend
