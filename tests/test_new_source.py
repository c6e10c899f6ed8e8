"""Adding a data source is one Python file plus one YAML file, with no edits to saelab (as a variant is:
tests/test_new_variant.py); the source's own fields key its activation cache, and a source that names nothing
that decides its activations is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from saelab.data.cache_key import ModelSpec, cache_name, key_inputs
from saelab.data.tokens import SpecialTokens
from saelab.errors import ConfigError
from tests.conftest import REPO, tiny_overrides

TOY_SOURCE = '''
"""A toy text source living outside saelab: documents of letters cycling through an alphabet."""
from saelab.data.sources import TextSource


class Alphabet(TextSource):
    name = "alphabet"

    def __init__(self, data_cfg):
        super().__init__(data_cfg)
        self.letters = int(data_cfg["letters"])

    def documents(self):
        return [" ".join(chr(97 + (doc + i) % self.letters) for i in range(400)) for doc in range(40)]

    def own_key_inputs(self):
        return {"letters": self.letters}


class Nameless(Alphabet):
    def own_key_inputs(self):
        return {}
'''

TOY_YAML = """
defaults:
  - pydocs
  - _self_
_target_: toy_source.Alphabet
source: alphabet
letters: 7
"""


@pytest.fixture
def toy_source(tmp_path, monkeypatch):
    (tmp_path / "toy_source.py").write_text(textwrap.dedent(TOY_SOURCE))
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "alphabet.yaml").write_text(TOY_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_a_source_from_a_temp_module_trains_through_the_cli(toy_source, tiny_model_dir, tiny_corpus_dir, tmp_path):
    out = tmp_path / "outputs"
    args = [a for a in tiny_overrides(tiny_model_dir, tiny_corpus_dir, out) if not a.startswith("data=")
            and not a.startswith("data.path=")]
    env = {**os.environ, "PYTHONPATH": f"{toy_source}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "saelab.cli.train", *args, "data=alphabet", "data.cache=auto",
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.searchpath=[file://{toy_source / 'conf'}]",
         "trainer.max_steps=2", "eval.spliced_windows=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = out.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["fvu"] < 10
    (manifest,) = (tmp_path / "cache").rglob("manifest.json")
    source = json.loads(manifest.read_text())["inputs"]["source"]
    assert source == {"name": "alphabet", "class": "toy_source.Alphabet", "letters": 7}


def _cache_name(data_cfg: dict) -> str:
    from saelab.data.sources import build_source

    special = SpecialTokens(bos=0, separator=0, excluded=frozenset({0}))
    spec = ModelSpec("org/tiny", "/nonexistent/tiny", "float32", "blocks.0.hook_out")
    cfg = {"context_size": 32, "prepend_bos": True, "eval_fraction": 0.1, "cache_dtype": "float32", **data_cfg}
    return cache_name(key_inputs(build_source(cfg), cfg, spec, special))


def test_a_sources_own_fields_key_its_cache(toy_source):
    """Two configurations of a new source that differ only in a field of its own never share a cache (a source
    the cache does not know was keyed by hf's fields, so these two would have)."""
    seven = {"_target_": "toy_source.Alphabet", "source": "alphabet", "letters": 7}
    assert _cache_name(seven) == _cache_name(dict(seven))
    assert _cache_name(seven) != _cache_name({**seven, "letters": 5})


def test_a_source_that_names_nothing_is_refused(toy_source):
    with pytest.raises(ConfigError, match=r"data._target_='toy_source.Nameless' is not allowed: expected a source "
                                          r"whose own_key_inputs\(\) names what decides its activations"):
        _cache_name({"_target_": "toy_source.Nameless", "source": "alphabet", "letters": 7})


def test_a_source_is_chosen_by_its_class_and_checked_by_name(toy_source):
    from saelab.data.sources import build_source

    with pytest.raises(ConfigError, match=r"data._target_='toy_source.Nowhere' is not allowed: expected an "
                                          "importable"):
        build_source({"_target_": "toy_source.Nowhere", "source": "alphabet"})
    with pytest.raises(ConfigError, match=r"data.source='pydocs' is not allowed: expected 'alphabet'"):
        build_source({"_target_": "toy_source.Alphabet", "source": "pydocs", "letters": 7})
