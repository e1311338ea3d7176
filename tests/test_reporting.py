"""The helpers the results scripts share: how a figure names its machine and its command."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_plot_curves_draws_the_tensorboard_scalars_and_names_what_is_missing(tmp_path, capsys):
    """scripts/plot_curves.py: a PNG of the chosen tags; an empty folder or an unknown tag is a clear error."""
    import importlib.util

    from volumes.curves import TrainingCurves

    spec = importlib.util.spec_from_file_location("plot_curves", Path(__file__).resolve().parents[1] / "scripts" / "plot_curves.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    curves = TrainingCurves(tmp_path / "tb", groups={"loss": "loss"})
    for step in range(1, 6):
        curves.add({"loss": 1.0 / step, "lr": 0.1, "step": step, "flag": True}, step)
    curves.close()
    out = tmp_path / "curves.png"
    assert script.main([str(tmp_path / "tb"), "--out", str(out), "--tags", "loss/loss", "lr"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "tb"), "--out", str(out), "--tags", "loss/dino"])
    assert "no scalars ['loss/dino']; it has ['loss/loss', 'lr']" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "empty"), "--out", str(out)])
    assert "no TensorBoard scalars found" in capsys.readouterr().err
