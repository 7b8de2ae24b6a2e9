"""Before a search writes anything or starts a trial: can it ever run, and is it the only driver?

* :func:`check_address` -- ``--address`` (or ``$RAY_ADDRESS``) must answer as a Ray cluster within
  a few seconds. Ray's own connection loop retries for minutes (forever for a port that accepts
  but is not Ray's), so the address is probed first with one bounded gRPC handshake.
* :func:`check_resources` -- one trial's ``--cpus-per-trial`` and ``--gpus-per-trial`` must fit
  on one node: this machine for a private local Ray (checked before Ray starts), else the nodes
  of the cluster joined (or the node types its autoscaler may add). A trial that fits nowhere
  would stay PENDING forever without a word.
* :func:`claim_experiment` -- one experiment, one driver: the folder is claimed with an
  exclusive lock (``.driver.lock``) held for the driver's life, so a second driver on the same
  ``--name`` (a new search or a ``--resume``) is refused in one line, even when both start at
  the same instant. The kernel releases the lock when the driver dies, even by SIGKILL, so a
  crashed driver never blocks its ``--resume``. ``flock`` works across the nodes of an NFS
  mount (Linux emulates it with NFS byte-range locks); on a filesystem without locks the claim
  falls back to an exclusive create of the lock file holding the driver's host and pid.

Every refusal is a :class:`~mura_tune.errors.ConfigError` or
:class:`~mura_tune.errors.ExperimentError` naming the flag, what was asked and what exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.layout import ExperimentDir

#: Seconds an address has to answer (TCP and the HTTP/2 handshake of Ray's GCS).
ADDRESS_TIMEOUT_S = 5.0
#: The Ray cluster launcher writes this file on the head node of an autoscaling cluster (Ray
#: Tune looks for the same file to tell an autoscaling cluster apart).
AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")


# --- address -----------------------------------------------------------------------------------
def check_address(address: str | None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse an ``--address`` (or ``$RAY_ADDRESS``) that does not answer as a Ray cluster in time.

    ``None`` without ``$RAY_ADDRESS`` means a private local Ray: nothing to probe.

    Raises:
        ConfigError: no running cluster for ``auto``, a malformed address, or nothing answering
            the Ray protocol at it within ``timeout`` seconds.
    """
    flag, asked = (
        ("--address", address) if address else ("$RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    )
    if not asked or asked == "local":
        return
    from ray._private.services import canonicalize_bootstrap_address

    target = asked.removeprefix("ray://")
    try:
        resolved = canonicalize_bootstrap_address(target if target != "auto" else None)
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(f"{flag} {asked}: {_first_line(exc)}") from None
    if resolved is None:  # "auto" found no running cluster on this machine
        raise ConfigError(
            f"{flag} {asked}: no running Ray cluster found on this machine "
            "(start one with `ray start --head`, or pass HOST:PORT)"
        )
    host, _, port = resolved.rpartition(":")
    problem = _probe(host, int(port), timeout)
    if problem:
        where = asked if asked == resolved else f"{asked} ({resolved})"
        raise ConfigError(
            f"{flag} {where}: {problem}; is `ray start --head` running there, and is the port open?"
        )


def _probe(host: str, port: int, timeout: float) -> str | None:
    """Why ``host:port`` is not a Ray GCS that answers within ``timeout`` s (None: it answers)."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"nothing answers within {timeout:g} s ({reason})"
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        left = max(0.5, timeout - (time.monotonic() - started))
        grpc.channel_ready_future(channel).result(timeout=left)
    except grpc.FutureTimeoutError:
        return f"the port accepts connections but does not answer as a Ray cluster within {timeout:g} s"
    finally:
        channel.close()
    return None


# --- resources ---------------------------------------------------------------------------------
def check_resources(cpus: float, gpus: float, nodes: list[dict] | None = None) -> None:
    """Refuse per-trial resources that no node can ever provide.

    Args:
        cpus: ``--cpus-per-trial``.
        gpus: ``--gpus-per-trial`` (a fraction needs a node with at least one GPU).
        nodes: the ``Resources`` of every alive node (``ray.nodes()``); None: this machine, as a
            private local Ray would see it (checked before Ray starts).

    Raises:
        ConfigError: naming the flag, what one trial asks and what the largest node has.
    """
    where = "this machine has" if nodes is None else "the largest node of the Ray cluster has"
    if nodes is None:
        nodes = [_this_machine()]
    elif not nodes:
        raise ConfigError("the Ray cluster has no alive node to run trials on")
    if any(_fits(cpus, gpus, node) for node in nodes):
        return
    extra = _autoscaler_node_types()
    if extra is None or any(_fits(cpus, gpus, node) for node in extra):
        return  # an autoscaler may add a node that fits (or its node types are not known)
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= gpus]
    if not gpu_nodes:
        flag, asked, noun, have = (
            "--gpus-per-trial",
            gpus,
            "GPU",
            max(n.get("GPU", 0) for n in nodes),
        )
    else:
        flag, asked, noun, have = (
            "--cpus-per-trial",
            cpus,
            "CPU",
            max(n.get("CPU", 0) for n in gpu_nodes),
        )
        if gpus:
            where = where.replace("largest node", f"largest node with {gpus:g} GPU(s)")
    hint = " (pass --gpus-per-trial 0 to train on CPUs)" if noun == "GPU" and have == 0 else ""
    raise ConfigError(
        f"{flag} {asked:g}: no trial could ever start: one trial asks for {asked:g} {noun}(s) "
        f"and {where} {have:g}{hint}"
    )


def _fits(cpus: float, gpus: float, node: dict) -> bool:
    return node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus


def _this_machine() -> dict:
    """What a private local Ray started here would offer (Ray's own CPU count: cgroup-aware)."""
    import torch
    from ray._private.utils import get_num_cpus

    return {"CPU": float(get_num_cpus()), "GPU": float(torch.cuda.device_count())}


def _autoscaler_node_types() -> list[dict] | None:
    """The resources of each node type an autoscaling cluster may start ([]: not an autoscaling
    cluster; None: it is one, but its node types do not say their resources)."""
    path = AUTOSCALER_CONFIG.expanduser()
    if not path.is_file():
        return []
    try:
        config = yaml.safe_load(path.read_text()) or {}
        types = [t.get("resources") or {} for t in config["available_node_types"].values()]
    except (OSError, yaml.YAMLError, KeyError, AttributeError, TypeError):
        return None
    return None if any(not t for t in types) else types


def cluster_nodes() -> list[dict]:
    """``Resources`` of every alive node of the Ray cluster this process is connected to."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


# --- the experiment folder ---------------------------------------------------------------------
@contextlib.contextmanager
def claim_experiment(exp: ExperimentDir, name: str) -> Iterator[None]:
    """Hold the experiment folder for this driver until the block ends.

    Raises:
        ExperimentError: another driver holds it (its host, pid and start time are named).
    """
    exp.path.mkdir(parents=True, exist_ok=True)
    lock = exp.lock
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ExperimentError(_held_message(lock, name)) from None
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.close(fd)
            fd = -1
            with _exclusive_create(lock, name):
                yield
            return
        os.ftruncate(fd, 0)
        os.write(fd, _holder().encode())
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock; the file stays (removing it would race a new claim)


@contextlib.contextmanager
def _exclusive_create(lock: Path, name: str) -> Iterator[None]:
    """The claim on a filesystem without locks: the lock file itself, created exclusively."""
    claim = lock.with_name(lock.name + ".claim")
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        holder = _read_holder(claim)
        if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            claim.unlink(missing_ok=True)  # left by a driver of this machine that died
            with _exclusive_create(lock, name):
                yield
            return
        raise ExperimentError(
            _held_message(claim, name) + f" (if that driver is gone, delete {claim})"
        ) from None
    try:
        os.write(fd, _holder().encode())
        os.close(fd)
        yield
    finally:
        claim.unlink(missing_ok=True)


def _holder() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})


def _read_holder(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _held_message(path: Path, name: str) -> str:
    holder = _read_holder(path)
    who = ""
    if holder:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        who = f" (pid {holder.get('pid')} on {holder.get('host')}, since {since})"
    return (
        f"experiment {name!r} is being run by another driver{who}; wait for it to end, "
        f"or choose another --name"
    )


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
