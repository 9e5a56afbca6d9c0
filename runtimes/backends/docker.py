"""The `docker` backend: each engine instance is a container on one of the GPU hosts.

The backend holds one Docker client per host of the inventory (`runtimes.inventory`). A container
carries everything needed to find it again in its labels (instance, model, engine, catalog
fingerprint, GPUs, host, start time), so a restarted orchestrator lists and adopts the containers
it started, and only those: every query filters on `llm-gateway.managed-by` and on
`llm-gateway.orchestrator=<ORCHESTRATOR_ID>`, so two orchestrators sharing a Docker engine never
see each other's engines. A handle is `<host name>/<container id>`.

Containers get no restart policy (the control plane decides about restarts) and are not removed
when they exit, so the exit code and the logs stay readable until `stop()` removes them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.tls import TLSConfig
from docker.types import DeviceRequest

from runtimes.backends.base import Backend, BackendError, Observed, Started
from runtimes.catalog import ModelSpec
from runtimes.engines import Engine
from runtimes.inventory import GpuHost, load_inventory
from runtimes.storage import snapshot_complete

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

MANAGED_BY = "llm-gateway-orchestrator"
LABEL_MANAGED_BY = "llm-gateway.managed-by"
LABEL_ORCHESTRATOR = "llm-gateway.orchestrator"
LABEL_INSTANCE = "llm-gateway.instance"
LABEL_MODEL = "llm-gateway.model"
LABEL_ENGINE = "llm-gateway.engine"
LABEL_FINGERPRINT = "llm-gateway.fingerprint"
LABEL_GPUS = "llm-gateway.gpus"
LABEL_GPU_HOST = "llm-gateway.gpu-host"
LABEL_PORT = "llm-gateway.port"
LABEL_STARTED_AT = "llm-gateway.started-at"

# Every engine listens on this port inside its container; Docker publishes it on a free host port.
CONTAINER_PORT = 8000
# Where the Hugging Face cache is mounted in engine containers (the images' default HF_HOME).
HF_MOUNT = "/root/.cache/huggingface"
DEFAULT_IMAGES = {
    "vllm": "vllm/vllm-openai:latest",
    "sglang": "lmsysorg/sglang:latest",
    "sim": "llm-gateway-sim:latest",
}
CONTAINER_PREFIX = "llm-gw-"


def hf_snapshot_cached(hf_home: Path, repo_id: str, revision: str | None = None) -> bool:
    """True when the cache at `hf_home` holds a complete snapshot of `repo_id` (the same test
    the downloader uses), so the engine can start with HF_HUB_OFFLINE=1 and ask the Hub
    nothing: faster, and it works with the Hub unreachable."""
    return snapshot_complete(hf_home, repo_id, revision)


def uses_no_gpu(spec: ModelSpec, engine: Engine) -> bool:
    """True for engines that never touch a GPU: the sim, and vLLM's CPU build (the catalog
    entry says VLLM_TARGET_DEVICE=cpu, as config/models.cpu.json does)."""
    return engine.name == "sim" or dict(spec.env).get("VLLM_TARGET_DEVICE") == "cpu"


class DockerBackend(Backend):
    name = "docker"

    def __init__(
        self,
        hosts: list[GpuHost],
        *,
        orchestrator_id: str = "default",
        network: str | None = None,
        shm_size: str | None = None,
        hf_home: Path | None = None,
        hf_home_host: Path | None = None,
        hf_token: str | None = None,
        images: dict[str, str] | None = None,
        api_timeout: float = 60.0,
    ):
        if not hosts:
            raise BackendError("the docker backend needs at least one host")
        self.hosts = {host.name: host for host in hosts}
        self.orchestrator_id = orchestrator_id
        self.network = network
        self.shm_size = shm_size
        # hf_home is the cache as this process sees it (to look for snapshots); hf_home_host is
        # the same cache as a path on the Docker hosts (to mount). They differ when the
        # orchestrator runs in a container itself.
        self.hf_home = Path(hf_home) if hf_home is not None else None
        self.hf_home_host = hf_home_host or (self.hf_home.absolute() if self.hf_home else None)
        self.hf_token = hf_token
        self.images = {**DEFAULT_IMAGES, **(images or {})}
        self.api_timeout = api_timeout
        self._clients: dict[str, docker.DockerClient] = {}
        self._clients_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerBackend:
        images = {}
        if settings.runtime_image:
            # RUNTIME_IMAGE is the image of the default engine (RUNTIME_TYPE); a catalog entry that
            # names another engine keeps that engine's image.
            images[settings.runtime_type] = settings.runtime_image
        return cls(
            load_inventory(settings),
            orchestrator_id=settings.orchestrator_id,
            network=settings.runtime_docker_network,
            shm_size=settings.runtime_shm_size,
            hf_home=settings.hf_home,
            hf_home_host=settings.hf_home_host,
            hf_token=settings.hf_token,
            images=images,
        )

    # -- Docker clients ------------------------------------------------------------------

    def _host(self, name: str) -> GpuHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise BackendError(
                f"unknown GPU host {name!r}; known: {', '.join(self.hosts)}"
            ) from None

    def client(self, host_name: str) -> docker.DockerClient:
        """The Docker client of a host, made on first use (a host that is down fails its calls,
        not the construction of the backend)."""
        with self._clients_lock:
            client = self._clients.get(host_name)
        if client is not None:
            return client
        host = self._host(host_name)
        # Made outside the lock: connecting to a host that is down must not hold up the others.
        with self._api(host, "connect"):
            client = docker.DockerClient(
                base_url=host.url,
                # "auto" asks the engine its API version, so old and new engines both work.
                version="auto",
                timeout=self.api_timeout,
                tls=self._tls(host),
                use_ssh_client=host.url.startswith("ssh://"),
            )
        with self._clients_lock:
            kept = self._clients.setdefault(host_name, client)
        if kept is not client:
            client.close()  # another thread connected first
        return kept

    @staticmethod
    def _tls(host: GpuHost) -> TLSConfig | bool:
        if host.tls is None:
            return False
        client_cert = (host.tls.cert, host.tls.key) if host.tls.cert else None
        return TLSConfig(client_cert=client_cert, ca_cert=host.tls.ca,
                         verify=host.tls.ca or True)

    @contextlib.contextmanager
    def _api(self, host: GpuHost, doing: str) -> Iterator[None]:
        """Turn what the Docker SDK raises into a BackendError that says where and what."""
        try:
            yield
        except docker.errors.APIError as exc:
            raise BackendError(
                f"Docker on host {host.name}: cannot {doing}: {exc.explanation or exc}"
            ) from exc
        except docker.errors.TLSParameterError as exc:
            raise BackendError(f"Docker on host {host.name}: bad TLS settings: {exc}") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BackendError(
                f"Docker on host {host.name} ({host.url}) is not reachable (trying to {doing}): "
                f"{exc}"
            ) from exc

    # -- starting ------------------------------------------------------------------------

    def image_for(self, spec: ModelSpec) -> str:
        return spec.image or self.images[spec.engine]

    def _image_hint(self, image: str) -> str:
        if image == self.images.get("sim") or image == DEFAULT_IMAGES["sim"]:
            return "build it with make sim-image"
        return f"pull it on that host: docker pull {image}"

    def _labels(
        self, instance_id: str, spec: ModelSpec, engine: Engine, gpus: tuple[int, ...],
        host: GpuHost,
    ) -> dict[str, str]:
        return {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_ORCHESTRATOR: self.orchestrator_id,
            LABEL_INSTANCE: instance_id,
            LABEL_MODEL: spec.id,
            LABEL_ENGINE: engine.name,
            LABEL_FINGERPRINT: spec.fingerprint,
            LABEL_GPUS: ",".join(str(g) for g in gpus),
            LABEL_GPU_HOST: host.name,
            LABEL_PORT: str(CONTAINER_PORT),
            LABEL_STARTED_AT: f"{time.time():.3f}",
        }

    def _environment(self, spec: ModelSpec, launch_env: dict[str, str]) -> dict[str, str]:
        # The snapshot is looked for in the cache as this process sees it; with several hosts
        # that is right when they share one cache (NFS), as the mount of HF_HOME_HOST assumes.
        env = {"HF_HOME": HF_MOUNT}
        if self.hf_token:
            env["HF_TOKEN"] = self.hf_token
        if self.hf_home is not None and hf_snapshot_cached(self.hf_home, spec.repo_id,
                                                           spec.revision):
            env["HF_HUB_OFFLINE"] = "1"
        # The catalog entry's own env is the operator's explicit choice, so it wins.
        return {**env, **launch_env}

    def create(
        self, instance_id: str, spec: ModelSpec, engine: Engine, gpus: tuple[int, ...] = (),
        gpu_host: str = "local", memory_fraction: float | None = None,
    ) -> Container:
        """Create (not start) the container of one engine instance."""
        host = self._host(gpu_host)
        client = self.client(host.name)
        launch = engine.launch(spec, host="0.0.0.0", port=CONTAINER_PORT, in_container=True,
                               memory_fraction=memory_fraction)
        image = self.image_for(spec)
        kwargs: dict = {
            "image": image,
            "command": list(launch.argv),
            "name": f"{CONTAINER_PREFIX}{instance_id}",
            "environment": self._environment(spec, launch.env),
            "labels": self._labels(instance_id, spec, engine, tuple(gpus), host),
            "detach": True,
        }
        if self.hf_home_host is not None:
            kwargs["volumes"] = {str(self.hf_home_host): {"bind": HF_MOUNT, "mode": "rw"}}
        if self.shm_size:
            kwargs["shm_size"] = self.shm_size
        else:
            # vLLM and NCCL exchange tensors through /dev/shm; Docker's default 64 MB is too
            # small, and sharing the host's IPC namespace is what their docs recommend.
            kwargs["ipc_mode"] = "host"
        if gpus and uses_no_gpu(spec, engine):
            # The sim engine and CPU builds use no GPU: they are told their GPUs (so placement
            # is exercised end to end) without asking Docker for devices a GPU-less test
            # machine lacks.
            kwargs["environment"] = {**kwargs.get("environment", {}),
                                     "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}
        elif gpus:
            kwargs["device_requests"] = [
                DeviceRequest(device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])
            ]
        elif not uses_no_gpu(spec, engine) and spec.gpus > 0:
            # GPUs unmanaged (GPUS unset and no nvidia-smi here, as in a compose container):
            # the engine gets every GPU of the host, as an engine process would see them.
            kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if self.network:
            kwargs["network"] = self.network
        else:
            # HostPort "" lets Docker pick a free port; start() reads it back.
            kwargs["ports"] = {f"{CONTAINER_PORT}/tcp": (host.bind_address, None)}
        try:
            with self._api(host, f"create the container of {instance_id} from {image}"):
                return client.containers.create(**kwargs)
        except BackendError as exc:
            if isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise BackendError(
                    f"image {image} not found on host {host.name}: {self._image_hint(image)}"
                ) from None
            raise

    def start(
        self, instance_id: str, spec: ModelSpec, engine: Engine, gpus: tuple[int, ...],
        gpu_host: str = "local", memory_fraction: float | None = None,
    ) -> Started:
        host = self._host(gpu_host)
        container = self.create(instance_id, spec, engine, gpus, gpu_host, memory_fraction)
        try:
            with self._api(host, f"start the container of {instance_id}"):
                container.start()
                container.reload()
        except BackendError:
            # A container that never ran (no such GPU, bad mount) is of no use to anyone.
            self._remove_quietly(host, container)
            raise
        address, port = self._endpoint(host, container)
        log.info("started %s for %s as container %s on host %s (%s:%d)", instance_id, spec.id,
                 container.short_id, host.name, address, port)
        # Port 0 means the engine already exited: the control plane sees that in list() and
        # records its exit code and logs.
        return Started(handle=f"{host.name}/{container.id}", host=address, port=port)

    def _endpoint(self, host: GpuHost, container: Container) -> tuple[str, int]:
        """Where the web app reaches the engine: a published port on the host's address, or the
        container's name and its own port on the shared Docker network."""
        key = f"{CONTAINER_PORT}/tcp"
        bindings = container.attrs.get("HostConfig", {}).get("PortBindings") or {}
        if key not in bindings:
            return container.name, int(container.labels.get(LABEL_PORT, CONTAINER_PORT))
        published = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(key)
        if not published:
            return host.address, 0  # not running: nothing is published
        return host.address, int(published[0]["HostPort"])

    # -- finding containers --------------------------------------------------------------

    def _our_filters(self, **labels: str) -> dict:
        wanted = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_ORCHESTRATOR: self.orchestrator_id,
                  **labels}
        return {"label": [f"{key}={value}" for key, value in wanted.items()]}

    def _is_ours(self, container: Container) -> bool:
        labels = container.labels
        return (labels.get(LABEL_MANAGED_BY) == MANAGED_BY
                and labels.get(LABEL_ORCHESTRATOR) == self.orchestrator_id)

    def _find(self, handle: str) -> tuple[GpuHost, Container] | None:
        """The container of a handle, or None when it is gone.

        A handle is `<host>/<container id>`; a bare instance id (what the registry holds for an
        instance whose start never returned a handle) is looked up by label on every host.
        """
        if "/" in handle:
            host_name, container_id = handle.split("/", 1)
            host = self._host(host_name)
            client = self.client(host.name)
            try:
                with self._api(host, f"inspect container {container_id}"):
                    container = client.containers.get(container_id)
            except BackendError as exc:
                if isinstance(exc.__cause__, docker.errors.NotFound):
                    return None
                raise
            if not self._is_ours(container):
                raise BackendError(
                    f"container {container.name} on host {host.name} is not managed by "
                    f"orchestrator {self.orchestrator_id!r}; leaving it alone"
                )
            return host, container
        for host in self.hosts.values():
            client = self.client(host.name)
            with self._api(host, f"look up instance {handle}"):
                found = client.containers.list(
                    all=True, filters=self._our_filters(**{LABEL_INSTANCE: handle}),
                    ignore_removed=True,
                )
            if found:
                return host, found[0]
        return None

    def list(self) -> list[Observed]:
        """Every container of this orchestrator on every host, exited ones included.

        A host that cannot be listed raises BackendError rather than being skipped: an instance
        missing from the answer would be taken for gone and its record forgotten.
        """
        observed = []
        for host in self.hosts.values():
            client = self.client(host.name)
            with self._api(host, "list containers"):
                containers = client.containers.list(
                    all=True, filters=self._our_filters(), ignore_removed=True
                )
            for container in containers:
                inst = self._observed(host, container)
                if inst is not None:
                    observed.append(inst)
        return observed

    def _observed(self, host: GpuHost, container: Container) -> Observed | None:
        labels = container.labels
        instance_id = labels.get(LABEL_INSTANCE)
        if not instance_id:
            return None
        running = container.status == "running"
        state = container.attrs.get("State", {})
        exit_code = None
        if container.status in ("exited", "dead"):
            exit_code = state.get("ExitCode")
        address, port = self._endpoint(host, container)
        try:
            gpus = tuple(int(g) for g in labels.get(LABEL_GPUS, "").split(",") if g)
        except ValueError:
            gpus = ()
        try:
            started_at = float(labels.get(LABEL_STARTED_AT, 0.0))
        except ValueError:
            started_at = 0.0
        return Observed(
            instance_id=instance_id,
            model=labels.get(LABEL_MODEL, ""),
            engine=labels.get(LABEL_ENGINE, ""),
            handle=f"{host.name}/{container.id}",
            host=address,
            port=port,
            running=running,
            exit_code=exit_code,
            fingerprint=labels.get(LABEL_FINGERPRINT, ""),
            gpus=gpus,
            gpu_host=host.name,
            started_at=started_at,
            extra={
                "container": container.name,
                "status": container.status,
                "image": container.attrs.get("Config", {}).get("Image", ""),
                "oom_killed": bool(state.get("OOMKilled")),
            },
        )

    # -- stopping and logs ---------------------------------------------------------------

    def stop(self, handle: str, grace: float = 10.0) -> None:
        """SIGTERM, SIGKILL after `grace` seconds, then remove; a container already gone is fine."""
        found = self._find(handle)
        if found is None:
            return
        host, container = found
        try:
            with self._api(host, f"stop container {container.name}"):
                # Docker takes whole seconds; never round a grace period down to nothing.
                container.stop(timeout=max(1, math.ceil(grace)))
        except BackendError as exc:
            if not isinstance(exc.__cause__, docker.errors.NotFound):
                raise
            return
        self._remove(host, container)
        log.info("stopped and removed container %s on host %s", container.name, host.name)

    def _remove(self, host: GpuHost, container: Container) -> None:
        try:
            with self._api(host, f"remove container {container.name}"):
                container.remove(force=True)
        except BackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, docker.errors.NotFound):
                return
            # 409: Docker is removing it already (another worker stopping the same instance).
            if isinstance(cause, docker.errors.APIError) and cause.status_code == 409:
                return
            raise

    def _remove_quietly(self, host: GpuHost, container: Container) -> None:
        try:
            self._remove(host, container)
        except BackendError as exc:
            log.warning("could not remove container %s: %s", container.name, exc)

    def logs(self, handle: str, tail: int = 50) -> str:
        """The last `tail` lines the engine wrote (stdout and stderr); empty when it is gone."""
        found = self._find(handle)
        if found is None:
            return ""
        host, container = found
        try:
            with self._api(host, f"read the logs of container {container.name}"):
                data = container.logs(stdout=True, stderr=True, tail=tail)
        except BackendError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                return ""
            raise
        return data.decode("utf-8", errors="replace").rstrip("\n")
