"""`saelab-dashboard <run dir or exported SAE dir> [overrides]`: a static HTML feature browser.

    saelab-dashboard outputs/2026-11-26/09-32-03-077660
    saelab-dashboard outputs/<date>/<time> latents=top:20+random:10 tokens=20000
    saelab-dashboard path/to/exported_sae model=tiny model.path=/models/tiny data=text_files data.path=corpus/

Writes <run dir>/dashboard/ (or out=<dir>): open dashboard/index.html in a browser, straight from disk.

Options (key=value; defaults in brackets):
    latents       which latents get a page [top:50+random:20]: top:N (most frequently firing), random:N,
                  an id or a list [3,17,42], terms joined with +
    tokens        held-out real-text tokens to encode [50000] (whole windows, in corpus order)
    contexts      top-activating contexts per latent [10]      window   tokens either side of the max [10]
    logit_tokens  tokens per logit-effect list [10]             bins     activation-histogram bins [30]
    seed          the random:N draw [0]                          batch_size  activations per encode [4096]
    out           output folder [<run dir>/dashboard]
    model=<option>, data=<option>, model.<field>=..., data.<field>=...   as for saelab-train; a run directory's
                  own .hydra/config.yaml is the default, a bare export starts from model=minilm data=pydocs

Bad input (no such directory, no cfg.json, an unknown option or value) prints one line and exits with code 2,
writing nothing.
"""

from __future__ import annotations

import logging
import sys
import time


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if args else 2)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    from saelab.dashboard.plan import make_plan
    from saelab.errors import bad_input_exit

    started = time.time()
    try:
        plan = make_plan(args[0], args[1:])
        from saelab.dashboard.collect import collect
        from saelab.dashboard.render import render

        data = collect(plan)
        out = render(data, plan.out_dir)
    except Exception as err:
        sys.exit(bad_input_exit(err))
    print(f"dashboard: {len(data.latents)} latents on {data.summary['held_out']['tokens']} held-out tokens in "
          f"{time.time() - started:.1f} s -> {out / 'index.html'}")


if __name__ == "__main__":
    main()
