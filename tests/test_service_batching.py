"""The continuous batcher (personaweave.serving.batching): exact greedy output, joining and leaving
between steps, per-request settings, cancellation and failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from personaweave.chat import chat
from personaweave.serving.batching import ContinuousBatcher, FairLock, Generation, QueueFull
from personaweave.testing import tiny_persona_model

MESSAGES = ["hello what should i read ?", "what is the sea", "hello", "read me a book about the sea please",
            "what", "i like the sea and books and reading", "hello hello", "should i"]


@pytest.fixture(scope="module")
def model_and_prompts():
    model, tok = tiny_persona_model()
    model.eval()
    prompts = []
    for i, text in enumerate(MESSAGES):
        conversation = chat(["pirate", "robot"][i % 2], text, [], model=model)
        rendered = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompts.append(tok(rendered, add_special_tokens=False)["input_ids"])
    return model, tok, prompts


def reference(model, prompt, max_new_tokens, eos, **kwargs):
    """Plain `generate` on the prompt alone (no padding): the tokens before the first end-of-turn token."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0, **kwargs)[0, len(prompt):].tolist()
    return out[:next((i for i, t in enumerate(out) if t in eos), len(out))]


def test_greedy_continuous_batching_equals_generate_with_requests_joining_and_leaving(model_and_prompts):
    """Eight requests with different max_tokens arrive at different times (so they join a running batch
    and leave it at different steps); each gets exactly `generate`'s greedy tokens for its prompt."""
    model, tok, prompts = model_and_prompts
    batcher = ContinuousBatcher(model, max_batch=4, eos_token_id=model.generation_config.eos_token_id)
    lengths = [3, 12, 7, 20, 1, 16, 9, 5]

    async def run():
        async def one(i):
            # four arrive together (a full batch, however slow the machine), the rest staggered: they join a
            # batch that is already decoding as earlier requests leave
            await asyncio.sleep(0.0 if i < 4 else 0.02 * i)
            return await batcher.submit(Generation(prompt=prompts[i], max_new_tokens=lengths[i],
                                                   repetition_penalty=1.2))
        return await asyncio.gather(*[one(i) for i in range(len(prompts))])

    done = asyncio.run(run())
    for i, gen in enumerate(done):
        expected = reference(model, prompts[i], lengths[i], batcher.eos, repetition_penalty=1.2)
        assert gen.tokens == expected, (i, gen.tokens, expected)
        assert gen.finish_reason == ("length" if len(expected) == lengths[i] else "stop")
    assert max(batcher.batch_sizes) == 4  # they did share steps (never more than max_batch)
    assert len(set(batcher.batch_sizes)) > 1  # ... and the batch grew and shrank


def test_greedy_matches_generate_in_bfloat16(model_and_prompts):
    model, _, prompts = model_and_prompts
    low = tiny_persona_model()[0].eval().to(torch.bfloat16)
    batcher = ContinuousBatcher(low, max_batch=8)

    async def run():
        return await asyncio.gather(*[batcher.submit(Generation(prompt=p, max_new_tokens=10)) for p in prompts])

    for prompt, gen in zip(prompts, asyncio.run(run())):
        assert gen.tokens == reference(low, prompt, 10, batcher.eos)


def test_settings_are_per_request_and_sampling_follows_the_seed(model_and_prompts):
    model, _, prompts = model_and_prompts
    batcher = ContinuousBatcher(model, max_batch=8)

    async def run():
        return await asyncio.gather(
            batcher.submit(Generation(prompt=prompts[0], max_new_tokens=6)),
            batcher.submit(Generation(prompt=prompts[0], max_new_tokens=6, temperature=1.5, top_p=0.9)),
            batcher.submit(Generation(prompt=prompts[0], max_new_tokens=2, repetition_penalty=1.2)))

    greedy, sampled, short = asyncio.run(run())
    assert greedy.tokens == reference(model, prompts[0], 6, batcher.eos)
    assert len(short.tokens) <= 2 and short.tokens == reference(model, prompts[0], 2, batcher.eos,
                                                                repetition_penalty=1.2)
    assert sampled.finish_reason in ("stop", "length") and len(sampled.tokens) <= 6


def test_a_caller_that_leaves_frees_its_row_at_the_next_step(model_and_prompts):
    model, _, prompts = model_and_prompts
    batcher = ContinuousBatcher(model, max_batch=4)
    language_model, steps = model.language_model, []
    real = language_model.forward

    def slow(*args, **kwargs):
        steps.append(1)
        time.sleep(0.02)
        return real(*args, **kwargs)

    language_model.forward = slow
    try:
        async def run():
            gen = Generation(prompt=prompts[1], max_new_tokens=10_000)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(batcher.submit(gen), 0.3)
            await asyncio.sleep(0.2)
            return gen

        gen = asyncio.run(run())
        count = len(steps)
        time.sleep(0.3)
        assert len(steps) == count and gen.finish_reason == "cancelled" and batcher.running == 0
    finally:
        del language_model.forward


def test_a_failing_request_fails_alone_even_when_the_batched_step_fails(model_and_prompts):
    """A request whose forward pass raises (here: any pass that sees its prompt's marker token) fails;
    the batched step it broke is retried request by request, and the others finish with `generate`'s tokens."""
    model, _, prompts = model_and_prompts
    batcher = ContinuousBatcher(model, max_batch=8)
    bad = prompts[3] + [prompts[3][-1]] * 3
    real, state = model.forward, {"armed": False, "batched_failures": 0}

    def forward(*args, input_ids=None, **kwargs):
        time.sleep(0.02)  # every pass takes a while, so the good requests are still decoding when it is armed
        if state["armed"] and input_ids is not None:
            if input_ids.shape[1] >= len(bad) and input_ids[0, :len(bad)].tolist() == bad:
                raise RuntimeError("this request breaks the model")
            if input_ids.shape[0] > 1 and state["batched_failures"] < 2:  # a batched step: which row is to blame?
                state["batched_failures"] += 1
                raise RuntimeError("this batch breaks the model")
        return real(*args, input_ids=input_ids, **kwargs)

    model.forward = forward
    try:
        async def run():
            good = [Generation(prompt=p, max_new_tokens=8) for p in prompts[:3]]
            tasks = [asyncio.ensure_future(batcher.submit(g)) for g in good]
            await asyncio.sleep(0.05)
            state["armed"] = True  # batched steps now fail twice, and the bad prompt always fails
            results = await asyncio.gather(*tasks, batcher.submit(Generation(prompt=bad, max_new_tokens=8)),
                                           return_exceptions=True)
            return good, results

        good, results = asyncio.run(run())
    finally:
        del model.forward
    assert isinstance(results[-1], RuntimeError)
    for prompt, gen in zip(prompts[:3], good):
        assert gen.finish_reason in ("stop", "length") and gen.tokens == reference(model, prompt, 8, batcher.eos)
    assert state["batched_failures"] == 2


def test_the_queue_is_bounded(model_and_prompts):
    model, _, prompts = model_and_prompts
    batcher = ContinuousBatcher(model, max_batch=1, max_queue=0)

    async def run():
        with pytest.raises(QueueFull):
            await batcher.submit(Generation(prompt=prompts[0], max_new_tokens=2))

    asyncio.run(run())


def test_fair_lock_serves_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()
    threads = [threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release())) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2]


def test_serve_dtype_and_max_batch_options(monkeypatch, tmp_path):
    import uvicorn

    from personaweave import cli

    model, tok = tiny_persona_model()
    calls = []
    adapters = []
    monkeypatch.setattr(cli, "_load", lambda args, with_adapters=False: adapters.append(with_adapters) or (model, tok, None))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    monkeypatch.delenv("PERSONAWEAVE_API_KEYS", raising=False)
    assert cli.main(["serve", "--db", f"sqlite:///{tmp_path}/s.sqlite", "--no-memory", "--dtype", "bfloat16",
                     "--max-batch", "3"]) == 0
    service = calls[-1].state.service
    assert model.dtype == torch.bfloat16 and service.batcher.max_batch == 3
    assert cli.main(["serve", "--db", f"sqlite:///{tmp_path}/s.sqlite", "--no-memory", "--no-adapters"]) == 0
    assert adapters == [True, False]  # LoRA sub-personalities by default, none with --no-adapters


def test_a_next_turn_reuses_its_own_kept_prefix_and_still_gets_generates_tokens(model_and_prompts):
    """A chat's next turn starts with the last turn's sequence (prompt + reply): it is prefilled from the kept
    cache rows (only its new tokens run), and its greedy tokens are still exactly `generate`'s. Another
    scope never uses those rows; `forget_prefix` drops them; the cache stays within its token budget."""
    model, tok, prompts = model_and_prompts
    batcher = ContinuousBatcher(model, max_batch=4, prefix_cache_tokens=400)

    def turn(prompt, scope, max_new_tokens=8):
        return asyncio.run(batcher.submit(Generation(prompt=prompt, max_new_tokens=max_new_tokens, prefix_scope=scope,
                                                     repetition_penalty=1.2)))

    first = turn(prompts[0], "alice")
    assert batcher.prefix_cache.hits == 0 and len(batcher.prefix_cache) == 1
    follow = list(prompts[0]) + first.tokens + list(prompts[3])  # the next turn: all of the first, then more
    for scope, hits in (("bob", 0), ("alice", 1)):  # bob's identical prompt gets nothing from alice's rows
        second = turn(follow, scope)
        assert batcher.prefix_cache.hits == hits
        assert second.tokens == reference(model, follow, 8, batcher.eos, repetition_penalty=1.2), scope
    # all of the first turn but a last token that ended it by length (its cache row is never computed)
    assert batcher.prefix_cache.reused_tokens == len(prompts[0]) + len(first.tokens) - (first.finish_reason == "length")
    # two at once, each from its own kept prefix, sharing the decode steps
    third = [list(follow) + second.tokens + list(prompts[i]) for i in (1, 2)]

    async def both():
        return await asyncio.gather(*[batcher.submit(Generation(prompt=p, max_new_tokens=6, prefix_scope="alice"))
                                      for p in third])

    for prompt, gen in zip(third, asyncio.run(both())):
        assert gen.tokens == reference(model, prompt, 6, batcher.eos)
    assert batcher.prefix_cache.hits == 3
    assert batcher.prefix_cache.tokens <= 400
    batcher.forget_prefix("alice")
    turn(follow, "alice")
    assert batcher.prefix_cache.hits == 3  # forgotten: prefilled in full
    for i in range(12):  # many scopes: the least recently used go, the budget holds
        turn(prompts[i % len(prompts)], f"user-{i}", max_new_tokens=4)
    assert 0 < batcher.prefix_cache.tokens <= 400
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        ContinuousBatcher(model, prefix_cache_tokens=-1)
    assert ContinuousBatcher(model, prefix_cache_tokens=0).prefix_cache is None


def test_requests_of_different_lora_sub_personalities_share_steps_and_each_gets_its_own_tokens():
    """With `mixed_adapters`, each request runs with its own LoRA adapter (None: the master alone) in one
    shared batch: every request's greedy tokens equal `generate` with that adapter alone. A kept prefix
    is reused only by a request of the same adapter."""
    from test_adapters import CONFIG, perturb

    from personaweave.sub_personalities import add_sub_personality, lora_config

    model, tok = tiny_persona_model()
    prompts = []
    for i, text in enumerate(MESSAGES[:6]):
        rendered = tok.apply_chat_template(chat(["pirate", "robot"][i % 2], text, [], model=model),
                                           add_generation_prompt=True, tokenize=False)
        prompts.append(tok(rendered, add_special_tokens=False)["input_ids"])
    peft = add_sub_personality(model, "pirate", lora_config(**CONFIG))
    peft = add_sub_personality(peft, "robot", lora_config(**CONFIG))
    perturb(peft, "pirate", 0)
    perturb(peft, "robot", 1)
    peft.eval()
    adapters = ["pirate", "robot", None, "robot", "pirate", None]
    batcher = ContinuousBatcher(peft, max_batch=6, prefix_cache_tokens=400, mixed_adapters=True,
                                eos_token_id=model.generation_config.eos_token_id)

    def alone(prompt, adapter, n=10):
        if adapter is None:
            with peft.disable_adapter():
                return reference(peft, prompt, n, batcher.eos, repetition_penalty=1.2)
        peft.set_adapter(adapter)
        return reference(peft, prompt, n, batcher.eos, repetition_penalty=1.2)

    async def run():
        async def one(i):
            await asyncio.sleep(0.0 if i < 3 else 0.02 * i)  # three start together, the rest join them
            return await batcher.submit(Generation(prompt=prompts[i], max_new_tokens=10, repetition_penalty=1.2,
                                                   adapter=adapters[i], prefix_scope=f"user-{i % 2}"))
        return await asyncio.gather(*[one(i) for i in range(len(prompts))])

    done = asyncio.run(run())
    expected = [alone(prompts[i], adapters[i]) for i in range(len(prompts))]
    # the adapters matter here (so a batch that ignored them would fail)
    assert any(expected[i] != alone(prompts[i], None) for i in range(len(prompts)) if adapters[i])
    for i, gen in enumerate(done):
        assert gen.tokens == expected[i], (i, adapters[i], gen.tokens, expected[i])
    assert max(batcher.batch_sizes) >= 3
    # a next turn from the same user: its kept prefix serves only the adapter that computed it
    follow = list(prompts[0]) + done[0].tokens + list(prompts[2])
    hits = batcher.prefix_cache.hits
    for adapter, new_hits in (("robot", 0), ("pirate", 1)):
        gen = asyncio.run(batcher.submit(Generation(prompt=follow, max_new_tokens=6, repetition_penalty=1.2,
                                                    adapter=adapter, prefix_scope="user-0")))
        assert batcher.prefix_cache.hits == hits + new_hits, adapter
        assert gen.tokens == alone(follow, adapter, 6), adapter
    with pytest.raises(ValueError, match="cannot apply the adapter"):
        asyncio.run(ContinuousBatcher(model).submit(Generation(prompt=prompts[0], max_new_tokens=2, adapter="pirate")))
