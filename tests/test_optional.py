"""Optional dependencies: one table, in step with pyproject.toml and constraints-lowest.txt; one-line errors."""

import re
import sys
from pathlib import Path

import pytest

from sinkdlm import optional
from sinkdlm.errors import UserError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parents[1]
UNPINNED = {"torch"}  # its CPU build is installed first (see constraints-lowest.txt)


def requirement(text: str) -> tuple[str, str]:
    """'transformers>=4.56' -> ('transformers', '4.56')."""
    name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(?:,<[0-9.]+)?", text).groups()
    return name.lower(), bound


def same_release(version: str) -> tuple[int, ...]:
    """'2.4.0' and '2.4' alike."""
    release = list(optional._release(version))
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    return tuple(release)


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_table_matches_the_extras_of_pyproject():
    extras = project()["optional-dependencies"]
    declared = {(extra, *requirement(r)) for extra, reqs in extras.items() if extra != "all" for r in reqs}
    table = {(d.extra, d.distribution, d.minimum) for d in optional.DEPENDENCIES.values()}
    assert table == {row for row in declared if row[0] != "test"}  # pytest is no run-time dependency
    everything = re.fullmatch(r"sinkdlm\[(.*)\]", extras["all"][0]).group(1).split(",")
    assert sorted(everything) == sorted(e for e in extras if e != "all")


def test_constraints_pin_every_lower_bound():
    proj = project()
    bounds = dict(requirement(r) for r in proj["dependencies"])
    bounds.update(requirement(r) for extra, reqs in proj["optional-dependencies"].items() if extra != "all"
                  for r in reqs)
    lines = [line for line in (ROOT / "constraints-lowest.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    pins = dict(line.lower().split("==") for line in lines)
    for name in UNPINNED:
        bounds.pop(name)
    assert {k: same_release(v) for k, v in pins.items()} == {k: same_release(v) for k, v in bounds.items()}


def test_a_missing_module_is_one_line_naming_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError) as e:
        optional.require("matplotlib", "the analysis figures")
    message = str(e.value)
    assert message == ('the analysis figures needs `matplotlib`, which is not installed; install the `analysis` '
                       'extra: pip install -e ".[analysis]"')
    assert not optional.available("surely_not_a_module_name")
    assert not optional.available("surely_not_a_module_name.submodule")  # find_spec raises for these


def test_a_module_a_table_package_brings_is_required_like_it(monkeypatch):
    """huggingface_hub is in no extra (tokenizers and transformers bring it): no KeyError, no version
    floor, and when missing the extra of transformers."""
    assert optional.require("huggingface_hub", "downloading a model").__name__ == "huggingface_hub"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(UserError) as e:
        optional.require("huggingface_hub", "downloading a model")
    assert str(e.value) == ('downloading a model needs `huggingface-hub`, which is not installed; install the '
                            '`convert` extra: pip install -e ".[convert]"')


def test_an_older_version_than_supported_is_refused(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0")
    with pytest.raises(UserError, match=r"needs pyarrow>=14, but 0.1.0 is installed; upgrade it"):
        optional.require("pyarrow", "reading the offline benchmarks")


@pytest.mark.parametrize("version, release", [("4.56.0.dev0", (4, 56, 0)), ("14", (14,)), ("2.12.0rc1", (2, 12, 0))])
def test_release_reads_the_numeric_part(version, release):
    assert optional._release(version) == release
    assert optional._release("4.55.4") < optional._release("4.56") <= optional._release("4.56.0")
