"""docs/generation/seed_intervals.py: the windowed-ELBO degradation and the copy-rule compliance over
training seeds, against hand-computed means and t intervals."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "generation" / "seed_intervals.py"
T_975_1DF = 12.706204736174694  # Student t quantile 0.975, 1 degree of freedom


def load():
    spec = importlib.util.spec_from_file_location("seed_intervals", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_degradations_and_seed_intervals_by_hand(tmp_path, capsys):
    # seed A: sink loses (2.5-2.0 + 3.5-3.0)/2 = 0.5, plain (2.2-2.0 + 3.2-3.0)/2 = 0.2 -> +0.3
    # seed B: sink 0.1, plain 0.3 -> -0.2; over seeds: mean +0.05, sd 0.3536, half-width 12.706 * 0.25
    runs = {"a": {"sink": {"window 8": [2.5, 3.5], "no eviction": [2.0, 3.0]},
                  "plain": {"window 8": [2.2, 3.2], "no eviction": [2.0, 3.0]}},
            "b": {"sink": {"window 8": [1.1, 1.1], "no eviction": [1.0, 1.0]},
                  "plain": {"window 8": [1.3, 1.3], "no eviction": [1.0, 1.0]}}}
    paths = []
    for name, nll in runs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"length": 64, "prompt": 16, "block": 16, "mc": 4, "nll": nll}))
        paths.append(str(path))
    load().elbo(paths)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| window 8"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    half = T_975_1DF * math.sqrt(0.125) / math.sqrt(2)
    assert cells[3] == f"+0.050 [{0.05 - half:+.3f}, {0.05 + half:+.3f}]"
    assert cells[1].startswith("+0.300 [") and cells[2].startswith("+0.250 [")
    assert cells[4] == "+0.300, -0.200"


def test_one_seed_gives_no_interval(tmp_path, capsys):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"length": 8, "prompt": 4, "block": 4, "mc": 1, "nll": {
        "sink": {"window 0": [1.5], "no eviction": [1.0]}, "plain": {"window 0": [1.2], "no eviction": [1.0]}}}))
    load().elbo([str(path)])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| window 0"))
    assert [c.strip() for c in row.strip("|").split("|")][3] == "+0.300"



def test_compliance_over_seeds_by_hand(tmp_path, capsys):
    # seed 1: sink 0.9 / 0.8 (full / W8), plain 0.7 / 0.4; seed 2: sink 0.8 / 0.8, plain 0.8 / 0.6
    means = {("sink", 1, "full"): 0.9, ("sink", 1, "W8"): 0.8, ("plain", 1, "full"): 0.7, ("plain", 1, "W8"): 0.4,
             ("sink", 2, "full"): 0.8, ("sink", 2, "W8"): 0.8, ("plain", 2, "full"): 0.8, ("plain", 2, "W8"): 0.6}
    for (variant, seed, decoding), mean in means.items():
        folder = tmp_path / f"{variant}-seed{seed}-{decoding}"
        folder.mkdir()
        (folder / "generation.json").write_text(json.dumps({"metrics": {"rule_compliance": {"mean": mean}}}))
    load().compliance(str(tmp_path))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    # full: sink - plain = +0.2, 0.0 -> mean +0.1, sd 0.1414, half-width 12.706 * 0.1
    half = T_975_1DF * 0.1
    assert rows["full"][3] == f"+0.100 [{0.1 - half:+.3f}, {0.1 + half:+.3f}] (2)"
    assert rows["W8"][3].startswith("+0.300 [")  # +0.4, +0.2
    assert rows["W8 - full, plain"][3].startswith("-0.250 [")  # -0.3, -0.2
    assert rows["W8 - full, sink - plain"][3].startswith("+0.200 [")  # -0.1 - (-0.3), 0 - (-0.2)
