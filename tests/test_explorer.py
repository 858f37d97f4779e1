"""The sink explorer's data (issue 24): replayed maps against the recording, the size plan, the
page's encoding and self-containment, the analyze hook. The page in a browser: test_explorer_browser."""

import json
import re

import pytest
import torch

from sinkdlm.analysis import AnalysisConfig, run_analysis
from sinkdlm.analysis import explorer as ex
from sinkdlm.analysis.record import RecordSettings, record_trajectory
from sinkdlm.analysis.stats import column_sums, detect, dominant
from sinkdlm.model import DLM
from sinkdlm.sample import SampleConfig
from tests.conftest import tiny
from tests.test_analysis import tiny_checkpoint

SETTINGS = AnalysisConfig(steps=4, gen_length=4, interventions=False, nulls=False, progress=False)


def page_data(path) -> dict:
    text = path.read_text()
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1))


# ---- the size plan ----------------------------------------------------------------------------------


def test_evenly_keeps_first_and_last():
    assert ex.evenly(32, 8) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert ex.evenly(5, 9) == [0, 1, 2, 3, 4] and ex.evenly(5, 1) == [0]


def test_plan_keeps_everything_that_fits_and_reduces_in_order():
    cells, layers = 100, [0, 1, 2, 3]
    per_map = cells * ex.BASE64_GROWTH + 1  # bytes of base64 (+1: float rounding of the budget)
    full = ex.plan_maps(32, layers, 4, cells, budget=32 * 4 * 4 * per_map)
    assert (full.steps, full.layers, full.head_mean, full.notes) == (list(range(32)), [0, 1, 2, 3], False, [])
    # 10 steps of 16 maps fit: steps are sampled first
    steps = ex.plan_maps(32, layers, 4, cells, budget=10 * 16 * per_map)
    assert len(steps.steps) == 10 and not steps.head_mean and steps.steps[0] == 0 and steps.steps[-1] == 31
    # below MIN_STEPS x 16 maps: heads averaged, then as many steps as fit (32 x 4 maps: all)
    heads = ex.plan_maps(32, layers, 4, cells, budget=7 * 16 * per_map)
    assert heads.head_mean and len(heads.steps) == 28 and heads.layers == [0, 1, 2, 3]
    # below MIN_STEPS x 4 mean maps: layers sampled at MIN_STEPS steps
    few = ex.plan_maps(32, layers, 4, cells, budget=2 * ex.MIN_STEPS * per_map)
    assert few.head_mean and len(few.steps) == ex.MIN_STEPS and few.layers == [0, 3]
    assert any("8 of 32 steps" in n for n in few.notes) and any("averaged" in n for n in few.notes)
    assert any("layers 0, 3 of the 4" in n for n in few.notes)
    assert ex.plan_maps(32, layers, 4, cells, budget=1).steps == [0]  # never nothing


# ---- maps: replayed vs recorded, encoded -------------------------------------------------------------


@pytest.mark.parametrize("sink_tokens", [0, 1])
def test_replayed_maps_are_the_recorded_attention(sink_tokens):
    model = DLM(tiny(sink_tokens=sink_tokens)).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]  # item 0 is the shorter: its row has padding
    tr = record_trajectory(model, prompts, SampleConfig(gen_length=4, steps=4), eos_id=1,
                           settings=RecordSettings(map_steps=[1, 3]), progress=False)
    maps = ex.replay_maps(model, tr, [0, 1, 2, 3], [0, 1])  # (S, L, H, T, K)
    assert maps.shape[:3] == (4, 2, 2)
    for s in (1, 3):  # the recorder kept these maps of sequence 0 in the batch of two
        torch.testing.assert_close(maps[s], tr.maps[s], atol=1e-6, rtol=0)
    colsum = column_sums(maps.flatten(0, 1), tr.query_valid[:, 0].repeat_interleave(2, 0)).unflatten(0, (4, 2))
    torch.testing.assert_close(colsum, tr.colsum[:, :, 0], atol=1e-5, rtol=0)
    # cropped to the real positions and averaged over heads while observed: the same numbers
    real = tr.query_valid[0, 0]
    keys = torch.cat([torch.ones(sink_tokens, dtype=torch.bool), real])
    small = ex.replay_maps(model, tr, [1, 2], [1], real=real, head_mean=True)
    torch.testing.assert_close(small, maps[1:3, 1:2][..., real, :][..., keys].mean(2, keepdim=True), atol=1e-7, rtol=0)


def test_encoded_maps_decode_within_the_stated_error():
    probs = torch.softmax(torch.randn(3, 2, 5, 7) * 3, -1)
    back = ex.decode_maps(ex.encode_maps(probs), tuple(probs.shape))
    # a code is within 0.5 of 255 sqrt(p): (sqrt(p) +- 0.5/255)^2 - p
    bound = probs.sqrt() / ex.CODE_MAX + 0.25 / ex.CODE_MAX**2
    assert ((back - probs).abs() <= bound + 1e-7).all()
    assert float((back - probs).abs().max()) < 0.004  # what the page states


def test_canvas_status_of_a_hand_made_trajectory():
    m = 9
    tokens = torch.tensor([[1, 2, m, m, m], [1, 2, 5, m, m], [1, 2, 5, 6, 7]])
    assert ex.canvas_status(tokens, m).tolist() == [[0, 0, 3, 3, 3], [0, 0, 2, 3, 3], [0, 0, 1, 2, 2]]


# ---- the page of a checkpoint ------------------------------------------------------------------------


def sink_and_plain(tiny_data, root, settings: AnalysisConfig) -> list:
    """A tiny sink model and a plain one in `root`, analysed on the same prompts: [(trajectory, metrics)] x 2."""
    torch.manual_seed(0)
    tiny_checkpoint(tiny_data, root / "sink", sink_tokens=1)
    tiny_checkpoint(tiny_data, root / "plain")
    sink = run_analysis(root / "sink", settings=settings)
    plain = run_analysis(root / "plain", prompts=sink[0]["prompts"], settings=settings)
    return [(sink[1], sink[0]), (plain[1], plain[0])]


@pytest.fixture(scope="module")
def analyses(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    return root, sink_and_plain(tiny_data, root, SETTINGS)


def test_page_holds_what_the_recording_says(analyses):
    root, pair = analyses
    page = ex.write_explorer(root / "out", pair)
    data = page_data(page)
    assert [p["n_sink"] for p in data["panels"]] == [1, 0]
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text) and "<link" not in text  # nothing fetched
    for panel, (tr, metrics) in zip(data["panels"], pair):
        n, real = tr.n_sink, tr.query_valid[0, 0]
        keys = torch.cat([torch.ones(n, dtype=torch.bool), real])
        colsum = tr.colsum[:, :, 0][..., keys]  # (S, L, H, K) of the kept keys
        valid = tr.key_valid[:, 0][:, keys][:, None, None]
        assert panel["dominant"] == dominant(colsum, valid).tolist()
        assert panel["canvas"] == tr.tokens[:, 0][:, real].tolist()
        sets = detect(tr.colsum, metrics["sinks"]["rule"], tr.key_valid[:, None, :, None, :],
                      metrics["sinks"]["eps"], metrics["sinks"]["std_k"],
                      **{k: metrics["sinks"][k] for k in ("gu_threshold",) if k in metrics["sinks"]})
        assert panel["sinks"][2][1][0] == sets[2, 1, 0, 0][keys].nonzero().flatten().tolist()
        maps = ex.decode_maps(panel["maps"], tuple(panel["map_shape"]))
        q = int(real.sum())
        torch.testing.assert_close(maps.sum(3), colsum, atol=q / ex.CODE_MAX, rtol=0)  # 8-bit codes, summed
        if n:  # absorption of head 0, layer 1, step 2 by hand; the layer's pooled over heads
            c = tr.colsum[2, 1, 0]
            assert panel["head_metrics"]["absorption_rate"][2][1][0] == pytest.approx(float(c[0, 0] / c[0].sum()),
                                                                                      abs=1e-4)
            assert panel["layer_metrics"]["absorption_rate"][2][1] == pytest.approx(float(c[:, 0].sum() / c.sum()),
                                                                                    abs=1e-4)
            assert panel["head_metrics"]["uniform_absorption"][2][1][0] == pytest.approx(
                1 / float(tr.key_valid[2, 0].sum()), abs=1e-4)


def test_page_over_the_size_limit_is_reduced_and_says_so(analyses):
    root, pair = analyses
    page = ex.write_explorer(root / "small", pair[:1], max_mb=2e-4)  # 200 bytes: one mean map of one step
    panel = page_data(page)["panels"][0]
    assert panel["head_mean"] and panel["map_steps"] == [0] and len(panel["layers"]) == 1
    assert panel["map_shape"][:3] == [1, 1, 1] and "above this panel's 0.0 MB" in " ".join(panel["notes"])


def test_script_closing_text_in_the_data_cannot_end_the_script(tmp_path):
    panel = {"label": "</script><b>x</b>", "notes": []}
    page = ex.write_page(tmp_path / "p.html", [panel])
    assert page_data(page)["panels"][0]["label"] == "</script><b>x</b>"


# ---- the command -----------------------------------------------------------------------------------


def test_analyze_writes_the_explorer_and_compares_a_second_checkpoint(analyses, tmp_path, capsys):
    from sinkdlm.cli import main

    root, _ = analyses
    args = ["analyze", "--checkpoint", str(root / "sink"), "--steps", "4", "--gen-length", "4",
            "--no-interventions", "--no-nulls"]
    assert main([*args, "--compare", str(root / "plain"), "--out", str(tmp_path / "a")]) == 0
    assert f"explorer: {tmp_path / 'a' / ex.EXPLORER_FILE}" in capsys.readouterr().out
    data = page_data(tmp_path / "a" / ex.EXPLORER_FILE)
    assert [p["n_sink"] for p in data["panels"]] == [1, 0]
    first, second = data["panels"]
    assert first["canvas"][0] == second["canvas"][0]  # the same prompts, masks included
    assert main([*args, "--compare", str(tmp_path / "none"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--compare: no checkpoint at" in err
    assert not (tmp_path / "b").exists()
    assert main([*args, "--explorer-max-mb", "0", "--out", str(tmp_path / "d")]) == 2
    assert "explorer_max_mb" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main([*args, "--compare", str(root / "plain"), "--checkpoint-steps", "all",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--compare" in capsys.readouterr().err
