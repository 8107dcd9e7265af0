"""Few-shot persona recognition with prototypical networks (Snell et al. 2017).

Each persona's prototype is the mean embedding of its k support replies; a query reply goes to
the nearest prototype (squared Euclidean distance). Embeddings come from the shipped MiniLM,
optionally through a linear projection meta-trained on episodes drawn from training personas,
so the projection learns what separates speakers rather than topics.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Episode:
    support: torch.Tensor  # (N, k, D)
    query: torch.Tensor  # (N, q, D)


def sample_episode(embeddings: Mapping[str, np.ndarray], n_way: int, k_shot: int, n_query: int,
                   rng: random.Random) -> Episode:
    """An N-way k-shot episode from personas that have at least k + q examples."""
    eligible = [name for name, e in embeddings.items() if len(e) >= k_shot + n_query]
    if k_shot < 1 or n_query < 1:
        raise ValueError("k_shot and n_query must be at least 1.")
    if len(eligible) < n_way:
        raise ValueError(f"{n_way}-way {k_shot}-shot needs {n_way} personas with >= {k_shot + n_query} "
                         f"examples; only {len(eligible)} have that many.")
    support, query = [], []
    for name in rng.sample(eligible, n_way):
        idx = rng.sample(range(len(embeddings[name])), k_shot + n_query)
        rows = torch.as_tensor(np.asarray(embeddings[name])[idx], dtype=torch.float32)
        support.append(rows[:k_shot])
        query.append(rows[k_shot:])
    return Episode(torch.stack(support), torch.stack(query))


def episode_logits(episode: Episode, projection: nn.Module | None = None) -> torch.Tensor:
    """(N * q, N) logits = negative squared distances of queries to the prototypes."""
    support, query = episode.support, episode.query
    if projection is not None:
        support, query = projection(support), projection(query)
    prototypes = support.mean(1)  # (N, D)
    flat = query.reshape(-1, query.shape[-1])  # (N * q, D)
    return -torch.cdist(flat, prototypes) ** 2


def episode_accuracy(episode: Episode, projection: nn.Module | None = None) -> float:
    n_way, n_query = episode.query.shape[:2]
    target = torch.arange(n_way).repeat_interleave(n_query)
    with torch.no_grad():
        return float((episode_logits(episode, projection).argmax(-1) == target).float().mean())


def evaluate_protonet(embeddings: Mapping[str, np.ndarray], n_way: int, k_shot: int, episodes: int = 500,
                      n_query: int = 5, projection: nn.Module | None = None, seed: int = 0) -> tuple[float, float]:
    """Mean accuracy and its 95% interval half-width over random episodes."""
    rng = random.Random(seed)
    accs = [episode_accuracy(sample_episode(embeddings, n_way, k_shot, n_query, rng), projection)
            for _ in range(episodes)]
    return float(np.mean(accs)), float(1.96 * np.std(accs) / np.sqrt(len(accs)))


def train_projection(embeddings: Mapping[str, np.ndarray], n_way: int = 5, k_shot: int = 5, n_query: int = 5,
                     steps: int = 500, dim: int = 128, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Meta-train a linear projection on episodes from the training personas."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    in_dim = np.asarray(next(iter(embeddings.values()))).shape[-1]
    projection = nn.Linear(in_dim, dim, bias=False)
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr)
    for _ in range(steps):
        episode = sample_episode(embeddings, n_way, k_shot, n_query, rng)
        target = torch.arange(n_way).repeat_interleave(n_query)
        loss = nn.functional.cross_entropy(episode_logits(episode, projection), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return projection.eval()


def group_embeddings(texts: Sequence[str], labels: Sequence[str], encoder=None) -> dict[str, np.ndarray]:
    """{label: (n, D) unit-norm embeddings} for texts grouped by persona/speaker label."""
    from personaweave.data.discovery import embed_units

    vectors = embed_units(list(texts), encoder)
    out: dict[str, list[np.ndarray]] = {}
    for v, label in zip(vectors, labels):
        out.setdefault(label, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}


# --- MAML on the trait head ---------------------------------------------------------------------
#
# Tasks are personas: support = k reply embeddings with the persona's ten traits, query = other
# replies of the same persona. The inner loop adapts the trait head (a linear layer + sigmoid on
# frozen MiniLM embeddings) with plain SGD through `torch.func.functional_call`, so the outer loop
# can differentiate through it (second order) or not (first order).


class TraitHead(nn.Module):
    """Sentence embedding (D) -> ten traits in [0, 1]."""

    def __init__(self, dim: int, num_traits: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_traits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


def inner_adapt(head: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                steps: int, lr: float, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """`steps` SGD steps on the support set; differentiable when `create_graph` (second-order MAML)."""
    from torch.func import functional_call

    if len(x) == 0:
        raise ValueError("Cannot adapt on an empty support set.")
    for _ in range(steps):
        loss = nn.functional.mse_loss(functional_call(head, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    return params


@dataclass
class TraitTask:
    x: torch.Tensor  # (n, D) reply embeddings
    y: torch.Tensor  # (10,) the persona's traits

    def split(self, k: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if k < 1 or k >= len(self.x):
            raise ValueError(f"k={k} support examples needs 1 <= k < {len(self.x)} (the task's examples).")
        idx = list(range(len(self.x)))
        rng.shuffle(idx)
        s, q = idx[:k], idx[k:]
        return self.x[s], self.y.expand(len(s), -1), self.x[q], self.y.expand(len(q), -1)


def blended_task(a: TraitTask, b: TraitTask, weight: float, size: int, rng: random.Random) -> TraitTask:
    """A pseudo-persona between two training personas: its replies drawn from both parents in
    proportion, its traits the weighted mix. Gives MAML a continuum of tasks, not six."""
    n_a = max(1, round(weight * size))
    rows = [a.x[rng.randrange(len(a.x))] for _ in range(n_a)] + [b.x[rng.randrange(len(b.x))] for _ in range(size - n_a)]
    return TraitTask(torch.stack(rows), weight * a.y + (1 - weight) * b.y)


def pretrain_head(tasks: Sequence[TraitTask], steps: int = 300, lr: float = 1e-2, seed: int = 0) -> TraitHead:
    """The shared starting point: a head regressed on every training reply at once."""
    torch.manual_seed(seed)
    x = torch.cat([t.x for t in tasks])
    y = torch.cat([t.y.expand(len(t.x), -1) for t in tasks])
    head = TraitHead(x.shape[1], y.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.mse_loss(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def task_meta_loss(module: nn.Module, split: Sequence[torch.Tensor], inner_steps: int, inner_lr: float,
                   first_order: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One task's MAML objective: the query loss after `inner_steps` SGD steps on the support set.

    Returns (loss, wrt): the meta-gradient is d loss / d wrt. Second order: wrt = the module's
    parameters, differentiated through the inner loop. First order (FOMAML): wrt = the adapted
    parameters as fresh leaves, i.e. the query gradient at the adapted point, to be applied to the
    initial one.
    """
    sx, sy, qx, qy = split
    params = dict(module.named_parameters())
    adapted = inner_adapt(module, params, sx, sy, inner_steps, inner_lr, create_graph=not first_order)
    if first_order:
        adapted = {n: p.detach().requires_grad_(True) for n, p in adapted.items()}
    loss = nn.functional.mse_loss(torch.func.functional_call(module, adapted, (qx,)), qy)
    return loss, list(adapted.values()) if first_order else list(params.values())


def maml_train(head: TraitHead, tasks: Sequence[TraitTask], k: int = 5, inner_steps: int = 5, inner_lr: float = 0.5,
               meta_lr: float = 1e-3, meta_steps: int = 300, tasks_per_step: int = 8, first_order: bool = False,
               gradient_accumulation_steps: int = 1, mixed_precision: str = "no", seed: int = 0) -> TraitHead:
    """Meta-train `head` in a custom Accelerate loop.

    DDP cannot do double backward, so with more than one process the loop runs first-order MAML
    and averages the gradients across processes itself (the inner loop runs on the unwrapped
    module through functional_call, outside DDP's hooks).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision)
    if accelerator.num_processes > 1:
        first_order = True
    rng = random.Random(seed + accelerator.process_index)
    optimizer = torch.optim.Adam(head.parameters(), lr=meta_lr)
    head, optimizer = accelerator.prepare(head, optimizer)
    module = accelerator.unwrap_model(head)
    device = accelerator.device
    for _ in range(meta_steps):
        with accelerator.accumulate(head):
            meta_loss = 0.0
            for _ in range(tasks_per_step):
                a, b = rng.sample(list(tasks), 2)
                task = blended_task(a, b, rng.random(), 4 * k, rng) if rng.random() < 0.5 else a
                split = tuple(t.to(device) for t in task.split(k, rng))
                loss, wrt = task_meta_loss(module, split, inner_steps, inner_lr, first_order)
                loss = loss / tasks_per_step
                if first_order:
                    grads = torch.autograd.grad(loss, wrt)
                    for p, g in zip(module.parameters(), grads):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    accelerator.backward(loss)
                meta_loss += float(loss)
            if accelerator.num_processes > 1:
                for p in module.parameters():
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            optimizer.step()
            optimizer.zero_grad()
    return accelerator.unwrap_model(head)


def adapt(head: TraitHead, support_x: torch.Tensor, support_y: torch.Tensor, steps: int = 5, lr: float = 0.5
          ) -> TraitHead:
    """A copy of `head` adapted to a new user or persona from its support examples."""
    import copy

    if len(support_x) == 0:
        raise ValueError("Cannot adapt on an empty support set.")
    params = inner_adapt(head, dict(head.named_parameters()), support_x, support_y, steps, lr)
    adapted = copy.deepcopy(head)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            p.copy_(params[name])
    return adapted


def few_shot_mse(head: TraitHead, task: TraitTask, k: int, steps: int, lr: float, rng: random.Random) -> float:
    """Query MSE after adapting `head` on k support examples of `task` (steps=0: no adaptation)."""
    sx, sy, qx, qy = task.split(k, rng)
    adapted = adapt(head, sx, sy, steps, lr) if steps else head
    with torch.no_grad():
        return float(nn.functional.mse_loss(adapted(qx), qy))


# --- Few-shot personas: a meta-learned starting vector ------------------------------------------
#
# `add_persona(name, examples=[...])` fits a new persona's vector to its example lines by a few Adam steps
# (`fit_persona_vector`, the model's weights untouched). Where those steps start matters: here the start is
# meta-learned over training personas, each a task whose support set is k of its lines and whose query set
# is other lines of the same persona. First-order MAML applies the query gradient at the adapted vector to
# the start; Reptile moves the start towards the adapted vector. The inner loop is the model's own, so
# what is meta-learned is exactly what `add_persona` runs.
#
# The start is either one vector shared by every new persona, or (`temperature=`) a retrieval start that
# depends on the support lines: the bank's described personas weighted by how close their vectors are to
# the lines' sentence embedding, plus an offset (`PersonaWeaveModel.few_shot_start`). Then the offset and the
# temperature are the meta-parameters, and each task's own persona is left out of the retrieval, as a new
# persona is absent from the bank.


@dataclass
class FewShotStart:
    """What meta-learning returns: `vector` (the start, `config.few_shot_init`; with a temperature the
    offset added to the retrieved start, `config.few_shot_offset`) and `temperature`
    (`config.few_shot_temperature`; None: no retrieval)."""

    vector: torch.Tensor
    temperature: float | None = None

    def apply(self, config) -> None:
        """Make this the model's few-shot start."""
        if self.temperature is None:
            config.few_shot_init, config.few_shot_offset, config.few_shot_temperature = self.vector.tolist(), None, None
        else:
            config.few_shot_offset, config.few_shot_temperature = self.vector.tolist(), self.temperature


class PersonaInit(nn.Module):
    """The meta-parameters: one vector (the start, or the retrieval offset) and, for a retrieval start, the
    log of its temperature."""

    def __init__(self, vector: torch.Tensor, temperature: float | None = None) -> None:
        super().__init__()
        self.vector = nn.Parameter(vector.detach().float().clone())
        self.log_temperature = None if temperature is None else nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, query: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        if self.log_temperature is None or keys is None:
            return self.vector
        from personaweave.models.modeling_personaweave import retrieval_start

        return retrieval_start(query, keys, self.log_temperature, self.vector)


def sample_support_query(lines: Sequence[str], k: int, n_query: int, rng: random.Random) -> tuple[list[str], list[str]]:
    if len(lines) < k + n_query:
        raise ValueError(f"A task needs at least k + n_query = {k + n_query} lines; it has {len(lines)}.")
    picked = rng.sample(list(lines), k + n_query)
    return picked[:k], picked[k:]


def meta_learn_persona_init(model: nn.Module, tokenizer, tasks: Sequence[Sequence[str]] | Mapping[str, Sequence[str]],
                            *, k: int = 5, n_query: int = 5, meta_steps: int = 50, tasks_per_step: int = 2,
                            meta_lr: float = 0.05, inner_steps: int | None = None, inner_lr: float | None = None,
                            method: str = "fomaml", init: torch.Tensor | None = None, temperature: float | None = None,
                            temperature_lr: float = 0.1, encoder=None, seed: int = 0, log=print) -> FewShotStart:
    """A few-shot start meta-learned over `tasks` (each: one persona's lines; a mapping names them by their
    persona in the bank) in a custom Accelerate loop. Returns it; `.apply(model.config)` makes it the default.

    With `temperature` (its starting value), the start is a retrieval start (see `few_shot_start`): the
    offset (from `init`, default zeros; Adam at `meta_lr`) and the log of the temperature (Adam at
    `temperature_lr`) are learned, the support lines are embedded with
    `encoder` (default MiniLM), and a named task's own persona is left out of what is retrieved. Without it,
    one vector is learned, from `init` (default: the model's current plain start).

    The model's weights are not trained (each process holds the same frozen model); with several processes
    the meta-gradient is averaged across them."""
    from accelerate import Accelerator

    from personaweave.models.modeling_personaweave import lines_embedding

    if method not in ("fomaml", "reptile"):
        raise ValueError(f"method must be 'fomaml' or 'reptile', got {method!r}.")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    named = list(tasks.items()) if isinstance(tasks, Mapping) else [(None, t) for t in tasks]
    named = [(name, list(t)) for name, t in named if len(t) >= k + n_query]
    if not named:
        raise ValueError(f"No task has the k + n_query = {k + n_query} lines a meta step needs.")
    accelerator = Accelerator()
    rng = random.Random(seed + accelerator.process_index)
    if init is None:
        init = torch.zeros(model.config.persona_dim) if temperature is not None else model.few_shot_init_vector()
    start = PersonaInit(init, temperature)
    groups = [{"params": [start.vector], "lr": meta_lr}]
    if start.log_temperature is not None:
        groups.append({"params": [start.log_temperature], "lr": temperature_lr})
    optimizer = torch.optim.Adam(groups)
    start, optimizer = accelerator.prepare(start, optimizer)
    module = accelerator.unwrap_model(start)
    scratch = "fewshot-meta-scratch"
    if scratch not in model.config.persona_names:
        model.add_persona(scratch, vector=module.vector.detach().cpu(), tokenizer=tokenizer)
    try:
        for step in range(meta_steps):
            optimizer.zero_grad()
            query_losses = []
            for _ in range(tasks_per_step):
                name, lines = rng.choice(named)
                support, query = sample_support_query(lines, k, n_query, rng)
                if temperature is not None:
                    keys = model.retrieval_keys(exclude=[scratch] + ([name] if name else []))
                    task_start = module(lines_embedding(support, encoder), keys)
                else:
                    task_start = module()
                adapted = model.fit_persona_vector(scratch, support, tokenizer, init=task_start.detach(),
                                                   steps=inner_steps, lr=inner_lr)
                if method == "reptile":
                    grad = task_start.detach() - adapted.to(task_start)
                else:  # first order: the query gradient at the adapted point
                    adapted = adapted.clone().requires_grad_(True)
                    loss = model.persona_loss(scratch, adapted, model.few_shot_batch(scratch, query, tokenizer))
                    (grad,) = torch.autograd.grad(loss, [adapted])
                    query_losses.append(float(loss.detach()))
                task_start.backward(grad.to(task_start) / tasks_per_step)  # through the start's own parameters
            if accelerator.num_processes > 1:
                for p in module.parameters():
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            optimizer.step()
            if query_losses:
                extra = "" if module.log_temperature is None else f", temperature {float(module.log_temperature.detach().exp()):.4f}"
                log(f"meta step {step + 1}/{meta_steps}: query loss after adaptation {np.mean(query_losses):.4f}{extra}")
    finally:
        model.remove_persona(scratch)
    return FewShotStart(module.vector.detach().cpu(),
                        None if module.log_temperature is None else float(module.log_temperature.detach().exp()))


def lines_batch(model: nn.Module, tokenizer, system: str, lines: Sequence[str]) -> dict[str, torch.Tensor]:
    """`lines` as replies after a plain system turn `system` ("" for none), in the layout of `few_shot_batch`
    (system turn, then the line as the reply): the baselines without persona tokens (no persona, few-shot
    prompt)."""
    from personaweave.models.modeling_personaweave import end_of_turn_ids

    text = tokenizer.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    end = end_of_turn_ids(tokenizer)
    rows = [prompt + t + end for t in tokenizer(list(lines), add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(prompt):len(row)] = torch.tensor(row[len(prompt):])
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
