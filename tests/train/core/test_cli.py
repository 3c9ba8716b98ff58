"""train.core.cli.run_main: a user's mistake is one line and exit code 2; a bug keeps its
traceback and exits 1; --debug / SIFT_JAX_DEBUG show tracebacks; the error log gets them all."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.core.cli import (
    DEBUG_ENV,
    UsageError,
    error_log,
    errors_logged_to,
    is_user_error,
    run_main,
    set_error_log,
)
from train.core.outputs import OutputDir

REPO = Path(__file__).resolve().parents[3]


class DataError(ValueError):
    """Like the project's data errors (ValueError subclasses)."""


def _raise(exc: BaseException):
    def main(argv):
        raise exc

    return main


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    yield
    assert error_log() is None  # no registration leaks out of a run_main call


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            ValueError("--learning_rate must be > 0, got -1."),
            "--learning_rate must be > 0, got -1.",
        ),
        (DataError("train.tsv line 3: 2 columns, expected 3."), "train.tsv line 3: 2 columns"),
        (UsageError("--task_name cola2: unknown task."), "--task_name cola2: unknown task."),
        (FileNotFoundError("--data_path: no such file(s): a.json."), "no such file(s): a.json."),
        (FileExistsError(17, "File exists", "out/model"), "[Errno 17] File exists: 'out/model'"),
        (IsADirectoryError("--prompt_file x is a directory."), "--prompt_file x is a directory."),
        (PermissionError(13, "Permission denied", "/data"), "Permission denied: '/data'"),
        (OSError(28, "No space left on device"), "No space left on device"),
        (KeyError("Unknown GGUF tensor 'x' for a llama model."), "Unknown GGUF tensor 'x' for"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, exc, message):
    assert run_main(_raise(exc), []) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_keyerror_messages_are_not_quoted(capsys):
    run_main(_raise(KeyError("No HF mapping for model parameter encoder/w.")), [])
    assert capsys.readouterr().err == "error: No HF mapping for model parameter encoder/w.\n"


def test_prog_and_multi_line_messages(capsys):
    exc = UsageError("--max_new_tokens 0 is invalid.\nPass a value >= 1.")
    exc.add_note("See --help.")
    assert run_main(_raise(exc), [], prog="train.generate") == 2
    assert capsys.readouterr().err == (
        "train.generate: error: --max_new_tokens 0 is invalid.\nPass a value >= 1.\nSee --help.\n"
    )


def test_output_dir_errors_are_user_errors(tmp_path, capsys):
    (tmp_path / "train_config.json").write_text("{}")

    def main(argv):
        with OutputDir(tmp_path):
            pass

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output_dir {tmp_path} is not empty")
    assert "--overwrite_output_dir" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "exc", [ZeroDivisionError("division by zero"), KeyError("hidden_size"), TypeError("x")]
)
def test_bugs_keep_their_traceback_and_exit_1(capsys, exc):
    assert run_main(_raise(exc), []) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert f"{type(exc).__name__}:" in err and "error: " not in err


def test_a_value_error_from_inside_numpy_is_a_bug(capsys):
    np = pytest.importorskip("numpy")

    def main(argv):
        np.broadcast_shapes((2,), (3,))

    assert run_main(main, []) == 1
    assert "Traceback" in capsys.readouterr().err
    assert is_user_error(ValueError("raised by us"))


def test_debug_flag_shows_the_traceback_and_is_not_passed_on(capsys):
    seen = []

    def main(argv):
        seen.append(argv)
        raise ValueError("bad value")

    argv = ["--task_name", "rte", "--debug", "--", "--debug"]
    assert run_main(main, argv) == 2
    assert seen == [["--task_name", "rte", "--", "--debug"]]  # kept after "--"
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "raise ValueError" in err
    assert err.endswith("error: bad value\n")


def test_debug_env_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert run_main(_raise(ValueError("bad")), []) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert run_main(_raise(ValueError("bad")), []) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_error_log_gets_the_traceback(tmp_path, capsys):
    log = tmp_path / "error.log"

    def main(argv):
        set_error_log(log)  # what the trainer does once its output dir is taken
        raise ValueError("eval set is empty")

    assert run_main(main, ["--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: eval set is empty (traceback in {log})\n"
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and "ValueError: eval set is empty" in text
    assert f"['--output_dir', '{tmp_path}']" in text and f"pid {os.getpid()}" in text

    def buggy(argv):
        set_error_log(log)
        return [][1]

    assert run_main(buggy, []) == 1
    err = capsys.readouterr().err
    assert "IndexError" in err and err.endswith(f"(traceback in {log})\n")
    assert log.read_text().count("Traceback") == 2  # appended


def test_errors_logged_to_a_block_reach_run_main_and_leave_no_registration(tmp_path, capsys):
    """What the jobs do once the output dir is locked: the traceback of an error raised in
    the block goes to that run's log even though the block (and the lock) ended before
    run_main reports it; called directly, the job leaves no log registered for later runs."""
    log = tmp_path / "error.log"

    def job(argv):
        with errors_logged_to(log):
            raise ValueError("--learning_rate too high: the loss is NaN")

    assert run_main(job, []) == 2
    assert capsys.readouterr().err.endswith(f"(traceback in {log})\n")
    assert "ValueError: --learning_rate too high" in log.read_text()
    with pytest.raises(ValueError):
        job([])
    assert error_log() is None
    assert run_main(_raise(ValueError("unrelated")), []) == 2
    assert capsys.readouterr().err == "error: unrelated\n"  # not logged to the old run's file
    assert log.read_text().count("Traceback") == 1


def test_an_unwritable_error_log_is_reported_not_raised(tmp_path, capsys):
    def main(argv):
        set_error_log(tmp_path / "missing" / "error.log")
        raise ValueError("bad")

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad (could not write the traceback to ")


def test_interrupt_exits_130(capsys, tmp_path):
    assert run_main(_raise(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "interrupted\n"
    log = tmp_path / "error.log"

    def main(argv):
        set_error_log(log)
        raise KeyboardInterrupt

    assert run_main(main, ["--debug"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(f"interrupted (traceback in {log})\n")
    assert "KeyboardInterrupt" in log.read_text()


def test_exit_codes_of_normal_ends(capsys):
    assert run_main(lambda argv: None, []) == 0
    assert run_main(lambda argv: {"eval_accuracy": 0.9}, []) == 0  # a main's results
    assert run_main(lambda argv: 3, []) == 3
    assert run_main(lambda argv: True, []) == 0

    def parse(argv):
        argparse.ArgumentParser(prog="train.glue").parse_args(argv)

    assert run_main(parse, ["--no_such_flag"]) == 2  # argparse's own usage error
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    assert run_main(parse, ["--help"]) == 0

    def exits(argv):
        sys.exit("fatal: out of devices")

    assert run_main(exits, []) == 1
    assert capsys.readouterr().err.endswith("fatal: out of devices\n")


def test_argv_defaults_to_sys_argv(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "argv", ["prog", "--a", "1", "--debug"])
    run_main(seen.append, None)
    assert seen == [["--a", "1"]]


def test_a_real_entry_point_exits_2_with_one_line(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from train.core.cli import run_main, UsageError

        def main(argv):
            if argv == ["bug"]:
                return {}["missing"]
            raise UsageError(f"--num_train_epochs must be >= 1, got {argv[0]}.")

        if __name__ == "__main__":
            sys.exit(run_main(main))
        """
    )
    entry = tmp_path / "entry.py"
    entry.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(DEBUG_ENV, None)

    def run(*args):
        return subprocess.run(
            [sys.executable, str(entry), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    r = run("0")
    assert (r.returncode, r.stdout, r.stderr) == (
        2,
        "",
        "error: --num_train_epochs must be >= 1, got 0.\n",
    )
    r = run("0", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr
    r = run("bug")
    assert r.returncode == 1 and "KeyError: 'missing'" in r.stderr


def test_importing_it_loads_nothing_else_of_train():
    code = "import sys, train.core.cli; print(sorted(m for m in sys.modules if 'train' in m))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["['train',", "'train.core',", "'train.core.cli']"]
