"""The personality service: an OpenAI-compatible chat API over a PersonaWeave model.

POST /v1/chat/completions  `model` = a persona name, a blend ("blend:librarian=0.7,robot=0.3"),
                           a description ("description:a wandering bard who answers in rhyme":
                           encoded and mapped to persona tokens by the layer; best with the
                           `descriptions` checkpoint), "auto" (the adaptation engine picks the blend)
                           or "ab" (the persona A/B experiment assigns a variant); `user` = the user id.
                           A persona with a LoRA sub-personality (`peft=`, `serve`'s default) answers
                           with its tokens and that adapter; a blend of such personas with the blended
                           tokens and its parents' adapters blended by the same weights (peft's `cat`
                           blend, as the demo and the quality harness blend); a blend with a parent
                           without an adapter, descriptions and "auto" with tokens alone
GET  /v1/models            the personas a client may name, plus `auto` / `ab` when enabled (blends are
                           asked for as `blend:...` and not listed; the pool's slots are internal)
GET/DELETE /v1/users/{id}  a user's state and turns (ids may contain "/")
POST /v1/feedback          thumbs up/down and blocking on the user's last reply: kept in the user's
                           state; if that reply came from `auto`, the adaptation engine sees it as
                           the next turn's negative-feedback signal; if from `ab`, it is a rating of
                           the user's variant (up = 1, down = 0)
GET  /v1/experiments/{name} the A/B experiment (default name "persona-ab"): users, ratings, per-user
                           mean rating per variant, Welch's t on them, P(B > A); with API keys, over
                           the calling key's users only
GET  /health               liveness, without authentication
GET  /metrics              Prometheus text: queue depth, requests, tokens, latency histogram, pool

Security: with API keys configured (`create_app(service, api_keys=[...])`), every route but
/health needs `Authorization: Bearer KEY` (401 otherwise), and each key is a tenant: user ids are
namespaced by a hash of the key in the database, memory, adaptation and A/B state, so one key
never reads, changes or deletes another key's users. Without keys the CLI binds loopback only.

Limits: a request is checked before it reaches the model (valid Unicode, finite numbers,
temperature 0 or in [0.01, 2], top_p in (0, 1], max_tokens 1-512, n = 1, at most 64 messages);
the prompt is counted in tokens after the chat template: stored history is dropped oldest first
to fit `window - max_tokens`, and when the request alone does not fit the answer is 400 with the
numbers. At most `max_queue` requests wait for the model (503 + Retry-After beyond that); a
request waits at most `request_timeout` seconds (504), and then leaves the batch at the next decode
step. Generation is continuously batched (`batching.ContinuousBatcher`: requests, streams
included, join and leave the running batch between decode steps, each with its own sampling
settings and max_tokens); a failure is confined to its request; a stream always ends (an SSE error
event, then [DONE]). Blends and per-user adaptive personas live in a fixed pool of `pool_size` bank slots
(least recently used evicted), so the bank, the tokenizer and the embedding matrix stay bounded;
personas from a description share that pool (one slot per distinct description, across API keys).

Per-user state in the database: persona, turn count, last model spec, the adaptive trait state,
the A/B assignment and ratings, feedback counts. The adaptive trait states and A/B ratings are
rebuilt from it when the server restarts (one server process per database: these also live in
its memory; corrupt rows are logged and skipped). DELETE /v1/users/{id} forgets the user
everywhere, memory included.

A reply is acknowledged only after the user's turn, the reply and the new state are committed
in one transaction; one user's requests are serialised so no turn is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Optional

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from personaweave.chat import chat
from personaweave.generation import DECODING
from personaweave.models.personas import blend_name, parse_blend
from personaweave.serving.adaptation.abtest import UserExperiment
from personaweave.serving.batching import ContinuousBatcher, FairLock, Generation, QueueFull
from personaweave.serving.memory import Memory
from personaweave.serving.storage import Storage
from personaweave.sub_personalities import MASTER, blend_sub_personalities, sub_personalities

logger = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 4000
MAX_MESSAGES = 64
MAX_USER_ID = 128
REPETITION_PENALTY = DECODING["repetition_penalty"]  # the deployed decoding (greedy unless asked to sample)
DEFAULT_TOP_P = 0.9
EXPERIMENT = "persona-ab"
POOL_PREFIX = "pool-"
DESCRIPTION_PREFIX = "description:"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _text(value: Optional[str]) -> Optional[str]:
    """Text must be encodable (a lone surrogate such as "\\ud800" is not)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


RESERVED = re.compile(r"<\|persona:[^|]*\|>")


def _content(value: str) -> str:
    """Client text may not carry the reserved persona tokens (they would select another persona,
    e.g. another user's adaptive one, behind the server's back)."""
    _text(value)
    if RESERVED.search(value):
        raise ValueError("text must not contain reserved persona tokens (<|persona:...|>)")
    return value


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str

    _content = field_validator("content")(_content)


class ChatRequest(BaseModel):
    model: str = Field(max_length=512)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    user: Optional[str] = Field(default=None, min_length=1, max_length=MAX_USER_ID)
    stream: bool = False
    max_tokens: Optional[int] = Field(default=None, ge=1, le=512)
    temperature: Optional[float] = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: Optional[int] = Field(default=None, ge=1, le=128)

    _texts = field_validator("model", "user")(_text)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and 0 < value < 0.01:
            raise ValueError("temperature must be 0 (greedy) or between 0.01 and 2")
        return value


class Feedback(BaseModel):
    user: str = Field(min_length=1, max_length=MAX_USER_ID)
    rating: Optional[Literal["up", "down"]] = None
    blocked: bool = False

    _user = field_validator("user")(_text)


def _error(status: int, message: str, kind: str = "invalid_request_error",
           headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=dict(headers or {}),
                        content={"error": {"message": message, "type": kind, "param": None, "code": status}})


def _has_lora_layers(model: Any) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in model.modules())


def tenant_of(key: str) -> str:
    """The namespace of an API key: a hash (the key itself is never stored)."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:12]


class UserLocks:
    """One asyncio lock per user, held only while someone uses it (no unbounded dict)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, user: Optional[str]):
        if not user:
            yield
            return
        lock, users = self._locks.get(user, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[user] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[user]
            if users <= 1:
                del self._locks[user]
            else:
                self._locks[user] = (lock, users - 1)


class PoolExhausted(Exception):
    pass


class PersonaPool:
    """Dynamic personas (blends, per-user adaptive states) in at most `size` bank slots.

    Slots are named `pool-0`..`pool-{size-1}`; their reserved tokens are added to the tokenizer
    once, so neither the tokenizer nor the embedding matrix grows with the number of blends or
    users. A slot in use by a request is pinned; the least recently used unpinned slot is
    evicted (`remove_persona`) when a new persona needs room. Bank edits need the caller to hold
    the model lock (generation reads the bank).

    With `peft` (the model with its LoRA sub-personalities), `acquire(..., lora=True)` of a blend whose parents
    all have a sub-personality also adds the parents' adapters blended by the same weights (peft's `cat` blend)
    as an adapter named after the slot, deleted with the slot's persona; its size is the sum of the parents'
    ranks (about 19 MB in float32 for two rank-8 parents on SmolLM2-135M)."""

    def __init__(self, model: Any, tokenizer: Any, size: int, peft: Any = None) -> None:
        if size < 1:
            raise ValueError("The persona pool needs at least one slot.")
        self.model, self.tokenizer, self.size, self.peft = model, tokenizer, size, peft
        self.lora_slots: set[str] = set()  # slots holding a blend of sub-personalities as a peft adapter of their name
        self.slots = [f"{POOL_PREFIX}{i}" for i in range(size)]
        # key -> (slot, blend weights or vector)
        self.entries: OrderedDict[str, tuple[str, dict[str, float] | torch.Tensor]] = OrderedDict()
        self.pins: Counter = Counter()
        self.evictions = 0
        self._lock = threading.Lock()
        static = [n for n in model.config.persona_names if not n.startswith(POOL_PREFIX)]
        if not static:
            raise ValueError("The model has no persona to blend from.")
        for slot in self.slots:  # reserve every slot's tokens (and embedding rows) now, once
            if slot in model.config.persona_names:
                model.remove_persona(slot)
            model.add_persona(slot, blend={static[0]: 1.0}, tokenizer=tokenizer)
            model.remove_persona(slot)

    def is_slot(self, name: str) -> bool:
        return name in self.slots

    def lookup(self, key: str) -> Optional[str]:
        """The pinned slot of `key` when it is in the pool (no bank edit: no model lock needed)."""
        with self._lock:
            if key not in self.entries:
                return None
            slot = self.entries[key][0]
            self.entries.move_to_end(key)
            self.pins[slot] += 1
            return slot

    def acquire(self, key: str, blend: Mapping[str, float] | torch.Tensor, replace: bool = False,
                lora: bool = False) -> str:
        """Pin and return the slot holding `key`'s persona (`blend`: weights over the bank, or a vector),
        adding it (evicting the least recently used unpinned slot if the pool is full). With `replace`, the
        persona is rebuilt from `blend` even when present (an adaptive user's new traits). With `lora`, a
        blend of sub-personalities gets their blended adapter too (see the class). Call with the model lock
        held."""
        blend = blend if isinstance(blend, torch.Tensor) else dict(blend)
        with self._lock:
            if key in self.entries:
                slot, old = self.entries[key]
                self.entries.move_to_end(key)
                if replace and not (isinstance(old, dict) and old == blend):
                    self._remove(slot)
                    self._add(slot, blend, lora)
                    self.entries[key] = (slot, blend)
                self.pins[slot] += 1
                return slot
            used = {s for s, _ in self.entries.values()}
            free = [s for s in self.slots if s not in used and not self.pins[s]]
            if free:
                slot = free[0]
            else:
                victim = next((k for k, (s, _) in self.entries.items() if not self.pins[s]), None)
                if victim is None:
                    raise PoolExhausted(f"all {self.size} persona pool slots are in use")
                slot = self.entries.pop(victim)[0]
                self.evictions += 1
            self._remove(slot)
            self._add(slot, blend, lora)
            self.entries[key] = (slot, blend)
            self.pins[slot] += 1
            return slot

    def _add(self, slot: str, blend: Mapping[str, float] | torch.Tensor, lora: bool = False) -> None:
        if isinstance(blend, torch.Tensor):
            self.model.add_persona(slot, vector=blend, tokenizer=self.tokenizer)
            return
        self.model.add_persona(slot, blend=blend, tokenizer=self.tokenizer)
        parents = {name: weight for name, weight in blend.items() if weight > 0}
        if (lora and self.peft is not None and parents
                and set(parents) <= set(sub_personalities(self.peft)) - self.lora_slots):
            try:
                blend_sub_personalities(self.peft, parents, name=slot, activate=False)
            except Exception:
                self.model.remove_persona(slot)
                raise
            self.lora_slots.add(slot)

    def _remove(self, slot: str) -> None:
        """Drop the slot's persona and its blended adapter, if any."""
        if slot in self.lora_slots:
            self.peft.delete_adapter(slot)
            self.lora_slots.discard(slot)
        if slot in self.model.config.persona_names:
            self.model.remove_persona(slot)

    def adapter_of(self, slot: str) -> Optional[str]:
        """The blended adapter a slot answers with (None: its tokens alone)."""
        return slot if slot in self.lora_slots else None

    def release(self, slot: Optional[str]) -> None:
        if slot is None or not self.is_slot(slot):
            return
        with self._lock:
            self.pins[slot] -= 1
            if self.pins[slot] <= 0:
                del self.pins[slot]

    def forget(self, key: str) -> None:
        """Drop `key`'s persona. Call with the model lock held."""
        with self._lock:
            entry = self.entries.pop(key, None)
            if entry is not None and not self.pins[entry[0]]:
                self._remove(entry[0])


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.active_streams = 0

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency[i] += 1
                return
        self.latency[-1] += 1


class PersonaService:
    """Model, tokenizer, storage, memory and batching behind the HTTP layer."""

    def __init__(self, model: Any, tokenizer: Any, storage: Storage, memory: Optional[Memory] = None,
                 adapter: Any = None, max_new_tokens: int = 64, batching: bool = True, max_batch: int = 16,
                 history_turns: int = 6,
                 experiment: Optional[Mapping[str, float]] = None, experiment_name: str = EXPERIMENT,
                 pool_size: int = 32, max_queue: int = 64, max_streams: int = 8, request_timeout: float = 300.0,
                 max_prompt_tokens: Optional[int] = None, decoder: Any = None, encoder: Any = None,
                 prefix_cache_tokens: int = 4096, peft: Any = None) -> None:
        """`decoder`: what runs the forward passes instead of `model` (e.g. `onnx_backend.OnnxDecoder`); it
        holds a fixed bank, so blends, descriptions and `auto` are then refused. `encoder`: what encodes a
        `description:` persona (anything with `.encode(list[str])`; default: the shipped MiniLM, loaded on
        first use). `prefix_cache_tokens`: the batcher's prefix cache (0: off), used by a user's next turn
        with a bank persona (not pool slots, whose tokens change meaning when a slot is reused).
        `peft`: `model` with its LoRA sub-personalities (as `load_model` returns it): a bank persona that
        has an adapter of its name answers with its tokens and that adapter (requests of different
        adapters share decode steps); a blend of such personas answers with the blended tokens and their adapters
        blended by the same weights (an adapter per pool slot, see `PersonaPool`); descriptions, `auto` and blends
        with a parent without an adapter use the tokens alone."""
        self.model, self.tokenizer, self.storage = model, tokenizer, storage
        self.dynamic_personas = decoder is None
        if decoder is not None and adapter is not None:
            raise ValueError("The adaptation engine ('auto') needs the PyTorch backend: an exported graph holds a "
                             "fixed persona bank.")
        self.peft, self.sub_personalities = peft, frozenset()
        if peft is None and _has_lora_layers(model):
            raise ValueError("`model` carries LoRA layers (peft put them in when its sub-personalities were loaded), "
                             "which would answer every request with whichever adapter is active: pass `peft=` too, "
                             "or load the model with `with_adapters=False`.")
        if peft is not None:
            if decoder is not None:
                raise ValueError("LoRA sub-personalities need the PyTorch backend; to serve them from an exported "
                                 "graph, bake them into it (`personaweave bake`).")
            if peft.get_base_model() is not model:
                raise ValueError("`peft` must be `model` with its LoRA sub-personalities (load_model's third value).")
            peft.eval()  # peft's per-row adapters (`adapter_names`) refuse a model in training mode
            self.sub_personalities = frozenset(sub_personalities(peft)) & set(model.config.persona_names)
        self.memory, self.adapter, self._encoder = memory, adapter, encoder
        self.max_new_tokens, self.history_turns = max_new_tokens, history_turns
        self.user_locks = UserLocks()
        self.model_lock = FairLock()  # bank edits and decode steps do not interleave; edits wait one step at most
        # requests join and leave the running batch between decode steps (without batching: one at a time)
        self.batcher = ContinuousBatcher(decoder or peft or model, self.model_lock, max_batch if batching else 1,
                                         max_queue,
                                         eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
                                         prefix_cache_tokens=prefix_cache_tokens, mixed_adapters=peft is not None)
        self.max_streams, self.request_timeout = max_streams, request_timeout
        self.metrics = Metrics()
        self.experiment = None
        if experiment is not None:
            unknown = [v for v in experiment if v not in model.config.persona_names]
            if unknown:
                raise ValueError(f"A/B variants {unknown} are not personas of the model.")
            self.experiment = UserExperiment(experiment_name, experiment)
        self.pool = PersonaPool(model, tokenizer, pool_size, peft=peft)
        text_config = getattr(model.config, "text_config", model.config)
        self.window = int(getattr(text_config, "max_position_embeddings", 0) or 2048)
        self.max_prompt_tokens = min(max_prompt_tokens or self.window, self.window)
        # a private copy for counting prompt tokens while the model's tokenizer is busy generating
        self.count_tokenizer, self._count_lock = copy.deepcopy(tokenizer), threading.Lock()
        self._resume()

    def _resume(self) -> None:
        """Adaptive trait states and A/B ratings back from the database (after a restart)."""
        if self.adapter is None and self.experiment is None:
            return
        for user, state in self.storage.iter_states():
            try:  # one bad row must not keep the server down
                if self.adapter is not None and state.get("traits") is not None:
                    self.adapter.restore(user, state["traits"])
                if self.experiment is not None and isinstance(state.get("ab"), Mapping):
                    self.experiment.restore(user, state["ab"])
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                logger.warning("ignoring the stored state of %s: %s", user, err)

    def forget(self, user: str) -> None:
        """Drop what the process holds about a user (the database row is deleted by the caller)."""
        with self.model_lock:
            self.pool.forget("user:" + user)
            if self.adapter is not None:
                self.adapter.forget(user)
        self.batcher.forget_prefix(user)
        if self.experiment is not None:
            self.experiment.forget(user)

    # -- persona resolution -----------------------------------------------------------------
    def check_spec(self, spec: str, user: Optional[str]) -> Optional[dict[str, float]]:
        """Reject a bad `model` before anything is generated or stored; the blend weights of a blend."""
        names = [n for n in self.model.config.persona_names if not self.pool.is_slot(n)]
        if spec == "auto":
            if self.adapter is None:
                raise HTTPException(400, "model 'auto' needs the adaptation engine, which this server was "
                                         "started without.")
            return None
        if spec == "ab":
            if self.experiment is None:
                raise HTTPException(400, "model 'ab' needs an A/B experiment, which this server was started "
                                         "without (--ab-test).")
            if not user:
                raise HTTPException(400, "model 'ab' needs a `user`: the assignment is per user.")
            return None
        if spec.startswith(DESCRIPTION_PREFIX):
            if not self.dynamic_personas:
                raise HTTPException(400, "Personas from a description need the PyTorch backend: this server runs an "
                                         f"exported ONNX graph, which holds a fixed set of personas: {names}.")
            if not spec[len(DESCRIPTION_PREFIX):].strip():
                raise HTTPException(400, "A persona description must be a non-empty string after 'description:'.")
            return None
        if spec.startswith("blend:"):
            if not self.dynamic_personas:
                raise HTTPException(400, "Blends need the PyTorch backend: this server runs an exported ONNX graph, "
                                         f"which holds a fixed set of personas: {names}.")
            try:
                weights = parse_blend(spec[len("blend:"):])
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
            unknown = [n for n in weights if n not in names]
            if unknown:
                raise HTTPException(404, f"Unknown persona(s) {unknown}; available: {names}.")
            if any(w < 0 for w in weights.values()):
                raise HTTPException(400, "Blend weights must not be negative.")
            if not math.isfinite(sum(weights.values())):
                raise HTTPException(400, "Blend weights must have a finite sum.")
            try:
                blend_name(weights)
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
            return weights
        if spec not in names:
            raise HTTPException(404, f"Unknown persona {spec!r}; available: {names}, 'auto', 'blend:...' or "
                                     "'description:...'.")
        return None

    def acquire(self, spec: str, user: Optional[str], message: str, anonymous: str = "anonymous"
                ) -> tuple[str, str, Optional[str]]:
        """(persona name to report, bank name to prompt with, pinned pool slot or None). `auto`
        without a user adapts the (tenant's) `anonymous` state."""
        weights = self.check_spec(spec, user)
        if spec.startswith(DESCRIPTION_PREFIX):
            return self.acquire_description(spec[len(DESCRIPTION_PREFIX):].strip())
        if spec == "ab":
            name = self.experiment.assign(user)
            return name, name, None
        if spec == "auto" or weights is not None:
            key = "user:" + (user or anonymous) if spec == "auto" else "blend:" + blend_name(weights)
            slot = None if spec == "auto" else self.pool.lookup(key)
            if slot is None:
                try:
                    with self.model_lock:
                        if spec == "auto":
                            weights = self.adapter.update(user or anonymous, message)
                        slot = self.pool.acquire(key, weights, replace=spec == "auto", lora=spec != "auto")
                except PoolExhausted as err:
                    raise HTTPException(503, f"Busy: {err}; retry shortly.") from None
                except (KeyError, ValueError) as err:
                    raise HTTPException(400, str(err)) from None
            return ("auto" if spec == "auto" else key[len("blend:"):]), slot, slot
        return spec, spec, None

    def acquire_description(self, description: str) -> tuple[str, str, str]:
        """A pool slot holding the persona of `description` (encoded outside the model lock, once per
        distinct description while it stays in the pool)."""
        key = DESCRIPTION_PREFIX + hashlib.sha256(description.encode("utf-8")).hexdigest()[:16]
        slot = self.pool.lookup(key)
        if slot is None:
            if self._encoder is None:
                from personaweave.encoders import default_encoder

                self._encoder = default_encoder()
            vector = torch.as_tensor(self._encoder.encode([description])[0], dtype=torch.float32)
            if vector.shape != (self.model.config.persona_dim,) or not torch.isfinite(vector).all():
                raise HTTPException(400, f"The description's encoding (shape {tuple(vector.shape)}) is not a finite "
                                         f"vector of the shape this model's persona layer takes "
                                         f"({self.model.config.persona_dim},).")
            try:
                with self.model_lock:
                    slot = self.pool.acquire(key, vector)
            except PoolExhausted as err:
                raise HTTPException(503, f"Busy: {err}; retry shortly.") from None
        return key, slot, slot

    def release(self, slot: Optional[str]) -> None:
        self.pool.release(slot)

    # -- generation --------------------------------------------------------------------------
    def generation_kwargs(self, temperature: Optional[float] = None, top_p: Optional[float] = None
                          ) -> dict[str, Any]:
        """Greedy unless a temperature > 0 is asked for; a repetition penalty either way (without
        it, a small model copies its own earlier replies in multi-turn chats)."""
        kwargs: dict[str, Any] = {"do_sample": False, "repetition_penalty": REPETITION_PENALTY}
        if temperature:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p or DEFAULT_TOP_P)
        return kwargs

    def adapter_of(self, bank_name: Optional[str]) -> Optional[str]:
        """The LoRA adapter a bank persona answers with: its sub-personality, or a pool slot's blend of its
        parents' (None: the tokens alone)."""
        if self.pool.is_slot(bank_name):
            return self.pool.adapter_of(bank_name)
        return bank_name if bank_name in self.sub_personalities else None

    def generate(self, conversations: list[list[dict[str, str]]], max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None,
                 personas: Optional[Sequence[Optional[str]]] = None) -> list[str]:
        """Replies to chat-format conversations with the request's settings (one `generate` call).
        `personas`: each conversation's bank persona, whose sub-personality (if any) answers it; None
        (or no `peft`): the master alone, without LoRA."""
        from personaweave.generation import generate_replies

        kwargs = self.generation_kwargs(temperature, top_p)
        if self.peft is not None:
            names = personas if personas is not None else [None] * len(conversations)
            if len(names) != len(conversations):
                raise ValueError(f"{len(names)} personas for {len(conversations)} conversations.")
            kwargs["adapter_names"] = [self.adapter_of(name) or MASTER for name in names]
        with self.model_lock:
            return generate_replies(self.peft or self.model, self.tokenizer, conversations,
                                    max_new_tokens=max_tokens or self.max_new_tokens, batch_size=len(conversations),
                                    **kwargs).texts

    def request(self, prompt: list[int], max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                top_p: Optional[float] = None, user: Optional[str] = None, bank_name: Optional[str] = None
                ) -> Generation:
        """A request for the batcher with the service's settings: greedy unless a temperature > 0 is asked
        for, and the repetition penalty either way (as `generation_kwargs`). A stored user speaking with a
        bank persona (`bank_name`, not a pool slot) may reuse the prefix cache of their own earlier turns;
        a bank persona with a sub-personality answers with it."""
        scope = user if user and bank_name is not None and not self.pool.is_slot(bank_name) else None
        return Generation(prompt=prompt, max_new_tokens=max_tokens or self.max_new_tokens,
                          temperature=temperature or 0.0, top_p=(top_p or DEFAULT_TOP_P) if temperature else 1.0,
                          top_k=self.model.generation_config.top_k or 0, repetition_penalty=REPETITION_PENALTY,
                          prefix_scope=scope, adapter=self.adapter_of(bank_name))

    def encode_prompt(self, conversation: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids after the chat template (with a private tokenizer: the model's may be
        in use by a bank edit)."""
        with self._count_lock:
            text = self.count_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            return self.count_tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_prompt(self, conversation: list[dict[str, str]]) -> int:
        return len(self.encode_prompt(conversation))

    def decode(self, tokens: list[int]) -> str:
        with self._count_lock:
            return self.count_tokenizer.decode(tokens, skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        with self._count_lock:
            return len(self.count_tokenizer(text, add_special_tokens=False)["input_ids"])

    def conversation(self, persona: str, request: ChatRequest, user: Optional[str] = None
                     ) -> tuple[list[dict[str, str]], str, list[int]]:
        """(chat messages, the user's message, prompt token ids). Stored history is dropped oldest
        first until the prompt fits `max_prompt_tokens - max_tokens`; 400 when the request alone
        does not fit."""
        last = request.messages[-1].content
        if user:
            history = [{"role": t["role"], "content": t["content"]}
                       for t in self.storage.history(user, limit=self.history_turns)]
        else:
            history = [m.model_dump() for m in request.messages[:-1] if m.role != "system"]
        context = None
        if self.memory is not None and user:
            recent = {t["content"] for t in history}
            recalled = self.memory.recall(last, self.storage, user)
            context = Memory.as_context([m for m in recalled if m not in recent])
        budget = self.max_prompt_tokens - (request.max_tokens or self.max_new_tokens)
        while True:
            try:
                conversation = chat(persona, last, history, model=self.model, context=context)
            except KeyError as err:  # the persona left the bank in the meantime
                raise HTTPException(503, f"Busy: {err}; retry shortly.") from None
            ids = self.encode_prompt(conversation)
            tokens = len(ids)
            if tokens <= budget:
                return conversation, last, ids
            if history and user:  # the server's own stored history: trim it
                history = history[2:] if len(history) > 1 else []
            elif context:
                context = None
            else:
                raise HTTPException(400, f"The prompt is {tokens} tokens after the chat template and max_tokens is "
                                         f"{request.max_tokens or self.max_new_tokens}: together more than the "
                                         f"{self.max_prompt_tokens}-token context window. Send fewer or shorter "
                                         "messages, or a smaller max_tokens.")

    def check_window(self, request: ChatRequest, user: Optional[str]) -> None:
        """400 before anything else happens when the request alone (the client's messages; for a stored
        user, the last message without the stored history) does not fit the window with max_tokens."""
        static = next(n for n in self.model.config.persona_names if not self.pool.is_slot(n))
        alone = request.model_copy(update={"messages": [request.messages[-1]]}) if user else request
        self.conversation(static, alone, None)

    def persist(self, user: Optional[str], persona: str, message: str, reply: str, spec: str = "") -> None:
        if not user:
            return
        vector = self.memory.embed([message])[0] if self.memory is not None else None

        def change(state: dict[str, Any]) -> dict[str, Any]:
            state.update(persona=persona, turns=state.get("turns", 0) + 1, last_spec=spec)
            if self.adapter is not None and user in self.adapter.states:
                state["traits"] = [round(float(x), 4) for x in self.adapter.states[user]]
            if spec == "ab" and self.experiment is not None:
                state["ab"] = self.experiment.state(user)
            return state

        # one transaction from the read to the write: another server process on the database loses nothing
        self.storage.update_exchange(user, change, [("user", message, persona, vector),
                                                    ("assistant", reply, persona, None)])

    def prometheus(self) -> str:
        m = self.metrics
        lines = ["# TYPE personaweave_queue_depth gauge", f"personaweave_queue_depth {self.batcher.depth}",
                 "# TYPE personaweave_active_streams gauge", f"personaweave_active_streams {m.active_streams}",
                 "# TYPE personaweave_requests_total counter"]
        lines += [f'personaweave_requests_total{{status="{s}"}} {n}' for s, n in sorted(m.requests.items())]
        lines += ["# TYPE personaweave_prompt_tokens_total counter", f"personaweave_prompt_tokens_total {m.prompt_tokens}",
                  "# TYPE personaweave_completion_tokens_total counter",
                  f"personaweave_completion_tokens_total {m.completion_tokens}",
                  "# TYPE personaweave_batch_failures_total counter",
                  f"personaweave_batch_failures_total {self.batcher.failures}",
                  "# TYPE personaweave_running_requests gauge", f"personaweave_running_requests {self.batcher.running}",
                  "# TYPE personaweave_decode_steps_total counter", f"personaweave_decode_steps_total {self.batcher.steps}"]
        cache = self.batcher.prefix_cache
        if cache is not None:
            lines += ["# TYPE personaweave_prefix_cache_hits_total counter", f"personaweave_prefix_cache_hits_total {cache.hits}",
                      "# TYPE personaweave_prefix_cache_reused_tokens_total counter",
                      f"personaweave_prefix_cache_reused_tokens_total {cache.reused_tokens}",
                      "# TYPE personaweave_prefix_cache_tokens gauge", f"personaweave_prefix_cache_tokens {cache.tokens}"]
        lines += ["# TYPE personaweave_request_seconds histogram"]
        total = 0
        for bound, count in zip(LATENCY_BUCKETS + (math.inf,), m.latency):
            total += count
            lines.append(f'personaweave_request_seconds_bucket{{le="{"+Inf" if bound == math.inf else bound}"}} {total}')
        lines += [f"personaweave_request_seconds_sum {m.latency_sum:.6f}", f"personaweave_request_seconds_count {total}",
                  "# TYPE personaweave_bank_size gauge", f"personaweave_bank_size {len(self.model.config.personas)}",
                  "# TYPE personaweave_pool_used gauge", f"personaweave_pool_used {len(self.pool.entries)}",
                  "# TYPE personaweave_pool_evictions_total counter",
                  f"personaweave_pool_evictions_total {self.pool.evictions}",
                  "# TYPE personaweave_user_locks gauge", f"personaweave_user_locks {len(self.user_locks)}"]
        return "\n".join(lines) + "\n"


def _completion(persona: str, spec: str, reply: str, prompt_tokens: int, completion_tokens: int,
                finish_reason: Optional[str] = "stop") -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": spec, "system_fingerprint": persona,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class Gate:
    """ASGI middleware: API keys (every path but /health), request metrics, and a last-resort
    OpenAI-style JSON 500 for anything the routes did not handle."""

    def __init__(self, app: Any, keys: Mapping[bytes, str], metrics: Metrics) -> None:
        self.app, self.keys, self.metrics = app, dict(keys), metrics

    def tenant(self, scope: Mapping[str, Any]) -> Optional[str]:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip()).digest()
        found = None
        for known, tenant in self.keys.items():  # no early exit: the time does not depend on the key
            if hmac.compare_digest(digest, known):
                found = tenant
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.keys and scope["path"] != "/health":
            tenant = self.tenant(scope)
            if tenant is None:
                self.metrics.requests["401"] += 1
                response = _error(401, "Missing or invalid API key: send `Authorization: Bearer KEY`.",
                                  "authentication_error", {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
            scope.setdefault("state", {})["tenant"] = tenant
        started, start = [], time.perf_counter()

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                started.append(message["status"])
                self.metrics.requests[str(message["status"])] += 1
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except Exception as err:  # noqa: BLE001  (the last resort: always an OpenAI-style answer)
            logger.exception("unhandled error on %s", scope.get("path"))
            if not started:
                await _error(500, f"Internal error ({type(err).__name__}); the request was not completed.",
                             "server_error")(scope, receive, send_and_count)
        finally:
            if scope["path"].startswith("/v1/chat"):
                self.metrics.observe(time.perf_counter() - start)


def _scoped(request: Request, user: Optional[str]) -> Optional[str]:
    """The stored id of the client's user: namespaced by the API key's tenant when keys are on."""
    if not user:
        return user
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:
        return user
    scoped = f"{tenant}:{user}"
    if len(scoped) > MAX_USER_ID:
        raise HTTPException(400, f"With API keys, user ids are at most {MAX_USER_ID - len(tenant) - 1} characters.")
    return scoped


def create_app(service: PersonaService, api_keys: Iterable[str] = ()) -> FastAPI:
    app = FastAPI(title="personaweave", version="0.1.0")
    app.state.service = service
    keys = {hashlib.sha256(k.encode()).digest(): tenant_of(k) for k in api_keys if k}
    app.add_middleware(Gate, keys=keys, metrics=service.metrics)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail), headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"Invalid request: {where}: {first.get('msg', 'malformed body')}")

    @app.get("/v1/models")
    async def models():
        # what a client may ask for by name: the model's personas (not the internal pool slots, which
        # hold blends and adaptive users: those are asked for as `blend:...` and `auto`)
        data = [{"id": p.name, "object": "model", "created": 0, "owned_by": "personaweave",
                 "description": p.description} for p in service.model.personas if not service.pool.is_slot(p.name)]
        # `auto` only where the adaptation engine runs (otherwise it answers 400), `ab` only with an experiment.
        extra = (["auto"] if service.adapter is not None else []) + (["ab"] if service.experiment is not None else [])
        return {"object": "list", "data": data + [{"id": name, "object": "model", "created": 0,
                                                   "owned_by": "personaweave"} for name in extra]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.prometheus(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def completions(request: ChatRequest, http: Request):
        last = request.messages[-1]
        if last.role != "user" or not last.content.strip():
            raise HTTPException(400, "The last message must be a non-empty user message.")
        if any(len(m.content) > MAX_MESSAGE_CHARS for m in request.messages):
            raise HTTPException(413, f"A message is longer than {MAX_MESSAGE_CHARS} characters.")
        if (request.n or 1) > 1:
            raise HTTPException(400, "n > 1 is not supported: this server returns one choice per request.")
        user, anonymous = _scoped(http, request.user), _scoped(http, "anonymous")
        service.check_spec(request.model, user)
        await asyncio.to_thread(service.check_window, request, user)
        if request.stream:  # the stream holds the user's lock itself, while it runs
            if service.metrics.active_streams >= service.max_streams:
                raise HTTPException(503, f"Busy: {service.max_streams} streams are running; retry shortly.",
                                    headers={"Retry-After": "2"})
            return StreamingResponse(_stream(service, request, user, anonymous),
                                     media_type="text/event-stream")
        try:
            return await asyncio.wait_for(_complete(service, request, user, anonymous), service.request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"The request took longer than {service.request_timeout:g} s.") from None

    @app.get("/v1/users/{user_id:path}")
    async def get_user(user_id: str, http: Request):
        stored = _scoped(http, user_id)
        state = await asyncio.to_thread(service.storage.state, stored)
        if state is None:
            raise HTTPException(404, f"Unknown user {user_id!r}.")
        history = await asyncio.to_thread(service.storage.history, stored)
        return {"id": user_id, "state": state, "turns": len(history), "history": history}

    @app.delete("/v1/users/{user_id:path}")
    async def delete_user(user_id: str, http: Request):
        stored = _scoped(http, user_id)
        async with service.user_locks.hold(stored):
            deleted = await asyncio.to_thread(service.storage.delete_user, stored)
            await asyncio.to_thread(service.forget, stored)
        if not deleted:
            raise HTTPException(404, f"Unknown user {user_id!r}.")
        return {"id": user_id, "deleted": True}

    @app.post("/v1/feedback")
    async def feedback(item: Feedback, http: Request):
        user = _scoped(http, item.user)
        experiment = service.experiment

        def change(state: dict[str, Any]) -> dict[str, Any]:
            log = state.setdefault("feedback", {"up": 0, "down": 0, "blocked": False})
            if item.rating:
                log[item.rating] = log.get(item.rating, 0) + 1
            log["blocked"] = bool(log.get("blocked")) or item.blocked
            if rated(state):
                state["ab"].setdefault("ratings", []).append(1.0 if item.rating == "up" else 0.0)
            return state

        def rated(state: Mapping[str, Any]) -> bool:
            return (bool(item.rating) and state.get("last_spec") == "ab" and experiment is not None
                    and experiment.owns(state.get("ab")))

        async with service.user_locks.hold(user):
            state = await asyncio.to_thread(service.storage.update_state, user, change)
            log, last, rated_ab = state["feedback"], state.get("last_spec"), rated(state)
            # in-memory effects only once the state is committed
            if rated_ab:
                experiment.restore(user, state["ab"])
            if service.adapter is not None and last == "auto":
                service.adapter.feedback(user, negative=item.rating == "down" or item.blocked)
        return {"user": item.user, "feedback": log}

    @app.get("/v1/experiments/{name}")
    async def experiment(name: str, http: Request):
        if service.experiment is None or name != service.experiment.name:
            raise HTTPException(404, f"Unknown experiment {name!r}.")
        tenant = getattr(http.state, "tenant", None)  # with API keys: the caller's own users only
        return service.experiment.report(prefix=f"{tenant}:" if tenant else "")

    return app


async def _complete(service: PersonaService, request: ChatRequest, user: Optional[str],
                    anonymous: str = "anonymous") -> dict[str, Any]:
    async with service.user_locks.hold(user):
        persona, bank_name, slot = await asyncio.to_thread(service.acquire, request.model, user,
                                                           request.messages[-1].content, anonymous)
        try:
            _, message, prompt = await asyncio.to_thread(service.conversation, bank_name, request, user)
            # a timeout (504) cancels this coroutine: the batcher then drops the request at its next step
            gen = service.request(prompt, request.max_tokens, request.temperature, request.top_p, user, bank_name)
            try:
                await service.batcher.submit(gen)
            except QueueFull as err:
                raise HTTPException(503, f"Busy: {err}; retry shortly.", headers={"Retry-After": "2"}) from None
        finally:
            service.release(slot)
        reply = (await asyncio.to_thread(service.decode, gen.tokens)).strip()
        await asyncio.to_thread(service.persist, user, persona, message, reply, request.model)
    service.metrics.prompt_tokens += len(prompt)
    service.metrics.completion_tokens += len(gen.tokens)
    return _completion(persona, request.model, reply, len(prompt), len(gen.tokens), gen.finish_reason)


def _sse(payload: Mapping[str, Any]) -> str:
    return "data: " + json.dumps(payload) + "\n\n"


async def _stream(service: PersonaService, request: ChatRequest, user: Optional[str], anonymous: str = "anonymous"):
    """Server-sent events in OpenAI's chunk format, decoded in the continuous batch.
    Always ends: an error becomes an SSE `error` event, then [DONE]."""
    service.metrics.active_streams += 1
    try:
        async with service.user_locks.hold(user):
            slot = None
            try:
                persona, bank_name, slot = await asyncio.to_thread(service.acquire, request.model, user,
                                                                   request.messages[-1].content, anonymous)
                _, message, prompt = await asyncio.to_thread(service.conversation, bank_name, request, user)
                async for event in _stream_events(service, persona, request, prompt, message, user, bank_name):
                    yield event
            except HTTPException as err:
                yield _sse({"error": {"message": str(err.detail), "type": "invalid_request_error", "param": None,
                                      "code": err.status_code}})
                yield "data: [DONE]\n\n"
            finally:
                service.release(slot)
    finally:
        service.metrics.active_streams -= 1


async def _stream_events(service: PersonaService, persona: str, request: ChatRequest, prompt: list[int],
                         message: str, user: Optional[str], bank_name: Optional[str] = None):
    """The reply's text as it is decoded: the request runs in the continuous batch like any other, and
    each step's token comes out here (text only once it is whole: no half UTF-8 character)."""
    gen = service.request(prompt, request.max_tokens, request.temperature, request.top_p, user, bank_name)
    chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    tokens = service.batcher.stream(gen)
    sent, failure = "", None
    try:
        while True:
            try:  # no token for `request_timeout` seconds: the stream ends (and the request leaves the batch)
                await asyncio.wait_for(anext(tokens), service.request_timeout)
            except StopAsyncIteration:
                break
            text = service.decode(gen.tokens)
            if text.endswith("\ufffd") or len(text) <= len(sent):
                continue
            piece, sent = text[len(sent):], text
            yield _sse({"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": request.model, "choices": [{"index": 0, "delta": {"content": piece},
                                                             "finish_reason": None}]})
    except QueueFull as err:
        failure = HTTPException(503, f"Busy: {err}; retry shortly.")
    except asyncio.TimeoutError:
        failure = TimeoutError(f"no token for {service.request_timeout:g} s")
    except Exception as err:  # noqa: BLE001  (reported to the client; the stream must end)
        failure = err
    finally:
        if gen.finish_reason is None:  # the client left or the stream failed: free the batch slot
            gen.cancelled.set()
        await tokens.aclose()
    if failure is not None:
        logger.warning("a stream failed: %s: %s", type(failure).__name__, failure)
        yield _sse({"error": {"message": f"Generation failed ({type(failure).__name__}); the reply is incomplete.",
                              "type": "server_error", "param": None, "code": 500}})
        yield "data: [DONE]\n\n"
        return
    reply = service.decode(gen.tokens).strip()
    await asyncio.to_thread(service.persist, user, persona, message, reply, request.model)
    service.metrics.prompt_tokens += len(prompt)
    service.metrics.completion_tokens += len(gen.tokens)
    yield _sse({"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": request.model, "choices": [{"index": 0, "delta": {}, "finish_reason": gen.finish_reason}]})
    yield "data: [DONE]\n\n"
