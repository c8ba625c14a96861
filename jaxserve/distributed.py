"""Multi-host serving: process 0 leads, the other processes replay its device calls.

A serving group's life (`jaxserve serve --distributed` on every host):
  1. every process joins jax.distributed, loads the checkpoint into its own shards and builds
     the same engine (jaxserve/engine.py); the mesh spans every device of every process;
  2. each follower connects to the leader's step channel (TCP, `step_address`) and sends a
     hello: its process id and the fingerprint of what it loaded (`fingerprint`); the leader
     refuses the group, naming what differs, unless every fingerprint equals its own;
  3. the leader serves HTTP, tokenizes, schedules and builds each step (host only); its
     ModelRunner calls `recorder(name, args)` before every device call it makes with host
     inputs (a step's call, a penalty-slot write, adapter writes, warm-up, the pool), and the
     leader sends that call to every follower as one message (`encode`: a pickle whose numpy
     arrays travel raw, out of band), in order;
  4. a follower replays each call on its own runner (`follow`): the same compiled program on
     its shards, so every collective has all its participants. Where the leader holds
     devices of the program, followers read no results: the sampled tokens are replicated
     global arrays, and the leader reads its own copy;
  4b. with data-parallel replicas (`--dp R`, jaxserve/replicas.py) each message names its
     replica and goes only to the processes holding that replica's devices; a replica with
     no device on the leader is built there as a RemoteRunner, and its first process sends
     each call's outputs back over its socket (`result` messages, host arrays);
  5. failure: a follower's reader sees the leader's socket close (or no message, not even a
     heartbeat, for `timeout_s`) and exits; the leader's watchdog, one thread per follower,
     sees a follower's socket close (or no heartbeat for `timeout_s`) and exits non-zero,
     naming the process. Either way the process exits at once (os._exit): a device call
     waiting on a dead peer's collective would never return.
The channel is not authenticated, like jax.distributed's coordinator: keep its port on the
cluster's own network.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import queue
import socket
import struct
import sys
import threading
import time

from jaxserve.fingerprint import differences, fingerprint

log = logging.getLogger("jaxserve.distributed")

HEARTBEAT_S = 1.0          # a message (or a heartbeat) at least this often, each way
DEFAULT_TIMEOUT_S = 60.0   # silence after which a peer is taken for dead
CONNECT_TIMEOUT_S = 600.0  # how long the leader waits for every follower (they load the model)
EXIT_CODE = 3              # a process that stops because another one failed
_HEADER = struct.Struct("<QI")   # pickle bytes, number of raw buffers
_LEN = struct.Struct("<Q")
_PING, _MSG = b"p", b"m"   # each message's first byte: a heartbeat, or encode's frames


def enabled(flag: bool = False) -> bool:
    """--distributed, or JAXSERVE_DISTRIBUTED=1."""
    return flag or os.environ.get("JAXSERVE_DISTRIBUTED", "0").lower() in ("1", "true", "yes")


def timeout_s() -> float:
    return float(os.environ.get("JAXSERVE_STEP_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def connect_timeout_s() -> float:
    return float(os.environ.get("JAXSERVE_STEP_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S))


def step_address() -> tuple[str, int]:
    """Where the leader listens: JAXSERVE_STEP_ADDRESS (host:port), else the coordinator's host
    (process 0 runs it) and JAXSERVE_STEP_PORT, else the coordinator's port + 1."""
    if os.environ.get("JAXSERVE_STEP_ADDRESS"):
        host, _, port = os.environ["JAXSERVE_STEP_ADDRESS"].rpartition(":")
        return host.strip("[]"), int(port)
    from jax._src import distributed   # the address jax.distributed used (given or detected)
    coord = distributed.global_state.coordinator_address or \
        os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    host, _, port = coord.rpartition(":")
    if not host:
        raise ValueError("--distributed: no coordinator address is known; set "
                         "JAX_COORDINATOR_ADDRESS (host:port of process 0) or "
                         "JAXSERVE_STEP_ADDRESS")
    step_port = os.environ.get("JAXSERVE_STEP_PORT")
    return host.strip("[]"), int(step_port) if step_port else int(port) + 1


def is_follower() -> bool:
    import jax
    return jax.process_index() != 0


def check_group(config) -> None:
    """Refuse a group the server cannot run on (config: the EngineConfig): one process, or
    replicas that leave some device out (a process without devices would have nothing to
    replay); jaxserve/replicas.py refuses a replica that takes part of a process's devices."""
    import jax
    n = jax.process_count()
    if n < 2:
        raise ValueError("--distributed: this is the only process (jax.process_count() is 1); "
                         "start one process per host with JAX_COORDINATOR_ADDRESS, "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or on an auto-detected "
                         "cluster), or serve without --distributed")
    dp = getattr(config, "dp", 1)
    if dp * config.tp != jax.device_count():
        raise ValueError(f"--distributed: --dp {dp} x --tp {config.tp} must span every device "
                         f"of the {n} processes ({jax.device_count()} devices)")


# ----------------------------------------------------------------------------- messages

def encode(obj) -> list:
    """obj as the frames of one message: a header, the pickle, then each numpy buffer raw."""
    bufs: list = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    head = _MSG + _HEADER.pack(len(body), len(raws)) + b"".join(_LEN.pack(r.nbytes) for r in raws)
    return [head, body, *raws]


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("closed")
        got += k
    return buf


def decode(sock: socket.socket):
    """One message read from sock (encode's frames); a heartbeat byte gives None."""
    kind = bytes(_recv_exact(sock, 1))
    if kind == _PING:
        return None
    if kind != _MSG:
        raise ConnectionError(f"a message starting with {kind!r}")
    body_len, num_raw = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    sizes = [_LEN.unpack(_recv_exact(sock, _LEN.size))[0] for _ in range(num_raw)]
    body = _recv_exact(sock, body_len)
    return pickle.loads(body, buffers=[_recv_exact(sock, n) for n in sizes])


def _send_json(sock: socket.socket, obj) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_json(sock: socket.socket, limit: int = 1 << 20):
    n = _LEN.unpack(_recv_exact(sock, _LEN.size))[0]
    if n > limit:
        raise ConnectionError(f"a hello of {n} bytes")
    return json.loads(bytes(_recv_exact(sock, n)))


def die(message: str) -> None:
    """Stop this process now, with the message: other threads may be inside a device call that
    waits for a dead peer, and would never return."""
    print(f"jaxserve: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


# ----------------------------------------------------------------------------- the leader

class Leader:
    """The step channel's sending side: one socket per follower, a watchdog thread each."""

    def __init__(self, address: tuple[str, int] | None = None):
        """Listen on the step channel and take the followers' joins in the background: made
        before the model loads, so that a process that stops while the group forms (a
        missing checkpoint, a crash while loading) stops the others at once, named."""
        import jax
        self.num_followers = jax.process_count() - 1
        self.timeout_s = timeout_s()
        self._lock = threading.Lock()      # one message at a time on the sockets
        self._closed = False
        self.socks: dict[int, socket.socket] = {}
        self._joined = threading.Condition()
        _, self.port = address or step_address()   # listens on every interface
        self._srv = socket.create_server(("", self.port), reuse_port=False)
        log.info("step channel: waiting for %d followers on port %d", self.num_followers,
                 self.port)
        threading.Thread(target=self._accept, daemon=True, name="jaxserve-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return   # closed: every follower joined
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(10.0)
            try:
                pid = int(_recv_json(conn)["process_id"])
                if not 0 < pid <= self.num_followers or pid in self.socks:
                    raise ValueError(f"process id {pid}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                # not a follower of this group (a stray connection): ignored
                log.warning("step channel: ignored a connection with a bad hello (%s)", e)
                conn.close()
                continue
            conn.settimeout(None)
            with self._joined:
                self.socks[pid] = conn
                self._joined.notify_all()
            threading.Thread(target=_watch_forming, args=(conn, f"process {pid} (a follower)"),
                             daemon=True, name=f"jaxserve-forming-{pid}").start()

    def start(self, engine, *, wait_s: float | None = None) -> None:
        """Wait up to wait_s (default JAXSERVE_STEP_CONNECT_TIMEOUT_S, 600) for every follower
        to join and send the fingerprint of what it loaded, check them, then record the
        engine's runners."""
        wait_s = wait_s or connect_timeout_s()
        deadline = time.monotonic() + wait_s
        with self._joined:
            while len(self.socks) < self.num_followers:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, self.num_followers + 1)) - set(self.socks))
                    raise ValueError(f"--distributed: processes {missing} did not connect to "
                                     f"the step channel (port {self.port}) within "
                                     f"{wait_s:g} s")
                self._joined.wait(left)
        self._srv.close()
        mine = fingerprint(engine)
        hellos = {}
        for pid, conn in sorted(self.socks.items()):   # each sends it once loaded
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                hellos[pid] = dict(_recv_json(conn)["fingerprint"])
            except socket.timeout:
                raise ValueError(f"--distributed: process {pid} did not finish loading within "
                                 f"{wait_s:g} s") from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                die(f"process {pid} (a follower) stopped while the group was forming ({e}): "
                    "the serving group stops (see that process's log for its cause)")
            conn.settimeout(self.timeout_s)
        bad = {pid: differences(mine, fp, pid) for pid, fp in sorted(hellos.items())}
        bad = {pid: d for pid, d in bad.items() if d}
        if bad:
            why = "; ".join(f"process {pid} differs from process 0 in {', '.join(d)}"
                            for pid, d in bad.items())
            why = f"--distributed: the processes did not load the same model and config: {why}"
            for conn in self.socks.values():
                _send_json(conn, {"refused": why})
                conn.close()
            raise ValueError(why)
        # who gets each replica's calls, and who returns a remote replica's outputs
        runners = getattr(engine.runner, "runners", [engine.runner])
        procs = getattr(engine.runner, "processes", [list(range(self.num_followers + 1))])
        self.results: dict[int, queue.Queue] = {}
        self._last_send = {pid: time.monotonic() for pid in self.socks}
        for pid, conn in self.socks.items():
            _send_json(conn, {"num_pages": engine.runner.kv.num_pages,
                              "report": [r for r, ps in enumerate(procs)
                                         if 0 not in ps and ps[0] == pid]})
        for pid, conn in self.socks.items():
            threading.Thread(target=self._watch, args=(pid, conn), daemon=True,
                             name=f"jaxserve-watch-{pid}").start()
        threading.Thread(target=self._heartbeat, daemon=True, name="jaxserve-heartbeat").start()
        self.num_messages = self.num_bytes = 0
        for r, (runner, ps) in enumerate(zip(runners, procs)):
            to = [p for p in ps if p != 0]
            send = functools.partial(self.send, replica=r, to=to)
            if 0 in ps:
                runner.recorder = send if to else None
            else:   # a RemoteRunner (jaxserve/replicas.py): its outputs come back
                self.results[r] = runner.results = queue.Queue()
                runner.send = send

    def send(self, name: str, args: tuple, replica: int = 0, to=None) -> None:
        """Send one device call of `replica` to the followers `to` (default: all); a runner's
        recorder."""
        data = b"".join(encode((replica, name, args)))
        with self._lock:
            self._broadcast(data, to)
            self.num_messages += 1
            self.num_bytes += len(data)

    def _broadcast(self, data: bytes, to=None) -> None:
        """data to the followers `to` (default: all; under self._lock); one unreachable stops
        the group."""
        now = time.monotonic()
        for pid in self.socks if to is None else to:
            try:
                self.socks[pid].sendall(data)
            except OSError as e:
                die(f"process {pid} (a follower) is unreachable ({e}): the serving group stops")
            self._last_send[pid] = now

    def close(self) -> None:
        """Tell the followers to stop (a clean shutdown), then close the sockets."""
        with self._lock:
            self._closed = True
            for conn in self.socks.values():
                try:
                    conn.sendall(b"".join(encode((None, "stop", ()))))
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _heartbeat(self) -> None:
        """A heartbeat to each follower that was sent nothing for HEARTBEAT_S (a replica's
        processes hear only its calls: an idle replica's would hear nothing)."""
        while not self._closed:
            time.sleep(HEARTBEAT_S / 2)
            with self._lock:
                now = time.monotonic()
                idle = [p for p, t in self._last_send.items() if now - t >= HEARTBEAT_S]
                if not self._closed and idle:
                    self._broadcast(_PING, idle)

    def _watch(self, pid: int, conn: socket.socket) -> None:
        """A follower sends heartbeats, and a remote replica's first process the outputs of
        its calls: silence or a closed socket means it is gone."""
        while True:
            try:
                msg = decode(conn)
                if msg is not None:
                    kind, replica, outputs = msg
                    if kind != "result" or replica not in self.results:
                        raise ConnectionError(f"an unexpected message {kind!r} ({replica})")
                    self.results[replica].put(outputs)
                continue
            except socket.timeout:
                why = f"it sent no heartbeat for {self.timeout_s:g} s"
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
                why = str(e) if not isinstance(e, ConnectionError) or str(e) else "closed"
            if self._closed:
                return
            die(f"process {pid} (a follower) stopped: {why}; the serving group stops "
                "(see that process's log for its cause)")


# ----------------------------------------------------------------------------- a follower

def join(address: tuple[str, int] | None = None, *, wait_s: float | None = None):
    """A follower's step channel: connected to the leader and joined (before the model loads:
    a leader that stops while the group forms stops this process at once)."""
    import jax
    host, port = address or step_address()
    pid = jax.process_index()
    deadline = time.monotonic() + (wait_s or connect_timeout_s())
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise ValueError(f"--distributed: process {pid} could not reach the leader's "
                                 f"step channel at {host}:{port} ({e})") from None
            time.sleep(0.2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _send_json(sock, {"process_id": pid})
    sock.settimeout(None)
    threading.Thread(target=_watch_forming, args=(sock, "the leader (process 0)"),
                     daemon=True, name="jaxserve-forming").start()
    log.warning("process %d joined the leader at %s:%d", pid, host, port)
    return sock


BAD_INPUT = (ValueError, FileNotFoundError, NotImplementedError)


def fail_forming(channel, error: BaseException) -> None:
    """This process failed while the group formed (loading): say why and exit now. A bad
    input of its own (a missing checkpoint) exits 2, as the CLI does; any other error may be
    a collective failing because another process stopped: that process is named if its
    channel closed (`blame`). os._exit: the normal exit waits in jax.distributed's shutdown
    barrier for processes that will never reach it."""
    import traceback
    if isinstance(error, BAD_INPUT):
        print(f"jaxserve: error: {error}", file=sys.stderr, flush=True)
        os._exit(2)
    blame(channel)
    traceback.print_exception(error, file=sys.stderr)
    print(f"jaxserve: error: {error!r}", file=sys.stderr, flush=True)
    os._exit(1)


def blame(channel, wait_s: float = 5.0) -> None:
    """After this process failed while the group formed: if a peer's socket closed (within
    wait_s), stop naming it: a collective with a dead process fails in JAX (gloo) about when
    the channel sees it close, and the lost process is the cause worth naming. Else return
    (the failure is this process's own)."""
    import select
    if isinstance(channel, Leader):
        peers = {conn: f"process {pid} (a follower)" for pid, conn in channel.socks.items()}
    else:
        peers = {channel: "the leader (process 0)"}
    deadline = time.monotonic() + wait_s
    while peers:
        ready, _, _ = select.select(list(peers), [], [], max(0.0, deadline - time.monotonic()))
        for sock in ready:
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except OSError:
                data = b""
            if not data:
                die(f"{peers[sock]} stopped while the serving group was forming (see its log "
                    "for why): the serving group stops")
            del peers[sock]
        if time.monotonic() >= deadline:
            return


def _watch_forming(sock: socket.socket, who: str) -> None:
    """While the group forms nothing is sent until the fingerprints (a follower's) or the
    leader's answer: the peer's socket closing first means it stopped (its own log says
    why); data arriving ends the watch (the channel's readers take over)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except OSError:
        data = b""
    if not data:
        die(f"{who} stopped while the serving group was forming (see its log for why): "
            "the serving group stops")


def follow(engine, sock: socket.socket) -> int:
    """Send the leader what this process loaded, then replay its device calls on this
    process's runners until it says stop (returns 0); a refusal raises ValueError; a lost
    leader ends the process."""
    import jax
    pid = jax.process_index()
    _send_json(sock, {"fingerprint": fingerprint(engine)})
    try:
        reply = _recv_json(sock)
    except (OSError, ConnectionError):
        die(f"process {pid}: the leader (process 0) closed the step channel before serving")
    if "refused" in reply:
        raise ValueError(reply["refused"])
    runners = getattr(engine.runner, "runners", [engine.runner])
    local = getattr(engine.runner, "local", runners)
    for runner in local:
        if runner.kv is None or runner.kv.num_pages != reply["num_pages"]:
            runner.init_pool(reply["num_pages"])   # the leader's pool, whatever this planned
    reports = set(reply.get("report", ()))   # replicas whose outputs this process returns
    calls: queue.Queue = queue.Queue()
    limit = timeout_s()
    sock.settimeout(limit)
    send_lock = threading.Lock()   # the heartbeat thread writes to the socket too
    threading.Thread(target=_read, args=(sock, calls, pid, limit), daemon=True,
                     name="jaxserve-step-reader").start()
    threading.Thread(target=_ping, args=(sock, send_lock), daemon=True,
                     name="jaxserve-heartbeat").start()
    log.warning("process %d follows the leader%s", pid,
                f"; returns the outputs of replicas {sorted(reports)}" if reports else "")
    while True:
        replica, name, args = calls.get()
        if name == "stop":
            jax.block_until_ready([r.kv.k for r in local])
            sock.close()
            return 0
        try:
            out = replay(runners[replica], name, args)
            if name == "call" and replica in reports:
                data = b"".join(encode(("result", replica, host_outputs(out))))
                with send_lock:
                    sock.sendall(data)
        except OSError:
            die(f"process {pid}: the leader (process 0) closed the step channel: it exited or "
                "its host is gone; the serving group stops")
        except BaseException as e:   # the leader's call did not fail: the group cannot go on
            log.exception("replaying %s", name)
            die(f"process {pid}: replaying the leader's {name} of replica {replica} failed "
                f"({e!r})")


REPLAYED = ("call", "write_slot", "write_adapters", "warmup", "init_pool")


def replay(runner, name: str, args: tuple):
    """Make one recorded call (ModelRunner.recorder's name and args) on this runner; its
    result (a call's device outputs)."""
    from jaxserve.replicas import RemoteRunner
    if name not in REPLAYED:
        raise ValueError(f"not a recorded runner call: {name!r}")
    if isinstance(runner, RemoteRunner):
        raise ValueError(f"replica {runner.replica} has no device on this process")
    return getattr(runner, name)(*args)


def host_outputs(outputs):
    """A call's (tokens, logprobs, prompt scores) as numpy arrays (each replicated over the
    replica's devices: this process's copy)."""
    import numpy as np
    import jax
    return jax.tree.map(np.asarray, outputs)


def _read(sock: socket.socket, calls: queue.Queue, pid: int, limit: float) -> None:
    """The follower's reader: messages into `calls`, in order; a lost leader ends the process."""
    while True:
        try:
            msg = decode(sock)
        except socket.timeout:
            die(f"process {pid}: no message from the leader (process 0) for {limit:g} s: "
                "the serving group stops")
        except (OSError, EOFError) as e:
            die(f"process {pid}: the leader (process 0) closed the step channel "
                f"({e or 'closed'}): it exited or its host is gone; the serving group stops")
        if msg is not None:
            calls.put(msg)
            if msg[1] == "stop":
                return


def _ping(sock: socket.socket, lock: threading.Lock) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            with lock:
                sock.sendall(_PING)
        except OSError:
            return   # the reader reports a lost leader
