"""`saelab-dashboard`: a static HTML feature browser for a trained SAE (see docs/DASHBOARD.md).

options.py reads the command line's words, plan.py turns them into a Plan (checked before any model loads),
collect.py computes the per-latent data on held-out text, render.py writes the folder, browser.py drives
headless Chromium (tests and screenshots), cli.py is the entry point.
"""
