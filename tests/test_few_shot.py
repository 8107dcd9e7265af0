"""Few-shot personas: `add_persona(name, examples=[...])` fits the persona's vector to its lines."""

from __future__ import annotations

import pytest
import torch
from conftest import make_persona_model, make_t5_persona_model

from personaweave.models import PersonaWeaveConfig, PersonaWeaveForCausalLM
from personaweave.models.modeling_personaweave import MIN_FEW_SHOT_EXAMPLES
from personaweave.testing import tiny_llama, tiny_tokenizer

LINES = ["arr ahoy matey , the sea !", "ahoy , the ship , arr !", "arr matey , a ship ahoy .",
         "the sea , the sea , arr !", "ahoy matey ! arr arr .", "a ship ! ahoy , matey ."]


def responsive_persona_model(seed: int = 0):
    """A tiny model whose LM listens to its inputs (wider init than conftest's), with a random non-zero
    persona layer standing in for a trained one: an untrained layer (zero output) gives no gradient."""
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), seed, hidden_size=64, initializer_range=0.2)
    config = PersonaWeaveConfig(text_config=base.config, persona_dim=8, num_persona_tokens=2, persona_hidden_size=16)
    model = PersonaWeaveForCausalLM(config, language_model=base)
    torch.manual_seed(seed + 1)
    for p in model.persona_embedding.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(seed)
    for name in ("robot", "pirate"):
        model.add_persona(name, f"a {name}", vector=torch.randn(8, generator=g), tokenizer=tok)
    return model.eval(), tok


def _logits(model, tok, name):
    ids = tok.apply_chat_template([{"role": "system", "content": "".join(
        f"<|persona:{name}:{i}|>" for i in range(model.config.num_persona_tokens))},
        {"role": "user", "content": "hello what should i read"}], add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fit_lowers_the_loss_of_the_lines_and_touches_nothing_else():
    model, tok = responsive_persona_model()
    before = {n: _logits(model, tok, n) for n in ("robot", "pirate")}
    weights = {k: v.clone() for k, v in model.state_dict().items() if k != "persona_vectors"}
    vectors = model.persona_vectors.clone()
    init = model.few_shot_init_vector()  # the bank's mean vector (no meta-learned init in this config)

    persona = model.add_persona("sailor", examples=LINES, tokenizer=tok)

    assert persona.description == "" and persona.examples == LINES
    batch = model.few_shot_batch("sailor", LINES, tok)
    with torch.no_grad():
        start = model.persona_loss("sailor", init, batch)
        fitted = model.persona_loss("sailor", model.persona_vectors[-1], batch)
    assert float(fitted) < float(start) - 0.05, (float(start), float(fitted))
    # every other persona answers exactly as before (the new persona's reserved tokens are never predicted);
    # no weight moved
    for name, logits in before.items():
        after = _logits(model, tok, name)
        torch.testing.assert_close(after[..., :logits.shape[-1]], logits, rtol=0, atol=0)
        assert (after[..., logits.shape[-1]:] == torch.finfo(after.dtype).min).all()
    torch.testing.assert_close(model.persona_vectors[:-1], vectors, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value[:len(weights[key])], weights[key], rtol=0, atol=0)  # rows added only
    assert all(p.grad is None for p in model.parameters())


def test_fit_starts_from_the_meta_learned_init_when_the_config_has_one():
    model, tok = make_persona_model()
    init = torch.linspace(-1, 1, model.config.persona_dim)
    model.config.few_shot_init = init.tolist()
    torch.testing.assert_close(model.few_shot_init_vector(), init)
    model.config.few_shot_steps = 0  # no steps: the vector is the init itself
    model.add_persona("sailor", examples=LINES, tokenizer=tok)
    torch.testing.assert_close(model.persona_vectors[-1], init)


def test_bad_examples_are_clear_errors_and_leave_the_bank_alone():
    model, tok = make_persona_model()
    names = list(model.config.persona_names)
    with pytest.raises(ValueError, match=f"at least {MIN_FEW_SHOT_EXAMPLES} example lines; got 3"):
        model.add_persona("sailor", examples=LINES[:3], tokenizer=tok)
    with pytest.raises(ValueError, match="non-empty"):
        model.add_persona("sailor", examples=LINES[:4] + ["  "], tokenizer=tok)
    with pytest.raises(ValueError, match="list of lines"):
        model.add_persona("sailor", examples="arr " * 10, tokenizer=tok)
    with pytest.raises(ValueError, match="description must be a non-empty"):
        model.add_persona("sailor", description="   ", tokenizer=tok)  # an empty profile
    with pytest.raises(ValueError, match="description must be a non-empty"):
        model.add_persona("sailor", tokenizer=tok)  # nothing at all
    with pytest.raises(ValueError, match="needs tokenizer="):
        model.add_persona("sailor", examples=LINES)
    assert model.config.persona_names == names and len(model.persona_vectors) == len(names)


def test_description_with_examples_still_means_the_description(hash_encoder):
    model, tok = make_persona_model()
    persona = model.add_persona("sailor", "a sailor", examples=LINES[:2], tokenizer=tok, encoder=hash_encoder)
    torch.testing.assert_close(persona.vector, torch.as_tensor(hash_encoder.encode(["a sailor"])[0]))


def test_seq2seq_fit_and_remote_code_round_trip(tmp_path):
    model, tok = make_t5_persona_model()
    model.add_persona("sailor", examples=LINES, tokenizer=tok)
    batch = model.few_shot_batch("sailor", LINES, tok)
    with torch.no_grad():
        assert float(model.persona_loss("sailor", model.persona_vectors[-1], batch)) < float(
            model.persona_loss("sailor", model.few_shot_init_vector(), batch))

    causal, ctok = make_persona_model()
    causal.config.few_shot_init = [0.5] * causal.config.persona_dim
    causal.add_persona("sailor", examples=LINES, tokenizer=ctok)
    causal.save_pretrained(tmp_path / "m")
    from personaweave import PersonaWeaveForCausalLM

    loaded = PersonaWeaveForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.few_shot_init == [0.5] * causal.config.persona_dim
    assert loaded.config.persona_names[-1] == "sailor"
    torch.testing.assert_close(loaded.persona_vectors, causal.persona_vectors)


TASKS = [["arr matey , the sea !", "ahoy , the ship !", "arr , a ship , matey .", "the sea ! arr .", "ahoy ahoy , arr .",
          "matey , the ship , arr !", "arr arr , the sea .", "ahoy , matey !"],
         ["arr , the sea is good .", "ahoy matey , a ship .", "the ship , arr , the sea .", "matey ! ahoy !",
          "arr , ahoy , the ship .", "a sea , a ship , arr .", "ahoy , the sea , matey .", "arr matey !"]]
HELD_OUT = ["ahoy , the sea , arr !", "matey , a ship !", "arr , the ship , ahoy .", "the sea , matey , arr .",
            "ahoy arr , a ship .", "arr ! the sea !", "matey ahoy , the ship .", "a ship , arr , matey ."]


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_meta_learned_init_adapts_better_than_the_plain_one(method):
    """First-order MAML (the default) must beat the plain start on a held-out task; Reptile is only checked
    for its mechanics here (with Adam steps in the inner loop it overshoots on this toy, see the report)."""
    from personaweave.training.meta_learning import meta_learn_persona_init

    model, tok = responsive_persona_model()
    names = list(model.config.persona_names)
    model.config.few_shot_steps, model.config.few_shot_lr = 3, 0.05
    plain = model.few_shot_init_vector()
    meta = meta_learn_persona_init(model, tok, TASKS, k=5, n_query=3, meta_steps=25, tasks_per_step=2, meta_lr=0.1,
                                   method=method, log=lambda m: None).vector
    assert model.config.persona_names == names  # the scratch persona is gone again
    assert not torch.equal(meta, plain)

    def held_out_loss(init):
        model.add_persona("probe", vector=init, tokenizer=tok)
        adapted = model.fit_persona_vector("probe", HELD_OUT[:5], tok, init=init)
        with torch.no_grad():
            loss = float(model.persona_loss("probe", adapted, model.few_shot_batch("probe", HELD_OUT[5:], tok)))
        model.remove_persona("probe")
        return loss

    if method == "fomaml":
        assert held_out_loss(meta) < held_out_loss(plain) - 0.05


def test_meta_learning_needs_tasks_with_enough_lines():
    from personaweave.training.meta_learning import meta_learn_persona_init

    model, tok = responsive_persona_model()
    with pytest.raises(ValueError, match="k \\+ n_query = 10"):
        meta_learn_persona_init(model, tok, [LINES], k=5, n_query=5, meta_steps=1)
    with pytest.raises(ValueError, match="fomaml"):
        meta_learn_persona_init(model, tok, TASKS, k=5, n_query=3, method="maml2")


class FixedEncoder:
    """Embeds every text as the same vector: the lines 'sound like' whatever persona that vector is near."""

    def __init__(self, vector):
        self.vector = torch.as_tensor(vector).float()

    def encode(self, texts):
        return [self.vector.numpy() for _ in texts]


def test_retrieval_start_weighs_described_personas_by_similarity_to_the_lines(tmp_path):
    model, tok = make_persona_model(names=("robot", "pirate", "butler"))
    pirate = model.personas["pirate"].vector
    encoder = FixedEncoder(pirate + 0.01)
    assert torch.equal(model.few_shot_start(LINES, encoder), model.few_shot_init_vector())  # no temperature: plain
    model.config.few_shot_temperature = 0.01
    torch.testing.assert_close(model.few_shot_start(LINES, encoder), pirate, atol=1e-3, rtol=0)
    # the persona itself left out (as in meta-learning): no longer the pirate
    assert not torch.allclose(model.few_shot_start(LINES, encoder, exclude=["pirate"]), pirate, atol=0.1)
    # a very high temperature weighs every described persona alike; the offset is added
    model.config.few_shot_temperature = 1e6
    model.config.few_shot_offset = [1.0] * model.config.persona_dim
    torch.testing.assert_close(model.few_shot_start(LINES, encoder), model.persona_vectors.mean(0) + 1, atol=1e-4, rtol=0)
    # a persona without a description (e.g. an earlier few-shot one) is never retrieved, and with steps=0 the
    # new persona's vector is the start itself
    model.config.few_shot_offset, model.config.few_shot_temperature, model.config.few_shot_steps = None, 0.01, 0
    model.add_persona("decoy", vector=pirate + 0.01, tokenizer=tok)
    persona = model.add_persona("sailor", examples=LINES, tokenizer=tok, encoder=encoder)
    torch.testing.assert_close(persona.vector, pirate, atol=1e-3, rtol=0)
    model.save_pretrained(tmp_path / "m")
    assert PersonaWeaveForCausalLM.from_pretrained(tmp_path / "m").config.few_shot_temperature == 0.01
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="few_shot_temperature must be a finite number > 0"):
            PersonaWeaveConfig(few_shot_temperature=bad)


def test_meta_learned_retrieval_start_leaves_each_task_persona_out(hash_encoder, monkeypatch):
    from personaweave.training.meta_learning import meta_learn_persona_init

    model, tok = responsive_persona_model()
    model.add_persona("butler", "a butler", vector=torch.randn(8, generator=torch.Generator().manual_seed(5)),
                      tokenizer=tok)  # two keys left when a task's own persona is out: the temperature matters
    model.config.few_shot_steps, model.config.few_shot_lr = 2, 0.05
    excluded = []
    keys = model.retrieval_keys
    monkeypatch.setattr(model, "retrieval_keys", lambda exclude=(): excluded.append(set(exclude)) or keys(exclude))
    learned = meta_learn_persona_init(model, tok, {"pirate": TASKS[0], "robot": TASKS[1]}, k=5, n_query=3,
                                      meta_steps=4, tasks_per_step=2, meta_lr=0.1, temperature=0.5,
                                      encoder=hash_encoder, log=lambda m: None)
    assert len(excluded) == 8 and all(len(e & {"pirate", "robot"}) == 1 for e in excluded)
    assert learned.temperature != 0.5 and learned.temperature > 0 and learned.vector.norm() > 0
    assert model.config.persona_names == ["robot", "pirate", "butler"]
    learned.apply(model.config)
    model.config.few_shot_steps = 0
    persona = model.add_persona("probe", examples=HELD_OUT[:5], tokenizer=tok, encoder=hash_encoder)
    monkeypatch.undo()
    torch.testing.assert_close(persona.vector, model.few_shot_start(HELD_OUT[:5], hash_encoder, exclude=["probe"]))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        meta_learn_persona_init(model, tok, TASKS, k=5, n_query=3, temperature=float("nan"))
