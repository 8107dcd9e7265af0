"""PersonaWeave models: a language model conditioned on personas through reserved tokens.

Each persona in the bank owns `num_persona_tokens` reserved tokens (`<|persona:NAME:i|>`).
At the embedding step those tokens are replaced by the persona's soft vectors, produced by
`PersonaEmbedding` from the persona vector. Everything else is the wrapped language model, so
`generate()`, the KV cache, TRL and ONNX export see an ordinary LM that takes `input_ids`.

For encoder-decoder bases the soft vectors are, in addition, concatenated with the encoder
output before the decoder's cross-attention (with the attention mask extended to match).

This file imports only torch, transformers and files of its own folder, so a saved model
folder loads with `trust_remote_code=True` where personaweave is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_personaweave import PersonaWeaveConfig
from .personas import (
    Persona,
    PersonaBank,
    check_description,
    check_name,
    check_vector,
    normalise_blend,
    persona_token,
)


class PersonaEmbedding(nn.Module):
    """Persona vectors (P, persona_dim) -> soft vectors (P, num_tokens, hidden_size).

    An MLP whose last layer starts at zero, plus a learned per-slot bias that starts at the
    mean token embedding: an untrained layer maps every persona to the same in-distribution
    vectors, so it neither wrecks the base model nor pretends to carry a persona.
    """

    def __init__(self, persona_dim: int, hidden_size: int, num_tokens: int, inner_size: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.hidden_size = hidden_size
        self.net = nn.Sequential(
            nn.Linear(persona_dim, inner_size),
            nn.GELU(),
            nn.Linear(inner_size, num_tokens * hidden_size),
        )
        self.slot_bias = nn.Parameter(torch.zeros(num_tokens, hidden_size))

    def reset_parameters(self, anchor: Optional[torch.Tensor] = None) -> None:
        nn.init.kaiming_uniform_(self.net[0].weight, a=5**0.5)
        nn.init.zeros_(self.net[0].bias)
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        with torch.no_grad():
            self.slot_bias.zero_()
            if anchor is not None:
                self.slot_bias.copy_(anchor.to(self.slot_bias).expand_as(self.slot_bias))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        out = self.net(vectors)  # (P, k * H)
        return out.view(-1, self.num_tokens, self.hidden_size) + self.slot_bias


class PersonaTokenEmbedding(nn.Embedding):
    """The wrapped model's token embedding (the same weight) that looks up each reserved persona token as its
    persona's soft vector, so `inputs_embeds=model.get_input_embeddings()(input_ids)` means what `input_ids`
    means (generate, PEFT/TRL embedding hooks). Plain `nn.Embedding` only: subclasses keep their own forward."""

    @classmethod
    def wrap(cls, embedding: nn.Module, owner: PersonaWeavePreTrainedModel) -> nn.Module:
        if type(embedding) is not nn.Embedding:
            return embedding
        new = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                  max_norm=embedding.max_norm, norm_type=embedding.norm_type,
                  scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse, device="meta")
        new.weight = embedding.weight
        object.__setattr__(new, "_persona_owner", owner)  # a plain reference, not a submodule
        return new

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._persona_owner._substitute_personas(input_ids, super().forward(input_ids))


class PersonaWeavePreTrainedModel(PreTrainedModel):
    """Shared persona-bank logic of the causal and the encoder-decoder models."""

    config_class = PersonaWeaveConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    # Empty here; device_map="auto" collects the wrapped model's own (e.g. LlamaDecoderLayer).
    _no_split_modules: list[str] = []
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _auto_class_for_base: Any = None

    def __init__(self, config: PersonaWeaveConfig, language_model: Optional[PreTrainedModel] = None) -> None:
        super().__init__(config)
        if language_model is None:
            language_model = self._auto_class_for_base.from_config(config.text_config)
        self.language_model = language_model
        # One config object for wrapper and wrapped model, so resizing etc. stays in step.
        self.config.text_config = language_model.config
        k = config.num_persona_tokens
        self.persona_embedding = PersonaEmbedding(
            config.persona_dim, language_model.config.hidden_size if hasattr(language_model.config, "hidden_size")
            else language_model.config.d_model, k, config.persona_hidden_size,
        )
        num = len(config.personas)
        self.register_buffer("persona_vectors", torch.zeros(num, config.persona_dim))
        table = torch.tensor(config.persona_token_ids, dtype=torch.long).view(num, k)
        self.register_buffer("persona_token_table", table, persistent=False)
        self.post_init()

    # -- HF plumbing: delegate to the wrapped model -----------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PersonaEmbedding):
            module.reset_parameters()
        elif module is not self:
            self.language_model._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # -- the persona bank -------------------------------------------------------------------
    @property
    def personas(self) -> PersonaBank:
        """A snapshot of the bank: metadata from the config, vectors from the weights."""
        bank = PersonaBank(dim=self.config.persona_dim)
        for entry, vector in zip(self.config.personas, self.persona_vectors.detach().float().cpu()):
            bank.add(Persona.from_dict(entry, vector))
        return bank

    def add_persona(
        self,
        name: str,
        description: Optional[str] = None,
        *,
        blend: Optional[Mapping[str, float]] = None,
        vector: Optional[Any] = None,
        traits: Optional[Mapping[str, float]] = None,
        examples: Sequence[str] = (),
        tokenizer: Any = None,
        encoder: Any = None,
    ) -> Persona:
        """Add a persona to the bank and its reserved tokens to `tokenizer`.

        Exactly one source of the vector: `blend` (weights over existing personas, normalised
        to sum to 1), `vector`, `description` (encoded with `encoder`, by default the
        shipped MiniLM), or, with none of those, `examples`: at least `MIN_FEW_SHOT_EXAMPLES`
        lines in the persona's voice, from which the vector is fitted by a few gradient steps
        (`fit_persona_vector`). The embeddings are resized when the tokenizer grows.
        """
        check_name(name)
        if name in self.config.persona_names:
            raise ValueError(f"Persona {name!r} already exists; remove_persona({name!r}) first.")
        if sum(x is not None for x in (blend, vector)) > 1:
            raise ValueError("Give at most one of blend= and vector=.")
        if blend is None and vector is None and description is None and examples:
            return self._add_few_shot_persona(name, examples, traits, tokenizer, encoder)
        bank = self.personas
        if blend is not None:
            weights = normalise_blend(blend, bank.names)
            persona = bank.blend(name, weights, description=description)
        else:
            if vector is None:
                description = check_description(description)
                vector = _encode([description], encoder)[0]
            elif description is not None:
                description = check_description(description)
            persona = Persona(name, description or "", dict(traits) if traits else None, list(examples))
            persona.vector = check_vector(vector, self.config.persona_dim, name)
        if traits is not None and blend is not None:
            persona.traits = Persona(name, traits=dict(traits)).traits
        token_ids = self._reserve_tokens(name, tokenizer)
        self._append_persona(persona, token_ids)
        return persona

    def add_personas(self, personas: Sequence[Persona], tokenizer: Any = None, encoder: Any = None) -> None:
        """Add many personas, encoding the descriptions of those without a vector in one batch."""
        missing = [p for p in personas if p.vector is None]
        if missing:
            vectors = _encode([check_description(p.description) for p in missing], encoder)
            for persona, vec in zip(missing, vectors):
                persona.vector = vec
        for p in personas:
            self.add_persona(
                p.name, p.description or None, vector=p.vector, traits=p.traits,
                examples=p.examples, tokenizer=tokenizer,
            )

    # -- few-shot personas: a vector fitted to example lines ------------------------------------
    def _add_few_shot_persona(self, name: str, examples: Sequence[str], traits: Optional[Mapping[str, float]],
                              tokenizer: Any, encoder: Any = None) -> Persona:
        lines = check_examples(examples)
        persona = Persona(name, "", dict(traits) if traits else None, lines)
        persona.vector = self.few_shot_start(lines, encoder)
        self._append_persona(persona, self._reserve_tokens(name, tokenizer))
        try:
            fitted = self.fit_persona_vector(name, lines, tokenizer)
        except BaseException:
            self.remove_persona(name)
            raise
        with torch.no_grad():
            self.persona_vectors[-1] = fitted.to(self.persona_vectors)
        return self.personas[name]

    def few_shot_init_vector(self) -> torch.Tensor:
        """Where a few-shot fit starts without retrieval: `config.few_shot_init` (meta-learned) or the bank's
        mean vector."""
        if self.config.few_shot_init is not None:
            return check_vector(self.config.few_shot_init, self.config.persona_dim, "few_shot_init")
        if len(self.persona_vectors):
            return self.persona_vectors.detach().float().mean(0).cpu()
        return torch.zeros(self.config.persona_dim)

    def few_shot_start(self, lines: Sequence[str], encoder: Any = None, exclude: Sequence[str] = ()) -> torch.Tensor:
        """Where a fit to `lines` starts. Without `config.few_shot_temperature`: `few_shot_init_vector()`.
        With it: the described personas' vectors (those of `exclude` left out) weighted by their cosine
        similarity to the lines' mean sentence embedding (`encoder`, default MiniLM), softmax at that
        temperature, plus `config.few_shot_offset` when set."""
        if self.config.few_shot_temperature is None:
            return self.few_shot_init_vector()
        keys = self.retrieval_keys(exclude)
        if keys is None:  # nothing to retrieve from
            return self.few_shot_init_vector()
        offset = (torch.zeros(self.config.persona_dim) if self.config.few_shot_offset is None
                  else check_vector(self.config.few_shot_offset, self.config.persona_dim, "few_shot_offset"))
        query = lines_embedding(lines, encoder)
        check_vector(query, self.config.persona_dim, "the lines' embedding")
        with torch.no_grad():
            start = retrieval_start(query, keys, torch.tensor(math.log(self.config.few_shot_temperature)), offset)
        return start

    def retrieval_keys(self, exclude: Sequence[str] = ()) -> Optional[torch.Tensor]:
        """(N, persona_dim) vectors of the bank's described personas (a non-empty description) outside
        `exclude`: what a retrieval start weighs; None when there are none."""
        rows = [i for i, p in enumerate(self.config.personas) if p.get("description") and p["name"] not in set(exclude)]
        if not rows:
            return None
        return self.persona_vectors.detach().float().cpu()[rows]

    def few_shot_batch(self, name: str, lines: Sequence[str], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Padded model inputs whose labels are `lines`, each said by persona `name` (whose reserved
        tokens open the prompt): the chat template's system turn, then the line as the reply."""
        tokens = "".join(persona_token(name, i) for i in range(self.config.num_persona_tokens))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if self.config.is_encoder_decoder:
            prompt = tokenizer([tokens] * len(lines))["input_ids"]
            targets = tokenizer(list(lines))["input_ids"]
            rows = [(p, [], t) for p, t in zip(prompt, targets)]  # encoder input, no masked prefix, labels
        else:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "system", "content": tokens}], add_generation_prompt=True,
                                                     tokenize=False)
            else:
                text = tokens
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            end = end_of_turn_ids(tokenizer)
            rows = [(prompt + t + end, [-100] * len(prompt), t + end)
                    for t in tokenizer(list(lines), add_special_tokens=False)["input_ids"]]
        width = max(len(r[0]) for r in rows)
        label_width = max(len(r[1]) + len(r[2]) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), label_width), -100, dtype=torch.long)
        for i, (ids, masked, target) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
            labels[i, len(masked):len(masked) + len(target)] = torch.tensor(target)
        device = self.persona_vectors.device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def persona_loss(self, name: str, vector: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's loss on `batch` with persona `name`'s vector replaced by `vector` (differentiable in
        `vector`); the bank is left as it was."""
        names = self.config.persona_names
        if name not in names:
            raise KeyError(f"Unknown persona {name!r}; known personas: {names}.")
        i = names.index(name)
        saved = self.persona_vectors
        self.persona_vectors = torch.cat([saved[:i], vector.to(saved)[None], saved[i + 1:]])
        try:
            return self(**batch).loss
        finally:
            self.persona_vectors = saved

    def fit_persona_vector(self, name: str, lines: Sequence[str], tokenizer: Any, *, init: Optional[torch.Tensor] = None,
                           steps: Optional[int] = None, lr: Optional[float] = None) -> torch.Tensor:
        """Persona `name`'s vector fitted to `lines` (Adam on the vector alone, model weights untouched):
        `steps` steps from `init` (default: its current vector). Returns the vector; the bank is unchanged."""
        steps = self.config.few_shot_steps if steps is None else steps
        lr = self.config.few_shot_lr if lr is None else lr
        batch = self.few_shot_batch(name, lines, tokenizer)
        if init is None:
            init = self.persona_vectors[self.config.persona_names.index(name)]
        vector = init.detach().float().clone().to(self.persona_vectors.device).requires_grad_(True)
        optimizer = torch.optim.Adam([vector], lr=lr)
        was_training = self.training
        self.eval()
        try:
            for _ in range(steps):
                loss = self.persona_loss(name, vector, batch)
                (grad,) = torch.autograd.grad(loss, [vector])  # the vector only: no weight gradients
                vector.grad = grad
                optimizer.step()
        finally:
            self.train(was_training)
        return vector.detach()

    def remove_persona(self, name: str) -> Persona:
        """Remove a persona. Its tokens stay in the tokenizer but no longer select anything."""
        names = self.config.persona_names
        if name not in names:
            raise KeyError(f"Unknown persona {name!r}; known personas: {names}.")
        removed = self.personas[name]
        keep = [i for i, n in enumerate(names) if n != name]
        self.config.personas = [self.config.personas[i] for i in keep]
        self.persona_vectors = self.persona_vectors[keep].clone()
        self.persona_token_table = self.persona_token_table[keep].clone()
        return removed

    def persona_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the positions that hold a reserved persona token."""
        return torch.isin(input_ids, self.persona_token_table.view(-1))

    def embed_with_personas(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every reserved persona token replaced by its soft vector."""
        embedding = self.get_input_embeddings()
        embeds = embedding(input_ids)
        if isinstance(embedding, PersonaTokenEmbedding):
            return embeds
        return self._substitute_personas(input_ids, embeds)

    def _substitute_personas(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        table = self.persona_token_table.view(-1)  # (P * k,)
        if table.numel() == 0:
            return embeds
        match = input_ids.unsqueeze(-1) == table  # (B, T, P * k)
        soft = self.persona_soft_vectors().reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        chosen = soft[match.int().argmax(-1)]  # (B, T, H)
        return torch.where(match.any(-1, keepdim=True), chosen, embeds)

    def persona_soft_vectors(self) -> torch.Tensor:
        """(P, k, H) soft vectors of every persona in the bank."""
        weight = self.persona_embedding.net[0].weight
        return self.persona_embedding(self.persona_vectors.to(weight.dtype))

    def soft_vector_fingerprint(self) -> dict[str, list[float]]:
        """{persona: [norm of each soft vector, then the sum of each]}: a small summary written beside
        exported graphs, so a graph exported from other persona weights is told apart from the served
        model even when names and token ids agree."""
        with torch.no_grad():
            soft = self.persona_soft_vectors().float()
        return {name: [round(float(v), 5) for v in (*vecs.norm(dim=-1), *vecs.sum(dim=-1))]
                for name, vecs in zip(self.config.persona_names, soft)}

    def mask_persona_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Reserved tokens are inputs only: never predict them."""
        ids = self.persona_token_table.view(-1)
        if ids.numel() == 0:
            return logits
        # Static shapes only (no boolean indexing), so torch.compile(fullgraph=True) and ONNX export trace it:
        # ids past the vocabulary land in an extra slot that is then dropped.
        vocab = logits.shape[-1]
        blocked = torch.zeros(vocab + 1, device=logits.device).index_fill(0, ids.clamp(max=vocab), 1.0)[:vocab]
        return logits.masked_fill(blocked.bool(), torch.finfo(logits.dtype).min)

    def _reserve_tokens(self, name: str, tokenizer: Any) -> list[int]:
        if tokenizer is None:
            raise ValueError(
                f"add_persona({name!r}) needs tokenizer= so that the persona's reserved tokens "
                "are added to it and the model and tokenizer stay in step."
            )
        tokens = [persona_token(name, i) for i in range(self.config.num_persona_tokens)]
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        needed = max(len(tokenizer), max(ids) + 1)
        if needed > self.get_input_embeddings().weight.shape[0]:
            self.language_model.resize_token_embeddings(needed, mean_resizing=False)
        return ids

    def _append_persona(self, persona: Persona, token_ids: list[int]) -> None:
        entry = persona.to_dict()
        entry["token_ids"] = list(token_ids)
        self.config.personas = self.config.personas + [entry]
        vec = persona.vector.to(self.persona_vectors)[None]
        self.persona_vectors = torch.cat([self.persona_vectors, vec])
        row = torch.tensor([token_ids], dtype=torch.long, device=self.persona_token_table.device)
        self.persona_token_table = torch.cat([self.persona_token_table, row])


class PersonaWeaveForCausalLM(PersonaWeavePreTrainedModel, GenerationMixin):
    """Any causal LM, conditioned on personas selected by reserved tokens in `input_ids`."""

    _auto_class_for_base = AutoModelForCausalLM
    # Static cache / torch.compile(fullgraph=True): true of the wrapped LMs this targets (Llama-style decoders).
    _can_compile_fullgraph = True

    def __init__(self, config: PersonaWeaveConfig, language_model: Optional[PreTrainedModel] = None) -> None:
        super().__init__(config, language_model)
        self.language_model.set_input_embeddings(
            PersonaTokenEmbedding.wrap(self.language_model.get_input_embeddings(), self))

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Any] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_personas(input_ids)
            if labels is not None:
                # Persona positions are conditioning, not text to predict.
                labels = labels.masked_fill(self.persona_token_mask(input_ids), -100)
        _pass_if_set(kwargs, output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            cache_position=cache_position,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        logits = self.mask_persona_logits(outputs.logits)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@dataclass
class PersonaEncoderOutput(BaseModelOutput):
    """Encoder output with the persona soft vectors prepended, and the mask that covers them.

    Keeping the mask inside the encoder output lets `generate()` (which runs the encoder once
    and expands its outputs for beam search) hand the decoder the right mask at every step.
    """

    attention_mask: Optional[torch.Tensor] = None


class _EncoderWithPersonas:
    """What `get_encoder()` returns: the base encoder, then the soft vectors concatenated."""

    main_input_name = "input_ids"

    def __init__(self, model: PersonaWeaveForConditionalGeneration) -> None:
        self.model = model

    def __call__(self, **kwargs: Any) -> PersonaEncoderOutput:
        return self.forward(**kwargs)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        **kwargs: Any,
    ) -> PersonaEncoderOutput:
        model = self.model
        if input_ids is None:
            raise ValueError("PersonaWeaveForConditionalGeneration selects personas from input_ids.")
        kwargs.pop("return_dict", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder = model.language_model.get_encoder()
        out = encoder(inputs_embeds=model.embed_with_personas(input_ids), attention_mask=attention_mask,
                      return_dict=True, **kwargs)
        prefix, prefix_mask = model.persona_prefix(input_ids, out.last_hidden_state.dtype)
        return PersonaEncoderOutput(
            last_hidden_state=torch.cat([prefix, out.last_hidden_state], dim=1),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            attention_mask=torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1),
        )


class PersonaWeaveForConditionalGeneration(PersonaWeavePreTrainedModel, GenerationMixin):
    """An encoder-decoder LM (T5, BART) whose decoder also attends to the persona soft vectors."""

    _auto_class_for_base = AutoModelForSeq2SeqLM

    def get_encoder(self) -> _EncoderWithPersonas:
        return _EncoderWithPersonas(self)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def persona_prefix(self, input_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k, H) soft vectors of each row's persona (its first persona token) and a (B, k) mask.

        Rows without a persona token get zeros, masked out, so they decode as the base would.
        """
        k = self.config.num_persona_tokens
        batch = input_ids.shape[0]
        hidden = self.persona_embedding.hidden_size
        if self.persona_token_table.numel() == 0:
            zeros = torch.zeros(batch, k, hidden, dtype=dtype, device=input_ids.device)
            return zeros, torch.zeros(batch, k, dtype=torch.long, device=input_ids.device)
        match = input_ids.unsqueeze(-1) == self.persona_token_table.view(-1)  # (B, T, P * k)
        per_persona = match.any(1).view(batch, -1, k).any(-1)  # (B, P)
        has_persona = per_persona.any(-1)  # (B,)
        soft = self.persona_soft_vectors().to(dtype)[per_persona.int().argmax(-1)]  # (B, k, H)
        soft = soft * has_persona[:, None, None].to(dtype)
        mask = has_persona[:, None].long().expand(batch, k)
        return soft, mask

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.LongTensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_outputs: Optional[Any] = None,
        past_key_values: Optional[Any] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        _pass_if_set(kwargs, output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if encoder_outputs is None:
            flags = {k: v for k, v in kwargs.items() if k in ("output_attentions", "output_hidden_states")}
            encoder_outputs = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, **flags)
        if not isinstance(encoder_outputs, PersonaEncoderOutput):
            raise ValueError("encoder_outputs must come from this model's get_encoder().")
        outputs = self.language_model(
            encoder_outputs=(encoder_outputs.last_hidden_state,),
            attention_mask=encoder_outputs.attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            cache_position=cache_position,
            return_dict=True,
            **kwargs,
        )
        return Seq2SeqLMOutput(
            loss=outputs.loss,
            logits=self.mask_persona_logits(outputs.logits),
            past_key_values=outputs.past_key_values,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


def _pass_if_set(kwargs: dict[str, Any], **flags: Optional[bool]) -> None:
    """Forward output_* flags only when given, so the wrapped model's config defaults still apply."""
    kwargs.update({k: v for k, v in flags.items() if v is not None})


MIN_FEW_SHOT_EXAMPLES = 5


def check_examples(examples: Sequence[str]) -> list[str]:
    """Example lines for a few-shot persona: at least MIN_FEW_SHOT_EXAMPLES non-empty strings."""
    if isinstance(examples, str):
        raise ValueError("examples= takes a list of lines, not one string.")
    lines = [str(e).strip() for e in examples]
    if any(not line for line in lines):
        raise ValueError("Every example line must be a non-empty string.")
    if len(lines) < MIN_FEW_SHOT_EXAMPLES:
        raise ValueError(f"A persona fitted from examples needs at least {MIN_FEW_SHOT_EXAMPLES} example lines; "
                         f"got {len(lines)}. Give more lines, or a description= instead.")
    return lines


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token the chat template puts right after a reply (e.g. `<|im_end|>`): a reply's last target.
    Falls back to EOS without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        sentinel = "XQZSENTINEL"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
        ids = tokenizer(text.split(sentinel, 1)[1], add_special_tokens=False)["input_ids"]
        if ids:
            return ids[:1]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def lines_embedding(lines: Sequence[str], encoder: Any = None) -> torch.Tensor:
    """The unit-length mean of the lines' sentence embeddings (`encoder`, default MiniLM): what a retrieval
    start compares with the bank's vectors."""
    vectors = torch.stack(_encode(list(lines), encoder)).float()
    return nn.functional.normalize(vectors.mean(0), dim=-1)


def retrieval_start(query: torch.Tensor, keys: torch.Tensor, log_temperature: torch.Tensor,
                    offset: torch.Tensor) -> torch.Tensor:
    """softmax(cosine(query, keys) / exp(log_temperature)) @ keys + offset; differentiable in the temperature
    and the offset (what meta-learning trains)."""
    similarity = nn.functional.normalize(keys, dim=-1) @ nn.functional.normalize(query, dim=-1)
    weights = torch.softmax(similarity / log_temperature.exp(), dim=0)
    return weights @ keys + offset


# Set by `personaweave.encoders` (imported by the package's loaders) to the shipped MiniLM; None where these
# files run as remote code without the package: encoding a description then needs `encoder=`.
DEFAULT_ENCODER_FACTORY: Optional[Any] = None


def _encode(texts: list[str], encoder: Any) -> list[torch.Tensor]:
    """Encode descriptions with `encoder` (anything with `.encode(list[str])`), default MiniLM."""
    if encoder is None:
        if DEFAULT_ENCODER_FACTORY is None:
            raise ValueError("Encoding a description needs a sentence encoder: pass encoder= (anything with "
                             ".encode(list[str]), e.g. personaweave.default_encoder()) or vector=.")
        encoder = DEFAULT_ENCODER_FACTORY()
    vectors = encoder.encode(texts)
    return [torch.as_tensor(v, dtype=torch.float32) for v in vectors]


__all__ = [
    "PersonaEmbedding",
    "PersonaWeavePreTrainedModel",
    "PersonaWeaveForCausalLM",
    "PersonaWeaveForConditionalGeneration",
]
