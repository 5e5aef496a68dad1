import os

# Spawned ranks inherit this: megatron-core warns about missing apex/TE on every import.
os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
