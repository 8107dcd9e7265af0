"""PersonaWeave model classes on tiny random configs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import PERSONA_DIM, make_persona_model, make_tokenizer, random_vector, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import personaweave
from personaweave import PersonaWeaveConfig, PersonaWeaveForCausalLM, chat, persona_prompt


def encode(tok, persona, text="hello what should i read ?", model=None):
    msgs = chat(persona, text, model=model, num_persona_tokens=2)  # the tiny test models use 2 tokens
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")


def test_prompt_without_persona_tokens_matches_base_model():
    tok = make_tokenizer()
    base = tiny_llama(len(tok))
    reference = copy.deepcopy(base)
    config = PersonaWeaveConfig(text_config=base.config, persona_dim=PERSONA_DIM, num_persona_tokens=2)
    model = PersonaWeaveForCausalLM(config, language_model=base).eval()
    for p in model.persona_embedding.parameters():
        torch.nn.init.normal_(p)
    model.add_persona("robot", "a robot", vector=random_vector(0), tokenizer=tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > reference.config.vocab_size
    ids = tok("hello what should i read ?", return_tensors="pt")["input_ids"]
    ours = model(ids).logits
    theirs = reference(ids).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, rtol=0, atol=1e-6)


def test_personas_change_the_output_and_reserved_tokens_are_never_predicted(persona_model):
    model, tok = persona_model
    robot = model(encode(tok, "robot", model=model)).logits
    pirate = model(encode(tok, "pirate", model=model)).logits
    assert (robot[0, -1] - pirate[0, -1]).abs().max() > 1e-3
    reserved = torch.tensor(model.config.persona_token_ids).view(-1)
    assert (robot[..., reserved] == torch.finfo(robot.dtype).min).all()


def test_untrained_persona_layer_maps_every_persona_alike():
    tok = make_tokenizer()
    base = tiny_llama(len(tok))
    config = PersonaWeaveConfig(text_config=base.config, persona_dim=PERSONA_DIM, num_persona_tokens=2)
    model = PersonaWeaveForCausalLM(config, language_model=base).eval()
    model.persona_embedding.reset_parameters(model.get_input_embeddings().weight.mean(0))
    model.add_persona("robot", vector=random_vector(0), tokenizer=tok)
    model.add_persona("pirate", vector=random_vector(1), tokenizer=tok)
    torch.testing.assert_close(model(encode(tok, "robot")).logits, model(encode(tok, "pirate")).logits)


def test_loss_ignores_persona_positions(persona_model):
    model, tok = persona_model
    ids = encode(tok, "robot", model=model)
    loss = model(ids, labels=ids).loss
    labels = ids.masked_fill(model.persona_token_mask(ids), -100)
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert model.persona_token_mask(ids).sum() == model.config.num_persona_tokens


def test_save_and_load_round_trip(tmp_path, persona_model):
    model, tok = persona_model
    model.add_persona("mix", blend={"robot": 3, "pirate": 1}, tokenizer=tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is PersonaWeaveForCausalLM
    assert loaded.config.persona_names == ["robot", "pirate", "mix"]
    assert loaded.personas["mix"].blend == {"robot": 0.75, "pirate": 0.25}
    ids = encode(loaded_tok, "mix", model=loaded)
    torch.testing.assert_close(ids, encode(tok, "mix", model=model))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("PersonaWeaveForCausalLM")


def test_generate_with_cache_matches_generate_without_cache(persona_model):
    model, tok = persona_model
    batch = tok.apply_chat_template(
        [chat("robot", "hello what", model=model), chat("pirate", "why is the sea good ?", model=model)],
        add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True,
    )
    cached = model.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    beams = model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape[0] == 2
    torch.manual_seed(0)
    sample_a = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=5)
    torch.manual_seed(0)
    sample_b = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=5)
    assert torch.equal(sample_a, sample_b)
    reserved = set(torch.tensor(model.config.persona_token_ids).view(-1).tolist())
    new = cached[:, batch["input_ids"].shape[1]:]
    assert not reserved & set(new.reshape(-1).tolist())



def _persona_batch(model, tok):
    return tok.apply_chat_template(
        [chat("robot", "hello what", model=model), chat("pirate", "why is the sea good ?", model=model)],
        add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True,
    )


def test_generate_from_inputs_embeds_keeps_the_persona(tmp_path, persona_model):
    model, tok = persona_model
    model.add_persona("mix", blend={"robot": 1, "pirate": 1}, tokenizer=tok)  # grows the embeddings
    batch = _persona_batch(model, tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    greedy = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True)
    from_ids = model.generate(**batch, **greedy)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **greedy)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(from_embeds.scores, from_ids.scores)
    # The plain token table at persona positions is another prompt (the tiny model's greedy tokens may
    # coincide, its scores do not).
    plain = torch.nn.functional.embedding(ids, model.get_input_embeddings().weight)
    from_plain = model.generate(inputs_embeds=plain, attention_mask=mask, **greedy)
    assert (from_plain.scores[0] - from_ids.scores[0]).abs().max() > 1e-3
    # The same after a save/load round trip (the persona-aware embedding is rebuilt, weights unchanged).
    model.save_pretrained(tmp_path)
    loaded = PersonaWeaveForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.get_input_embeddings()(ids), embeds, rtol=0, atol=0)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_return_dict_false_returns_a_tuple_led_by_the_logits(persona_model, t5_persona_model):
    model, tok = persona_model
    ids = encode(tok, "pirate", model=model)
    logits = model(ids).logits
    out = model(ids, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], logits, rtol=0, atol=0)
    model.config.return_dict = False  # the config's choice is honoured too
    assert isinstance(model(ids), tuple)
    t5, t5_tok = t5_persona_model
    enc = t5_tok(persona_prompt("robot", 2) + " hello", return_tensors="pt")["input_ids"]
    dec = torch.zeros((1, 1), dtype=torch.long)
    out = t5(enc, decoder_input_ids=dec, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], t5(enc, decoder_input_ids=dec).logits, rtol=0, atol=0)


def test_persona_logit_mask_compiles_without_graph_breaks(persona_model):
    model, tok = persona_model
    logits = model(encode(tok, "robot", model=model)).logits
    compiled = torch.compile(model.mask_persona_logits, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(logits), model.mask_persona_logits(logits), rtol=0, atol=0)


def test_top_level_config_and_auto_model_registration(persona_model):
    from transformers import AutoModel

    model, _ = persona_model
    assert model.config.use_cache is True  # generate() reads it from the top-level config
    assert type(AutoModel.from_config(model.config)) is PersonaWeaveForCausalLM

def test_blend_vector_is_the_normalised_weighted_mix(persona_model):
    model, tok = persona_model
    persona = model.add_persona("mix", blend={"robot": 0.6, "pirate": 0.2}, tokenizer=tok)
    bank = model.personas
    expected = 0.75 * bank["robot"].vector + 0.25 * bank["pirate"].vector
    torch.testing.assert_close(bank["mix"].vector, expected)
    assert persona.blend == pytest.approx({"robot": 0.75, "pirate": 0.25})


def test_remove_persona(persona_model):
    model, tok = persona_model
    model.remove_persona("robot")
    assert model.config.persona_names == ["pirate"]
    assert model.persona_vectors.shape == (1, PERSONA_DIM)
    ids = tok(persona_prompt("robot", 2) + " hello", return_tensors="pt")["input_ids"]
    assert not model.persona_token_mask(ids).any()
    with pytest.raises(KeyError, match="robot"):
        model.remove_persona("robot")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "robot", "vector": random_vector(5)}, ValueError, "already exists"),
        ({"name": "bad name!", "vector": random_vector(5)}, ValueError, "Invalid persona name"),
        ({"name": "x", "description": "   "}, ValueError, "non-empty"),
        ({"name": "x"}, ValueError, "non-empty"),
        ({"name": "x", "blend": {"ghost": 1.0}}, KeyError, "ghost"),
        ({"name": "x", "blend": {"robot": -1.0, "pirate": 2.0}}, ValueError, "negative"),
        ({"name": "x", "blend": {"robot": 0.0, "pirate": 0.0}}, ValueError, "positive"),
        ({"name": "x", "blend": {}}, ValueError, "at least one"),
        ({"name": "x", "vector": torch.full((PERSONA_DIM,), float("nan"))}, ValueError, "NaN"),
        ({"name": "x", "vector": torch.zeros(PERSONA_DIM + 1)}, ValueError, "shape"),
        ({"name": "x", "vector": random_vector(5), "traits": {"charm": 0.5}}, ValueError, "Unknown traits"),
        ({"name": "x", "vector": random_vector(5), "traits": {"humor": 1.5}}, ValueError, "outside"),
    ],
)
def test_bad_persona_input_raises_and_changes_nothing(persona_model, kwargs, error, match):
    model, tok = persona_model
    before = (list(model.config.persona_names), model.persona_vectors.clone(), len(tok))
    with pytest.raises(error, match=match):
        model.add_persona(tokenizer=tok, **kwargs)
    assert model.config.persona_names == before[0]
    assert torch.equal(model.persona_vectors, before[1])
    assert len(tok) == before[2]


def test_add_persona_needs_a_tokenizer(persona_model):
    model, _ = persona_model
    with pytest.raises(ValueError, match="tokenizer="):
        model.add_persona("x", vector=random_vector(3))
    assert "x" not in model.config.persona_names


def test_add_persona_from_description_uses_the_encoder(persona_model, hash_encoder):
    model, tok = persona_model
    persona = model.add_persona("bard", description="a bard who rhymes", tokenizer=tok, encoder=hash_encoder)
    expected = torch.as_tensor(hash_encoder.encode(["a bard who rhymes"])[0])
    torch.testing.assert_close(model.personas["bard"].vector, expected)
    assert persona.description == "a bard who rhymes"


def test_chat_helper_validates_and_reinserts_tokens(persona_model):
    model, _ = persona_model
    with pytest.raises(KeyError, match="ghost"):
        chat("ghost", "hello", model=model)
    with pytest.raises(ValueError):
        chat("robot", "  ", model=model)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "beep"}]
    msgs = chat("robot", "why ?", history, model=model)
    tokens = persona_prompt("robot", model.config.num_persona_tokens)
    assert msgs[0] == {"role": "system", "content": tokens}
    assert msgs[-1]["content"].startswith(tokens)
    assert len(msgs) == 4


def test_add_persona_tokens_rejects_a_tokenizer_out_of_step(persona_model):
    model, _ = persona_model
    fresh = make_tokenizer()
    fresh.add_tokens(["something", "else"])
    with pytest.raises(ValueError, match="other ids"):
        personaweave.add_persona_tokens(fresh, model)
    in_step = make_tokenizer()
    assert len(personaweave.add_persona_tokens(in_step, model)) == 4


def test_training_the_persona_layer_changes_it_and_not_the_base(persona_model):
    model, tok = persona_model
    model.train()
    for p in model.language_model.parameters():
        p.requires_grad_(False)
    base_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    layer_before = {k: v.clone() for k, v in model.persona_embedding.state_dict().items()}
    ids = encode(tok, "robot", "hello what should i read ? a book")
    optimizer = torch.optim.AdamW(model.persona_embedding.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(v, model.persona_embedding.state_dict()[k]) for k, v in layer_before.items())
    assert all(torch.equal(v, model.language_model.state_dict()[k]) for k, v in base_before.items())


def test_saved_folder_loads_with_remote_code_without_personaweave(tmp_path, persona_model):
    model, tok = persona_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = encode(tok, "pirate", model=model)
    torch.save(ids, tmp_path / "ids.pt")
    expected = model(ids).logits
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "personaweave" or name.startswith("personaweave."):
                    raise ImportError("personaweave is blocked in this process")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "personaweave" not in sys.modules
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
        print(type(model).__module__, model.config.persona_names)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformers_modules" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)


def test_corrupt_weights_fail_loudly(tmp_path, persona_model):
    model, tok = persona_model
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception, match="(?i)safetensor|header|deserializ|incomplete|invalid"):
        PersonaWeaveForCausalLM.from_pretrained(tmp_path)


# --- encoder-decoder ------------------------------------------------------------------------


def t5_inputs(tok, texts):
    return tok(texts, return_tensors="pt", padding=True)


def test_t5_rows_without_persona_decode_like_the_base(t5_persona_model):
    model, tok = t5_persona_model
    batch = t5_inputs(tok, [persona_prompt("robot", 2) + " hello what", "hello what"])
    decoder_ids = torch.zeros(2, 3, dtype=torch.long)
    ours = model(**batch, decoder_input_ids=decoder_ids).logits
    base = model.language_model(**batch, decoder_input_ids=decoder_ids).logits
    reserved = torch.tensor(model.config.persona_token_ids).view(-1)
    keep = torch.ones(base.shape[-1], dtype=torch.bool).index_fill(0, reserved, False)
    torch.testing.assert_close(ours[1][:, keep], base[1][:, keep], rtol=0, atol=1e-5)
    assert (ours[0][:, keep] - base[0][:, keep]).abs().max() > 1e-4  # the persona row differs
    enc = model.get_encoder()(**batch)
    assert enc.last_hidden_state.shape[1] == batch["input_ids"].shape[1] + 2
    assert enc.attention_mask.tolist()[1][:2] == [0, 0] and enc.attention_mask.tolist()[0][:2] == [1, 1]


def test_t5_personas_differ_and_generate_works(t5_persona_model):
    model, tok = t5_persona_model
    batch = t5_inputs(tok, [persona_prompt("robot", 2) + " hello", persona_prompt("pirate", 2) + " hello"])
    decoder_ids = torch.zeros(2, 1, dtype=torch.long)
    logits = model(**batch, decoder_input_ids=decoder_ids).logits
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    beams = model.generate(**batch, max_new_tokens=6, num_beams=2)
    assert beams.shape[0] == 2
    labels = tok(["yes", "no"], return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(**batch, labels=labels).loss)


def test_t5_round_trip_through_auto_class(tmp_path, t5_persona_model):
    model, tok = t5_persona_model
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    batch = t5_inputs(tok, [persona_prompt("pirate", 2) + " hello"])
    decoder_ids = torch.zeros(1, 2, dtype=torch.long)
    torch.testing.assert_close(
        loaded(**batch, decoder_input_ids=decoder_ids).logits, model(**batch, decoder_input_ids=decoder_ids).logits
    )


def test_make_persona_model_helper_is_deterministic():
    a, tok = make_persona_model(seed=3)
    b, _ = make_persona_model(seed=3)
    ids = encode(tok, "robot")
    torch.testing.assert_close(a(ids).logits, b(ids).logits)
