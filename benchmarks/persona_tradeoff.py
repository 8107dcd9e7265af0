"""What the v2 candidates say about persona evidence vs relevance and fluency (issue 14).

Reads the committed judged candidate shards (every sampled reply of the prompted base with the selection
judge's components) and prints JSON lines:
- `within_group`: the mean, over (turn, persona) groups of defect-free candidates, of the Spearman rank
  correlation between persona probability and relevance / fluency: is a more in-character reply of the *same*
  turn less on-topic or less likely under the bare base?
- `quintile`: mean relevance and fluency per quintile of persona probability over all defect-free candidates.

    python benchmarks/persona_tradeoff.py [--shards datasets_scripts/shards/v2]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import pandas as pd


def within_group(frame: pd.DataFrame, a: str, b: str) -> tuple[float, int]:
    """Mean within-group Spearman correlation of columns a and b (groups of >= 3 candidates), and the group count."""
    corr = [g[a].rank().corr(g[b].rank()) for _, g in frame.groupby(["prompt", "persona"], sort=False) if len(g) >= 3]
    series = pd.Series(corr, dtype=float).dropna()
    return float(series.mean()), int(series.count())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="datasets_scripts/shards/v2")
    args = parser.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.shards, "judged-*.parquet")))
    if not paths:
        raise SystemExit(f"error: no judged shards in {args.shards} (build_persona_dialogues_v2.py judges them)")
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    clean = frame[~frame["hard_defect"]]
    for other in ("relevance", "fluency"):
        mean, groups = within_group(clean, "persona_prob", other)
        print(json.dumps({"within_group": f"persona_prob~{other}", "spearman_mean": round(mean, 4), "groups": groups}))
    quintile = pd.qcut(clean["persona_prob"].rank(method="first"), 5, labels=False)
    for q, part in clean.groupby(quintile):
        print(json.dumps({"quintile": int(q) + 1, "candidates": len(part),
                          **{k: round(float(part[k].mean()), 4) for k in ("persona_prob", "relevance", "fluency")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
