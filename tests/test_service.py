"""The personality service on a tiny model: OpenAI client, bad input, concurrency, persistence."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from personaweave.models.personas import blend_name
from personaweave.serving import PersonaService, Storage, create_app  # noqa: E402
from personaweave.serving.memory import Memory  # noqa: E402
from personaweave.testing import serve_in_thread, tiny_persona_model  # noqa: E402


@pytest.fixture
def service(tmp_path, hash_encoder):
    model, tok = tiny_persona_model()
    return PersonaService(model.eval(), tok, Storage(f"sqlite:///{tmp_path}/db.sqlite"), memory=Memory(hash_encoder),
                          max_new_tokens=6)


@pytest.fixture
def client(service):
    return TestClient(create_app(service))


def body(**kw):
    return {"model": "pirate", "messages": [{"role": "user", "content": "hello what should i read ?"}], **kw}


def test_chat_models_and_user_state(client, service):
    models = client.get("/v1/models").json()
    assert {m["id"] for m in models["data"]} >= {"pirate", "robot"}
    for _ in range(2):
        reply = client.post("/v1/chat/completions", json=body(user="u1"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    user = client.get("/v1/users/u1").json()
    assert user["turns"] == 4 and user["state"]["persona"] == "pirate"
    blend = client.post("/v1/chat/completions", json=body(model="blend:pirate=0.7,robot=0.3", user="u2"))
    assert blend.status_code == 200 and blend.json()["system_fingerprint"] == blend_name({"pirate": 0.7, "robot": 0.3})
    assert client.post("/v1/feedback", json={"user": "u1", "rating": "up"}).json()["feedback"]["up"] == 1
    assert client.delete("/v1/users/u1").status_code == 200
    assert client.get("/v1/users/u1").status_code == 404


def test_a_persona_from_a_description_takes_one_pool_slot_per_distinct_description(client, service, hash_encoder):
    service._encoder = hash_encoder
    bard = "a wandering bard who answers in rhyme"
    first = client.post("/v1/chat/completions", json=body(model=f"description:{bard}", user="d1"))
    assert first.status_code == 200, first.text
    key = first.json()["system_fingerprint"]
    assert key.startswith("description:") and first.json()["model"] == f"description:{bard}"
    slot = service.pool.entries[key][0]
    torch.testing.assert_close(service.model.personas[slot].vector, torch.as_tensor(hash_encoder.encode([bard])[0]))
    again = client.post("/v1/chat/completions", json=body(model=f"description:  {bard} ", user="d2")).json()
    assert again["system_fingerprint"] == key and len(service.pool.entries) == 1  # the same persona, not a new one
    other = client.post("/v1/chat/completions", json=body(model="description:a gloomy chef", user="d3")).json()
    assert other["system_fingerprint"] != key and len(service.pool.entries) == 2
    assert client.get("/v1/users/d1").json()["state"]["persona"] == key
    listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert key not in listed and not any(i.startswith("pool-") for i in listed)  # pool slots stay internal
    empty = client.post("/v1/chat/completions", json=body(model="description:   ", user="bad"))
    assert empty.status_code == 400 and "non-empty" in empty.json()["error"]["message"]
    service._encoder = type("Wide", (), {"encode": lambda self, texts: [[0.5] * 16 for _ in texts]})()
    wrong = client.post("/v1/chat/completions", json=body(model="description:a third one", user="bad"))
    assert wrong.status_code == 400 and "(8,)" in wrong.json()["error"]["message"]
    assert service.storage.state("bad") is None and len(service.pool.entries) == 2


@pytest.mark.parametrize("payload, status, words", [
    ("not json", 422, "Invalid request"),
    ({"model": "ghost", "messages": [{"role": "user", "content": "hi"}], "user": "bad"}, 404, "Unknown persona"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "   "}], "user": "bad"}, 400, "non-empty"),
    ({"model": "pirate", "messages": [], "user": "bad"}, 422, "messages"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "x" * 5000}], "user": "bad"}, 413, "longer"),
    ({"model": "blend:pirate=-1,robot=2", "messages": [{"role": "user", "content": "hi"}], "user": "bad"}, 400,
     "negative"),
    ({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "user": "bad"}, 400, "adaptation engine"),
])
def test_bad_input_is_a_clear_4xx_and_writes_nothing(client, service, payload, status, words):
    kwargs = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, str) \
        else {"json": payload}
    response = client.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert service.storage.state("bad") is None


def test_concurrent_requests_for_one_user_lose_no_turn(service):
    app = create_app(service)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            replies = await asyncio.gather(*[c.post("/v1/chat/completions", json=body(user="same"))
                                             for _ in range(6)])
        return [r.status_code for r in replies]

    assert asyncio.run(run()) == [200] * 6
    assert service.storage.count_turns("same") == 12


def test_batching_groups_concurrent_users(service):
    app = create_app(service)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            replies = await asyncio.gather(*[c.post("/v1/chat/completions", json=body(user=f"u{i}")) for i in range(6)])
        assert [r.status_code for r in replies] == [200] * 6

    asyncio.run(run())
    assert max(service.batcher.batch_sizes) > 1


def test_memory_brings_back_relevant_turns(service):
    client = TestClient(create_app(service))
    service.history_turns = 0  # only long-term memory can bring the old turn back
    client.post("/v1/chat/completions", json=body(user="m", messages=[{"role": "user", "content": "coffee tea please"}]))
    from personaweave.serving.app import ChatRequest

    request = ChatRequest(**body(user="m", messages=[{"role": "user", "content": "coffee tea please"}]))
    conversation, _, prompt = service.conversation("pirate", request, "m")
    assert "coffee tea please" in conversation[0]["content"] and len(conversation) == 2
    assert prompt == service.encode_prompt(conversation)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_client_against_a_running_server(service):
    openai = pytest.importorskip("openai")
    with serve_in_thread(create_app(service)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        reply = client.chat.completions.create(model="robot", messages=[{"role": "user", "content": "hello"}],
                                               user="oa")
        assert reply.choices[0].message.role == "assistant"
        chunks = list(client.chat.completions.create(model="robot", user="oa", stream=True,
                                                     messages=[{"role": "user", "content": "why ?"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")  # length: max_tokens reached
        assert [m.id for m in client.models.list()][:2] == ["librarian", "robot"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
        assert service.storage.count_turns("oa") == 4


@pytest.mark.slow
def test_kill_9_keeps_every_acknowledged_turn(tmp_path):
    """Start `personaweave serve` with an API key, write from several users at once, kill -9 while
    requests are in flight, restart: every acknowledged turn is there."""
    import threading

    model, tok = tiny_persona_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    db = f"sqlite:///{tmp_path}/db.sqlite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONAWEAVE_API_KEYS": "k9-key-0123456789abcdef"}
    headers = {"Authorization": "Bearer k9-key-0123456789abcdef"}

    def start(port):
        return subprocess.Popen([sys.executable, "-m", "personaweave.cli", "serve", "--model", str(tmp_path / "model"),
                                 "--db", db, "--port", str(port), "--no-memory", "--max-new-tokens", "4"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(port):
        for _ in range(300):
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.1)
        return False

    port = free_port()
    proc = start(port)
    assert wait(port), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "server did not start"
    acknowledged: dict[str, list[str]] = {f"k9-{u}": [] for u in range(4)}
    killed = threading.Event()

    def writer(user):
        for i in range(200):
            if killed.is_set():
                return
            text = f"hello {i}"
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, headers=headers,
                               json=body(model="robot", user=user, messages=[{"role": "user", "content": text}]))
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                acknowledged[user].append(text)

    threads = [threading.Thread(target=writer, args=(u,)) for u in acknowledged]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(map(len, acknowledged.values())) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # requests are in flight
    killed.set()
    proc.wait()
    for t in threads:
        t.join()
    port = free_port()
    proc = start(port)
    try:
        assert wait(port)
        assert sum(map(len, acknowledged.values())) >= 12
        for user, texts in acknowledged.items():
            stored = httpx.get(f"http://127.0.0.1:{port}/v1/users/{user}", timeout=10, headers=headers).json()
            kept = [t["content"] for t in stored.get("history", []) if t["role"] == "user"]
            assert set(texts) <= set(kept), (user, texts, kept)
            assert stored.get("turns", 0) in (2 * len(texts), 2 * len(texts) + 2)  # + at most the one in flight
    finally:
        proc.kill()
        proc.wait()


def test_ab_experiment_assigns_rates_per_user_and_survives_a_restart(tmp_path, hash_encoder):
    from personaweave.serving.adaptation.abtest import assign

    model, tok = tiny_persona_model()
    variants = {"pirate": 0.5, "robot": 0.5}
    make = lambda v=variants: PersonaService(model.eval(), tok, Storage(f"sqlite:///{tmp_path}/ab.sqlite"),  # noqa: E731
                                             memory=Memory(hash_encoder), max_new_tokens=4, experiment=v)
    client = TestClient(create_app(make()))
    assert "ab" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    users = [f"ab{i}" for i in range(10)]
    for i, user in enumerate(users):
        reply = client.post("/v1/chat/completions", json=body(model="ab", user=user)).json()
        assert reply["system_fingerprint"] == assign(user, "persona-ab", variants)  # deterministic, by hash
        for _ in range(1 + 4 * (i == 0)):  # user 0 rates five times: still one user in the analysis
            client.post("/v1/feedback", json={"user": user, "rating": "up" if i % 3 else "down"})
    client.post("/v1/chat/completions", json=body(model="pirate", user=users[1]))  # no longer through 'ab'
    client.post("/v1/feedback", json={"user": users[1], "rating": "down"})  # not an A/B rating
    client.post("/v1/chat/completions", json=body(model="pirate", user="outsider"))
    client.post("/v1/feedback", json={"user": "outsider", "rating": "up"})
    report = client.get("/v1/experiments/persona-ab").json()
    assert sum(report["users"].values()) == 10 and sum(report["ratings"].values()) == 14
    assert report["p_value"] is None or 0 <= report["p_value"] <= 1
    state = client.get(f"/v1/users/{users[0]}").json()["state"]
    assert state["ab"] == {"experiment": "persona-ab", "variants": ["pirate", "robot"],
                           "variant": assign(users[0], "persona-ab", variants), "ratings": [0.0] * 5}
    restarted = TestClient(create_app(make()))  # ratings are rebuilt from the database
    assert restarted.get("/v1/experiments/persona-ab").json()["ratings"] == report["ratings"]
    other = TestClient(create_app(make({"pirate": 0.5, "butler": 0.5})))  # reconfigured: old ratings ignored
    assert sum(other.get("/v1/experiments/persona-ab").json()["ratings"].values()) == 0
    assert restarted.delete(f"/v1/users/{users[0]}").status_code == 200  # forgotten in memory too
    assert sum(restarted.get("/v1/experiments/persona-ab").json()["ratings"].values()) == 9
    assert restarted.get("/v1/experiments/other").status_code == 404
    no_user = restarted.post("/v1/chat/completions", json=body(model="ab"))
    assert no_user.status_code == 400 and "user" in no_user.json()["error"]["message"]
    plain = TestClient(create_app(PersonaService(model, tok, Storage(f"sqlite:///{tmp_path}/p.sqlite"))))
    assert "--ab-test" in plain.post("/v1/chat/completions", json=body(model="ab", user="x")).json()["error"]["message"]
    with pytest.raises(ValueError, match="not personas"):
        PersonaService(model, tok, Storage(f"sqlite:///{tmp_path}/q.sqlite"), experiment={"ghost": 1.0, "robot": 1})
    with pytest.raises(ValueError, match="exactly two"):
        PersonaService(model, tok, Storage(f"sqlite:///{tmp_path}/q.sqlite"), experiment={"robot": 1.0})


def test_adaptive_traits_persist_and_feedback_reaches_the_policy(tmp_path, hash_encoder):
    from personaweave.serving.adaptation.engine import TraitAdaptationEngine

    model, tok = tiny_persona_model()
    seen = []

    def policy(observation):
        seen.append(observation[7])  # negative_feedback signal
        return 5 * 5 + 4  # humor +0.2

    make = lambda: PersonaService(  # noqa: E731
        model.eval(), tok, Storage(f"sqlite:///{tmp_path}/auto.sqlite"), memory=Memory(hash_encoder),
        max_new_tokens=4, adapter=TraitAdaptationEngine(model, tok, policy=policy))
    client = TestClient(create_app(make()))
    client.post("/v1/chat/completions", json=body(model="auto", user="ann"))
    client.post("/v1/feedback", json={"user": "ann", "rating": "down"})
    client.post("/v1/chat/completions", json=body(model="auto", user="ann"))
    assert seen == [0.0, 1.0]  # the thumbs-down arrived as the next turn's negative feedback
    traits = client.get("/v1/users/ann").json()["state"]["traits"]
    assert traits[5] == pytest.approx(0.7, abs=1e-3)  # humor 0.5 -> 0.6 -> 0.7 (half of +0.2 per turn)
    restarted = make()
    assert restarted.adapter.states["ann"][5] == pytest.approx(0.7, abs=1e-3)
    restarted_client = TestClient(create_app(restarted))
    assert restarted_client.post("/v1/chat/completions", json=body(model="auto", user="ann")).status_code == 200
    slot = restarted.pool.entries["user:ann"][0]  # the user's persona lives in the bounded pool
    assert slot in model.config.persona_names
    assert restarted_client.delete("/v1/users/ann").status_code == 200
    assert "ann" not in restarted.adapter.states and slot not in model.config.persona_names
    assert "user:ann" not in restarted.pool.entries


def test_max_tokens_and_temperature_are_honoured(client, service):
    short = client.post("/v1/chat/completions", json=body(max_tokens=1)).json()
    assert short["usage"]["completion_tokens"] <= 1 and short["choices"][0]["finish_reason"] in ("stop", "length")
    full = client.post("/v1/chat/completions", json=body()).json()
    assert full["usage"]["completion_tokens"] > short["usage"]["completion_tokens"]
    sampled = client.post("/v1/chat/completions", json=body(temperature=0.8, top_p=0.5)).json()
    assert sampled["usage"]["completion_tokens"] <= service.max_new_tokens
    greedy, hot = service.request([1, 2], 1), service.request([1, 2], None, 0.8, 0.5)
    assert (greedy.max_new_tokens, greedy.temperature, greedy.top_p) == (1, 0.0, 1.0)
    assert (hot.max_new_tokens, hot.temperature, hot.top_p) == (service.max_new_tokens, 0.8, 0.5)
    assert service.generation_kwargs(0.8)["do_sample"] and not service.generation_kwargs()["do_sample"]


def test_a_persona_with_a_lora_sub_personality_answers_with_it(tmp_path, hash_encoder):
    """`peft=`: "pirate" and "robot" answer with their own adapters (in the continuous batch and in
    `generate`), a persona without an adapter with the master alone, a blend of the two with their adapters
    blended alike; each reply is what plain `generate` gives with that adapter (or none)."""
    from test_adapters import CONFIG, perturb

    from personaweave.chat import chat
    from personaweave.generation import generate_replies
    from personaweave.models.personas import blend_name
    from personaweave.serving.app import REPETITION_PENALTY, ChatRequest
    from personaweave.sub_personalities import add_sub_personality, blend_sub_personalities, lora_config

    model, tok = tiny_persona_model()
    peft = add_sub_personality(model, "pirate", lora_config(**CONFIG))
    peft = add_sub_personality(peft, "robot", lora_config(**CONFIG))
    perturb(peft, "pirate", 0)
    perturb(peft, "robot", 1)
    service = PersonaService(model, tok, Storage(f"sqlite:///{tmp_path}/db.sqlite"), memory=Memory(hash_encoder),
                             max_new_tokens=8, peft=peft)
    assert service.sub_personalities == {"pirate", "robot"} and not peft.training
    client = TestClient(create_app(service))

    def expected(persona, adapter):
        conversation = chat(persona, "hello what should i read ?", [], model=model)
        kwargs = dict(max_new_tokens=8, repetition_penalty=REPETITION_PENALTY)
        if adapter is None:
            with peft.disable_adapter():
                return generate_replies(peft, tok, [conversation], **kwargs).texts[0]
        peft.set_adapter(adapter)
        return generate_replies(peft, tok, [conversation], **kwargs).texts[0]

    replies = {}
    for persona in ("pirate", "robot", "butler"):
        answer = client.post("/v1/chat/completions", json=body(model=persona))
        assert answer.status_code == 200, answer.text
        replies[persona] = answer.json()["choices"][0]["message"]["content"]
        assert replies[persona] == expected(persona, persona if persona != "butler" else None), persona
    assert replies["pirate"] != expected("pirate", None)  # the adapter changed the reply
    request = ChatRequest(model="pirate", messages=[{"role": "user", "content": "hello what should i read ?"}])
    conversations = [service.conversation(p, request)[0] for p in ("pirate", "robot", "butler")]
    assert service.generate(conversations, personas=["pirate", "robot", "butler"]) == list(replies.values())
    assert service.generate(conversations[:1]) == [expected("pirate", None)]  # no personas: the master alone
    # a blend of personas with sub-personalities: the blended tokens + the parents' adapters blended alike
    blend = client.post("/v1/chat/completions", json=body(model="blend:pirate=0.7,robot=0.3"))
    assert blend.status_code == 200, blend.text
    slot = service.pool.entries["blend:" + blend_name({"pirate": 0.7, "robot": 0.3})][0]
    assert service.adapter_of(slot) == slot and service.adapter_of("pirate") == "pirate"
    blend_sub_personalities(peft, {"pirate": 0.7, "robot": 0.3}, name="check", activate=False)
    assert blend.json()["choices"][0]["message"]["content"] == expected(slot, "check")
    assert expected(slot, "check") != expected(slot, None)  # the blended adapter changed the reply
    peft.delete_adapter("check")
    # a parent without an adapter: the tokens alone; a forgotten blend takes its adapter with it
    assert client.post("/v1/chat/completions", json=body(model="blend:pirate=0.5,butler=0.5")).status_code == 200
    assert service.adapter_of(service.pool.entries["blend:" + blend_name({"pirate": 0.5, "butler": 0.5})][0]) is None
    with service.model_lock:
        service.pool.forget("blend:" + blend_name({"pirate": 0.7, "robot": 0.3}))
    assert slot not in peft.peft_config and service.adapter_of(slot) is None
    assert set(peft.peft_config) == {"pirate", "robot"}
    with pytest.raises(ValueError, match="carries LoRA layers"):  # which adapter would answer is an accident
        PersonaService(model, tok, Storage(f"sqlite:///{tmp_path}/db1.sqlite"))
    with pytest.raises(ValueError, match="load_model's third value"):
        PersonaService(tiny_persona_model()[0], tok, Storage(f"sqlite:///{tmp_path}/db2.sqlite"), peft=peft)
    with pytest.raises(ValueError, match="bake"):
        PersonaService(model, tok, Storage(f"sqlite:///{tmp_path}/db3.sqlite"), peft=peft, decoder=object())
