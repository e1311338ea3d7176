"""The helpers the results scripts share: how a figure names its machine and its command."""

from __future__ import annotations

from volumes.reporting import available_cores, command_line, cpu_model, format_params, machine_line


def test_command_line_quotes_what_a_shell_would_split():
    line = command_line("zoo_results.py", ["--weights", "clip=/tmp/my weights.bin", "--quick"])
    assert line == ".venv/bin/python scripts/zoo_results.py --weights 'clip=/tmp/my weights.bin' --quick"
    assert command_line("zoo_results.py", []) == ".venv/bin/python scripts/zoo_results.py"


def test_machine_line_names_cores_cpu_and_threads():
    line = machine_line(3)
    assert line.startswith(f"{available_cores()} CPU cores ({cpu_model()}), ")
    assert "load average " in line and line.endswith("torch uses 3 thread(s)")


def test_format_params_units():
    assert [format_params(n) for n in (385, 523_400, 86_390_000)] == ["385", "523.4 k", "86.39 M"]
