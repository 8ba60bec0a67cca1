"""The machine fingerprint an evaluation records: the CPU model from /proc/cpuinfo and the numeric libraries."""

import platform

import mujoco
import numpy as np
import torch

from trainer.machine import cpu_model, machine_fingerprint


def test_cpu_model_reads_the_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9B14"


def test_cpu_model_without_cpuinfo_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "processor", lambda: "Apple M2")
    assert cpu_model(tmp_path / "missing") == "Apple M2"
    monkeypatch.setattr(platform, "processor", lambda: "")  # Linux often reports nothing here
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_model(tmp_path / "missing") == "aarch64"
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # an ARM cpuinfo has no model name
    assert cpu_model(tmp_path / "cpuinfo") == "aarch64"


def test_machine_fingerprint_names_the_libraries_that_round():
    fingerprint = machine_fingerprint()
    assert set(fingerprint) == {"cpu", "cpu_capability", "torch", "mujoco", "numpy"}
    assert (fingerprint["torch"], fingerprint["mujoco"], fingerprint["numpy"]) == \
        (torch.__version__, mujoco.__version__, np.__version__)
    assert fingerprint["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
