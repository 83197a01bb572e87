"""Test set-up. Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors;
TRITON_INTERPRET must be set before triton decorates any kernel, hence here, first."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
