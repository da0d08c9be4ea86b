import os

# Before torch is imported by any test module: see tether/__init__.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
