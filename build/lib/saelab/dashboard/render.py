"""Write the dashboard folder: index.html (Jinja2), assets/, latents/<id>.js, summary.json.

The folder is built beside its destination and renamed into place, so a failed build leaves no half-written
dashboard and a rebuild replaces the old one whole.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from saelab.dashboard.collect import DashboardData

ASSETS = ("dashboard.js", "dashboard.css")  # static files copied as they are


def environment() -> Environment:
    """Jinja2 with HTML escaping for the page (token text and paths are data, never markup)."""
    return Environment(loader=PackageLoader("saelab.dashboard", "templates"), undefined=StrictUndefined,
                       autoescape=lambda name: bool(name and name.endswith(".html.j2")), keep_trailing_newline=True)


def latent_file(latent: int, pad: int) -> str:
    """latents/00012.js: the name dashboard.js asks for (zero-padded to `pad` digits)."""
    return f"latents/{latent:0{pad}d}.js"


def write_folder(data: DashboardData, directory: Path) -> None:
    """Every file of a dashboard into an existing empty `directory`."""
    env = environment()
    summary: dict[str, Any] = data.summary
    (directory / "index.html").write_text(env.get_template("index.html.j2").render(s=summary), encoding="utf-8")
    (directory / "summary.json").write_text(json.dumps(summary, separators=(",", ":")) + "\n", encoding="utf-8")
    (directory / "assets").mkdir()
    templates = files("saelab.dashboard") / "templates"
    for name in ASSETS:
        (directory / "assets" / name).write_text(templates.joinpath(name).read_text(encoding="utf-8"),
                                                 encoding="utf-8")
    (directory / "latents").mkdir()
    latent_js = env.get_template("latent.js.j2")
    for record in data.latents:
        (directory / latent_file(record["id"], summary["pad"])).write_text(latent_js.render(latent=record),
                                                                           encoding="utf-8")


def render(data: DashboardData, out_dir: Path) -> Path:
    """Build the dashboard in a temporary folder next to `out_dir`, then move it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write_folder(data, staging)
        staging.chmod(0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
