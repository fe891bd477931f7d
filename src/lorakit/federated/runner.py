"""Run the Flower apps on Flower's engines, on this machine: the simulation engine, or a loopback deployment.

``write_app(dir, settings)`` writes the Flower app (a ``pyproject.toml`` naming lorakit's ServerApp and
ClientApp, with the run config). ``simulate`` starts a SuperLink in simulation mode (Ray runs the ClientApps);
``deploy`` starts a SuperLink and one SuperNode per client, all on 127.0.0.1. Both then submit the app with
``flwr run`` and return the server's ``history.json``. Every process started here is stopped on the way out.
Apps run from the installed environment (``--disable-runtime-dependency-installation``): nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from .experiment import Settings

CONNECTION = "lorakit"
PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lorakit-federated"
version = "1.0.0"
description = "Federated LoRA fine-tuning with lorakit: ServerApp and ClientApp"
license = "Apache-2.0"
dependencies = []  # lorakit (with flwr) must be installed wherever the apps run

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lorakit"

[tool.flwr.app.components]
serverapp = "lorakit.federated.server_app:app"
clientapp = "lorakit.federated.client_app:app"

[tool.flwr.app.config]
"""


def toml_value(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)


def write_app(directory: str | os.PathLike, settings: Optional[Settings] = None) -> Path:
    """Write the Flower app directory (``pyproject.toml``) with ``settings`` as its default run config."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    config = (settings or Settings()).to_config()
    body = PYPROJECT + "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items())
    (root / "pyproject.toml").write_text(body)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The Flower processes started for one run; ``stop`` ends them and their children."""

    def __init__(self, workdir: Path):
        self.workdir, self.started = workdir, []
        bin_dir = str(Path(sys.executable).parent)
        src_root = str(Path(__file__).resolve().parents[2])  # where this lorakit is imported from
        self.env = {**os.environ, "FLWR_HOME": str(workdir / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "PYTHONPATH": os.pathsep.join(p for p in (src_root, os.environ.get("PYTHONPATH")) if p)}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        """Terminate every started process and its descendants (they may have left its process group)."""
        try:
            import psutil

            family = [c for p in self.started if psutil.pid_exists(p.pid) for c in psutil.Process(p.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 - psutil missing or a process already gone
            family = []
        self._signal(family, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
        self._signal(family, signal.SIGKILL)

    def _signal(self, family: list, sig: int) -> None:
        for proc in self.started:
            if proc.poll() is None:  # only while it runs: a reaped leader's id may belong to someone else by now
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
        for child in family:  # psutil refuses to signal a process whose id was reused
            with contextlib.suppress(Exception):
                child.send_signal(sig)

    def tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted(self.workdir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@contextlib.contextmanager
def superlink(workdir: Path, simulation: bool) -> Iterator[tuple[Processes, int]]:
    """A SuperLink on 127.0.0.1 (all its APIs on one port), with a ``lorakit`` connection in FLWR_HOME."""
    procs = Processes(workdir)
    port = free_port()
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    try:
        procs.start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                    "--host", "127.0.0.1", "--port", str(port), *(["--simulation"] if simulation else []))
        wait_for_port(port)
        yield procs, port
    finally:
        procs.stop()


def _new_rounds(history: Path, seen: int, on_round: Optional[Callable[[dict], None]]) -> int:
    """Pass the rounds of ``history`` after the first ``seen`` to ``on_round``; returns how many it holds."""
    if on_round is None or not history.is_file():
        return seen
    try:
        rounds = json.loads(history.read_text())["rounds"]
    except (json.JSONDecodeError, KeyError, OSError):  # being rewritten: read it next time
        return seen
    for record in rounds[seen:]:
        on_round(record)
    return max(seen, len(rounds))


def submit(procs: Processes, app: Path, settings: Settings, timeout: float, federation: str = "",
           on_round: Optional[Callable[[dict], None]] = None) -> dict:
    """``flwr run`` the app with ``settings`` and wait for it; returns the server's history.

    ``on_round(record)`` is called with each round's record as the server writes it (progress)."""
    overrides = procs.workdir / "run-config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.to_config().items()))
    cmd = ["flwr", "run", str(app), CONNECTION, "--stream", "--run-config", str(overrides)]
    if federation:
        cmd += ["--federation-config", federation]
    history, seen = Path(settings.out_dir) / "history.json", 0
    with open(procs.workdir / "flwr-run.log", "w") as log:
        done = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=procs.env)
        deadline = time.monotonic() + timeout
        try:
            while done.poll() is None:
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                seen = _new_rounds(history, seen, on_round)
                time.sleep(0.5)
        finally:
            if done.poll() is None:
                done.kill()
                done.wait()
    _new_rounds(history, seen, on_round)
    if not history.is_file():
        raise RuntimeError(f"the Flower run wrote no {history} (flwr run exit {done.returncode}):\n{procs.tail()}")
    data = json.loads(history.read_text())
    if data["rounds"][-1]["round"] != settings.num_rounds:
        raise RuntimeError(f"the Flower run stopped after round {data['rounds'][-1]['round']}:\n{procs.tail()}")
    return data


def _prepared(settings: Settings, workdir: Optional[str]) -> tuple[Settings, Path, Path]:
    root = Path(workdir or tempfile.mkdtemp(prefix="lorakit-fed-"))
    root.mkdir(parents=True, exist_ok=True)
    if not settings.out_dir:
        settings = Settings(**{**settings.__dict__, "out_dir": str(root / "out")})
    return settings, root, write_app(root / "app", settings)


def simulate(settings: Settings, workdir: Optional[str] = None, timeout: float = 3600, cpus_per_client: int = 1,
             on_round: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the apps in Flower's simulation engine (Ray) with ``num_clients`` virtual SuperNodes."""
    settings, root, app = _prepared(settings, workdir)
    federation = f"num_supernodes={settings.num_clients} client_resources_num_cpus={cpus_per_client}"
    with superlink(root, simulation=True) as (procs, _):
        return submit(procs, app, settings, timeout, federation, on_round=on_round)


def deploy(settings: Settings, workdir: Optional[str] = None, timeout: float = 3600,
           node_configs: Optional[list[dict]] = None, on_started=None,
           on_round: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the apps as a deployment: a SuperLink and ``num_clients`` SuperNodes, as separate processes.

    ``on_started(procs, supernodes)`` is called once the SuperNodes run (tests use it to stop one mid-run).
    """
    settings, root, app = _prepared(settings, workdir)
    with superlink(root, simulation=False) as (procs, port):
        supernodes = []
        for k in range(settings.num_clients):
            extra = (node_configs or [{}] * settings.num_clients)[k]
            node_config = " ".join(f"{key}={toml_value(v)}" for key, v in
                                   {"partition-id": k, "num-partitions": settings.num_clients, **extra}.items())
            supernodes.append(procs.start(f"supernode-{k}", "flower-supernode", "--insecure", "--superlink",
                                          f"127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(free_port()),
                                          "--node-config", node_config))
        if on_started is not None:
            on_started(procs, supernodes)
        return submit(procs, app, settings, timeout, on_round=on_round)
