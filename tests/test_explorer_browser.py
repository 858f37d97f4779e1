"""The sink explorer in a real browser (issue 24): Debian's chromium driven by Playwright.

The page loads without console errors; the step slider and the layer/head pickers change what is
drawn; the sink, [MASK] and dominant-key marks sit on the columns the recording says; a screenshot
is saved under pytest's tmp dir (its path printed). Skipped only where no chromium is installed
(.ci/run installs it with apt).
"""

import shutil

import pytest
import torch

from sinkdlm.analysis import AnalysisConfig
from sinkdlm.analysis import explorer as ex
from sinkdlm.analysis.stats import dominant
from tests.test_explorer import sink_and_plain

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SETTINGS = AnalysisConfig(steps=4, gen_length=6, interventions=False, nulls=False, progress=False)
SINK, MASK, DOMINANT = (255, 140, 0), (140, 140, 140), (230, 0, 126)  # the page's MARK colours
# per mark row of a panel's canvas: the colour at the middle of each key column's strip
STRIPS = """panel => { const lay = explorer.layout(panel), ctx = document.querySelectorAll('canvas.map')[panel].getContext('2d');
  const out = {};
  for (const [row, y] of Object.entries(lay.rows)) out[row] = [...Array(lay.K).keys()].map(k => Array.from(
    ctx.getImageData(lay.x0 + k * lay.cell + (lay.cell >> 1), y + (lay.strip >> 1), 1, 1).data.slice(0, 3)));
  return out; }"""


def expected_dominant(tr, step: int, layer: int, head: int) -> int:
    """The most-attended key of sequence 0 among its kept keys (sinks + real positions), from the recording."""
    keys = torch.cat([torch.ones(tr.n_sink, dtype=torch.bool), tr.query_valid[0, 0]])
    colsum = tr.colsum[step, tr.layers.index(layer), 0, head][keys]
    return int(dominant(colsum, tr.key_valid[step, 0][keys]))


def check_marks(page, pair, step: int, layer: int, head: int) -> None:
    """Each mark strip is coloured on exactly the columns the recording says: the dedicated sinks, the
    [MASK] inputs of this step, and this step's most-attended key of the layer and head."""
    for panel, (tr, metrics) in enumerate(pair):
        strips = page.evaluate(STRIPS, panel)
        keys = range(len(strips["sink"]))
        want = expected_dominant(tr, step, layer, head)
        assert [tuple(c) == DOMINANT for c in strips["dominant"]] == [k == want for k in keys], (panel, step)
        assert [tuple(c) == SINK for c in strips["sink"]] == [k < tr.n_sink for k in keys], panel
        masked = (tr.tokens[step, 0][tr.query_valid[0, 0]] == metrics["model"]["vocab_size"]).tolist()
        assert [tuple(c) == MASK for c in strips["mask"]] == [False] * tr.n_sink + masked, (panel, step)


def drawn(page) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('canvas.map')).map(c => c.toDataURL())")


@pytest.fixture(scope="module")
def explorer_page(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    pair = sink_and_plain(tiny_data, root, SETTINGS)
    return ex.write_explorer(root, pair), pair


def test_explorer_in_chromium(explorer_page, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium found on PATH: install Debian's `apt-get install -y chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    path, pair = explorer_page
    layers, errors = pair[0][0].layers, []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_function("window.explorer !== undefined")
        check_marks(page, pair, step=0, layer=layers[0], head=0)
        before = drawn(page)

        last = SETTINGS.steps - 1
        page.locator("#step").fill(str(last))
        assert page.evaluate("explorer.state.step") == last
        masked = int((pair[0][0].tokens[last, 0] == pair[0][1]["model"]["vocab_size"]).sum())
        assert page.locator(".panel").first.locator(".text .tok.masked").count() == masked
        check_marks(page, pair, step=last, layer=layers[0], head=0)
        after_step = drawn(page)
        assert after_step[0] != before[0] and after_step[1] != before[1]

        page.select_option("#layer", str(layers[1]))
        check_marks(page, pair, step=last, layer=layers[1], head=0)
        after_layer = drawn(page)
        assert after_layer[0] != after_step[0]
        page.select_option("#head", "1")
        check_marks(page, pair, step=last, layer=layers[1], head=1)
        assert drawn(page)[0] != after_layer[0]

        shot = tmp_path / "explorer.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"explorer screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert errors == []
