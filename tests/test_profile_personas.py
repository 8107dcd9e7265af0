"""Profile personas: the Synthetic-Persona-Chat profile loader, the two profile encodings, and a short
training run of the profile -> soft-vector map on a tiny model."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import HashEncoder

from personaweave.data.profiles import load_persona_profiles, split_profiles
from personaweave.models import PersonaEmbedding
from personaweave.testing import tiny_llama, tiny_tokenizer
from personaweave.training.profile_personas import (
    ProfileSentenceEncoder,
    SentencePersonaEmbedding,
    encode_profiles,
    encode_turn,
    evaluate_nll,
    make_persona_map,
    save_persona_layer,
    split_sentences,
    train_persona_map,
)

FIXTURE = Path(__file__).parent / "fixtures" / "synthetic_persona_chat_sample.csv"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthetic_persona_chat"


def test_loader_gives_each_speaker_its_profile_and_its_own_turns():
    data = load_persona_profiles(str(FIXTURE))
    assert len(data) == 4 and data["speaker"] == ["User 1", "User 2", "User 1", "User 2"]
    first, second = data[0], data[1]
    assert first["sentences"][0] == "I love to bake cookies." and len(first["sentences"]) == 4
    assert first["description"] == " ".join(first["sentences"])
    assert second["prompts"][0] == "Hi!" and second["responses"][0] == "Hello!"
    assert first["prompts"][0] == "Hello!" and first["responses"][0] == "What is your favorite thing to do?"
    assert "I like to move objects with my mind." in second["responses"]
    assert not set(first["responses"]) & set(second["responses"])
    assert first["persona"] != second["persona"] and first["persona"].startswith("profile-")


def test_empty_profile_is_a_clear_error(tmp_path):
    rows = list(csv.DictReader(FIXTURE.open(encoding="utf-8")))
    rows[1]["user 2 personas"] = "  \n "
    with pytest.raises(ValueError, match="Conversation 1: User 2 has an empty profile"):
        load_persona_profiles(rows)
    with pytest.raises(ValueError, match="missing columns"):
        load_persona_profiles([{"text": "hi"}])
    with pytest.raises(FileNotFoundError):
        load_persona_profiles(str(tmp_path / "none.csv"))


def test_split_is_by_conversation():
    data = load_persona_profiles(str(FIXTURE))
    train, held_out = split_profiles(data, 1, seed=0)
    assert len(train) == len(held_out) == 2
    assert not set(train["conversation"]) & set(held_out["conversation"])
    with pytest.raises(ValueError, match="leaves one side empty"):
        split_profiles(data, 2)


def test_per_sentence_map_is_a_persona_embedding_with_block_diagonal_weights():
    torch.manual_seed(0)
    layer = SentencePersonaEmbedding(sentence_dim=6, hidden_size=4, max_sentences=3, tokens_per_sentence=2,
                                     inner_size=5)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    vectors = torch.randn(7, 18)
    vectors[0, 12:] = 0  # a profile with two sentences
    exported = layer.to_persona_embedding()
    assert isinstance(exported, PersonaEmbedding) and exported.num_tokens == 6
    torch.testing.assert_close(exported(vectors), layer(vectors))
    # each sentence drives its own soft tokens only
    changed = vectors.clone()
    changed[:, :6] += 1
    diff = (layer(changed) - layer(vectors)).abs().sum(-1)
    assert (diff[:, :2] > 0).all() and (diff[:, 2:] == 0).all()


def test_encodings_and_the_sentence_encoder_agree():
    encoder = HashEncoder()
    profiles = [["i like tea.", "i have a cat."], ["i sail."]]
    whole = encode_profiles(profiles, encoder, "whole")
    per = encode_profiles(profiles, encoder, "per_sentence", max_sentences=3)
    assert whole.shape == (2, 8) and per.shape == (2, 24)
    assert (per[1, 8:] == 0).all()
    assert split_sentences("i like tea. i have a cat.") == ["i like tea.", "i have a cat."]
    wrapped = ProfileSentenceEncoder(encoder, max_sentences=3)
    assert wrapped.dim == 24
    torch.testing.assert_close(torch.as_tensor(wrapped.encode(["i like tea. i have a cat.", "i sail."])), per)
    with pytest.raises(ValueError, match="at least one sentence"):
        encode_profiles([[]], encoder, "whole")
    with pytest.raises(ValueError, match="Unknown encoding"):
        make_persona_map("bag", 8, 4, 2, 4)


LINES = {"a pirate who sails the sea": ["arr matey , the sea !", "ahoy , the ship !"],
         "a polite butler": ["certainly sir , tea ?", "indeed sir , coffee please ."],
         "a robot of logic": ["beep . logic is good .", "beep beep , human ."],
         "a reader of books": ["a book , please read a book .", "i read a good book today ."]}


@pytest.mark.parametrize("encoding", ["whole", "per_sentence"])
def test_short_training_lowers_the_loss_and_an_unseen_description_is_not_the_mean(encoding, tmp_path):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok), 0, hidden_size=64, initializer_range=0.2)
    encoder = HashEncoder()
    profiles = [d.split(" who ") for d in LINES]  # one or two "sentences" each
    vectors = encode_profiles(profiles, encoder, encoding, max_sentences=2)
    rows = [encode_turn(tok, "hello", line, slots=2, persona=i) for i, lines in enumerate(LINES.values())
            for line in lines]
    layer = make_persona_map(encoding, encoder.dim, 64, num_tokens=2, inner_size=16, max_sentences=2,
                             anchor=lm.get_input_embeddings().weight.detach().mean(0))
    before = evaluate_nll(lm, rows, pad_id=tok.pad_token_id, layer=layer, vectors=vectors)["loss"]
    weights = {k: v.clone() for k, v in layer.state_dict().items()}
    untrained = layer(vectors).detach()
    assert torch.allclose(untrained, untrained[:1].expand_as(untrained))  # neutral: every persona alike
    losses = train_persona_map(lm, layer, vectors, rows, pad_id=tok.pad_token_id, steps=60, batch_size=4, lr=3e-2,
                               log_every=0)
    after = evaluate_nll(lm, rows, pad_id=tok.pad_token_id, layer=layer, vectors=vectors)["loss"]
    assert after < before - 0.1, (before, after)
    assert any(not torch.equal(v, weights[k]) for k, v in layer.state_dict().items())
    assert all(p.requires_grad is False for p in lm.parameters())  # the LM stayed frozen
    assert len(losses) == 60

    soft = layer(vectors).detach()
    mean = soft.mean(0)
    spread = (soft - mean).norm(dim=(-2, -1)).mean()
    unseen = layer(encode_profiles([["a grumpy old sailor", "tea"]], encoder, encoding, max_sentences=2)).detach()[0]
    assert (unseen - mean).norm() > 0.2 * spread  # not collapsed onto the mean of the training personas
    assert min((unseen - s).norm() for s in soft) > 0.1 * spread  # nor a copy of one of them

    out = save_persona_layer(layer, str(tmp_path / "best"), "tiny")
    from safetensors.torch import load_file

    saved = load_file(str(Path(out) / "persona_layer.safetensors"))
    assert saved["persona_vectors"].shape == (0, vectors.shape[1])


@pytest.mark.skipif(not SHARED.is_dir(), reason="Synthetic-Persona-Chat is not here")
def test_real_profiles_load():
    data = load_persona_profiles(str(SHARED / "Synthetic-Persona-Chat_valid.csv"))
    assert len(data) == 2000
    assert all(4 <= len(s) <= 5 for s in data["sentences"])
    assert sum(len(r) for r in data["responses"]) > 20000
