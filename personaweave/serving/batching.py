"""Continuous batching: requests join and leave the running batch between decode steps.

One worker thread runs a manual decode loop over a shared KV cache (`DynamicCache`): new requests
are prefilled together with others of similar length (their prompts, persona tokens included: the
model's embedding swaps them for the persona's soft vectors exactly as in `generate`) and their
cache rows are merged into the running batch, left-padded to a common length; every step then decodes one token for every running
request; a request that is done (an end-of-turn token, its own `max_new_tokens`) or whose caller
has gone (a timeout, a closed stream) leaves the batch at once, and leading columns that only
padding uses are trimmed. Each request keeps its own sampling settings (greedy or temperature /
top-k / top-p, repetition penalty over its own prompt and tokens), so requests with different
settings share steps.

Greedy decoding gives the tokens `model.generate` gives for the same prompt alone (tested): the
same logits processors, in the same order, on float32 logits; padding is masked out of attention
(and positions count real tokens only), so it changes the numbers at rounding level at most.

Prefix cache (`prefix_cache_tokens` > 0): when a request that names a `prefix_scope` (the service: the
user and persona) finishes, its sequence's cache rows are kept, up to that many tokens in all (least
recently used first out). A later request of the same scope whose prompt starts with a kept sequence (a
chat's next turn: the same system prompt, history and the last reply) is prefilled from there, alone:
only its new tokens go through the model. Scopes never share entries, so one user's conversation cannot
speed up, and thus reveal itself to, another's; `forget_prefix(scope)` drops a scope's entries.

Failure isolation: choosing a request's token is done row by row, so a failure there (e.g. NaN
probabilities) fails that request only; a failed group prefill is retried request by request, so
it fails only the request that fails alone; when a batched
decode step fails, every running request goes back to the front of the queue with the tokens it
has so far and is prefilled again alone, so only a request that fails alone fails.

LoRA sub-personalities (`mixed_adapters=True`, `model` a peft model): each request names its adapter
(`Generation.adapter`; None: the master without LoRA) and every forward pass gets the batch's names as
peft's `adapter_names`, so requests of different sub-personalities share steps (peft applies each
adapter to its own rows). Kept prefixes are kept per adapter too.

`lock` (held for each prefill and step) lets other threads edit the persona bank between steps;
`FairLock` hands it over in arrival order, so an edit waits one step at most.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from personaweave.sub_personalities import MASTER

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """`max_queue` requests are already waiting: the caller should retry later."""


class FairLock:
    """A lock granted in arrival order (a ticket lock): the decode loop, which takes it again right
    after each step, cannot starve a thread that waits to edit the persona bank."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass
class Generation:
    """One request: its prompt (token ids) and settings in; its tokens and finish reason out."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 50  # as `generate` samples by default (GenerationConfig.top_k)
    repetition_penalty: float = 1.0
    prefix_scope: Optional[str] = None  # whose kept prefixes this request may reuse (None: no prefix cache)
    adapter: Optional[str] = None  # its LoRA sub-personality (with `mixed_adapters`); None: the master alone
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (end of turn), "length", "error" or "cancelled"
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _loop: Any = field(default=None, repr=False)
    _events: Any = field(default=None, repr=False)
    _prefix: Any = field(default=None, repr=False)  # (length, [(keys, values) per layer]) found at admission

    def _send(self, kind: str, value: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the caller's event loop is closed: nobody waits for this request
            self.cancelled.set()


class PrefixCache:
    """Finished sequences' cache rows by scope, at most `max_tokens` tokens in all (LRU)."""

    def __init__(self, max_tokens: int, min_prefix: int = 8) -> None:
        self.max_tokens, self.min_prefix = max_tokens, min_prefix
        # key -> ((scope, adapter), tokens, per-layer cache rows)
        self._entries: collections.OrderedDict[int, tuple[tuple[str, Optional[str]], list[int], list]] = \
            collections.OrderedDict()
        self._next = self.tokens = self.hits = self.reused_tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, scope: str, sequence: Sequence[int], adapter: Optional[str] = None
               ) -> Optional[tuple[int, list]]:
        """(length, layers) of the scope's longest kept prefix of `sequence` computed with the same
        `adapter`, leaving at least its last token to feed; None below `min_prefix` tokens."""
        best, best_key = 0, None
        with self._lock:
            for key, (owner, tokens, _) in self._entries.items():
                if owner != (scope, adapter):
                    continue
                limit, n = min(len(tokens), len(sequence) - 1), 0
                while n < limit and tokens[n] == sequence[n]:
                    n += 1
                if n > best:
                    best, best_key = n, key
            if best_key is None or best < self.min_prefix:
                return None
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.reused_tokens += best
            layers = self._entries[best_key][2]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def add(self, scope: str, tokens: list[int], layers: list, adapter: Optional[str] = None) -> None:
        if len(tokens) < self.min_prefix or len(tokens) > self.max_tokens:
            return
        with self._lock:
            for key, (owner, kept, _) in list(self._entries.items()):  # what the new sequence extends goes
                if owner == (scope, adapter) and len(kept) <= len(tokens) and tokens[:len(kept)] == kept:
                    self._drop(key)
            self._entries[self._next] = ((scope, adapter), tokens, layers)
            self._next += 1
            self.tokens += len(tokens)
            while self.tokens > self.max_tokens:
                self._drop(next(iter(self._entries)))

    def forget(self, scope: str) -> None:
        with self._lock:
            for key in [k for k, (owner, _, _) in self._entries.items() if owner[0] == scope]:
                self._drop(key)

    def _drop(self, key: int) -> None:
        _, tokens, _ = self._entries.pop(key)
        self.tokens -= len(tokens)


class ContinuousBatcher:
    """`await batcher.submit(Generation(...))` -> the same object, finished; `async for token in
    batcher.stream(gen)` yields each token as it is decoded.

    At most `max_batch` requests decode together and at most `max_queue` wait (QueueFull beyond);
    new requests are prefilled between steps, up to `prefill_tokens` prompt tokens at a time (at
    least one request), so a burst of long prompts does not stall the running batch for long.
    `prefix_cache_tokens`: the prefix cache's size in tokens (0: none; see the module docstring).
    `mixed_adapters`: `model` is a peft model and each request's `adapter` is passed to it (see the
    module docstring); without it, `Generation.adapter` must be None.
    """

    def __init__(self, model: Any, lock: Any = None, max_batch: int = 16, max_queue: int = 64,
                 eos_token_id: Optional[int | Sequence[int]] = None, prefill_tokens: int = 2048,
                 idle_seconds: float = 30.0, prefix_cache_tokens: int = 0, mixed_adapters: bool = False) -> None:
        self.model, self.lock = model, lock if lock is not None else FairLock()
        self.mixed_adapters = mixed_adapters
        self.max_batch, self.max_queue, self.prefill_tokens = max(1, max_batch), max_queue, prefill_tokens
        if eos_token_id is None:
            eos_token_id = model.generation_config.eos_token_id
        self.eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self.idle_seconds = idle_seconds
        if not isinstance(prefix_cache_tokens, int) or prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be a whole number >= 0 (0: no prefix cache), not "
                             f"{prefix_cache_tokens!r}.")
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # running rows per step
        self.failures = self.steps = 0
        self._waiting: collections.deque[Generation] = collections.deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._reset()

    # -- the asyncio side -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests waiting to join the batch (not counting the running ones)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    async def stream(self, gen: Generation) -> AsyncIterator[int]:
        if gen.adapter is not None and not self.mixed_adapters:
            raise ValueError(f"This batcher runs the master alone; it cannot apply the adapter {gen.adapter!r}.")
        gen._loop, gen._events = asyncio.get_running_loop(), asyncio.Queue()
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(gen)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="personaweave-decode")
                self._thread.start()
            self._cond.notify()
        try:
            while True:
                kind, value = await gen._events.get()
                if kind == "token":
                    yield value
                elif kind == "done":
                    return
                else:
                    raise value
        finally:  # the caller left (timeout, closed stream): the worker drops the request at its next step
            if gen.finish_reason is None:
                gen.cancelled.set()

    def forget_prefix(self, scope: str) -> None:
        """Drop the prefix cache's entries of `scope` (e.g. a deleted user's)."""
        if self.prefix_cache is not None:
            self.prefix_cache.forget(scope)

    async def submit(self, gen: Generation) -> Generation:
        async for _ in self.stream(gen):
            pass
        return gen

    # -- the worker thread ------------------------------------------------------------------
    def _reset(self) -> None:
        self._rows: list[Generation] = []
        self._cache = self._mask = self._last = self._positions = None
        # (cache rows, first column) the running rows still need from `_cache`: rows that left are dropped
        # lazily, by the next join's copy (which happens anyway) or before the next step
        self._pending: Optional[tuple[Any, int]] = None

    def _run(self) -> None:
        import torch

        while True:
            with self._cond:
                while not self._waiting and not self._rows:
                    if not self._cond.wait(self.idle_seconds) and not self._waiting:
                        self._thread = None  # idle: the next request starts a new worker
                        return
                admitted, budget = [], self.prefill_tokens
                while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                    gen = self._waiting[0]
                    size = len(gen.prompt) + len(gen.tokens)
                    if admitted and size > budget:
                        break
                    self._waiting.popleft()
                    if gen.cancelled.is_set():
                        gen.finish_reason = "cancelled"
                        continue
                    admitted.append(gen)
                    budget -= size
            try:
                with torch.inference_mode():
                    for group in self._groups(admitted):  # the lock is let go between prefills (bank edits)
                        with self.lock:
                            self._prefill(group)
                    with self.lock:
                        self._drop_cancelled()
                        if self._rows:
                            self._step()
            except Exception as err:  # noqa: BLE001  (a bug here must not leave callers waiting forever)
                logger.exception("the decode loop failed; failing its running requests")
                for gen in self._rows:
                    self._fail(gen, err)
                self._reset()

    def _groups(self, admitted: list[Generation]) -> list[list[Generation]]:
        """Newcomers prefilled together: similar lengths (by length, a group's shortest at least 3/4 of its
        longest), so little of a group's forward pass is spent on padding."""
        size = lambda g: len(g.prompt) + len(g.tokens)  # noqa: E731
        groups: list[list[Generation]] = []
        if self.prefix_cache is not None:
            for gen in admitted:
                if gen.prefix_scope is not None:
                    gen._prefix = self.prefix_cache.lookup(gen.prefix_scope, list(gen.prompt) + gen.tokens,
                                                           gen.adapter)
            groups = [[gen] for gen in admitted if gen._prefix is not None]  # each from its own past
            admitted = [gen for gen in admitted if gen._prefix is None]
        for gen in sorted(admitted, key=size, reverse=True):
            if groups and 4 * size(gen) >= 3 * size(groups[-1][0]):
                groups[-1].append(gen)
            else:
                groups.append([gen])
        return groups

    def _prefill(self, group: list[Generation]) -> None:
        """One forward pass over the newcomers' prompts (left-padded), their first tokens, and their cache
        rows into the running batch. When a group fails, each of its requests is prefilled alone."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        rows = [list(gen.prompt) + gen.tokens for gen in group]
        width = max(map(len, rows))
        past, kept = DynamicCache(), 0
        if len(group) == 1 and group[0]._prefix is not None:  # from a kept prefix: its new tokens only
            kept, layers = group[0]._prefix
            group[0]._prefix = None
            for i, (keys, values) in enumerate(layers):
                past.update(keys.to(device), values.to(device), i)
        ids = torch.zeros(len(rows), width - kept, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row[kept:], device=device)
            mask[i, width - len(row):] = 1
        positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, kept:]  # as `generate` numbers left-padded prompts
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             cache_position=torch.arange(kept, width, device=device), past_key_values=past,
                             use_cache=True, logits_to_keep=1, **self._adapters(group))
        except Exception as err:  # noqa: BLE001
            if len(group) == 1:
                self._fail(group[0], err)
            else:
                for gen in group:
                    self._prefill([gen])
            return
        keep, tokens = [], []
        for i, gen in enumerate(group):
            try:
                token = self._choose(gen, out.logits[i:i + 1, -1])
            except Exception as err:  # noqa: BLE001  (this request alone)
                self._fail(gen, err)
                continue
            if not self._advance(gen, token):
                keep.append(i)
                tokens.append(token)
        if keep:
            self._join([group[i] for i in keep], out.past_key_values, mask, keep, tokens,
                       [len(rows[i]) for i in keep])

    def _step(self) -> None:
        import torch

        rows, device = self._rows, self.model.device
        self._compact()
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        try:
            out = self.model(input_ids=self._last, attention_mask=mask, position_ids=self._positions[:, None],
                             cache_position=torch.tensor([self._mask.shape[1]], device=device),
                             past_key_values=self._cache, use_cache=True, **self._adapters(rows))
        except Exception as err:  # noqa: BLE001
            # which request broke the batch is unknown: each goes back to the front of the queue with its
            # tokens so far and is prefilled alone (which also decodes its next token), so only it fails
            logger.warning("a decode step of %d failed (%s: %s); retrying its requests one by one",
                           len(rows), type(err).__name__, err)
            with self._cond:
                self._waiting.extendleft(reversed(rows))
            self._reset()
            return
        self.steps += 1
        self.batch_sizes.append(len(rows))
        self._mask, self._positions = mask, self._positions + 1
        logits = out.logits[:, -1]
        keep, tokens = [], []
        for i, gen in enumerate(rows):
            try:
                token = self._choose(gen, logits[i:i + 1])
            except Exception as err:  # noqa: BLE001  (this request alone)
                self._fail(gen, err)
                continue
            if not self._advance(gen, token, row=i):
                keep.append(i)
                tokens.append(token)
        if len(keep) < len(rows):
            self._select(keep)
        if self._rows:
            self._last = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]

    def _remember(self, row: int, gen: Generation) -> None:
        """Keep a finished row's sequence and cache rows in the prefix cache (padding columns left out)."""
        if self.prefix_cache is None or gen.prefix_scope is None:
            return
        length = int(self._mask[row].sum())  # the row's cached tokens: the last `length` columns
        tokens = (list(gen.prompt) + gen.tokens)[:length]
        layers = [(layer.keys[row:row + 1, :, -length:].clone(), layer.values[row:row + 1, :, -length:].clone())
                  for layer in self._cache.layers]
        self.prefix_cache.add(gen.prefix_scope, tokens, layers, gen.adapter)

    def _adapters(self, rows: Sequence[Generation]) -> dict[str, Any]:
        """The forward pass's peft `adapter_names`, one per row (with `mixed_adapters`)."""
        return {"adapter_names": [gen.adapter or MASTER for gen in rows]} if self.mixed_adapters else {}

    def _choose(self, gen: Generation, logits) -> int:
        """The next token from (1, V) logits with the request's settings: `generate`'s processors, in
        `generate`'s order, on float32 scores."""
        import torch
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        scores = logits.to(dtype=torch.float32)
        ids = torch.tensor([list(gen.prompt) + gen.tokens], dtype=torch.long, device=scores.device)
        if gen.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(gen.repetition_penalty)(ids, scores)
        if not gen.temperature:
            return int(scores.argmax(-1))
        scores = TemperatureLogitsWarper(gen.temperature)(ids, scores)
        if gen.top_k:
            scores = TopKLogitsWarper(gen.top_k)(ids, scores)
        if gen.top_p < 1.0:
            scores = TopPLogitsWarper(gen.top_p)(ids, scores)
        return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1))

    def _advance(self, gen: Generation, token: int, row: Optional[int] = None) -> bool:
        """Record `token`; True when the request is finished (it has then left, or never joins, the batch).
        A finished running `row` goes to the prefix cache before its caller hears that it is done."""
        if gen.cancelled.is_set():
            gen.finish_reason = "cancelled"
            return True
        if token in self.eos:
            if row is not None:
                self._remember(row, gen)
            return self._finish(gen, "stop")
        gen.tokens.append(token)
        gen._send("token", token)
        if len(gen.tokens) >= gen.max_new_tokens:
            if row is not None:
                self._remember(row, gen)
            return self._finish(gen, "length")
        return False

    def _finish(self, gen: Generation, reason: str) -> bool:
        gen.finish_reason = reason
        gen._send("done")
        return True

    def _fail(self, gen: Generation, err: BaseException) -> None:
        self.failures += 1
        gen.finish_reason = "error"
        gen._send("error", err)

    def _join(self, gens: list[Generation], cache, mask, keep: list[int], tokens: list[int],
              lengths: list[int]) -> None:
        """Merge rows `keep` of a prefilled group's cache into the running batch (left-padded to one length)."""
        import torch
        import torch.nn.functional as F

        device = mask.device
        index = torch.tensor(keep, dtype=torch.long, device=device)
        every_row = len(keep) == mask.shape[0]
        mask = mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # columns that only the dropped rows used
        mask = mask[:, start:]
        if start or not every_row:  # copy only when rows or columns go
            for layer in cache.layers:
                layer.keys = layer.keys[:, :, start:].index_select(0, index)
                layer.values = layer.values[:, :, start:].index_select(0, index)
        last = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        positions = torch.tensor(lengths, dtype=torch.long, device=device)
        if not self._rows:
            self._cache, self._mask, self._last, self._positions, self._rows = cache, mask, last, positions, list(gens)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self._mask.shape[1], width - mask.shape[1]
        rows = self._mask.shape[0]
        kept, first = self._pending if self._pending is not None else (None, 0)
        kept = kept.tolist() if kept is not None else None
        for old, new in zip(self._cache.layers, cache.layers):  # (B, heads, T, head_dim): one copy each
            for name in ("keys", "values"):
                a, b = getattr(old, name), getattr(new, name)
                merged = a.new_zeros(rows + b.shape[0], a.shape[1], width, a.shape[3])
                if kept is None:
                    merged[:rows, :, pad_old:] = a
                else:  # the running rows still to select: copied straight into place
                    for i, row in enumerate(kept):
                        merged[i, :, pad_old:] = a[row, :, first:]
                merged[rows:, :, pad_new:] = b
                setattr(old, name, merged)
        self._pending = None
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self._last = torch.cat([self._last, last])
        self._positions = torch.cat([self._positions, positions])
        self._rows.extend(gens)

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows; drop the leading columns that are padding in every remaining row (in the
        cache: pending until `_compact` or the next join)."""
        import torch

        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # first column some row uses
        self._mask = mask[:, start:]
        if self._pending is None:  # the cache itself is selected later (`_compact`, or the next join's copy)
            self._pending = (index, start)
        else:
            self._pending = (self._pending[0].index_select(0, index), self._pending[1] + start)
        self._positions = self._positions.index_select(0, index)
        self._last = self._last.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]

    def _compact(self) -> None:
        """Apply the pending row and column selection to the cache (one contiguous copy)."""
        if self._pending is None:
            return
        index, start = self._pending
        for layer in self._cache.layers:
            layer.keys = layer.keys[:, :, start:].index_select(0, index)
            layer.values = layer.values[:, :, start:].index_select(0, index)
        self._pending = None

    def _drop_cancelled(self) -> None:
        keep = []
        for i, gen in enumerate(self._rows):
            if gen.cancelled.is_set():
                gen.finish_reason = "cancelled"
            else:
                keep.append(i)
        if len(keep) < len(self._rows):
            self._select(keep)
