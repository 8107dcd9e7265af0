"""Persona bank persistence, atomic saving and the packaged default personas."""

from __future__ import annotations

import pytest
import torch
from conftest import random_vector

from personaweave import TRAITS, Persona, PersonaBank
from personaweave.files import save_folder_atomically
from personaweave.zoo import load_default_personas


def test_bank_save_load_round_trip(tmp_path):
    bank = PersonaBank([Persona("a", "first", vector=random_vector(0)), Persona("b", "second", vector=random_vector(1))])
    bank.add(bank.blend("ab", {"a": 1, "b": 3}))
    bank.save(tmp_path)
    loaded = PersonaBank.load(tmp_path)
    assert loaded.names == ["a", "b", "ab"]
    torch.testing.assert_close(loaded.vectors(), bank.vectors())
    assert loaded["ab"].blend == {"a": 0.25, "b": 0.75}
    assert "first" in loaded["ab"].description and "75%" in loaded["ab"].description
    assert not list(tmp_path.glob(".tmp-*"))


def test_bank_errors_name_the_problem():
    bank = PersonaBank([Persona("a", vector=random_vector(0))])
    with pytest.raises(KeyError, match="known personas: \\['a'\\]"):
        bank["zzz"]
    with pytest.raises(ValueError, match="already exists"):
        bank.add(Persona("a", vector=random_vector(1)))
    with pytest.raises(ValueError, match="shape"):
        bank.add(Persona("c", vector=torch.zeros(3)))
    with pytest.raises(FileNotFoundError):
        PersonaBank.load("/nonexistent/folder")


def test_default_personas_are_complete():
    personas = load_default_personas()
    assert [p.name for p in personas] == [
        "librarian", "robot", "pirate", "butler", "coach", "counselor", "grump", "scientist"]
    for p in personas:
        assert p.description and len(p.examples) >= 5
        assert list(p.traits) == list(TRAITS)
        assert all(0.0 <= v <= 1.0 for v in p.traits.values())


class Exploding:
    def save_pretrained(self, path, **kwargs):
        (__import__("pathlib").Path(path) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")


class Fine:
    def save_pretrained(self, path, **kwargs):
        (__import__("pathlib").Path(path) / "model.safetensors").write_bytes(b"new")


def test_atomic_save_keeps_the_old_folder_when_saving_fails(tmp_path):
    target = tmp_path / "model"
    save_folder_atomically(Fine(), None, target)
    assert (target / "model.safetensors").read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="disk full"):
        save_folder_atomically(Exploding(), None, target)
    assert (target / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
