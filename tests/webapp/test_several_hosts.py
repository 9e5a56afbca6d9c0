"""Two web instances and two batch workers on two "machines", behind one address, sharing one
Sentinel-managed Redis; one web instance and one batch worker SIGKILLed mid-batch.

The machines are network namespaces (`tests.netns`): host 0 and host 1 each run gunicorn on
port 8000 of their own address and a gevent batch worker; the root namespace is the Redis
machine (a primary, a replica and three Sentinels on the bridge's address) and runs the control
worker with beat and the engines, which listen on the bridge's address too. Clients go through
one address, a TCP balancer (`tests.balancer`) in front of both web instances.

What must hold: a change made through one instance or behind both (a new keys file, an engine
stopped) is honoured by each instance on its own; a web instance and a batch worker killed in
the middle of a batch cost no batch line (each custom_id once in the output) and no realtime call
beyond a connection cut by the kill, which the client retries.
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from collections import Counter

import openai
import pytest
import urllib3
from redis.sentinel import Sentinel

from runtimes.registry import RuntimeRegistry
from tests.balancer import TcpBalancer
from tests.conftest import DATA, TOKENS, keys_document, ready_records
from tests.harness import RedisSentinel, RedisServer, Stack, wait_for
from tests.netns import HostNetwork

WEB_PORT = 8000  # the same on every host, as on real machines
LINES = 300
PAIR = "sim/pair"  # two replicas always (min_replicas 2): one can be stopped under traffic
KEYS_RELOAD_SECONDS = 1
# Long enough that a web instance still routes to an engine stopped a moment ago.
ROUTE_CACHE_SECONDS = 10
CALL = {"model": "sim/fast", "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def network():
    net = HostNetwork(hosts=2).open()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory, network):
    workdir = tmp_path_factory.mktemp("hosts-redis")
    host = network.root_address
    primary = RedisServer(workdir / "primary", host=host).start()
    replica = RedisServer(workdir / "replica", appendonly=True, replica_of=primary.port,
                          host=host).start()
    watchers = [RedisSentinel(workdir / f"sentinel{i}", primary.port, host=host)
                for i in range(3)]
    try:
        for sentinel in watchers:
            sentinel.start()
        wait_for(lambda: all(s.watching() for s in watchers), 30, interval=0.2,
                 what="three Sentinels that know each other and the replica")
        yield watchers
    finally:
        for server in (*watchers, replica, primary):
            server.stop()


def _catalog(workdir) -> str:
    document = json.loads((DATA / "models.test.json").read_text())
    document["models"].append({"id": PAIR, "gpus": 0, "min_replicas": 2, "max_replicas": 2,
                               "engine_args": {"sim": ["--load-seconds", "0.3"]}})
    path = workdir / "models.json"
    path.write_text(json.dumps(document))
    return path


class Hosts:
    """The stack spread over the namespaces, and the one address in front of its web tier."""

    def __init__(self, stack: Stack, network: HostNetwork, balancer: TcpBalancer, keys):
        self.stack = stack
        self.network = network
        self.balancer = balancer
        self.keys = keys
        self.web_urls = [f"http://{a}:{WEB_PORT}" for a in network.addresses]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, network, sentinels):
    workdir = tmp_path_factory.mktemp("hosts-stack")
    keys = workdir / "auth.keys.json"
    keys.write_text(json.dumps(keys_document()))
    stack = Stack(workdir, ";".join(s.url for s in sentinels) + "/0", _catalog(workdir), keys,
                  REDIS_SENTINEL_MASTER="mymaster", RUNTIME_HOST=network.root_address,
                  RESTART_BACKOFF_SECONDS="0.2", BATCH_CHUNK_LINES="25",
                  BATCH_MAX_INFLIGHT_PER_RUNTIME="8", CELERY_VISIBILITY_TIMEOUT="15",
                  BATCH_SWEEP_SECONDS="1", BATCH_STALL_SECONDS="10",
                  KEYS_RELOAD_INTERVAL_SECONDS=str(KEYS_RELOAD_SECONDS),
                  REGISTRY_CACHE_SECONDS=str(ROUTE_CACHE_SECONDS))
    balancer = TcpBalancer([(a, WEB_PORT) for a in network.addresses]).start()
    try:
        stack.workdir.mkdir(parents=True, exist_ok=True)
        stack.start_worker()  # control worker and beat: on the Redis machine, with the engines
        for i, netns in enumerate(network.names):
            # Each machine has its own directory of Prometheus values.
            metrics = workdir / f"prometheus-{i}"
            metrics.mkdir()
            env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}
            stack.start_web(f"web{i}", f"{network.addresses[i]}:{WEB_PORT}", netns, env)
            stack.start_batch_worker(f"batch{i}", netns=netns, env=env)
        yield Hosts(stack, network, balancer, keys)
    finally:
        balancer.close()
        stack.stop()
        for name in ("web0", "web1", "worker", "batch0", "batch1"):
            print(f"\n--- {name} log (tail) ---\n{stack.tail(name, 25)}")


def post(base_url: str, body: dict, token: str = TOKENS["realtime"], timeout: float = 20,
         new_connection: bool = False):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    if new_connection:  # so that the balancer places each call anew
        headers["Connection"] = "close"
    return urllib3.request("POST", f"{base_url}/v1/completions", body=json.dumps(body).encode(),
                           headers=headers, timeout=timeout, retries=False)


def warm(base_url: str, model: str, timeout: float = 30) -> None:
    def served():
        status = post(base_url, {**CALL, "model": model}).status
        assert status in (200, 503), status
        return status == 200

    wait_for(served, timeout, interval=0.2, what=f"{model} served through {base_url}")


def registry_of(hosts: Hosts) -> RuntimeRegistry:
    sentinel_urls = hosts.stack.env["REDIS_URL"].rsplit("/", 1)[0].split(";")
    addresses = [tuple(u.removeprefix("sentinel://").split(":")) for u in sentinel_urls]
    master = Sentinel([(h, int(p)) for h, p in addresses]).master_for("mymaster", db=0)
    return RuntimeRegistry(master)


def _write_keys(path, document) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)  # atomic, as a config tool does


def _every_worker_answers(url: str, token: str, status: int) -> bool:
    # Each instance has two gunicorn workers, each with its own copy of the keys: ask several
    # times, each on a new connection, so that both are likely met.
    return all(post(url, CALL, token=token, new_connection=True).status == status
               for _ in range(6))


def test_each_host_honours_a_new_keys_file_within_its_reload_interval(hosts):
    for url in hosts.web_urls:
        warm(url, "sim/fast")
    token = "added-on-one-host-only-token-7"
    assert all(post(url, CALL, token=token).status == 401 for url in hosts.web_urls)
    original = json.loads(hosts.keys.read_text())
    document = json.loads(hosts.keys.read_text())
    document["keys"].append({"name": "added", "token": token, "scopes": ["realtime"]})
    try:
        _write_keys(hosts.keys, document)
        changed = time.monotonic()
        for url in hosts.web_urls:
            wait_for(lambda url=url: _every_worker_answers(url, token, 200),
                     KEYS_RELOAD_SECONDS + 4, interval=0.1, what=f"the new key on {url}")
        took = time.monotonic() - changed
        _write_keys(hosts.keys, original)
        removed = time.monotonic()
        for url in hosts.web_urls:
            wait_for(lambda url=url: _every_worker_answers(url, token, 401),
                     KEYS_RELOAD_SECONDS + 4, interval=0.1, what=f"the key removed on {url}")
    finally:
        _write_keys(hosts.keys, original)
    print(f"new key honoured by both hosts after {took:.1f} s, its removal after "
          f"{time.monotonic() - removed:.1f} s")


def test_an_engine_stopped_behind_both_hosts_costs_no_call(hosts):
    registry = registry_of(hosts)
    for url in hosts.web_urls:
        warm(url, PAIR)
    wait_for(lambda: len(ready_records(registry, PAIR)) == 2, 30, interval=0.2,
             what=f"two ready replicas of {PAIR}")
    # Both hosts' route caches now hold both replicas (a call through each, after both are
    # ready, refreshes nothing for ROUTE_CACHE_SECONDS): fill them.
    for url in hosts.web_urls:
        wait_for(lambda url=url: post(url, {**CALL, "model": PAIR}).status == 200, 10,
                 what="a call")
    statuses: list[tuple[float, int]] = []
    stopping = threading.Event()

    def traffic(url: str):
        while not stopping.is_set():
            statuses.append((time.monotonic(), post(url, {**CALL, "model": PAIR}).status))

    threads = [threading.Thread(target=traffic, args=(url,), daemon=True)
               for url in hosts.web_urls for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    victim = ready_records(registry, PAIR)[0]
    _stop_via_control_plane(hosts.stack, victim.id)
    stopped = time.monotonic()
    time.sleep(3)  # well within the caches' 10 s: both hosts still list the stopped replica
    stopping.set()
    for thread in threads:
        thread.join(25)
    after = Counter(status for at, status in statuses if at > stopped)
    assert after and set(after) == {200}, (after, hosts.stack.tail("web0"),
                                           hosts.stack.tail("web1"))
    assert set(status for _, status in statuses) == {200}
    # Neither host's usage report brought the stopped replica back into the registry.
    time.sleep(2)
    assert registry.get(victim.id) is None
    print(f"calls after the stop: {dict(after)}")


def _stop_via_control_plane(stack: Stack, instance_id: str) -> None:
    """Stop an instance as an operator would, through a control plane of the stack's own."""
    from config.settings import load_settings
    from runtimes.factory import build_control_plane

    env = {k: v for k, v in stack.env.items() if k.isupper()}
    build_control_plane(load_settings(env)).stop_instance(instance_id, "stopped by the test")


class RealtimeLoop(threading.Thread):
    """Calls sim/fast through the balancer, one after another, each on a new connection (so
    they alternate between the web instances); a call cut at the connection level is tried
    again (up to 3 times), as a client behind a load balancer does. Keeps (start, final status,
    tries)."""

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.base_url = base_url
        self.calls: list[tuple[float, int, int]] = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            status = -1
            for tries in range(1, 4):
                try:
                    status = post(self.base_url, CALL, new_connection=True).status
                    break
                except urllib3.exceptions.HTTPError:
                    time.sleep(0.1)
            self.calls.append((started, status, tries))
            time.sleep(0.02)


def test_a_web_instance_and_a_batch_worker_killed_mid_batch_lose_nothing(hosts):
    stack, balancer = hosts.stack, hosts.balancer
    warm(balancer.base_url, "sim/fast")
    warm(balancer.base_url, "sim/batch")
    lines = [{"custom_id": f"h{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "sim/batch", "prompt": f"{i}", "max_tokens": 24}}
             for i in range(LINES)]
    files = openai.OpenAI(base_url=f"{balancer.base_url}/v1", api_key=TOKENS["upload"],
                          max_retries=3, timeout=30)
    uploaded = files.files.create(
        file=("in.jsonl", io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))),
        purpose="batch")
    # The SDK retries a connection cut by the kill, as any client behind a balancer would.
    client = openai.OpenAI(base_url=f"{balancer.base_url}/v1", api_key=TOKENS["batch"],
                           max_retries=3, timeout=30)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 50, 60,
             interval=0.1, what="the batch to be under way")
    loop = RealtimeLoop(balancer.base_url)
    loop.start()
    time.sleep(1)
    assert all(sent > 5 for sent in balancer.sent_to.values()), balancer.sent_to
    # The batch worker that took the most chunks is the one killed (with its prefetched ones).
    taken = {name: stack.log_path(name).read_bytes().count(b"batch.run_chunk")
             for name in ("batch0", "batch1")}
    victim = max(taken, key=taken.get)

    killed_at = time.monotonic()
    stack.stop_process("web0", signal.SIGKILL)
    stack.stop_process(victim, signal.SIGKILL)
    assert client.batches.retrieve(batch.id).status not in ("completed", "failed")

    def finished():
        current = client.batches.retrieve(batch.id)
        return current if current.status in ("completed", "failed") else None

    done = wait_for(finished, 60, interval=0.5, what="the batch after the kills")
    finished_after = time.monotonic() - killed_at
    time.sleep(1)
    loop.stopping.set()
    loop.join(30)

    assert done.status == "completed", done
    assert done.request_counts.completed == LINES and done.request_counts.failed == 0
    seen = Counter(json.loads(x)["custom_id"] for x in
                   client.files.content(done.output_file_id).text.splitlines())
    assert set(seen) == {f"h{i}" for i in range(LINES)} and set(seen.values()) == {1}

    statuses = Counter(status for _, status, _ in loop.calls)
    assert set(statuses) == {200}, (statuses, stack.tail("web1"))
    after = [status for started, status, _ in loop.calls if started > killed_at + 1]
    assert len(after) >= 10, loop.calls[-5:]
    # The survivors are up, and the balancer found web0 gone.
    survivors = ["web1", "worker", *(set(taken) - {victim})]
    assert all(stack.procs[name].poll() is None for name in survivors)
    assert balancer.refused[(hosts.network.addresses[0], WEB_PORT)] > 0
    retried = sum(1 for _, _, tries in loop.calls if tries > 1)
    print(f"chunks taken before the kill {taken}, {victim} killed; batch done "
          f"{finished_after:.1f} s after the kills; realtime calls {dict(statuses)}, {retried} "
          f"retried at the connection level; balancer {balancer.sent_to}")
