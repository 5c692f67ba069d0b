"""Metrics, health and request ids of a fresh `keyless up`: a known sequence of IMDS requests,
then /metrics parsed with prometheus_client's text parser must count exactly that."""
import json
import pathlib
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import keyless_bin, start_up


@pytest.fixture(scope="module")
def own():
    d = tempfile.mkdtemp(prefix="keyless-ops-")
    u = start_up(pathlib.Path(d) / "data", extra=("--metrics-listen", "127.0.0.1:0"))
    m = next((re.search(r"Ops endpoint: (http://\S+)", l) for l in u.stdout if "Ops endpoint" in l), None)
    assert m, u.stdout
    u.ops = m.group(1)
    yield u
    u.stop()
    shutil.rmtree(d, ignore_errors=True)


def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()}


def samples(ops):
    status, text, headers = get(f"{ops}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, headers)
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap, name, **labels):
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_match_what_the_test_did(own):
    imds = own.info["imdsUrl"] + "/metadata/identity/oauth2/token?api-version=2018-02-01"
    before = samples(own.ops)
    n = 3
    for i in range(n):  # N distinct resources: N issuances, N cache misses
        status, body, _ = get(f"{imds}&resource=https://app-{i}.example.com/", {"Metadata": "true"})
        assert status == 200, body
    status, _, _ = get(f"{imds}&resource=https://app-0.example.com/", {"Metadata": "true"})  # cached
    assert status == 200
    status, body, _ = get(f"{imds}&resource=https://x.example.com/")  # no Metadata header
    assert status == 400, body
    status, body, _ = get(f"{imds}&resource=https://x.example.com/&client_id={uuid.uuid4()}",
                          {"Metadata": "true"})  # unknown identity
    assert status == 400 and "Identity not found" in body, body
    after = samples(own.ops)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    issued = "keyless_tokens_issued_total"
    refused = "keyless_token_refusals_total"
    assert delta(issued, surface="imds", kind="managed_identity") == n + 1
    # the embedded agent asked the server's host API once per distinct resource
    assert delta(issued, surface="host", kind="managed_identity") == n
    assert delta(refused, surface="imds", reason="invalid_request") == 1
    assert delta(refused, surface="imds", reason="identity_not_found") == 1
    assert delta("keyless_agent_token_cache_misses_total") == n
    assert delta("keyless_agent_token_cache_hits_total") == 1
    route = "/metadata/identity/oauth2/token"
    reqs = "keyless_http_requests_total"
    assert delta(reqs, surface="imds", method="GET", route=route, status="200") == n + 1
    assert delta(reqs, surface="imds", method="GET", route=route, status="400") == 2
    assert delta("keyless_http_request_duration_seconds_count", surface="imds", method="GET",
                 route=route, status="200") == n + 1
    assert value(after, "keyless_signing_key_age_seconds") >= 0
    assert value(after, "keyless_signing_key_next_rotation_seconds") > 0
    assert value(after, "keyless_build_info", process="up", version="0.1.0") == 1
    # no raw path or query value in a label
    assert not any("app-1.example.com" in str(k) for k in after), "a query value became a label"


def test_health_readiness_and_status(own):
    assert get(f"{own.ops}/healthz")[:2] == (200, "ok")
    status, body, _ = get(f"{own.ops}/readyz")
    report = json.loads(body)
    assert status == 200 and report["status"] == "ready", report
    assert {c["name"] for c in report["checks"]} >= {"store", "signing key", "host credential", "first sync"}
    out = subprocess.run([keyless_bin(), "status", "--server-metrics", own.ops], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^server\s+ready", out.stdout, re.M), out.stdout
    # a named process that does not answer fails the status
    out = subprocess.run([keyless_bin(), "status", "--server-metrics", own.ops, "--node-metrics", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "DOWN" in out.stdout, out.stdout


def test_arm_and_token_endpoint_request_ids(own):
    base = own.info["serverUrl"]
    ca = own.info["caFile"]
    import ssl
    ctx = ssl.create_default_context(cafile=ca)
    req = urllib.request.Request(f"{base}/subscriptions?api-version=2022-12-01",
                                 headers={"x-ms-correlation-request-id": "corr-42"})
    try:
        urllib.request.urlopen(req, timeout=10, context=ctx)
        pytest.fail("unauthenticated ARM call answered 2xx")
    except urllib.error.HTTPError as e:
        assert e.code == 401
        assert e.headers["x-ms-correlation-request-id"] == "corr-42"
        uuid.UUID(e.headers["x-ms-request-id"])
    req = urllib.request.Request(f"{base}/{own.info['tenantId']}/oauth2/v2.0/token", data=b"grant_type=client_credentials",
                                 headers={"client-request-id": "cr-7"})
    try:
        urllib.request.urlopen(req, timeout=10, context=ctx)
        pytest.fail("a token without credentials")
    except urllib.error.HTTPError as e:
        assert e.code in (400, 401)
        assert e.headers["client-request-id"] == "cr-7"
        uuid.UUID(e.headers["x-ms-request-id"])
