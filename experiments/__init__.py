"""The experiment scripts, each run from the checkout as `python -m experiments.NAME`."""
