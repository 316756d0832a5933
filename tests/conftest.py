import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/moe_cases.py is importable from every test file

import moelora_ext  # noqa: E402,F401  (registers torch.ops.moelora.*)
from moe_cases import DEVICES  # noqa: E402


def pytest_report_header(config):
    return [f"torch {torch.__version__}, devices: {', '.join(DEVICES)}, threads: {torch.get_num_threads()}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
