"""The personality service: an OpenAI-compatible chat API over a PersonaWeave model.

POST /v1/chat/completions  `model` = a persona name, a blend ("blend:librarian=0.7,robot=0.3"),
                           "auto" (the adaptation engine picks the blend) or "ab" (the persona A/B
                           experiment assigns a variant); `user` = the user id
GET  /v1/models            the personas
GET/DELETE /v1/users/{id}  a user's state and turns
POST /v1/feedback          thumbs up/down and blocking on the user's last reply: kept in the user's
                           state; if that reply came from `auto`, the adaptation engine sees it as
                           the next turn's negative-feedback signal; if from `ab`, it is a rating of
                           the user's variant (up = 1, down = 0)
GET  /v1/experiments/{name} the A/B experiment (default name "persona-ab"): users, ratings, per-user
                           mean rating per variant, Welch's t on them, P(B > A)

Per-user state in the database: persona, turn count, last model spec, the adaptive trait state,
the A/B assignment and ratings, feedback counts. The adaptive trait states and A/B ratings are
rebuilt from it when the server restarts (one server process per database: these also live in
its memory). DELETE /v1/users/{id} forgets the user everywhere, memory included.

A reply is acknowledged only after the user's turn, the reply and the new state are committed
in one transaction; one user's requests are serialised so no turn is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Literal, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from personaweave.chat import chat
from personaweave.models.personas import blend_name, parse_blend
from personaweave.serving.adaptation.abtest import UserExperiment
from personaweave.serving.batching import DynamicBatcher
from personaweave.serving.memory import Memory
from personaweave.serving.storage import Storage

logger = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 4000
REPETITION_PENALTY = 1.2
EXPERIMENT = "persona-ab"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    user: Optional[str] = Field(default=None, max_length=128)
    stream: bool = False
    max_tokens: Optional[int] = Field(default=None, ge=1, le=512)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)


class Feedback(BaseModel):
    user: str = Field(min_length=1, max_length=128)
    rating: Optional[Literal["up", "down"]] = None
    blocked: bool = False


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


class PersonaService:
    """Model, tokenizer, storage, memory and batching behind the HTTP layer."""

    def __init__(self, model: Any, tokenizer: Any, storage: Storage, memory: Optional[Memory] = None,
                 adapter: Any = None, max_new_tokens: int = 64, batching: bool = True, max_batch: int = 8,
                 max_wait_ms: float = 10.0, history_turns: int = 6,
                 experiment: Optional[Mapping[str, float]] = None, experiment_name: str = EXPERIMENT) -> None:
        self.model, self.tokenizer, self.storage = model, tokenizer, storage
        self.memory, self.adapter = memory, adapter
        self.max_new_tokens, self.history_turns = max_new_tokens, history_turns
        self.batcher = DynamicBatcher(self._generate_batch, max_batch if batching else 1, max_wait_ms)
        self.user_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.model_lock = threading.Lock()  # bank edits and generation do not interleave
        self.experiment = None
        if experiment is not None:
            unknown = [v for v in experiment if v not in model.config.persona_names]
            if unknown:
                raise ValueError(f"A/B variants {unknown} are not personas of the model.")
            self.experiment = UserExperiment(experiment_name, experiment)
        self._resume()

    def _resume(self) -> None:
        """Adaptive trait states and A/B ratings back from the database (after a restart)."""
        if self.adapter is None and self.experiment is None:
            return
        for user, state in self.storage.iter_states():
            if self.adapter is not None and state.get("traits") is not None:
                try:
                    self.adapter.restore(user, state["traits"])
                except ValueError as err:  # one bad row must not keep the server down
                    logger.warning("ignoring the stored trait state of %s: %s", user, err)
            if self.experiment is not None:
                self.experiment.restore(user, state.get("ab"))

    def forget(self, user: str) -> None:
        """Drop what the process holds about a user (the database row is deleted by the caller)."""
        if self.adapter is not None:
            with self.model_lock:
                self.adapter.forget(user)
        if self.experiment is not None:
            self.experiment.forget(user)

    # -- persona resolution -----------------------------------------------------------------
    def resolve(self, spec: str, user: Optional[str], message: str) -> str:
        names = self.model.config.persona_names
        if spec == "auto":
            if self.adapter is None:
                raise HTTPException(400, "model 'auto' needs the adaptation engine, which this server was "
                                         "started without.")
            with self.model_lock:
                return self.adapter.step(user or "anonymous", message)
        if spec == "ab":
            if self.experiment is None:
                raise HTTPException(400, "model 'ab' needs an A/B experiment, which this server was started "
                                         "without (--ab-test).")
            if not user:
                raise HTTPException(400, "model 'ab' needs a `user`: the assignment is per user.")
            return self.experiment.assign(user)
        if spec.startswith("blend:"):
            try:
                weights = parse_blend(spec[len("blend:"):])
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
            unknown = [n for n in weights if n not in names]
            if unknown:
                raise HTTPException(404, f"Unknown persona(s) {unknown}; available: {names}.")
            try:
                name = blend_name(weights)
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
            with self.model_lock:
                if name not in self.model.config.persona_names:
                    try:
                        self.model.add_persona(name, blend=weights, tokenizer=self.tokenizer)
                    except (KeyError, ValueError) as err:
                        raise HTTPException(400, str(err)) from None
            return name
        if spec not in names:
            raise HTTPException(404, f"Unknown persona {spec!r}; available: {names}, 'auto' or 'blend:...'.")
        return spec

    # -- generation --------------------------------------------------------------------------
    def generation_kwargs(self, temperature: Optional[float] = None) -> dict[str, Any]:
        """Greedy unless a temperature > 0 is asked for; a repetition penalty either way (without
        it, a small model copies its own earlier replies in multi-turn chats)."""
        kwargs: dict[str, Any] = {"do_sample": False, "repetition_penalty": REPETITION_PENALTY}
        if temperature:
            kwargs.update(do_sample=True, temperature=temperature, top_p=0.9)
        return kwargs

    def generate(self, conversations: list[list[dict[str, str]]], max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None) -> list[str]:
        """Replies to chat-format conversations with the request's settings (one `generate` call)."""
        from personaweave.generation import generate_replies

        with self.model_lock:
            return generate_replies(self.model, self.tokenizer, conversations,
                                    max_new_tokens=max_tokens or self.max_new_tokens, batch_size=len(conversations),
                                    **self.generation_kwargs(temperature)).texts

    def _generate_batch(self, items: list[tuple[list[dict[str, str]], Optional[int], Optional[float]]]
                        ) -> list[tuple[str, int, int]]:
        """The batcher's worker: requests with the same (max_tokens, temperature) share a call.
        Returns (reply, prompt tokens, completion tokens) per request."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, max_tokens, temperature) in enumerate(items):
            groups[(max_tokens or self.max_new_tokens, temperature or 0.0)].append(i)
        replies: list[tuple[str, int, int]] = [("", 0, 0)] * len(items)
        for (max_tokens, temperature), members in groups.items():
            texts = self.generate([items[i][0] for i in members], max_tokens, temperature)
            with self.model_lock:  # the fast tokenizer must not be used from two threads at once
                for i, text in zip(members, texts):
                    prompt = self.tokenizer.apply_chat_template(items[i][0], add_generation_prompt=True)
                    replies[i] = (text, len(prompt), len(self.tokenizer(text)["input_ids"]))
        return replies

    def conversation(self, persona: str, request: ChatRequest) -> tuple[list[dict[str, str]], str]:
        last = request.messages[-1].content
        if request.user:
            history = [{"role": t["role"], "content": t["content"]}
                       for t in self.storage.history(request.user, limit=self.history_turns)]
        else:
            history = [m.model_dump() for m in request.messages[:-1] if m.role != "system"]
        context = None
        if self.memory is not None and request.user:
            recent = {t["content"] for t in history}
            recalled = self.memory.recall(last, self.storage, request.user)
            context = Memory.as_context([m for m in recalled if m not in recent])
        return chat(persona, last, history, model=self.model, context=context), last

    def persist(self, user: Optional[str], persona: str, message: str, reply: str, spec: str = "") -> None:
        if not user:
            return
        vector = self.memory.embed([message])[0] if self.memory is not None else None
        state = self.storage.state(user) or {}
        state.update(persona=persona, turns=state.get("turns", 0) + 1, last_spec=spec)
        if self.adapter is not None and user in self.adapter.states:
            state["traits"] = [round(float(x), 4) for x in self.adapter.states[user]]
        if spec == "ab" and self.experiment is not None:
            state["ab"] = self.experiment.state(user)
        self.storage.add_exchange(user, state, [("user", message, persona, vector), ("assistant", reply, persona, None)])


def _completion(persona: str, spec: str, reply: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": spec, "system_fingerprint": persona,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def create_app(service: PersonaService) -> FastAPI:
    app = FastAPI(title="personaweave", version="0.1.0")
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"Invalid request: {where}: {first.get('msg', 'malformed body')}")

    @app.get("/v1/models")
    async def models():
        bank = service.model.personas
        data = [{"id": p.name, "object": "model", "created": 0, "owned_by": "personaweave",
                 "description": p.description} for p in bank]
        # `auto` only where the adaptation engine runs (otherwise it answers 400), `ab` only with an experiment.
        extra = (["auto"] if service.adapter is not None else []) + (["ab"] if service.experiment is not None else [])
        return {"object": "list", "data": data + [{"id": name, "object": "model", "created": 0,
                                                   "owned_by": "personaweave"} for name in extra]}

    @app.post("/v1/chat/completions")
    async def completions(request: ChatRequest):
        last = request.messages[-1]
        if last.role != "user" or not last.content.strip():
            raise HTTPException(400, "The last message must be a non-empty user message.")
        if any(len(m.content) > MAX_MESSAGE_CHARS for m in request.messages):
            raise HTTPException(413, f"A message is longer than {MAX_MESSAGE_CHARS} characters.")
        if request.stream:  # the stream holds the user's lock itself, while it runs
            persona = await asyncio.to_thread(service.resolve, request.model, request.user, last.content)
            return StreamingResponse(_stream(service, persona, request), media_type="text/event-stream")
        lock = service.user_locks[request.user] if request.user else asyncio.Lock()
        async with lock:
            persona = await asyncio.to_thread(service.resolve, request.model, request.user, last.content)
            conversation, message = await asyncio.to_thread(service.conversation, persona, request)
            reply, prompt_tokens, completion_tokens = await service.batcher.submit(
                (conversation, request.max_tokens, request.temperature))
            await asyncio.to_thread(service.persist, request.user, persona, message, reply, request.model)
        return _completion(persona, request.model, reply, prompt_tokens, completion_tokens)

    @app.get("/v1/users/{user_id}")
    async def get_user(user_id: str):
        state = await asyncio.to_thread(service.storage.state, user_id)
        if state is None:
            raise HTTPException(404, f"Unknown user {user_id!r}.")
        history = await asyncio.to_thread(service.storage.history, user_id)
        return {"id": user_id, "state": state, "turns": len(history), "history": history}

    @app.delete("/v1/users/{user_id}")
    async def delete_user(user_id: str):
        async with service.user_locks[user_id]:
            deleted = await asyncio.to_thread(service.storage.delete_user, user_id)
            service.forget(user_id)
        if not deleted:
            raise HTTPException(404, f"Unknown user {user_id!r}.")
        return {"id": user_id, "deleted": True}

    @app.post("/v1/feedback")
    async def feedback(item: Feedback):
        async with service.user_locks[item.user]:
            state = await asyncio.to_thread(service.storage.state, item.user) or {}
            log = state.setdefault("feedback", {"up": 0, "down": 0, "blocked": False})
            if item.rating:
                log[item.rating] += 1
            log["blocked"] = log["blocked"] or item.blocked
            experiment, last = service.experiment, state.get("last_spec")
            rated_ab = bool(item.rating) and last == "ab" and experiment is not None and experiment.owns(state.get("ab"))
            if rated_ab:
                state["ab"]["ratings"].append(1.0 if item.rating == "up" else 0.0)
            await asyncio.to_thread(service.storage.save_state, item.user, state)
            # in-memory effects only once the state is committed
            if rated_ab:
                experiment.restore(item.user, state["ab"])
            if service.adapter is not None and last == "auto":
                service.adapter.feedback(item.user, negative=item.rating == "down" or item.blocked)
        return {"user": item.user, "feedback": log}

    @app.get("/v1/experiments/{name}")
    async def experiment(name: str):
        if service.experiment is None or name != service.experiment.name:
            raise HTTPException(404, f"Unknown experiment {name!r}.")
        return service.experiment.report()

    return app


async def _stream(service: PersonaService, persona: str, request: ChatRequest):
    """Server-sent events in OpenAI's chunk format, from a TextIteratorStreamer (not batched)."""
    lock = service.user_locks[request.user] if request.user else asyncio.Lock()
    async with lock:
        conversation, message = await asyncio.to_thread(service.conversation, persona, request)
        async for event in _stream_events(service, persona, request, conversation, message):
            yield event


async def _stream_events(service: PersonaService, persona: str, request: ChatRequest, conversation, message: str):
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(service.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def run():
        import torch

        with service.model_lock, torch.no_grad():  # the lock also guards the (not thread-safe) tokenizer
            ids = service.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt")
            service.model.generate(ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=request.max_tokens or service.max_new_tokens, streamer=streamer,
                                   pad_token_id=service.tokenizer.pad_token_id,
                                   **service.generation_kwargs(request.temperature))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    pieces = []
    iterator = iter(streamer)
    while True:
        piece = await asyncio.to_thread(next, iterator, None)
        if piece is None:
            break
        if piece:
            pieces.append(piece)
            yield "data: " + json.dumps({"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                         "model": request.model, "choices": [{"index": 0, "delta": {"content": piece},
                                                                              "finish_reason": None}]}) + "\n\n"
    thread.join()
    await asyncio.to_thread(service.persist, request.user, persona, message, "".join(pieces).strip(), request.model)
    yield "data: " + json.dumps({"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                 "model": request.model, "choices": [{"index": 0, "delta": {},
                                                                      "finish_reason": "stop"}]}) + "\n\n"
    yield "data: [DONE]\n\n"
