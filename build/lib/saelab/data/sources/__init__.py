"""Data sources: where a run's activations come from, one class per source behind one interface (base.DataSource).

A config's `data._target_` names the class (conf/data/<source>.yaml); `build_source(data_cfg)` makes it from the
data section, as `build_sae` makes a variant from the sae section. A new source is one file here (or anywhere
importable) and one YAML.
"""

from saelab.data.sources.base import DataSource, TextSource, build_source

__all__ = ["DataSource", "TextSource", "build_source"]
