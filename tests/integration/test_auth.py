"""Authentication, ownership and stream tokens against the live service (ACCEPTANCE X1-X3).

Tokens are made in the test with PyJWT; the JWKS is served on loopback; two subjects, alice and bob.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from service.security import STREAM_AUDIENCE, Authenticator, Principal
from service.settings import Settings, SettingsError
from tests.integration.conftest import TERMINAL, Service, ServiceFactory, delete_prefix
from tests.integration.test_persistence import fresh_database
from tests.support.auth import AUDIENCE, ISSUER, SECRET, SigningKeys, claims_for, forged, hs256, jwks_server
from tests.support.sse import collect_events

STREAM_SECRET = "stream-token-secret-for-the-tests"
pytestmark = pytest.mark.xdist_group("auth")


@pytest.fixture
def keys() -> SigningKeys:
    return SigningKeys()


@pytest.fixture
async def jwks_url(keys: SigningKeys) -> AsyncIterator[str]:
    async with jwks_server(keys) as url:
        yield url


def jwt_settings(**overrides: Any) -> dict[str, Any]:
    return {
        "auth": "jwt",
        "jwt_audience": AUDIENCE,
        "jwt_issuer": ISSUER,
        "stream_token_secret": STREAM_SECRET,
        "jwks_cooldown_s": 0,
        **overrides,
    }


@pytest.fixture
async def secured(make_service: ServiceFactory, jwks_url: str) -> Service:
    """The service with auth on, keys from the JWKS."""
    return await make_service(**jwt_settings(jwks_url=jwks_url))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Caller:
    """One subject's view of the service."""

    def __init__(self, service: Service, token: str) -> None:
        self.service = service
        self.token = token
        self.http = httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=20)

    async def chat(self) -> str:
        response = await self.http.post("/v1/chats", json={})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def finished_run(self) -> tuple[str, str]:
        chat = await self.chat()
        response, events = await collect_events(
            self.http, "POST", f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={"accept": "text/event-stream"}
        )
        assert response.status_code == 200, response.text
        assert events[-1]["type"] == "run.completed", events
        return chat, str(events[0]["run_id"])

    async def ws(self, **query: str) -> Any:
        url = self.service.ws_url + (f"?{httpx.QueryParams(query)}" if query else "")
        headers = {} if query else bearer(self.token)
        return await websockets.connect(url, additional_headers=headers)


@pytest.fixture
async def alice(secured: Service, keys: SigningKeys) -> AsyncIterator[Caller]:
    caller = Caller(secured, keys.token("alice"))
    yield caller
    await caller.http.aclose()


@pytest.fixture
async def bob(secured: Service, keys: SigningKeys) -> AsyncIterator[Caller]:
    caller = Caller(secured, keys.token("bob"))
    yield caller
    await caller.http.aclose()


# --- X2: the token matrix ------------------------------------------------------------------------


def bad_tokens(keys: SigningKeys) -> dict[str, str | None]:
    stream = jwt.encode(
        {"sub": "alice", "scope": "ws", "aud": STREAM_AUDIENCE, "exp": int(time.time()) + 60}, STREAM_SECRET
    )
    return {
        "no token": None,
        "alg none": forged(claims_for("alice"), alg="none"),
        "HS256 keyed with the RS256 public key": forged(
            claims_for("alice"), alg="HS256", key=keys.public_pem().encode(), kid="k1"
        ),
        "bad signature": keys.token("alice")[:-4] + "AAAA",
        "expired beyond the leeway": keys.token("alice", exp=int(time.time()) - 31),
        "no exp": keys.token("alice", exp=None),
        "wrong aud": keys.token("alice", aud="another-service"),
        "wrong iss": keys.token("alice", iss="https://evil.example"),
        "unknown kid": keys.token("alice", kid="k-unknown"),
        "no sub": keys.token(None),
        "a stream token as bearer": stream,
    }


async def test_every_bad_token_is_401_on_every_transport_and_starts_nothing(
    secured: Service, alice: Caller, keys: SigningKeys
) -> None:
    chat, run = await alice.finished_run()
    requests_before = len(secured.upstream.requests)
    refused: list[str] = []
    for case, token in bad_tokens(keys).items():
        headers = {} if token is None else bearer(token)
        http = secured.http
        for method, path, body in [
            ("GET", "/v1/chats", None),
            ("POST", "/v1/chats", {}),
            ("GET", f"/v1/chats/{chat}", None),
            ("GET", f"/v1/runs/{run}", None),
            ("POST", f"/v1/runs/{run}/cancel", None),
            ("POST", f"/v1/runs/{run}/stream-token", None),
            ("POST", "/v1/ws-token", None),
        ]:
            response = await http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (case, path, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        sse_post = await http.post(
            f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={**headers, "accept": "text/event-stream"}
        )
        sse_get = await http.get(f"/v1/runs/{run}/events", headers=headers)
        sse_query = await http.get(f"/v1/runs/{run}/events", params={"token": token or ""})
        assert [sse_post.status_code, sse_get.status_code, sse_query.status_code] == [401, 401, 401], case
        handshakes = [({}, headers)]
        if case != "a stream token as bearer":  # (in ?token= of /v1/ws, a ws stream token is what it is for)
            handshakes.append(({"token": token or ""}, {}))
        for query, ws_headers in handshakes:
            url = secured.ws_url + (f"?{httpx.QueryParams(query)}" if query else "")
            with pytest.raises(InvalidStatus) as refusal:
                await websockets.connect(url, additional_headers=ws_headers)
            assert refusal.value.response.status_code == 401, case
        refused.append(case)
    assert len(refused) == len(bad_tokens(keys))
    assert len(secured.upstream.requests) == requests_before  # no run started
    chats = (await alice.http.get("/v1/chats")).json()["items"]
    assert [c["id"] for c in chats] == [chat]  # no chat created


async def test_a_token_within_the_leeway_and_a_rotated_key_are_accepted(
    secured: Service, keys: SigningKeys, alice: Caller
) -> None:
    late = keys.token("alice", exp=int(time.time()) - 5)  # the default leeway is 10 s
    assert (await secured.http.get("/v1/chats", headers=bearer(late))).status_code == 200
    fetches = keys.jwks_fetches
    keys.rotate()  # the identity provider signs with a key the service has not seen
    assert (await secured.http.get("/v1/chats", headers=bearer(keys.token("alice")))).status_code == 200
    assert keys.jwks_fetches == fetches + 1  # fetched again for the unknown kid, once


async def test_hs256_secret_and_pem_public_key_configurations(
    make_service: ServiceFactory, keys: SigningKeys, tmp_path: Path
) -> None:
    with_secret = await make_service(**jwt_settings(jwt_secret=SECRET))
    assert (await with_secret.http.get("/v1/chats", headers=bearer(hs256("alice")))).status_code == 200
    assert (await with_secret.http.get("/v1/chats", headers=bearer(hs256("alice", secret="x" * 40)))).status_code == 401
    assert (await with_secret.http.get("/v1/chats", headers=bearer(keys.token("alice")))).status_code == 401

    with_pem = await make_service(  # a database of its own: a second process on one SQLite file refuses to start
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'pem.db'}",
        **jwt_settings(jwt_public_key=keys.public_pem(), jwt_algorithm="RS256"),
    )
    assert (await with_pem.http.get("/v1/chats", headers=bearer(keys.token("alice")))).status_code == 200
    assert (await with_pem.http.get("/v1/chats", headers=bearer(hs256("alice")))).status_code == 401


def test_settings_refuse_unsafe_auth_configurations() -> None:
    with pytest.raises(SettingsError, match="SERVICE_AUTH=jwt"):
        Settings.from_env({"SERVICE_HOST": "0.0.0.0"})
    assert Settings.from_env({"SERVICE_HOST": "0.0.0.0", "SERVICE_ALLOW_ANONYMOUS": "true"}).allow_anonymous
    with pytest.raises(SettingsError, match="SERVICE_JWT_AUDIENCE"):
        Settings.from_env({"SERVICE_AUTH": "jwt", "SERVICE_JWT_SECRET": SECRET})
    with pytest.raises(SettingsError, match="exactly one"):
        Settings.from_env({"SERVICE_AUTH": "jwt", "SERVICE_JWT_AUDIENCE": "a"})
    with pytest.raises(SettingsError, match="HS"):
        Settings.from_env({"SERVICE_AUTH": "jwt", "SERVICE_JWT_AUDIENCE": "a", "SERVICE_JWKS_URL": "http://127.0.0.1/j",
                           "SERVICE_JWT_ALGORITHM": "HS256"})  # fmt: skip
    with pytest.raises(SettingsError, match="SERVICE_JWT_LEEWAY_S"):
        Settings.from_env({"SERVICE_JWT_LEEWAY_S": "31"})
    with pytest.raises(SettingsError, match="SERVICE_STREAM_TOKEN_TTL_S"):
        Settings.from_env({"SERVICE_STREAM_TOKEN_TTL_S": "61"})


# --- X1: ownership -------------------------------------------------------------------------------


def _same_as_unknown(theirs: httpx.Response, unknown: httpx.Response, real_id: str, fake_id: str) -> None:
    assert theirs.status_code == unknown.status_code == 404, theirs.text
    assert theirs.text.replace(real_id, fake_id) == unknown.text


OWNED = 3  # chats and runs of alice that bob probes (ACCEPTANCE X1's 100 in test_ownership_at_scale)


async def probe_as_stranger(alice_ids: list[tuple[str, str]], bob: Caller) -> None:
    """Bob calls every object endpoint with alice's ids: each answer is what an unknown id gets."""
    fake_chat, fake_run = "0" * 32, "f" * 32
    for chat, run in alice_ids:
        for method, template, real, fake in [
            ("GET", "/v1/chats/{}", chat, fake_chat),
            ("DELETE", "/v1/chats/{}", chat, fake_chat),
            ("GET", "/v1/chats/{}/active-run", chat, fake_chat),
            ("POST", "/v1/chats/{}/runs", chat, fake_chat),
            ("POST", "/v1/chats/{}/runs/stream", chat, fake_chat),
            ("GET", "/v1/runs/{}", run, fake_run),
            ("GET", "/v1/runs/{}/events", run, fake_run),
            ("GET", "/v1/runs/{}/stream", run, fake_run),
            ("POST", "/v1/runs/{}/cancel", run, fake_run),
            ("POST", "/v1/runs/{}/stream-token", run, fake_run),
        ]:
            body = {"message": "hi"} if "/runs" in template.removeprefix("/v1/runs") else None
            theirs = await bob.http.request(method, template.format(real), json=body)
            unknown = await bob.http.request(method, template.format(fake), json=body)
            _same_as_unknown(theirs, unknown, real, fake)
    async with await bob.ws() as ws:
        for chat, run in alice_ids:
            answers = []
            for frame in [
                {"type": "run.resume", "run_id": run},
                {"type": "run.cancel", "run_id": run},
                {"type": "run.resume", "run_id": fake_run},
                {"type": "run.cancel", "run_id": fake_run},
                {"type": "run.create", "chat_id": chat, "message": "hi", "client_ref": "x"},
                {"type": "run.create", "chat_id": fake_chat, "message": "hi", "client_ref": "x"},
            ]:
                await ws.send(json.dumps(frame))
                answers.append(json.loads(await ws.recv()))
            assert {a["type"] for a in answers} == {"error"}, answers
            assert [a["code"] for a in answers] == ["not_found"] * 6
            assert answers[0]["message"].replace(run, fake_run) == answers[2]["message"]
            assert answers[4]["message"].replace(chat, fake_chat) == answers[5]["message"]


async def test_another_subjects_ids_answer_exactly_what_unknown_ids_answer(
    secured: Service, alice: Caller, bob: Caller
) -> None:
    alice_ids = [await alice.finished_run() for _ in range(OWNED)]
    requests = len(secured.upstream.requests)

    await probe_as_stranger(alice_ids, bob)

    assert len(secured.upstream.requests) == requests  # bob started nothing on alice's chats
    assert (await bob.http.get("/v1/chats")).json()["items"] == []
    listed = {c["id"] for c in (await alice.http.get("/v1/chats")).json()["items"]}
    assert listed == {chat for chat, _ in alice_ids}
    for chat, run in alice_ids:  # and alice still has all of it
        assert len((await alice.http.get(f"/v1/chats/{chat}")).json()["messages"]) == 2
        assert (await alice.http.get(f"/v1/runs/{run}")).json()["status"] == "completed"


async def _ownership_at_scale(make_service: ServiceFactory, keys: SigningKeys, **settings: Any) -> None:
    service = await make_service(**jwt_settings(rate_limit_per_minute=0, ws_frame_burst=1000, **settings))
    alice, bob = Caller(service, keys.token("alice")), Caller(service, keys.token("bob"))
    try:
        alice_ids = [await alice.finished_run() for _ in range(100)]
        assert all(len(bytes.fromhex(ident)) == 16 for pair in alice_ids for ident in pair)  # 128-bit random ids
        await probe_as_stranger(alice_ids, bob)
        assert (await bob.http.get("/v1/chats", params={"limit": 100})).json()["items"] == []
    finally:
        await alice.http.aclose()
        await bob.http.aclose()


@pytest.mark.slow
async def test_ownership_at_scale_memory_runs_sqlite(
    make_service: ServiceFactory, jwks_url: str, keys: SigningKeys
) -> None:
    """ACCEPTANCE X1: 100 chat ids and 100 run ids of alice, every endpoint, as bob."""
    await _ownership_at_scale(make_service, keys, jwks_url=jwks_url)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
async def test_ownership_at_scale_redis_runs_postgres(
    make_service: ServiceFactory, jwks_url: str, keys: SigningKeys, redis_url: str, postgres_url: str
) -> None:
    """ACCEPTANCE X1 on the shared backends."""
    prefix = f"auth-{uuid.uuid4().hex[:12]}"
    try:
        async with fresh_database(postgres_url) as database_url:
            await _ownership_at_scale(
                make_service,
                keys,
                jwks_url=jwks_url,
                redis_url=redis_url,
                redis_prefix=prefix,
                database_url=database_url,
            )
    finally:
        await delete_prefix(redis_url, prefix)


# --- X3: stream tokens ---------------------------------------------------------------------------


async def test_a_stream_token_opens_only_its_own_runs_events(secured: Service, alice: Caller) -> None:
    _, run = await alice.finished_run()
    _, other = await alice.finished_run()
    minted = (await alice.http.post(f"/v1/runs/{run}/stream-token")).json()
    assert minted["expires_at"] - time.time() < 61  # the TTL, rounded up to whole seconds

    response, events = await collect_events(
        secured.http, "GET", f"/v1/runs/{run}/events", params={"token": minted["token"]}
    )
    assert response.status_code == 200
    assert events[-1]["type"] in TERMINAL
    assert all(e["run_id"] == run for e in events)

    _, same = await collect_events(secured.http, "GET", f"/v1/runs/{run}/stream", params={"token": minted["token"]})
    assert same == events  # the other streaming operation takes it too
    for path in (f"/v1/runs/{other}/events", f"/v1/runs/{other}/stream"):
        assert (await secured.http.get(path, params={"token": minted["token"]})).status_code == 401
    tampered = minted["token"][:-3] + ("AAA" if not minted["token"].endswith("AAA") else "BBB")
    assert (await secured.http.get(f"/v1/runs/{run}/events", params={"token": tampered})).status_code == 401
    # only on the events endpoint: not as a query token elsewhere, nor as a bearer token
    assert (await secured.http.get(f"/v1/runs/{run}", params={"token": minted["token"]})).status_code == 401
    assert (await secured.http.get(f"/v1/runs/{run}", headers=bearer(minted["token"]))).status_code == 401
    with pytest.raises(InvalidStatus) as refusal:
        await websockets.connect(f"{secured.ws_url}?token={minted['token']}")
    assert refusal.value.response.status_code == 401


async def test_expired_stream_tokens_and_bearer_tokens_in_the_query_are_401(secured: Service, alice: Caller) -> None:
    _, run = await alice.finished_run()
    expired = jwt.encode(
        {"sub": "alice", "scope": f"run:{run}", "aud": STREAM_AUDIENCE, "exp": int(time.time()) - 1}, STREAM_SECRET
    )
    assert (await secured.http.get(f"/v1/runs/{run}/events", params={"token": expired})).status_code == 401
    assert (await secured.http.get(f"/v1/runs/{run}/events", params={"token": alice.token})).status_code == 401
    with pytest.raises(InvalidStatus) as refusal:
        await websockets.connect(f"{secured.ws_url}?token={alice.token}")
    assert refusal.value.response.status_code == 401


async def test_a_ws_token_opens_a_socket_that_keeps_its_session(secured: Service, alice: Caller) -> None:
    chat = await alice.chat()
    minted = (await alice.http.post("/v1/ws-token")).json()
    async with await alice.ws(token=minted["token"]) as ws:
        await ws.send(json.dumps({"type": "run.create", "chat_id": chat, "message": "hi", "client_ref": "r"}))
        frames = [json.loads(await ws.recv())]
        while frames[-1]["type"] not in TERMINAL:
            frames.append(json.loads(await ws.recv()))
    assert frames[0]["type"] == "run.accepted"
    assert frames[-1]["type"] == "run.completed"
    assert (await alice.http.get(f"/v1/runs/{frames[0]['run_id']}")).status_code == 200  # alice owns it


async def test_the_development_token_command_mints_a_token_the_service_accepts(make_service: ServiceFactory) -> None:
    env = {**os.environ, "SERVICE_AUTH": "jwt", "SERVICE_JWT_SECRET": SECRET, "SERVICE_JWT_AUDIENCE": AUDIENCE}
    env["SERVICE_JWT_ISSUER"] = ISSUER
    minted = subprocess.run(  # noqa: ASYNC221 - a short child process, before the service is used
        [sys.executable, "-m", "service", "token", "--sub", "carol"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    service = await make_service(**jwt_settings(jwt_secret=SECRET))
    response = await service.http.post("/v1/chats", json={}, headers=bearer(minted.stdout.strip()))
    assert response.status_code == 201, response.text


def test_a_stream_token_lives_its_whole_ttl() -> None:
    """`exp` is whole seconds; rounded down, a 1 s token minted at x.9 would live 0.1 s."""
    settings = Settings(auth="jwt", jwt_secret=SECRET, stream_token_ttl_s=1)
    for _ in range(20):
        before = time.time()
        token = Authenticator(settings).mint(Principal(subject="alice"), "ws")
        after = time.time()
        claims = jwt.decode(token.token, options={"verify_signature": False})
        assert before + 1 <= claims["exp"] == token.expires_at < after + 2
        time.sleep(0.013)  # other fractions of a second
