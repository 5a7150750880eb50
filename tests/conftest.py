"""Test-session set-up shared by every test module."""

import os

import torch

# Triton's interpreter (NumPy on the CPU) runs the "bf16-triton" search kernel where no GPU is: Triton reads
# TRITON_INTERPRET when it is imported, so it is set here, before any test imports it (tests/test_search_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
