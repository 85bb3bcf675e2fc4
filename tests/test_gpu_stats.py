"""NVML readings degrade to nothing where there is no GPU, so a CPU worker's stats never fail on them."""

from __future__ import annotations

import pytest
import torch

from splitserve.gpu_stats import GpuReader, nvml_form


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_reader_without_gpu_reads_nothing():
    assert GpuReader.for_device(torch.device("cpu")).read() == {}
    assert GpuReader(None).read() == {}
    assert GpuReader("GPU-00000000-0000-0000-0000-000000000000").read() == {}  # no NVML or no such GPU


def test_nvml_form_adds_the_prefix_torch_leaves_out():
    assert nvml_form("0b1c2d3e-0000") == "GPU-0b1c2d3e-0000"
    assert nvml_form("GPU-0b1c2d3e-0000") == nvml_form("0b1c2d3e-0000")
    assert nvml_form("MIG-0b1c") == "MIG-0b1c"
    assert nvml_form("") == ""
