"""Where a run's units are computed: in this process, or as a Ray Data pipeline.

A run is a list of units (trajectories, items, tokens) whose tables land as parts in the
run folder (`results.run_folder`). `execute` takes the groups of units still to do and a
`UnitJob` (what to compute for a group of units: built on the driver, picklable, the
model travelling as its load recipe) and either runs the groups here on the model already
loaded, or as a Ray Data pipeline: the groups are a dataset (one block each),
`map_batches` hands one group at a time to a fixed pool of stateful actors
(`compute=ray.data.ActorPoolStrategy(size=workers)`, `num_gpus` per actor), each loading
the model once; an actor returns its units' tables and the driver writes them as the very
parts the single-process path writes, in the same folder. So a run started in one process
can be finished on Ray and the other way round, and the merged tables are the same row for
row. An actor killed mid-group is restarted by Ray (Ray Data's actors retry without
limit) and the group recomputed; parts are written only by the driver, each whole
(temporary file + rename) and once per unit, so nothing is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow as pa

from routelens.errors import RouteLensError, SettingError

INSTALL_HINT = "pip install 'routelens[ray]' (or: pip install 'ray[data]==2.60.*')"


@dataclass(frozen=True)
class RaySettings:
    """`address`: "local" (start a Ray instance on this machine), "auto" (join the cluster
    this machine belongs to) or a cluster address (ray://host:10001, host:6379);
    `workers` actors, each with `cpus_per_worker` CPUs and `gpus_per_worker` GPUs (None:
    1 when the model runs on CUDA, else 0; above 1 spread the model with --device-map)."""

    address: str = "local"
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None

    def __post_init__(self):
        if not isinstance(self.address, str) or not self.address.strip():
            raise SettingError("`ray` takes local, auto or a cluster address (host:port or ray://host:port)", "ray")
        if self.address not in PLACES:
            cluster_endpoint(self.address)   # host:port or ray://host:port, else one line
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise SettingError(f"`workers` must be a positive integer, got {self.workers!r}", "workers")
        if not _finite(self.cpus_per_worker) or self.cpus_per_worker <= 0:
            raise SettingError(f"`cpus_per_worker` must be positive, got {self.cpus_per_worker!r}", "cpus_per_worker")
        if self.gpus_per_worker is not None and (not _finite(self.gpus_per_worker) or self.gpus_per_worker < 0):
            raise SettingError(f"`gpus_per_worker` must be 0 or more, got {self.gpus_per_worker!r}", "gpus_per_worker")

    def gpus(self, device: str) -> float:
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if device.startswith("cuda") or device == "device_map" else 0.0

    def to_dict(self, device: str) -> dict:
        return {**asdict(self), "gpus_per_worker": self.gpus(device)}


def ray_settings(ray: str | RaySettings | None, workers: int | None = None) -> RaySettings | None:
    """The API's `ray=` / `workers=` arguments as settings (None: this process), checked, and
    Ray Data importable (else one line saying how to install it)."""
    if ray is None:
        if workers is not None:
            raise SettingError("`workers` needs `ray` (local, auto or a cluster address)", "workers", "ray")
        return None
    settings = ray if isinstance(ray, RaySettings) else RaySettings(address=ray, **({"workers": workers} if workers else {}))
    require_ray()
    import ray as ray_module

    if not ray_module.is_initialized():   # (a Ray already joined is used as it is)
        if settings.address == "local":
            check_local_resources(settings)
        else:
            check_cluster_reachable(settings.address)
    return settings


PLACES = ("local", "auto")
ADDRESS_FORMS = "local, auto or a cluster address (host:port, e.g. 10.0.0.5:6379, or ray://host:10001)"
CONNECT_TIMEOUT_S = 3.0   # joining a cluster that does not answer fails within seconds, not Ray's minute of retries


def _finite(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cluster_endpoint(address: str) -> tuple[str, int]:
    """(host, port) of a cluster address host:port or ray://host:port; anything else is refused."""
    rest = address.strip()[len("ray://"):] if address.strip().startswith("ray://") else address.strip()
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")   # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise SettingError(f"`ray` {address!r} is not {ADDRESS_FORMS}", "ray")
    return host, int(port)


def check_local_resources(settings: RaySettings) -> None:
    """A local Ray gets this machine's CPUs and GPUs: an actor that asks for more would wait
    for them forever, so such settings are refused before Ray starts."""
    cpus = os.cpu_count() or 1
    if settings.cpus_per_worker > cpus:
        raise SettingError(f"`cpus_per_worker` {settings.cpus_per_worker:g} is more CPUs than this machine has ({cpus}); "
                           f"give `cpus_per_worker` {cpus} or less, or join a larger cluster with `ray` ADDRESS",
                           "cpus_per_worker", "ray")
    if settings.gpus_per_worker:
        import torch

        gpus = torch.cuda.device_count()
        wanted = settings.gpus_per_worker * settings.workers
        if wanted > gpus:
            raise SettingError(
                f"`gpus_per_worker` {settings.gpus_per_worker:g} for {settings.workers} worker(s) needs {wanted:g} GPU(s), "
                f"but this machine has {gpus or 'none'} (torch sees {gpus} CUDA device(s)); "
                + ("drop `gpus_per_worker` (CPU actors) or join a GPU cluster with `ray` ADDRESS" if not gpus else
                   "lower `gpus_per_worker` or `workers`"), "gpus_per_worker", "workers", "ray")


@contextlib.contextmanager
def _quiet_stderr():
    """Ray's core writes its connection retries straight to file descriptor 2: kept aside
    while it tries, and shown only if it succeeds (its failure is said in one line)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                kept.seek(0)
                sys.stderr.write(kept.read().decode(errors="replace"))


def check_cluster_reachable(address: str) -> None:
    """A cluster address answers: its host resolves and takes a connection within
    CONNECT_TIMEOUT_S, and (host:port) a Ray GCS answers there; else one line, at once."""
    import socket

    if address == "auto":   # the cluster this machine belongs to (RAY_ADDRESS, or the one `ray start` began)
        try:
            from ray._private.services import get_ray_address_from_environment
        except ImportError:   # another Ray layout: ray.init finds it or says why not
            return
        try:
            found = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise SettingError("`ray` auto joins the Ray cluster this machine belongs to, but none runs here (no "
                               "RAY_ADDRESS, no `ray start`); start one (`ray start --head`), give its address, or "
                               "pass `ray` local", "ray") from None
        if not found or found == "auto":
            return
        address = found
    host, port = cluster_endpoint(address)
    client = address.strip().startswith("ray://")
    if client:
        from ray._private.utils import get_ray_client_dependency_error  # Ray Client's own check

        if get_ray_client_dependency_error() is not None:
            raise SettingError(f"`ray` {address} is a Ray Client address, which needs Ray Client: pip install "
                               "'ray[client]' (or give the cluster's host:port, e.g. host:6379)", "ray")
    advice = "start it (`ray start --head`), check the address, or pass `ray` local"
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror:
        raise SettingError(f"cannot join the Ray cluster at `ray` {address}: no host {host!r} is known here; "
                           f"{advice}", "ray") from None
    except TimeoutError:
        raise SettingError(f"cannot join the Ray cluster at `ray` {address}: nothing answered at {host}:{port} within "
                           f"{CONNECT_TIMEOUT_S:g} s; {advice}", "ray") from None
    except OSError as error:
        raise SettingError(f"cannot join the Ray cluster at `ray` {address}: {host}:{port} refused the connection "
                           f"({error.strerror or error}); {advice}", "ray") from None
    if client:   # the Ray Client protocol is checked by ray.init itself
        return
    try:
        from ray._raylet import GcsClient
    except ImportError:   # another Ray layout: ray.init says what is wrong
        return
    try:
        with _quiet_stderr():
            GcsClient(address=f"{host}:{port}")
    except Exception as error:  # noqa: BLE001 - whatever answered there is not a Ray cluster
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SettingError(f"cannot join the Ray cluster at `ray` {address}: something answers at {host}:{port} but "
                           f"not a Ray cluster ({first}); {advice}", "ray") from None


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise SettingError(f"`ray` needs Ray Data, which is not installed here: {INSTALL_HINT}", "ray") from None


def _without_grad(method):
    import functools

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)

    return wrapped


class UnitJob:
    """What a run computes for a group of units. Built on the driver and pickled to each
    Ray actor (so it holds the model's load recipe and the inputs, never the model);
    `setup` runs once per process, on the loaded model (None: load it from the recipe)."""

    recipe: dict | None = None

    def __init_subclass__(cls, **kwargs):
        """Every job's `setup` and `run` make no autograd graph, here and on a Ray actor: a
        parameter that requires grad (as every parameter a checkpoint loads does) would
        otherwise give scores that carry one (issue 32). Training (router-update) asks for
        gradients explicitly (`torch.enable_grad`)."""
        super().__init_subclass__(**kwargs)
        for name in ("setup", "run"):
            if name in cls.__dict__:
                setattr(cls, name, _without_grad(cls.__dict__[name]))

    def setup(self, loaded=None) -> None:
        raise NotImplementedError

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        """The tables of each unit of the group, in the group's order."""
        raise NotImplementedError

    def checks(self) -> dict:
        """The run-time checks seen so far in this process (JSON-able; merged over actors)."""
        return {}

    def load(self, loaded):
        """The model: the one given (this process) or loaded from the recipe (an actor)."""
        if loaded is not None:
            return loaded
        from routelens.models.loading import load_model

        recipe = dict(self.recipe)
        if recipe.get("device", "").startswith("cuda:"):   # Ray gives each actor its own GPUs, numbered from 0
            recipe["device"] = "cuda"
        return load_model(**recipe)

    def __getstate__(self):
        # only the inputs travel; what setup built (model, engine) stays in its process
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


SPREADING = ("auto", "balanced", "sequential")   # device maps an actor can apply to the GPUs Ray gives it


def check_device_map(device_map, settings: RaySettings | str | None) -> None:
    """A device map on Ray: each actor loads the model on the GPUs Ray gives it, numbered
    from 0, so a map cannot name devices; an actor spreads its model over several GPUs with a
    named strategy and `gpus_per_worker` above 1. Anything else names what to drop."""
    if settings is None or device_map is None:
        return
    if isinstance(device_map, str) and device_map in SPREADING and (getattr(settings, "gpus_per_worker", None) or 0) > 1:
        return
    raise SettingError("`device_map` and `ray` together: Ray gives each actor its own GPUs, where the actor loads "
                       "the whole model; drop `device_map` (each actor holds the model), or drop `ray` (this process "
                       "spreads the model), or spread each actor's model over several GPUs with `device_map` auto "
                       "and `gpus_per_worker` 2 or more", "device_map", "ray", "gpus_per_worker")


def check_ray_can_load(loaded, ray: RaySettings | str | None) -> None:
    """Ray actors load the model themselves, from how this process loaded it; a model loaded
    without weights serves only that (both checked before a run folder is made)."""
    check_device_map((getattr(loaded, "recipe", None) or {}).get("device_map"), ray)
    if ray is None and not getattr(loaded, "weights", True):
        raise RouteLensError(f"model {loaded.spec!r} was loaded without weights (weights=False), which only a Ray "
                             "run can use (its actors load them); load it with weights, or pass ray=")
    if ray is not None and getattr(loaded, "recipe", None) is None:
        raise RouteLensError(f"model {loaded.spec!r} was given as an object (routelens.wrap); Ray workers load the "
                             "model themselves: load it with routelens.load(...) (a folder, hub id, tiny: or demo)")


# counts over the run: each process's add up (every other number is a largest deviation)
SUMMED_CHECKS = ("standard_route_flagged_tokens", "standard_route_checked_tokens", "natural_route_flagged_tokens",
                 "natural_route_checked_tokens", "fallback_seconds", "fallback_tokens", "gating_rule_checked_rows",
                 "block_algebra_checked_rows")


def merge_checks(seen: list[dict]) -> dict:
    """One run's checks from each process's: counts (`SUMMED_CHECKS`) summed, other numbers
    (largest deviations) by their maximum, mappings (layers the cache engine scored, a
    tolerance) merged, anything else the first one set."""
    merged: dict = {}
    for checks in seen:
        for key, value in checks.items():
            if key in SUMMED_CHECKS and merged.get(key) is not None:
                merged[key] = merged[key] + value
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and merged.get(key) is not None:
                merged[key] = max(merged[key], value)
            elif isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            elif merged.get(key) is None:
                merged[key] = value
    return merged


def execute(folder, job: UnitJob, groups: list[list[int]], advance: Callable[[dict[str, pa.Table]], None],
            loaded, ray: RaySettings | None) -> dict:
    """Compute `groups` of units into `folder`, here (on `loaded`) or on Ray; call `advance`
    with each unit's tables as it lands; return the merged run-time checks."""
    folder.state["execution"] = ({"ray": None} if ray is None else
                                 {"ray": ray.to_dict(loaded.device), "ray_version": _ray_version()})
    if folder.state.get("sessions"):
        folder.state["sessions"][-1]["execution"] = folder.state["execution"]
    seen: list[dict] = []
    written: set[int] = set()
    for units, tables in _computed(job, groups, loaded, ray, seen):
        for unit, unit_tables in zip(units, tables):
            if unit in written:   # a group Ray re-ran after its result came back: already in the folder
                continue
            folder.write_unit(unit, unit_tables)
            written.add(unit)
            advance(unit_tables)
    return merge_checks(seen)


def _computed(job: UnitJob, groups: list[list[int]], loaded, ray: RaySettings | None, seen: list[dict]):
    """(units, their tables) of each group as it completes, here or on Ray; each process's
    checks are appended to `seen`."""
    if ray is None:
        job.setup(loaded)
        for group in groups:
            yield group, job.run(group)
        seen.append(job.checks())
        return
    check_ray_can_load(loaded, ray)
    job.recipe = loaded.recipe
    for units, tables, checks in _ray_results(job, groups, ray, loaded.device):
        seen.append(checks)
        yield units, tables


def _ray_version() -> str | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


class _GroupScorer:
    """The stateful `map_batches` class: one per actor, the model loaded once."""

    def __init__(self, job: UnitJob):
        from routelens.allocator import keep_freed_memory

        keep_freed_memory()   # as the driver's command did
        job.setup(None)
        self.job = job

    def __call__(self, batch: pa.Table) -> dict:
        units = [int(u) for u in batch.column("units")[0].as_py()]
        tables = self.job.run(units)
        return {"units": [units], "tables": [pickle.dumps(tables)], "checks": [json.dumps(self.job.checks())]}


def _ray_results(job: UnitJob, groups: list[list[int]], settings: RaySettings, device: str):
    """(units, their tables, the actor's checks) of each group as it completes."""
    require_ray()
    import ray
    import ray.data

    started_here = _connect(settings)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False      # routelens's own bar counts the units
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if not groups:
            return
        dataset = ray.data.from_items([{"units": group} for group in groups], override_num_blocks=len(groups))
        scored = dataset.map_batches(
            _GroupScorer, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=settings.workers),
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus(device))
        try:
            for row in scored.iter_rows():
                yield [int(u) for u in row["units"]], pickle.loads(row["tables"]), json.loads(row["checks"])
        except Exception as error:
            raise _user_error(error) from None
    finally:
        if started_here:
            ray.shutdown()


LOCAL_OBJECT_STORE_BYTES = 1 << 30


def _connect(settings: RaySettings) -> bool:
    """Start or join Ray as the settings say; True when this call started it (and ends it)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, configure_logging=False, log_to_driver=True)
    if settings.address == "local":
        cpus = max(os.cpu_count() or 1, int(settings.workers * settings.cpus_per_worker + 0.999))
        # only unit ids and result tables pass through the object store (actors load the
        # weights themselves): a bounded store, not Ray's default of 30% of the memory.
        # Ray runs its workers at nice 15; here the actors do all the work while the driver
        # waits, so any other busy process would starve them (measured: actors at 3% of a
        # core beside two CPU-bound loops): they run at the driver's priority instead.
        ray.init(num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 _system_config={"worker_niceness": 0}, **quiet)
    else:
        try:
            with _quiet_stderr():   # its retries are one line below, not a screenful
                ray.init(address=settings.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SettingError(f"cannot join the Ray cluster at `ray` {settings.address}: {first}; start it "
                               "(`ray start --head`) or pass `ray` local", "ray") from None
    return True


def _user_error(error: Exception) -> Exception:
    """The routelens error an actor raised (a bad input, a failed run-time check), unwrapped
    from Ray's exception chain; anything else as it came."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RouteLensError):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return error
