"""Lazy builds of the native XLA:CPU kernels (cpu_attention.cc, cpu_matmul.cc).

Each kernel source is one C++ file (plus the shared header cpu_simd.h), built on first use with the system C++ compiler
(`g++ -O3 -march=native -std=c++17 -shared -fPIC`; `$CXX` overrides g++) into
`$JAXSERVE_CACHE_DIR`, default `~/.cache/jaxserve/kernels/`, as `<name>-<key>.so`, the key hashing
the source and headers, the compiler version, the jaxlib version, the build flags, the FFI include dir and
the CPU's feature flags (the code is built for this CPU). The build goes to a temporary file that
is then renamed into place, so processes building at the same time do not see each other's
partial output. The loaded library's handlers are registered as XLA FFI targets on "cpu".

NativeLibrary.unavailable_reason() / available() never raise: a library is unavailable with
JAXSERVE_CPU_KERNELS=0 (or false/no/off), off the CPU backend, without a compiler, or if the build
or load fails (available() logs the reason once).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = (os.path.join(_HERE, "cpu_simd.h"),)   # included by every kernel source; in the key


def cache_dir() -> str:
    return os.environ.get("JAXSERVE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxserve", "kernels")


def compiler() -> str:
    return os.environ.get("CXX") or "g++"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def disabled_reason() -> str | None:
    """Why no native kernel may be used in this process (None: they may)."""
    flag = os.environ.get("JAXSERVE_CPU_KERNELS", "1").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return f"disabled by JAXSERVE_CPU_KERNELS={flag}"
    try:
        backend = jax.default_backend()
    except Exception as e:           # noqa: BLE001
        return f"no JAX backend ({type(e).__name__}: {e})"
    if backend != "cpu":
        return f"the default JAX backend is {backend!r}, not 'cpu'"
    return None


class NativeLibrary:
    """The C++ file `source`, built into `<cache_dir>/<name>-<key>.so` on first load, whose
    exported FFI handler symbols `targets` {target name: symbol} get registered on the CPU."""

    def __init__(self, name: str, source: str, targets: dict[str, str], what: str,
                 logger: logging.Logger):
        self.name, self.source, self.targets = name, source, dict(targets)
        self.what, self.log = what, logger
        self._lock = threading.Lock()
        self.state: dict = {}        # "lib": the loaded library, or "error": why it is unusable
        self._warned: set[str] = set()

    def build_key(self, cxx: str, include_dir: str) -> str:
        import jaxlib
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                                 check=True).stdout
        h = hashlib.sha256()
        for path in (self.source, *HEADERS):
            with open(path, "rb") as f:
                h.update(f.read())
        for part in (version, jaxlib.__version__, cpu_flags(), " ".join(FLAGS), include_dir):
            h.update(b"\0" + part.encode())
        return h.hexdigest()[:20]

    def build(self, cxx: str, include_dir: str, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{self.name}-",
                                   suffix=".so.tmp")
        os.close(fd)
        try:
            cmd = [cxx, *FLAGS, f"-I{include_dir}", f"-I{_HERE}", self.source, "-o", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"build failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self):
        """The loaded library with its FFI targets registered, or None (reason in
        state['error']). Built and loaded once per process."""
        with self._lock:
            if "lib" in self.state or "error" in self.state:
                return self.state.get("lib")
            try:
                cxx = compiler()
                if shutil.which(cxx) is None:
                    raise RuntimeError(f"no C++ compiler ({cxx!r} not on PATH)")
                include_dir = jax.ffi.include_dir()
                path = os.path.join(cache_dir(),
                                    f"{self.name}-{self.build_key(cxx, include_dir)}.so")
                if not os.path.exists(path):
                    self.log.info("building %s", path)
                    self.build(cxx, include_dir, path)
                try:
                    lib = ctypes.CDLL(path)
                except OSError:      # a damaged cache entry: rebuild it once
                    self.build(cxx, include_dir, path)
                    lib = ctypes.CDLL(path)
                for target, symbol in self.targets.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                                platform="cpu")
                self.state["lib"] = lib
            except Exception as e:   # noqa: BLE001 -- available() must never raise
                self.state["error"] = f"{type(e).__name__}: {e}"
            return self.state.get("lib")

    def unavailable_reason(self) -> str | None:
        """Why available() is False, or None when it is True."""
        reason = disabled_reason()
        if reason is not None:
            return reason
        if self.load() is None:
            return self.state["error"]
        return None

    def available(self) -> bool:
        """Whether the kernels can run here (builds the library on first call)."""
        reason = self.unavailable_reason()
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                self.log.warning("%s unavailable (using the XLA path): %s", self.what, reason)
            return False
        return True
