"""Bake: a PersonaWeave model as a plain base-architecture checkpoint (tiny models; real weights under `slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from personaweave.chat import chat
from personaweave.cli import main
from personaweave.export.bake import bake, persona_token_ids
from personaweave.sub_personalities import add_sub_personality, save_sub_personalities
from personaweave.testing import tiny_persona_model

BLEND = {"pirate": 0.7, "robot": 0.3}
QUESTIONS = ("what should i read today ?", "why is the sea good , sir ?")


def trained_tiny_model(seed: int = 0):
    """The tiny default-persona model with a non-zero persona layer, so every persona differs."""
    model, tok = tiny_persona_model(seed=seed)
    torch.manual_seed(seed + 1)
    for p in model.persona_embedding.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval(), tok


def prompt_ids(tok, persona, question, history=None, num_tokens=2):
    messages = chat(persona, question, history, num_persona_tokens=num_tokens)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


def base_vocab(baked) -> list[int]:
    blocked = set(baked.generation_config.suppress_tokens)
    return [i for i in range(baked.config.vocab_size) if i not in blocked]


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """(PersonaWeave model with the blend added, its tokenizer, baked folder) - baked from the model object."""
    model, tok = trained_tiny_model()
    out = tmp_path_factory.mktemp("bake") / "baked"
    bake(model, str(out), tokenizer=tok, blends={"mix": BLEND})
    model.add_persona("mix", blend=BLEND, tokenizer=tok)  # the same blend, the PersonaWeave way
    return model, tok, str(out)


def test_baked_logits_and_greedy_replies_match(baked):
    model, tok, out = baked
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    plain_tok = AutoTokenizer.from_pretrained(out)
    assert type(plain).__name__ == "LlamaForCausalLM" and not plain.config.tie_word_embeddings
    vocab = base_vocab(plain)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ahoy matey !"}]
    for name in model.config.persona_names:  # every default persona and the blend
        for question, past in ((QUESTIONS[0], None), (QUESTIONS[1], history)):
            ids = prompt_ids(tok, name, question, past)
            assert torch.equal(ids, prompt_ids(plain_tok, name, question, past)), "the baked tokenizer differs"
            with torch.no_grad():
                diff = (model(ids).logits[..., vocab] - plain(ids).logits[..., vocab]).abs().max().item()
            assert diff < 1e-4, (name, diff)
            ours = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
            theirs = plain.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(ours, theirs), name


def test_baked_embedding_rows_are_the_soft_vectors_and_output_rows_zero(baked):
    model, tok, out = baked
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    soft = model.persona_soft_vectors()
    ids = persona_token_ids(out)
    assert set(ids) == set(model.config.persona_names)
    for p, name in enumerate(model.config.persona_names):
        assert ids[name] == model.config.persona_token_ids[p]
        torch.testing.assert_close(plain.get_input_embeddings().weight[ids[name]], soft[p], rtol=0, atol=0)
        assert plain.get_output_embeddings().weight[ids[name]].abs().max() == 0
    assert sorted(sum(ids.values(), [])) == plain.generation_config.suppress_tokens
    # every ordinary token keeps its output row (the tied embedding of the original)
    vocab = base_vocab(plain)
    torch.testing.assert_close(plain.get_output_embeddings().weight[vocab],
                               model.get_output_embeddings().weight[vocab], rtol=0, atol=0)


def test_persona_tokens_are_never_sampled(baked):
    model, tok, out = baked
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    blocked = torch.tensor(plain.generation_config.suppress_tokens)
    ids = prompt_ids(tok, "pirate", QUESTIONS[0]).repeat(10, 1)
    torch.manual_seed(0)
    sampled = plain.generate(ids, max_new_tokens=100, min_new_tokens=100, do_sample=True, temperature=1.5,
                             pad_token_id=0)[:, ids.shape[1]:]
    assert sampled.numel() == 1000
    assert int(torch.isin(sampled, blocked).sum()) == 0
    # the control: without suppress_tokens the zero output rows (logit 0) are sampled from this tiny model
    torch.manual_seed(0)
    unsuppressed = plain.generate(ids, max_new_tokens=100, min_new_tokens=100, do_sample=True, temperature=1.5,
                                  pad_token_id=0, suppress_tokens=None)[:, ids.shape[1]:]
    assert int(torch.isin(unsuppressed, blocked).sum()) > 0


def test_baked_folder_loads_without_personaweave_or_remote_code(baked, tmp_path):
    model, tok, out = baked
    assert not any(f.endswith(".py") for f in os.listdir(out))
    assert "auto_map" not in json.load(open(os.path.join(out, "config.json")))
    ids = prompt_ids(tok, "mix", QUESTIONS[0])
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "personaweave" or name.startswith("personaweave."):
                    raise ImportError("personaweave is blocked in this process")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({out!r}).eval()
        tok = AutoTokenizer.from_pretrained({out!r})
        assert not any(m == "personaweave" or m.startswith("personaweave.") for m in sys.modules)
        try:
            import personaweave  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("personaweave was importable")
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        assert tok.convert_ids_to_tokens(ids[0]).count("<|persona:mix:0|>") == 1
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
        print(type(model).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "transformers.models.llama.modeling_llama"
    vocab = base_vocab(AutoModelForCausalLM.from_pretrained(out))
    with torch.no_grad():
        expected = model(ids).logits[..., vocab]
    assert (torch.load(tmp_path / "logits.pt")[..., vocab] - expected).abs().max() < 1e-4


def test_subset_drops_the_other_personas_tokens(tmp_path):
    model, tok = trained_tiny_model()
    out = bake(model, str(tmp_path / "baked"), tokenizer=tok, personas=["pirate"])
    plain_tok = AutoTokenizer.from_pretrained(out)
    pirate = model.config.persona_names.index("pirate")
    assert persona_token_ids(out) == {"pirate": model.config.persona_token_ids[pirate]}
    assert len(plain_tok("<|persona:pirate:0|>", add_special_tokens=False).input_ids) == 1
    assert len(plain_tok("<|persona:robot:0|>", add_special_tokens=False).input_ids) > 1  # plain text now
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    all_ids = sorted(i for ids in model.config.persona_token_ids for i in ids)
    assert plain.generation_config.suppress_tokens == all_ids  # dropped ids can never be generated either
    ids = prompt_ids(tok, "pirate", QUESTIONS[0])
    vocab = base_vocab(plain)
    with torch.no_grad():
        assert (model(ids).logits[..., vocab] - plain(ids).logits[..., vocab]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def with_adapters(tmp_path_factory):
    """A saved PersonaWeave folder with LoRA sub-personalities for pirate and robot (non-zero B)."""
    model, tok = trained_tiny_model(seed=3)
    root = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    peft = None
    for i, name in enumerate(("pirate", "robot")):
        peft = add_sub_personality(peft or model, name)
        torch.manual_seed(10 + i)
        for key, param in peft.named_parameters():
            if f"lora_B.{name}." in key:
                torch.nn.init.normal_(param, std=0.3)
    save_sub_personalities(peft, str(root / "model"))
    return peft.eval(), tok, root


def peft_logits(peft, tok, name):
    ids = prompt_ids(tok, name, QUESTIONS[0])
    peft.set_adapter(name)
    with torch.no_grad():
        return ids, peft(input_ids=ids).logits


def test_adapters_are_copied_as_plain_peft_adapters(with_adapters):
    from peft import PeftModel

    peft, tok, root = with_adapters
    out = bake(str(root / "model"), str(root / "baked"))
    meta = json.load(open(os.path.join(out, "persona_tokens.json")))
    assert {p["name"]: p["adapter"] for p in meta["personas"]}["pirate"] == "adapters/pirate"
    assert {p["name"]: p["adapter"] for p in meta["personas"]}["butler"] is None
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    vocab = base_vocab(plain)
    served = PeftModel.from_pretrained(plain, os.path.join(out, "adapters", "pirate"), adapter_name="pirate")
    served.load_adapter(os.path.join(out, "adapters", "robot"), adapter_name="robot")
    for name in ("pirate", "robot"):
        ids, expected = peft_logits(peft, tok, name)
        served.set_adapter(name)
        with torch.no_grad():
            got = served(input_ids=ids).logits
        assert (got[..., vocab] - expected[..., vocab]).abs().max() < 1e-4, name


def test_merge_lora_bakes_one_sub_personality_into_the_weights(with_adapters):
    peft, tok, root = with_adapters
    out = bake(str(root / "model"), str(root / "merged"), merge_lora="pirate")
    assert not os.path.exists(os.path.join(out, "adapters"))
    assert list(persona_token_ids(out)) == ["pirate"]  # merging picks that persona unless told otherwise
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    vocab = base_vocab(plain)
    ids, expected = peft_logits(peft, tok, "pirate")
    with torch.no_grad():
        diff = (plain(ids).logits[..., vocab] - expected[..., vocab]).abs().max().item()
    assert diff < 1e-4
    with torch.no_grad(), peft.disable_adapter():  # and it really differs from the master alone
        assert (peft(input_ids=ids).logits[..., vocab] - expected[..., vocab]).abs().max() > 1e-3


# --- bad input ------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(tmp_path, baked):
    model, tok, out = baked
    with pytest.raises(KeyError, match="Unknown persona.*'nobody'.*known personas"):
        bake(model, str(tmp_path / "a"), tokenizer=tok, personas=["pirate", "nobody"])
    with pytest.raises(ValueError, match="holds a 'llama' model, not a PersonaWeave model"):
        bake(out, str(tmp_path / "b"))  # a baked folder is a plain Llama now
    with pytest.raises(ValueError, match="does not exist"):
        bake(str(tmp_path / "missing"), str(tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        bake(str(tmp_path / "empty"), str(tmp_path / "d"))
    with pytest.raises(FileExistsError, match="not empty"):
        bake(model, out, tokenizer=tok)
    with pytest.raises(KeyError, match="No LoRA sub-personality 'pirate'"):
        bake(model, str(tmp_path / "e"), tokenizer=tok, merge_lora="pirate")
    with pytest.raises(ValueError, match="already taken"):
        bake(model, str(tmp_path / "f"), tokenizer=tok, blends={"pirate": BLEND})
    with pytest.raises(KeyError, match="Unknown persona 'nobody' in blend"):
        bake(model, str(tmp_path / "g"), tokenizer=tok, blends={"mix2": {"nobody": 1.0}})
    with pytest.raises(ValueError, match="needs tokenizer="):
        bake(model, str(tmp_path / "h"))
    assert not any(p.name.startswith((".a", ".e", ".h")) for p in tmp_path.iterdir())  # no temp folders left


def test_cli_bake(with_adapters, tmp_path, capsys):
    _, _, root = with_adapters
    out = tmp_path / "cli"
    assert main(["bake", str(root / "model"), "--out", str(out), "--personas", "pirate,butler",
                 "--blend", "mix", "pirate=1,butler=1"]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "<|persona:mix:0|><|persona:mix:1|>" in printed
    assert "adapters/pirate" in printed
    assert sorted(persona_token_ids(str(out))) == ["butler", "mix", "pirate"]
    with pytest.raises(SystemExit) as err:  # the same folder again: not empty
        main(["bake", str(root / "model"), "--out", str(out)])
    assert err.value.code == 2 and "not empty" in capsys.readouterr().err
    assert main(["bake", str(root / "model"), "--out", str(tmp_path / "x"), "--personas", "nobody"]) == 2
    assert "Unknown persona" in capsys.readouterr().err


# --- the shipped checkpoint -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~4 min on 2 idle cores; far more when they are shared
def test_bake_shipped_checkpoint(tmp_path):
    """Every default persona + one blend on the shipped SmolLM2 personas: logits, greedy replies, 1,000
    sampled tokens without a persona token, and the LoRA adapters beside it."""
    from personaweave.loading import has_shipped_checkpoint, load_model

    if not has_shipped_checkpoint():
        pytest.skip("no shipped checkpoint in this install")
    model, tok, _ = load_model(with_adapters=False)
    out = bake(None, str(tmp_path / "baked"), blends={"mix": {"librarian": 0.5, "robot": 0.5}})
    model.add_persona("mix", blend={"librarian": 0.5, "robot": 0.5}, tokenizer=tok)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    plain_tok = AutoTokenizer.from_pretrained(out)
    vocab = base_vocab(plain)
    k = model.config.num_persona_tokens
    figures = {}
    for name in model.config.persona_names:
        messages = chat(name, "What should I read this weekend?", model=model)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        assert torch.equal(ids, plain_tok(text, return_tensors="pt", add_special_tokens=False).input_ids)
        with torch.no_grad():
            diff = (model(ids).logits[..., vocab] - plain(ids).logits[..., vocab]).abs().max().item()
        ours = model.generate(ids, max_new_tokens=24, do_sample=False)
        theirs = plain.generate(ids, max_new_tokens=24, do_sample=False)
        figures[name] = {"max_abs_logit_diff": diff, "greedy_identical": bool(torch.equal(ours, theirs))}
        print(json.dumps({name: figures[name]}), flush=True)
        assert diff < 1e-4, (name, diff)
        assert torch.equal(ours, theirs), name
    ids = tok(tok.apply_chat_template(chat("mix", "Tell me about the ocean.", num_persona_tokens=k),
                                      add_generation_prompt=True, tokenize=False),
              return_tensors="pt", add_special_tokens=False).input_ids.repeat(8, 1)
    torch.manual_seed(0)
    sampled = plain.generate(ids, max_new_tokens=125, min_new_tokens=125, do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0)[:, ids.shape[1]:]
    blocked = torch.tensor(plain.generation_config.suppress_tokens)
    figures["sampled_tokens"] = sampled.numel()
    figures["persona_tokens_sampled"] = int(torch.isin(sampled, blocked).sum())
    print(json.dumps(figures))
    assert sampled.numel() == 1000 and figures["persona_tokens_sampled"] == 0
    adapters = sorted(os.listdir(os.path.join(out, "adapters")))
    assert adapters == sorted(n for n in model.config.persona_names if n != "mix")


def _vllm_skip_reason() -> str | None:
    import importlib.util

    if not torch.cuda.is_available():
        return "GPU-only: vLLM serving of the baked folder needs a CUDA GPU (none here)"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm on a GPU machine)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_vllm_skip_reason() is not None, reason=_vllm_skip_reason() or "")
def test_vllm_serves_the_baked_folder_with_one_lora_per_persona(with_adapters):
    """The README's vLLM recipe: the baked folder as a plain Llama, each sub-personality a LoRA request,
    persona tokens banned; vLLM's greedy reply equals transformers' greedy reply on the same baked folder."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    _, tok, root = with_adapters
    out = bake(str(root / "model"), str(root / "baked-vllm"))
    meta = json.load(open(os.path.join(out, "persona_tokens.json")))
    prompt = {p["name"]: p["prompt"] for p in meta["personas"]}
    messages = [{"role": "system", "content": prompt["pirate"]}, {"role": "user", "content": QUESTIONS[0]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    llm = LLM(model=out, enable_lora=True, max_lora_rank=8, dtype="float32", enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={i: -100.0 for i in meta["suppress_token_ids"]})
    result = llm.generate([text], params, lora_request=LoRARequest("pirate", 1, os.path.join(out, "adapters", "pirate")))
    got = list(result[0].outputs[0].token_ids)
    from peft import PeftModel

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), os.path.join(out, "adapters", "pirate"))
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    expected = plain.generate(input_ids=ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1]:].tolist()
    assert got[:len(expected)] == expected[:len(got)]
    assert not set(got) & set(meta["suppress_token_ids"])
