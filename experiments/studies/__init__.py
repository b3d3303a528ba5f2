"""The paper's comparisons as resumable studies: design (what runs), runner (train, skip, store), statistics
and markdown tables. The command is `python -m experiments.run_study`; see experiments/README.md."""
