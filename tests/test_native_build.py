"""The install-time build of the native CPU kernels (`python -m jaxserve.backends.cpu.native_build`,
`jaxserve build-kernels`): every library into $JAXSERVE_CACHE_DIR, and without a compiler a
reason per library instead of a failure. Fresh processes (the environment decides), no time
limit."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ("cpu_attention", "cpu_matmul")
STATUS = "from jaxserve.backends.cpu import native_build as nb; print(nb.status())"


def _run(args, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAXSERVE_CPU_KERNELS", "CXX")}
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)


def _lines(stdout: str) -> dict[str, str]:
    """{library: what the build printed for it}."""
    return dict(line.split(": ", 1) for line in stdout.strip().splitlines())


@pytest.mark.slow   # compiles both kernels (tens of seconds on 2 cores)
def test_builds_every_library_into_the_cache_dir(tmp_path):
    r = _run(["-m", "jaxserve.backends.cpu.native_build"], JAXSERVE_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    out = _lines(r.stdout)
    assert sorted(out) == list(LIBRARIES)
    files = sorted(os.listdir(tmp_path))   # one .so each, no temporary left behind
    assert [f.split("-")[0] for f in files] == list(LIBRARIES)
    assert all(f.endswith(".so") for f in files)
    for name, f in zip(LIBRARIES, files):
        assert out[name].startswith(f"built {tmp_path / f} ("), out[name]

    mtimes = [os.path.getmtime(tmp_path / f) for f in files]
    r = _run(["-m", "jaxserve.cli", "build-kernels"], JAXSERVE_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _lines(r.stdout) == {n: f"cached {tmp_path / f}" for n, f in zip(LIBRARIES, files)}
    assert [os.path.getmtime(tmp_path / f) for f in files] == mtimes

    # A process loads what the install step built (status(): no reason), compiling nothing.
    r = _run(["-c", STATUS], JAXSERVE_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert ast.literal_eval(r.stdout.strip().splitlines()[-1]) == dict.fromkeys(LIBRARIES)
    assert sorted(os.listdir(tmp_path)) == files
    assert [os.path.getmtime(tmp_path / f) for f in files] == mtimes


def test_no_compiler_is_reported_not_raised(tmp_path):
    cache = tmp_path / "kernels"
    r = _run(["-m", "jaxserve.backends.cpu.native_build"], JAXSERVE_CACHE_DIR=str(cache),
             CXX="/nonexistent/g++")
    assert r.returncode == 0, r.stdout + r.stderr
    out = _lines(r.stdout)
    assert sorted(out) == list(LIBRARIES)
    assert all("no C++ compiler ('/nonexistent/g++' not on PATH)" in v for v in out.values()), out
    assert not cache.exists() or not os.listdir(cache)

    r = _run(["-c", STATUS], JAXSERVE_CACHE_DIR=str(cache), CXX="/nonexistent/g++")
    assert r.returncode == 0, r.stderr
    status = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert set(status) == set(LIBRARIES)
    assert all("no C++ compiler" in reason for reason in status.values()), status


def test_switched_off_builds_nothing(tmp_path):
    r = _run(["-m", "jaxserve.cli", "build-kernels"], JAXSERVE_CACHE_DIR=str(tmp_path),
             JAXSERVE_CPU_KERNELS="0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _lines(r.stdout) == {n: "not built (disabled by JAXSERVE_CPU_KERNELS=0)"
                                for n in LIBRARIES}
    assert os.listdir(tmp_path) == []
