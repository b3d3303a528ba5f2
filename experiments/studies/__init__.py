"""The paper's comparisons as resumable studies: design (what runs), runner (train, skip, store), statistics
and markdown tables. The command is `experiments/run_study.py`; see experiments/README.md."""
