"""The GPU check (issue 12): ``bash bench/gpu_check.sh`` proves the CUDA path in one bounded
command on a lent GPU machine; ``--dry-run`` runs the same parts CI-sized on CPU.

Modules: ``check`` (the driver, ``python -m bench.gpu``), ``proc`` (bounded subprocesses),
``setup_env`` (part 1: which Python, install), ``train_runs`` + ``synth_rec`` (part 3:
``train.py`` runs), ``head`` (part 4: head step on the device), ``summary`` (part 5). Part 2 is
``pytest -m cuda`` (tests/test_cuda.py).
"""
