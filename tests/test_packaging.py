"""passes/ and hw_targets/ install as lorafx.passes and lorafx.hw_targets, never top level."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_namespace_from_another_directory(tmp_path):
    code = ("import importlib.util, lorafx.passes, lorafx.hw_targets; "
            "print(importlib.util.find_spec('passes'), importlib.util.find_spec('hw_targets'), "
            "lorafx.passes.InsertLoRA.__module__, lorafx.hw_targets.get_target('cpu').name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None", "lorafx.passes.insert_lora", "cpu"]


def test_wheel_holds_only_the_lorafx_package(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), ROOT], check=True, capture_output=True)
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"lorafx"}
    assert "lorafx/passes/insert_lora.py" in names and "lorafx/hw_targets/__init__.py" in names
    assert "lorafx/dialect/registry.py" in names and "lorafx/dialect/linear.py" in names
