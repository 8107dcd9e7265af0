"""The two judges, the v2 data pipeline, and the wall between evaluation anchors and training."""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from personaweave.evaluation.judges import EvaluationJudge, SelectionJudge, load_eval_anchors, penalties
from personaweave.testing import BagOfWordsEncoder
from personaweave.zoo import load_default_personas

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "datasets_scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(SCRIPTS))
    spec.loader.exec_module(module)
    return module


def test_penalties_flag_each_defect():
    description = "a boisterous pirate captain who talks in nautical slang"
    assert penalties("", description)["empty"]
    assert penalties("Arr, the sea is wide and I love it so much and", description)["cut_off"]
    assert penalties("I sail. I sail. I sail. I sail. I sail. I sail.", description)["repetition"]
    assert penalties("I am a boisterous pirate captain who sails.", description)["restates_description"]
    assert penalties("As an AI, I cannot sail.", description)["breaks_character"]
    clean = penalties("Arr, grab a good book and a mug of grog, matey!", description)
    assert not any(clean.values())


def test_anchors_are_held_out_from_training_and_selection_data():
    anchors = load_eval_anchors()
    personas = load_default_personas()
    assert set(anchors) == {p.name for p in personas}
    assert all(len(lines) >= 20 for lines in anchors.values())
    examples = {e.lower() for p in personas for e in p.examples}
    lines = [line.lower() for group in anchors.values() for line in group]
    assert not examples & set(lines)
    import pandas as pd

    for folder in ("persona_dialogues", "persona_dialogues_v2"):
        for path in (ROOT / "personaweave" / "data" / folder).glob("*.parquet"):
            frame = pd.read_parquet(path)
            texts = set()
            for column in ("response", "chosen", "rejected"):
                if column in frame:
                    texts |= {t.lower() for t in frame[column]}
            assert not texts & set(lines), f"an evaluation anchor is in {path}"


def test_no_training_or_selection_code_reads_the_anchors():
    """Only the evaluation package and evaluation recipes may name the anchors file or its loader."""
    allowed = {ROOT / "personaweave" / "evaluation" / "judges.py", ROOT / "recipes" / "persona_quality.py",
               ROOT / "recipes" / "persona_drift.py", ROOT / "recipes" / "unseen_personas.py",
               # benchmarks that only measure (serving graphs, serving dtypes): they select and train nothing
               ROOT / "benchmarks" / "deploy.py", ROOT / "benchmarks" / "serve_dtype.py"}
    offenders = []
    for folder in ("personaweave", "recipes", "datasets_scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in allowed:
                continue
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
            if "eval_anchors" in text or {"load_eval_anchors", "ANCHORS_FILE", "EvaluationJudge"} & names:
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_selection_pipeline_never_opens_the_anchors(tmp_path, monkeypatch):
    """Run the v2 builder's judging + selection on a small shard and watch every file it opens."""
    import pandas as pd

    build = _script("build_persona_dialogues_v2")
    personas = load_default_personas()
    rows = []
    for p in personas[:3]:
        for sample, reply in enumerate([p.examples[0], "ok.", "I like turtles and the weather today is fine."]):
            rows.append({"shard": 0, "prompt": "What should I read this weekend?", "source": "test", "split": "train",
                         "persona": p.name, "description": p.description, "sample": sample, "reply": reply,
                         "new_tokens": 5})
    shard = tmp_path / "shard-00000.parquet"
    pd.DataFrame(rows).to_parquet(shard)
    opened = []
    real_open = builtins.open

    def watching_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching_open)
    import importlib.resources as resources

    real_files = resources.files

    def watching_files(package):
        traversable = real_files(package)
        opened.append(str(traversable))
        return traversable

    monkeypatch.setattr(resources, "files", watching_files)
    judge = SelectionJudge.from_personas(personas, encoder=BagOfWordsEncoder())
    frame = build.judge_shard(str(shard), judge, str(tmp_path / "judged-00000.parquet"))
    sft, pairs, counts = build.select(frame, threshold=-10.0, pair_margin=0.0)
    assert counts["groups"] == 3 and len(sft) == 3 and pairs
    assert all(row["response"] != "ok." for row in sft)  # too short: a hard defect, never kept
    assert not any("eval_anchors" in path for path in opened)


def _judged_group(candidates, prompt="What should I read?", persona="pirate"):
    """A judged candidate frame for one (turn, persona): (reply, score, persona_prob, relevance, hard_defect)."""
    import pandas as pd

    return pd.DataFrame([{"prompt": prompt, "persona": persona, "source": "test", "split": "train",
                          "reply_trimmed": reply, "score": score, "persona_prob": prob, "relevance": rel,
                          "fluency": -2.0, "hard_defect": defect}
                         for reply, score, prob, rel, defect in candidates])


def test_persona_pairs_contrast_persona_evidence_on_topic():
    build = _script("build_persona_dialogues_v2")
    frame = _judged_group([
        ("off-topic but very piratey", 0.30, 0.99, 0.05, False),   # most in character, least relevant
        ("on-topic and piratey", 0.60, 0.80, 0.50, False),         # the chosen side
        ("on-topic, bland", 0.55, 0.10, 0.60, False),
        ("bland and a little off", 0.20, 0.05, 0.30, False),       # the rejected side
        ("short, a bit salty", 0.10, 0.40, 0.35, False),           # lowest score, not least in character
        ("broken loop loop loop", -1.0, 0.00, 0.40, True),         # hard defect: never a side
    ])
    _, pairs, counts = build.select(frame, threshold=-10.0, pair_margin=0.0, pair_by="persona", persona_gap=0.3)
    assert counts["pairs"] == 1
    assert pairs[0]["chosen"] == "on-topic and piratey" and pairs[0]["rejected"] == "bland and a little off"
    assert pairs[0]["chosen_persona_prob"] == 0.80 and pairs[0]["rejected_persona_prob"] == 0.05
    # by score, the same group pairs the best against the defective worst
    _, by_score, _ = build.select(frame, threshold=-10.0, pair_margin=0.0)
    assert (by_score[0]["chosen"], by_score[0]["rejected"]) == ("on-topic and piratey", "broken loop loop loop")
    # no_less_relevant: the rejected side is never more relevant than the chosen one (0.50)
    frame.loc[frame["reply_trimmed"] == "bland and a little off", "relevance"] = 0.70
    _, kept, _ = build.select(frame, -10.0, 0.0, pair_by="persona", persona_gap=0.3, no_less_relevant=True)
    assert (kept[0]["chosen"], kept[0]["rejected"]) == ("on-topic and piratey", "short, a bit salty")
    _, plain, _ = build.select(frame, -10.0, 0.0, pair_by="persona", persona_gap=0.3)
    assert plain[0]["rejected"] == "bland and a little off"
    # no_less_fluent: nor more fluent (bare base) than the chosen one (-2.0): the salty reply is now more fluent, and
    # every other less in-character candidate is more relevant: no pair
    frame.loc[frame["reply_trimmed"] == "short, a bit salty", "fluency"] = -1.0
    assert build.select(frame, -10.0, 0.0, pair_by="persona", persona_gap=0.3, no_less_relevant=True,
                        no_less_fluent=True)[1] == []
    _, fluent_ok, _ = build.select(frame, -10.0, 0.0, pair_by="persona", persona_gap=0.3, no_less_relevant=True)
    assert fluent_ok[0]["rejected"] == "short, a bit salty"
    frame.loc[frame["reply_trimmed"] == "short, a bit salty", "fluency"] = -2.0
    # both rules pooled: each group's pairs of both kinds, a pair both rules make kept once
    _, pooled, counts = build.select(frame, -10.0, 0.0, pair_by=("score", "persona"), persona_gap=0.3)
    assert [(r["chosen"], r["rejected"]) for r in pooled] == [
        ("on-topic and piratey", "broken loop loop loop"), ("on-topic and piratey", "bland and a little off")]
    same = _judged_group([("ahoy, read a sea tale", 0.8, 0.9, 0.5, False), ("read something", 0.1, 0.1, 0.4, False)])
    _, once, counts = build.select(same, -10.0, 0.0, pair_by=["score", "persona"], persona_gap=0.3)
    assert counts["pairs"] == 1 and once[0]["chosen"] == "ahoy, read a sea tale"
    # a gap below persona_gap is no pair; an unknown pairing is an error
    assert build.select(frame, -10.0, 0.0, pair_by="persona", persona_gap=0.8)[1] == []
    with pytest.raises(ValueError, match="pair_by"):
        build.select(frame, -10.0, 0.0, pair_by="vibes")


def test_selection_judge_prefers_in_character_on_topic_replies():
    personas = load_default_personas()
    judge = SelectionJudge.from_personas(personas, encoder=BagOfWordsEncoder())
    prompt = "What book should I read this weekend?"
    in_voice_on_topic = "Arr matey, hoist the sails and read a book about treasure on the high seas this weekend!"
    in_voice_off_topic = "Arr matey, hoist the sails, the grog barrel be empty and the crew be loyal!"
    bland_on_topic = "You could read a book this weekend."
    verdicts = judge.judge([prompt] * 3, [in_voice_on_topic, in_voice_off_topic, bland_on_topic], ["pirate"] * 3)
    assert verdicts.scores[0] > verdicts.scores[1]
    assert verdicts.scores[0] > verdicts.scores[2]


def test_evaluation_judge_bad_input():
    judge = EvaluationJudge.from_default_personas(encoder=BagOfWordsEncoder())
    with pytest.raises(KeyError, match="Unknown persona"):
        judge.judge(["hi"], ["hello"], ["ghost"])
    with pytest.raises(ValueError, match="same length"):
        judge.judge(["hi"], ["hello", "there"], ["pirate"])
    verdicts = judge.judge(["hi"], [""], ["pirate"])
    assert verdicts.summary()["persona_accuracy"] == 0.0  # an empty reply identifies nobody


@pytest.mark.slow
def test_judges_on_real_models_rank_hand_made_replies():
    """MiniLM + the bare SmolLM2: in-character and on-topic beats in-character off-topic and bland on-topic,
    for the selection judge's score; the evaluation judge gives the in-character reply more persona
    evidence than the bland one and reports relevance and fluency that separate the off-topic and the
    broken reply. (It does not always name the right persona: "a novel" pulls a robot's reply towards
    the librarian, whose anchors talk about books.)"""
    from personaweave.zoo import load_base

    model, tokenizer = load_base()
    personas = load_default_personas()
    selection = SelectionJudge.from_personas(personas, base_model=model, tokenizer=tokenizer)
    evaluation = EvaluationJudge.from_default_personas(encoder=selection.encoder, base_model=model, tokenizer=tokenizer)
    prompt = "What should I read this weekend?"
    replies = {
        "robot": ("Processing. Optimal weekend reading: a science fiction novel. Humans enjoy fictional robots. "
                  "Illogical, but efficient.",
                  "Processing. Humans require sleep cycles and fuel. Illogical, but predictable.",
                  "You could read a good novel this weekend."),
        "pirate": ("Arr, matey! Read a tale of buried treasure and sea battles, best enjoyed with a mug of grog!",
                   "Arr, matey! Hoist the sails and swab the deck, the tide waits for no crew!",
                   "You could read a good novel this weekend."),
    }
    for persona, (good, off_topic, bland) in replies.items():
        sel = selection.judge([prompt] * 3, [good, off_topic, bland], [persona] * 3)
        assert sel.scores[0] > sel.scores[1] and sel.scores[0] > sel.scores[2], (persona, sel.scores)
        ev = evaluation.judge([prompt] * 3, [good, off_topic, bland], [persona] * 3)
        assert ev.persona_prob[0] > ev.persona_prob[2]  # more in character than the bland reply
        assert ev.relevance[0] > ev.relevance[1]  # more on topic than the off-topic one
        assert np.isfinite(ev.fluency).all()
    broken = evaluation.judge([prompt] * 2, ["You could read a novel.", "novel novel the the read read of of"],
                              ["librarian"] * 2)
    assert broken.fluency[0] > broken.fluency[1]


@pytest.mark.slow
def test_candidate_generation_resumes_where_it_stopped(tmp_path):
    """Shards are written one at a time (temp file + rename); a second run skips finished shards."""
    generate = _script("generate_candidates")
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"{shared} not present")
    common = ["--out", str(tmp_path), "--num_turns", "4", "--turns_per_shard", "2", "--num_samples", "2",
              "--max_new_tokens", "4", "--shared_data", str(shared)]
    assert generate.main(common + ["--max_shards", "1"]) == 0
    first = tmp_path / "shard-00000.parquet"
    assert first.exists() and not (tmp_path / "shard-00001.parquet").exists()
    stamp = os.stat(first).st_mtime_ns
    assert generate.main(common) == 0
    assert os.stat(first).st_mtime_ns == stamp  # not regenerated
    import pandas as pd

    second = pd.read_parquet(tmp_path / "shard-00001.parquet")
    assert len(second) == 2 * 8 * 2  # 2 turns x 8 personas x 2 samples
    assert not list(tmp_path.glob("*.tmp"))
    turns = json.loads((tmp_path / "turns.json").read_text())["turns"]
    assert [t["split"] for t in turns] == sorted((t["split"] for t in turns),
                                                  key={"test": 0, "validation": 1, "train": 2}.get)


def test_builder_pools_an_expert_iteration_round(tmp_path):
    """Candidates of a second round (sampled from a trained model) compete with round 1 per (turn, persona):
    the selected reply is the best over both folders and its origin is recorded."""
    import json

    import pandas as pd

    build = _script("build_persona_dialogues_v2")
    personas = load_default_personas()[:2]
    judge = SelectionJudge.from_personas(load_default_personas(), encoder=BagOfWordsEncoder())
    prompt = "What should I read this weekend?"
    folders = {}
    for round_name, replies in (("round1", ["ok then.", "I like turtles and the weather today is fine."]),
                                ("round2", None)):
        folder = tmp_path / round_name
        folder.mkdir()
        rows = []
        for p in personas:
            texts = replies or [p.examples[0], "The weather is fine today, I think."]
            for sample, reply in enumerate(texts):
                row = {"shard": 0, "prompt": prompt, "source": "test", "split": "train", "persona": p.name,
                       "description": p.description, "sample": sample, "reply": reply, "new_tokens": 5}
                if round_name == "round2":
                    row["origin"] = "trained:test:lora"
                rows.append(row)
        pd.DataFrame(rows).to_parquet(folder / "shard-00000.parquet")
        build.judge_shard(str(folder / "shard-00000.parquet"), judge, str(folder / "judged-00000.parquet"))
        folders[round_name] = folder
    (folders["round1"] / "turns.json").write_text(json.dumps({"turns": [], "settings": {"num_samples": 2}}))
    out = tmp_path / "data"
    assert build.main(["--shards", str(folders["round1"]), str(folders["round2"]), "--out", str(out),
                       "--threshold", "-10", "--pair_margin", "0"]) == 0
    train = pd.read_parquet(out / "train.parquet")
    assert len(train) == 2  # one row per (turn, persona), not per folder
    examples = {p.name: p.examples[0] for p in personas}
    assert all(r.response == examples[r.persona] and r.origin == "trained:test:lora" for r in train.itertuples())
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selected_origin"] == {"trained:test:lora": 2} and stats["candidates"] == 8


def test_expert_iteration_sampler_writes_resumable_shards_from_a_trained_folder(tmp_path):
    """Round 2 samples from a saved PersonaWeave folder through each persona's LoRA sub-personality, in the
    round-1 shard layout (same index and turns), and skips shards that exist."""
    import json

    import pandas as pd

    from personaweave.sub_personalities import add_sub_personality, lora_config, save_sub_personalities
    from personaweave.testing import tiny_persona_model

    sampler = _script("sample_trained_candidates")
    model, tokenizer = tiny_persona_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    names = list(model.config.persona_names)
    peft = None
    for name in names:
        peft = add_sub_personality(peft or model, name, lora_config(r=2, alpha=4))
    save_sub_personalities(peft, str(folder))
    round1 = tmp_path / "round1"
    round1.mkdir()
    turns = [{"prompt": "hello there", "source": "t", "split": "test"},
             {"prompt": "what now", "source": "t", "split": "train"}, {"prompt": "why so", "source": "t", "split": "train"}]
    (round1 / "turns.json").write_text(json.dumps({"turns": turns, "settings": {"turns_per_shard": 1}}))
    out = tmp_path / "round2"
    argv = ["--model", str(folder), "--round1", str(round1), "--out", str(out), "--num_samples", "2",
            "--max_new_tokens", "3", "--dtype", "float32"]
    assert sampler.main(argv + ["--max_shards", "1"]) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.parquet"]  # test turns are not sampled
    frame = pd.read_parquet(out / "shard-00001.parquet")
    assert len(frame) == len(names) * 2 and set(frame["persona"]) == set(names)
    assert set(frame["origin"]) == {"trained:model:lora"} and set(frame["prompt"]) == {"what now"}
    before = (out / "shard-00001.parquet").stat().st_mtime_ns
    assert sampler.main(argv) == 0  # resumes: shard 1 kept, shard 2 written
    assert (out / "shard-00001.parquet").stat().st_mtime_ns == before and (out / "shard-00002.parquet").exists()
    with pytest.raises(SystemExit, match="turns.json"):
        sampler.main(["--model", str(folder), "--round1", str(tmp_path / "nothing"), "--out", str(out)])
