"""Roles, adapter caps, /metrics access and cardinality, and no server paths in responses
(issue 20, items 2, 4 and 5), on the fake-runner server (tests/fake_runner.py)."""
from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_runner import FAKE_MODEL, expected_text, fake_engine, write_adapter
from jaxserve.lora.store import load_adapter as read_adapter
from jaxserve.sampling_params import SamplingParams
from server.cli import parse_bytes, read_key_file
from server.config import ServerConfig
from server.metrics import ServingMetrics
from server_harness import ServerThread

KEYS = {"admin": "sk-admin", "alice": "sk-alice", "bob": "sk-bob", "mon": "sk-mon"}


def http(url: str, path: str, body=None, key: str | None = None):
    """(status, parsed JSON or text); never raises on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers,
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    text = raw.decode("utf-8")   # strict: every response must be valid UTF-8
    return status, (json.loads(text) if "json" in ctype else text)


def as_(who: str):
    return KEYS[who]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(("alpha", "beta", "gamma", "delta", "nested/eps")):
        write_adapter(r / name, seed=i)
    (r / "broken").mkdir()
    (r / "broken" / "adapter_config.json").write_text("{not json")
    (r / "empty").mkdir()
    return str(r)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    d = tmp_path_factory.mktemp("outside") / "ext"
    write_adapter(d, seed=9)
    return str(d)


def keyed_config(root: str, **kw) -> ServerConfig:
    return ServerConfig(api_keys=tuple((k, c) for c, k in KEYS.items()),
                        key_roles=(("sk-admin", "admin"), ("sk-mon", "metrics")),
                        lora_root=root, lora_modules=(("sql", os.path.join(root, "alpha")),),
                        **kw)


# ------------------------------------------------------------------ key files
def test_key_file_roles_and_admin_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("sk-a alice 2\nsk-m mon role=metrics\nsk-x role=admin  # the operator\nsk-b\n")
    keys, weights, roles = read_key_file(str(f))
    assert keys == (("sk-a", "alice"), ("sk-m", "mon"), ("sk-x", "client2"), ("sk-b", "client3"))
    assert weights == {"alice": 2.0}
    assert roles == {"sk-a": "tenant", "sk-m": "metrics", "sk-x": "admin", "sk-b": "tenant"}
    keys, _, roles = read_key_file(str(f), role="admin")   # --admin-api-keys: all admins
    assert set(roles.values()) == {"admin"}
    f.write_text("sk-a alice role=root\n")
    with pytest.raises(ValueError, match="role must be one of"):
        read_key_file(str(f))
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")


def test_cli_builds_roles_and_caps(tmp_path, root):
    from jaxserve.cli import add_engine_arguments
    from server.cli import add_arguments, build_configs
    (tmp_path / "t").write_text("sk-a alice\nsk-m mon role=metrics\n")
    (tmp_path / "a").write_text("sk-root\n")
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    add_arguments(p)
    args = p.parse_args(["--api-keys", str(tmp_path / "t"), "--admin-api-keys",
                         str(tmp_path / "a"), "--lora-root", root, "--allow-tenant-adapters",
                         "--max-loaded-adapters", "8", "--max-adapter-host-bytes", "1G",
                         "--metrics-max-clients", "5"])
    _, _, cfg = build_configs(args)
    assert dict(cfg.api_keys) == {"sk-a": "alice", "sk-m": "mon", "sk-root": "admin0"}
    assert dict(cfg.key_roles) == {"sk-m": "metrics", "sk-root": "admin"}
    assert (cfg.allow_tenant_adapters, cfg.max_loaded_adapters, cfg.max_adapter_host_bytes,
            cfg.metrics_max_clients) == (True, 8, 1 << 30, 5)


# ------------------------------------------------------------------ roles (no tenant adapters)
@pytest.fixture(scope="module")
def keyed(root):
    eng = fake_engine()
    with ServerThread(eng, keyed_config(root)) as s:
        s.engine = eng
        yield s


def test_tenants_cannot_load_or_unload(keyed):
    st, b = http(keyed.url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "beta"},
                 as_("alice"))
    assert st == 403 and b["error"]["type"] == "permission_error", b
    assert b["error"]["code"] == "admin_required" and "x" not in keyed.engine.loras
    # another's (here: the operator's shared) adapter cannot be unloaded by a tenant
    st, b = http(keyed.url, "/v1/unload_lora_adapter", {"lora_name": "sql"}, as_("bob"))
    assert st == 403 and b["error"]["type"] == "permission_error"
    assert "sql" in keyed.engine.loras
    assert http(keyed.url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "beta"}
                )[0] == 401
    # implicit loading by path is an admin action too; using a loaded one is not
    st, b = http(keyed.url, "/generate", {"inputs": "hi", "lora_dir": "gamma"}, as_("alice"))
    assert st == 403 and b["error"]["code"] == "admin_required"
    st, b = http(keyed.url, "/generate", {"inputs": "hi", "lora_dir": "alpha",
                                          "parameters": {"max_new_tokens": 3}}, as_("alice"))
    assert st == 200 and b["generated_text"] == [expected_text("hi", 3, adapter="sql")]


def test_admin_loads_tenants_use_admin_unloads(keyed):
    st, b = http(keyed.url, "/v1/load_lora_adapter", {"lora_name": "shared-b", "lora_path": "beta"},
                 as_("admin"))
    assert st == 200, b
    st, b = http(keyed.url, "/v1/completions", {"model": "shared-b", "prompt": "hey",
                                                "max_tokens": 4}, as_("bob"))
    assert st == 200 and b["choices"][0]["text"] == expected_text("hey", 4, adapter="shared-b")
    assert http(keyed.url, "/v1/unload_lora_adapter", {"lora_name": "shared-b"},
                as_("alice"))[0] == 403
    assert http(keyed.url, "/v1/unload_lora_adapter", {"lora_name": "shared-b"},
                as_("admin"))[0] == 200
    st, b = http(keyed.url, "/generate", {"inputs": "hi", "lora_dir": "gamma"}, as_("admin"))
    assert st == 200 and "gamma" in keyed.engine.loras
    assert http(keyed.url, "/v1/unload_lora_adapter", {"lora_name": "gamma"},
                as_("admin"))[0] == 200


def test_metrics_needs_admin_or_metrics_role(keyed):
    assert http(keyed.url, "/metrics")[0] == 401
    assert http(keyed.url, "/metrics", key="nope")[0] == 401
    st, b = http(keyed.url, "/metrics", key=as_("alice"))
    assert st == 403 and b["error"]["type"] == "permission_error"
    for who in ("mon", "admin"):
        st, text = http(keyed.url, "/metrics", key=as_(who))
        assert st == 200 and "vllm:num_requests_running" in text
    assert http(keyed.url, "/health")[0] == 200


# ------------------------------------------------------------------ tenants' own adapters
@pytest.fixture(scope="module")
def tenants(root):
    eng = fake_engine()
    with ServerThread(eng, keyed_config(root, allow_tenant_adapters=True,
                                        max_adapters_per_tenant=2)) as s:
        s.engine = eng
        yield s


def model_ids(srv, who):
    st, b = http(srv.url, "/v1/models", key=as_(who))
    assert st == 200
    return {m["id"]: m["root"] for m in b["data"]}


def test_tenant_adapters_are_private(tenants):
    load = {"lora_name": "mine", "lora_path": "beta"}
    st, b = http(tenants.url, "/v1/load_lora_adapter", load, as_("alice"))
    assert st == 200 and b["lora_name"] == "mine", b
    assert model_ids(tenants, "alice")["mine"] == "beta"
    assert "mine" not in model_ids(tenants, "bob")
    assert "alice~mine" in model_ids(tenants, "admin")
    req = {"model": "mine", "prompt": "hey", "max_tokens": 4}
    st, b = http(tenants.url, "/v1/completions", req, as_("alice"))
    assert st == 200 and b["choices"][0]["text"] == expected_text("hey", 4, adapter="alice~mine")
    for model in ("mine", "alice~mine", "fake-model:alice~mine"):   # others: as if absent
        st, b = http(tenants.url, "/v1/completions", {**req, "model": model}, as_("bob"))
        assert st == 404, (model, b)
        assert "beta" not in json.dumps(b)
    for name in ("mine", "alice~mine"):     # bob cannot unload alice's adapter: 404
        st, b = http(tenants.url, "/v1/unload_lora_adapter", {"lora_name": name}, as_("bob"))
        assert st == 404 and b["error"]["code"] == "adapter_not_found", b
    # bob may have his own "mine"; each sees their own
    assert http(tenants.url, "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "gamma"},
                as_("bob"))[0] == 200
    assert model_ids(tenants, "bob")["mine"] == "gamma"
    st, b = http(tenants.url, "/v1/completions", req, as_("bob"))
    assert b["choices"][0]["text"] == expected_text("hey", 4, adapter="bob~mine")
    # a shared adapter's name cannot be taken, nor the shared one unloaded
    st, b = http(tenants.url, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "beta"},
                 as_("alice"))
    assert st == 400 and b["error"]["code"] == "adapter_exists"
    assert http(tenants.url, "/v1/unload_lora_adapter", {"lora_name": "sql"}, as_("alice"))[0] == 403
    for who in ("alice", "bob"):
        assert http(tenants.url, "/v1/unload_lora_adapter", {"lora_name": "mine"},
                    as_(who))[0] == 200
    assert not {"alice~mine", "bob~mine"} & set(tenants.engine.loras.names())


def test_per_tenant_cap_and_lora_dir(tenants):
    for name, path in (("t1", "beta"), ("t2", "gamma")):
        assert http(tenants.url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                    as_("alice"))[0] == 200
    st, b = http(tenants.url, "/v1/load_lora_adapter", {"lora_name": "t3", "lora_path": "delta"},
                 as_("alice"))
    assert st == 409 and b["error"]["code"] == "adapter_limit_reached"
    assert "--max-adapters-per-tenant" in b["error"]["message"] and "unload" in b["error"]["message"]
    st, b = http(tenants.url, "/generate", {"inputs": "hi", "lora_dir": "delta"}, as_("alice"))
    assert st == 409
    # bob's cap is his own; lora_dir loads an adapter of his own under its relative path
    st, b = http(tenants.url, "/generate", {"inputs": "hi", "lora_dir": "nested/eps",
                                            "parameters": {"max_new_tokens": 2}}, as_("bob"))
    assert st == 200 and b["generated_text"] == [expected_text("hi", 2, adapter="bob~nested/eps")]
    assert model_ids(tenants, "bob")["nested/eps"] == "nested/eps"
    assert "nested/eps" not in model_ids(tenants, "alice")
    for who, name in (("alice", "t1"), ("alice", "t2"), ("bob", "nested/eps")):
        assert http(tenants.url, "/v1/unload_lora_adapter", {"lora_name": name}, as_(who))[0] == 200
    assert http(tenants.url, "/v1/load_lora_adapter", {"lora_name": "t3", "lora_path": "delta"},
                as_("alice"))[0] == 200
    assert http(tenants.url, "/v1/unload_lora_adapter", {"lora_name": "alice~t3"},
                as_("admin"))[0] == 200            # admins may unload anyone's
    assert "mine" not in model_ids(tenants, "alice") and "t3" not in model_ids(tenants, "alice")


# ------------------------------------------------------------------ caps on loaded adapters
def test_total_caps_count_and_host_bytes(root):
    one = read_adapter("x", os.path.join(root, "beta"), FAKE_MODEL).num_bytes
    cfg = ServerConfig(lora_root=root, lora_modules=(("sql", os.path.join(root, "alpha")),),
                       max_loaded_adapters=2)
    with ServerThread(fake_engine(), cfg) as s:   # no keys: local use, every caller an admin
        assert http(s.url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "beta"})[0] == 200
        st, b = http(s.url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "gamma"})
        assert st == 409 and b["error"]["code"] == "adapter_limit_reached", b
        assert "--max-loaded-adapters" in b["error"]["message"]
        assert http(s.url, "/v1/unload_lora_adapter", {"lora_name": "b"})[0] == 200
        assert http(s.url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "gamma"})[0] == 200
    cfg = ServerConfig(lora_root=root, lora_modules=(("sql", os.path.join(root, "alpha")),),
                       max_adapter_host_bytes=2 * one + one // 2)
    with ServerThread(fake_engine(), cfg) as s:
        assert http(s.url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "beta"})[0] == 200
        st, b = http(s.url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "gamma"})
        assert st == 409 and "--max-adapter-host-bytes" in b["error"]["message"], b
        assert http(s.url, "/v1/unload_lora_adapter", {"lora_name": "sql"})[0] == 200
        assert http(s.url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "gamma"})[0] == 200


# ------------------------------------------------------------------ no server paths
def test_no_server_paths_in_responses(root, outside):
    cfg = ServerConfig(lora_root=root, model_path=os.path.dirname(root),
                       lora_modules=(("ext", outside), ("sql", os.path.join(root, "alpha"))))
    with ServerThread(fake_engine(), cfg) as s:
        st, b = http(s.url, "/v1/models")
        roots = {m["id"]: m["root"] for m in b["data"]}
        assert roots == {"fake-model": "fake-model", "ext": "ext", "sql": "alpha"}
        seen = []
        for path in ("broken", "empty", os.path.join(root, "broken"), "missing", "nested"):
            st, b = http(s.url, "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": path})
            assert 400 <= st < 500, b
            seen.append(b["error"]["message"])
        st, b = http(s.url, "/generate", {"inputs": "x", "lora_dir": "broken"})
        seen.append(b["error"]["message"])
        text = "\n".join(seen)
        assert root not in text and "/tmp" not in text and "pytest" not in text, text
        assert "broken/adapter_config.json" in text   # the relative name stands in
    cfg = ServerConfig(model_path="org/some-model")     # a repo id is no server path
    with ServerThread(fake_engine(), cfg) as s:
        assert http(s.url, "/v1/models")[1]["data"][0]["root"] == "org/some-model"


# ------------------------------------------------------------------ /metrics cardinality
def client_labels(text: str) -> set[str]:
    found = set()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if "client" in sample.labels:
                found.add(sample.labels["client"])
    return found


def test_metrics_bounded_for_many_users():
    eng = fake_engine(max_num_seqs=8)
    with ServerThread(eng, ServerConfig(metrics_max_clients=5)) as s:
        def burst(users):
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(lambda u: http(s.url, "/v1/completions", {
                    "model": "fake-model", "prompt": u, "max_tokens": 1, "user": u})[0], users))
            assert statuses == [200] * len(users)

        burst([f"user{i:03d}" for i in range(20)])
        small = http(s.url, "/metrics")[1]
        burst([f"user{i:03d}" for i in range(20, 400)])
        st, text = http(s.url, "/metrics")
        assert st == 200
        labels = client_labels(text)
        assert len(labels) == 6 and "other" in labels, labels
        assert len(text) < len(small) * 1.2, (len(small), len(text))
        totals = {}
        for fam in text_string_to_metric_families(text):
            if fam.name.startswith("jaxserve:scheduler_client_input_tokens"):
                totals = {x.labels["client"]: x.value for x in fam.samples}
        # every user sent len("userNNN") = 7 prompt tokens: "other" sums the 395 not shown
        assert totals["other"] == 7 * 395 and sum(totals.values()) == 7 * 400, totals
        assert 'jaxserve:scheduler_clients_other{model_name="fake-model"} 395' in text


@pytest.mark.parametrize("name", ["\ud800", "a\udfffb", "nul\x00", 'q"\\\n\r\t\x7f', "é日本",
                                  "\u2028x", "other"])
def test_metrics_render_any_client_name(name):
    m = ServingMetrics()
    stats = {"scheduler": {"policy": "vtc", "clients": {
        name: {"counter": 1.0, "weight": 1.0, "input_tokens": 5, "output_tokens": 3},
        "plain": {"counter": 0.0, "weight": 1.0, "input_tokens": 1, "output_tokens": 1}}}}
    text = m.render("m\ud800", stats, 0)
    text.encode("utf-8")   # no lone surrogate left
    fams = list(text_string_to_metric_families(text))
    assert fams
    labels = client_labels(text)
    assert len(labels) == 2 and "plain" in labels
    if name == "other":   # a client really named "other" is folded into the aggregate
        assert labels == {"plain", "other"}


def test_metrics_surrogate_client_over_http():
    """A client id no JSON parser refusal reaches (set on the engine directly): /metrics
    still answers 200 with valid UTF-8."""
    eng = fake_engine()
    with ServerThread(eng, ServerConfig()) as s:
        async def one():
            async for _ in s.async_engine.generate(None, [104, 105], SamplingParams(max_tokens=1),
                                                   client_id="\ud800\x00x"):
                pass
        s.on_loop(one())
        st, text = http(s.url, "/metrics")
        assert st == 200 and '\\\\ud800\\\\x00x' in text
        list(text_string_to_metric_families(text))


def test_other_aggregation_rules():
    from server.metrics import _per_client
    clients = {f"c{i}": {"counter": float(i), "weight": 1.0, "input_tokens": 10 * i,
                         "output_tokens": 0} for i in range(5)}
    out, n, n_other = _per_client({"scheduler": {"clients": clients}}, max_clients=2)
    assert (n, n_other) == (5, 3)
    as_dict = {f: dict(v) for f, v in out.items()}
    assert set(as_dict["input_tokens"]) == {'client="c4"', 'client="c3"', 'client="other"'}
    assert as_dict["input_tokens"]['client="other"'] == 0 + 10 + 20
    assert as_dict["counter"]['client="other"'] == 0.0      # min over c0..c2
    assert as_dict["weight"]['client="other"'] == 3.0       # sum


def test_no_keys_keeps_local_loading(root):
    """No keys configured: anyone may load (local use), but only with --lora-root."""
    with ServerThread(fake_engine(), ServerConfig(lora_root=root)) as s:
        assert http(s.url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "beta"})[0] == 200
        assert http(s.url, "/metrics")[0] == 200
    with ServerThread(fake_engine(), ServerConfig()) as s:
        st, b = http(s.url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "beta"})
        assert st == 403 and b["error"]["code"] == "lora_root_not_set"



def test_client_id_hashes_any_bearer_key():
    """Without key files a bearer key is hashed into the client id; a key holding lone
    surrogates (header bytes that are not UTF-8, as aiohttp decodes them) hashes too, apart
    from other keys, and a UTF-8 key hashes as before."""
    import hashlib
    from types import SimpleNamespace
    from server.context import ServerContext

    ctx = ServerContext.__new__(ServerContext)   # client_id needs only the keys (none here)
    ctx.api_keys = {}

    def cid(key):
        return ctx.client_id(SimpleNamespace(headers={"Authorization": f"Bearer {key}"}), None)

    ids = [cid(k) for k in ("sk-\udcff\udcfe", "sk-\udcff", "sk-\ud800x", "sk-\udfff", "sk-é")]
    assert all(i.startswith("key-") and len(i) == 16 for i in ids), ids
    assert len(set(ids)) == len(ids), ids
    assert ids[-1] == "key-" + hashlib.sha256("sk-é".encode()).hexdigest()[:12]
    assert ctx.client_id(SimpleNamespace(headers={}), "alice") == "alice"
