"""The dashboard's command-line words -> its Options, each value checked (the Plan is plan.py's).

Overrides are `key=value` words parsed with OmegaConf.from_dotlist (YAML values: `latents=[3,17,42]`,
`tokens=5e4`). Dashboard options are bare keys (`latents`, `tokens`, ...); `model=<option>` and
`data=<option>` pick a config group as for saelab-train, `model.<field>=...` and `data.<field>=...` change a
field (split_overrides sorts the words into these three; plan.py applies the group choices and fields).
Anything else is a ConfigError: one line naming the field and what is allowed, raised before a file is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import ListConfig, OmegaConf

from saelab.errors import ConfigError

GROUPS = ("model", "data")  # the config groups a dashboard reads; everything else of a run is irrelevant here

DEFAULTS: dict[str, Any] = {
    "latents": "top:50+random:20",  # which latents get a page (see parse_latents)
    "tokens": 50_000,  # held-out real-text tokens to encode (whole windows, in corpus order)
    "contexts": 10,  # top-activating windows shown per latent
    "window": 10,  # tokens shown either side of a context's maximum
    "logit_tokens": 10,  # tokens listed whose logits the decoder row raises / lowers most (causal LMs)
    "bins": 30,  # bins of each latent's activation histogram
    "seed": 0,  # the random:N draw
    "batch_size": 4096,  # activations per SAE encode (memory: batch_size x d_sae x 4 bytes)
    "out": None,  # output folder (default: <run dir>/dashboard)
}
OPTION_HELP = ", ".join(DEFAULTS) + ", model=<option>, model.<field>, data=<option>, data.<field>"
LATENTS_ALLOWED = ("top:N (most frequently firing), random:N, a latent id or a list of ids such as [3,17,42], "
                   "joined with + (e.g. top:50+random:20)")


@dataclass(frozen=True)
class LatentSpec:
    """Which latents get a page: the `top` most frequently firing, `random` others, and `listed` ids."""

    top: int = 0
    random: int = 0
    listed: tuple[int, ...] = ()


@dataclass(frozen=True)
class Options:
    latents: LatentSpec
    tokens: int
    contexts: int
    window: int
    logit_tokens: int
    bins: int
    seed: int
    batch_size: int


def _int(name: str, value: Any, minimum: int) -> int:
    """An integer option; `5e4` (YAML float or string) counts as 50000."""
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
        raise ConfigError(name, value, f"an integer >= {minimum}")
    if int(number) < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")
    return int(number)


def parse_latents(value: Any) -> LatentSpec:
    """`top:50+random:20`, `random:5`, `12`, `[3,17,42]` or `3+17+top:5` -> LatentSpec."""
    terms: list[Any]
    if isinstance(value, (list, tuple, ListConfig)):
        terms = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        terms = [value]
    elif isinstance(value, str):
        terms = [t.strip() for t in re.split(r"[+,]", re.sub(r"[\[\]\s]", "", value))]
    else:
        raise ConfigError("latents", value, LATENTS_ALLOWED)
    top = rand = 0
    listed: list[int] = []
    for term in terms:
        if isinstance(term, int) and not isinstance(term, bool) and term >= 0:
            listed.append(term)
            continue
        match = re.fullmatch(r"(top|random):(\d+)|(\d+)", str(term))
        if match is None or (match.group(2) is not None and int(match.group(2)) == 0):
            raise ConfigError("latents", value if not isinstance(value, ListConfig) else list(value),
                              LATENTS_ALLOWED)
        if match.group(3) is not None:
            listed.append(int(match.group(3)))
        elif match.group(1) == "top":
            top += int(match.group(2))
        else:
            rand += int(match.group(2))
    return LatentSpec(top, rand, tuple(dict.fromkeys(listed)))


def check_latents(spec: LatentSpec, d_sae: int) -> None:
    bad = [i for i in spec.listed if i >= d_sae]
    if bad:
        raise ConfigError("latents", bad[0] if len(bad) == 1 else bad,
                          f"latent ids in 0..{d_sae - 1} (this SAE has d_sae {d_sae})")


def parse_options(values: Mapping[str, Any]) -> Options:
    merged = {**DEFAULTS, **values}
    return Options(
        latents=parse_latents(merged["latents"]),
        tokens=_int("tokens", merged["tokens"], 1),
        contexts=_int("contexts", merged["contexts"], 1),
        window=_int("window", merged["window"], 0),
        logit_tokens=_int("logit_tokens", merged["logit_tokens"], 1),
        bins=_int("bins", merged["bins"], 1),
        seed=_int("seed", merged["seed"], 0),
        batch_size=_int("batch_size", merged["batch_size"], 1),
    )


# -- the command line -----------------------------------------------------------------------------------------
def split_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    """(group choices {group: option}, dashboard options {key: value}, field overrides `group.x=v`)."""
    choices: dict[str, str] = {}
    fields: list[str] = []
    option_words: list[str] = []
    for word in overrides:
        if "=" not in word:
            raise ConfigError("option", word, f"key=value, with key one of {OPTION_HELP}")
        key, value = word.split("=", 1)
        key = key.strip()
        if key in GROUPS:
            choices[key] = value.strip()
        elif key.lstrip("+").split(".", 1)[0] in GROUPS and "." in key:
            fields.append(word)
        elif key in DEFAULTS:
            option_words.append(word)
        else:
            raise ConfigError(key, value, f"one of the options {OPTION_HELP}")
    try:
        options = OmegaConf.to_container(OmegaConf.from_dotlist(option_words)) if option_words else {}
    except Exception as err:  # a value YAML cannot read, e.g. latents=[3,
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError("option", " ".join(option_words), f"key=value with a YAML value ({first})") from None
    return choices, dict(options), fields
