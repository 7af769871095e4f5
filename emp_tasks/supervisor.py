"""Runs the Procfile's processes together (what `emp run` and the test harness use).

Each process gets the same environment, its output is prefixed with its name,
and when one exits the others are stopped, so a broken system never looks alive.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from emp_tasks.store.db import ROOT

PROCFILE = ROOT / "Procfile"


def read_procfile(path: Path = PROCFILE) -> dict[str, str]:
    processes: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        processes[name.strip()] = command.strip()
    return processes


class ProcessGroup:
    """Started processes from the Procfile; `stop()` ends them all."""

    def __init__(self, env: dict[str, str], names: list[str] | None = None, output=None) -> None:
        self.env = env
        commands = read_procfile()
        self.commands = {name: commands[name] for name in (names or list(commands))}
        self.output = output if output is not None else sys.stdout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def _command(self, command: str) -> list[str]:
        argv = shlex.split(command)
        if argv and argv[0] == "emp":  # the console script of this same environment
            argv = [sys.executable, "-m", "emp_tasks.cli", *argv[1:]]
        return argv

    def start(self) -> ProcessGroup:
        width = max(len(name) for name in self.commands)
        for name, command in self.commands.items():
            process = subprocess.Popen(
                self._command(command),
                env=self.env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.processes[name] = process
            threading.Thread(
                target=self._pump, args=(name.ljust(width), process), daemon=True
            ).start()
        return self

    def _pump(self, label: str, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            with self._lock:
                try:
                    self.output.write(f"{label} | {raw.decode(errors='replace')}")
                    self.output.flush()
                except ValueError:
                    return

    def wait_any(self) -> tuple[str, int]:
        """Block until one process exits; return its name and exit code."""
        while True:
            for name, process in self.processes.items():
                code = process.poll()
                if code is not None:
                    return name, code
            time.sleep(0.2)

    def terminate(self) -> None:
        """Ask every process still running to stop (SIGTERM to its group); no waiting."""
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.terminate()
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
