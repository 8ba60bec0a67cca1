import subprocess
import sys

from vla_mbpo import cli


def test_help_lists_every_available_subcommand():
    out = subprocess.run([sys.executable, "-m", "vla_mbpo.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = list(cli.available())
    assert "bench" in names
    for name in names:
        assert f"    {name} " in out.stdout or f"    {name}\n" in out.stdout, name


def test_unknown_subcommand_is_an_error():
    out = subprocess.run([sys.executable, "-m", "vla_mbpo.cli", "fly"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice: 'fly'" in out.stderr


def test_every_registered_module_that_exists_has_main():
    import importlib

    for name, (module, _) in cli.available().items():
        if name != "bench":
            assert callable(importlib.import_module(module).main), name
