"""Eviction by value: which engines make room for a wanted model, and what the room costs. Pure.

The cost of evicting an engine is the waiting it will cause its own callers: while it is out
(the wanted model's start or wake, then its own way back: a wake if it was put to sleep, a cold
load if it was stopped) its calls keep arriving at their recent rate and wait, on average, half
of that time. In call-seconds: rate x outage^2 / 2. A model called every few seconds is expensive
to push out for a cold load (0.3 calls/s x 62 s out: ~580 call-s); one asleep or idle for
minutes costs next to nothing; putting an engine to sleep instead of stopping it (vLLM sleep
mode, where the memory model lets the wanted model load beside its context) makes the way back
seconds instead of minutes, and is preferred whenever it frees enough.

A victim's rate is its recent one, unless the silence since its last call rules that out (the
"rule of three": no call in d seconds puts a 95 % bound of 3/d calls per second on it), so a
model whose burst has just ended is cheap to push out.

`room_for` searches the victims of each host (few: a handful of engines per host) for the set
that frees enough memory at the least cost (`cheapest_room`); `worth_it` weighs that cost
against the waiting of the wanted model's callers: rent until the price of buying (once they
have waited as long as the swap would make others wait, it is made; a model called once a
minute waits for a busy one, a burst for a cold model gets its room at once), and when the
victims are idle engines about to sleep or stop by themselves, the swap is made now only if
waiting for that would cost more. For batch work, warm-keeping and scale-out only engines with
no realtime traffic are victims, and only those that cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtimes.placement import Held, holds, place_spec, release
from runtimes.registry import READY, SLEEPING, RuntimeRecord
from runtimes.snapshot import (
    REALTIME,
    Action,
    Snapshot,
    Want,
    call_rate,
    footprint_of,
    keep_alive_for,
    last_active,
    predicted_rate,
    sleeps,
    start_estimate,
    wake_estimate,
    wake_fits,
)

SLEEP, STOP = "sleep", "stop"
# Victims looked at per host, cheapest first: past this the search would only add cost.
MAX_CANDIDATES = 6


@dataclass(frozen=True)
class Victim:
    """One way to make room: put `record` to sleep or stop it, freeing `frees` GB on each of its
    GPUs, at `cost` call-seconds of waiting for its callers."""

    record: RuntimeRecord
    mode: str
    frees: float
    cost: float
    rate: float  # its recent calls per second
    outage: float  # seconds it will be out
    # Orders victims of equal cost (idle before busy, asleep before awake); never weighed.
    tiebreak: float = 0.0

    @property
    def rank(self) -> float:
        return self.cost + self.tiebreak


@dataclass(frozen=True)
class Room:
    victims: tuple[Victim, ...]

    @property
    def cost(self) -> float:
        return sum(v.cost for v in self.victims)

    @property
    def rank(self) -> float:
        return sum(v.rank for v in self.victims)


def waiting_cost(rate: float, outage: float) -> float:
    """Call-seconds of waiting for a model called `rate` times a second that is out `outage` s."""
    return rate * outage * outage / 2


def cheapest_room(options: Sequence[Sequence[Victim]], held: Held,
                  fits: Callable[[Held], bool]) -> Room | None:
    """The cheapest choice of at most one option per engine (each `options[i]` lists the ways to
    evict one engine) after which `fits(held)` holds; None if no choice makes room."""
    ranked = sorted((sorted(ways, key=lambda v: v.rank) for ways in options if ways),
                    key=lambda ways: ways[0].rank)[:MAX_CANDIDATES]
    best: list[Room | None] = [None]

    def search(index: int, chosen: tuple[Victim, ...], cost: float, state: Held) -> None:
        if best[0] is not None and cost >= best[0].rank:
            return
        if chosen and fits(state):
            best[0] = Room(chosen)
            return
        if index == len(ranked):
            return
        for way in ranked[index]:
            search(index + 1, (*chosen, way), cost + way.rank,
                   release(state, way.record, way.frees))
        search(index + 1, chosen, cost, state)

    search(0, (), 0.0, held)
    return best[0]


# -- the rules, on a snapshot ---------------------------------------------------------------


def room_for(snapshot: Snapshot, want: Want, alive: list[RuntimeRecord],
              held: Held) -> Room | None:
    """The cheapest set of engines to put to sleep or stop so that `want` fits."""
    counts: dict[str, int] = {}
    for record in alive:
        counts[record.model] = counts.get(record.model, 0) + 1
    if want.wake is not None:
        hosts = [want.wake.gpu_host]
        arrive = wake_estimate(snapshot, want.model)
    else:
        hosts = list(snapshot.gpu_inventory)
        arrive = start_estimate(snapshot, want.model)
    best: Room | None = None
    for host in hosts:
        candidates = [r for r in alive if r.gpu_host == host
                      and _evictable(snapshot, want, r, counts)]
        if want.wake is not None:
            candidates = [r for r in candidates if set(r.gpus) & set(want.wake.gpus)]
        if not candidates:
            continue
        options = [_ways_toevict_action(snapshot, want, r, arrive) for r in candidates]
        room = cheapest_room(options, held, _fitter(snapshot, want, host))
        if room is not None and (best is None or room.rank < best.rank):
            best = room
    return best


def _fitter(snapshot: Snapshot, want: Want, host: str) -> Callable[[Held], bool]:
    """Whether `want` fits on `host` once memory is held as given."""
    if want.wake is not None:
        return lambda state: wake_fits(snapshot, want.wake, state)
    spec, inventory = snapshot.catalog[want.model], {host: snapshot.gpu_inventory[host]}
    return lambda state: place_spec(spec, inventory, snapshot.gpu_memory, state) is not None


def _evictable(snapshot: Snapshot, want: Want, record: RuntimeRecord,
               counts: dict[str, int]) -> bool:
    if (record.model == want.model or record.state not in (READY, SLEEPING)
            or not record.gpus):
        return False
    if counts[record.model] <= snapshot.catalog[record.model].min_replicas:
        return False
    if want.kind == REALTIME:
        return True  # its value decides (`worth_it`)
    # Batch work, warm-keeping and scale-out never push out realtime traffic.
    return (snapshot.arrivals.get(record.model, 0) == 0
            and snapshot.inflight.get(record.id, 0) == 0)


def _ways_toevict_action(snapshot: Snapshot, want: Want, record: RuntimeRecord,
                   arrive: float) -> list[Victim]:
    """Putting `record` to sleep (if it can, and that frees memory) and stopping it, each with
    the waiting it costs its callers: out while `want` arrives, then on their own way back."""
    fp = footprint_of(snapshot, record)
    rate = predicted_rate(snapshot, record.model)
    # Calls in flight are drained first, so an idle engine goes first of equals.
    extra = 1e-3 * snapshot.inflight.get(record.id, 0)
    ways = []
    spec = snapshot.catalog[record.model]
    if record.state == READY and sleeps(snapshot, spec) and not fp.whole:
        out = arrive + wake_estimate(snapshot, record.model)
        ways.append(Victim(record, SLEEP, fp.awake - fp.asleep, waiting_cost(rate, out), rate,
                           out, extra))
    young = (record.state == READY
             and snapshot.now - (record.ready_at or record.state_since) < snapshot.min_lifetime)
    if not young or want.kind == REALTIME:
        out = arrive + start_estimate(snapshot, record.model)
        # Asleep, it holds little; stopped, its next call waits a load instead of a wake.
        ways.append(Victim(record, STOP, holds(record, fp), waiting_cost(rate, out), rate, out,
                           extra + (record.state == READY) * 1e-3))
    return ways


def _waited(snapshot: Snapshot, model: str) -> tuple[float, float]:
    """(seconds, call-seconds) the model's callers have waited: since its first unmet call, at
    its recent rate of calls. The web app counts a caller's retries as calls too, so this is
    the more generous the shorter its Retry-After; over the whole window, not just the wait,
    so that one caller retrying every few seconds does not count as a crowd."""
    since = snapshot.demand_since.get(model, snapshot.demand.get(model, snapshot.now))
    seconds = max(0.0, snapshot.now - since)
    return seconds, seconds * (1.0 + call_rate(snapshot, model) * seconds / 2)


def _frees_itself_in(snapshot: Snapshot, victim: Victim) -> float | None:
    """Seconds until the victim would give up its memory anyway (asleep, or stopped, by its own
    keep-alive), or None while it is busy (calls in flight, batch lines waiting, or calls
    likely to come before then)."""
    record = victim.record
    if snapshot.inflight.get(record.id, 0) or snapshot.batch_pending.get(record.model, 0):
        return None
    keep = keep_alive_for(snapshot, snapshot.catalog[record.model])
    idle = snapshot.now - last_active(snapshot, record)
    by = keep.awake if record.state == READY and victim.mode == SLEEP else keep.stop
    left = max(0.0, by - idle)
    # Only if it is likely to stay idle that long: a call before then would keep it.
    return left if predicted_rate(snapshot, record.model) * left < 1.0 else None


def worth_it(snapshot: Snapshot, want: Want, room: Room) -> str:
    """Why evicting `room` for `want` is worth it now, or "" (then `want` waits).

    Rent until the price of buying: once its callers have waited as long as the swap would
    make the victims' callers wait, it is made. And when the victims would free the memory by
    themselves soon (idle engines that sleep or stop on their own), waiting for that is worth it
    only if it costs its callers less than the swap costs the victims'."""
    if want.kind != REALTIME:
        return f"for {want.kind} work, from engines with no realtime traffic"
    seconds, waited = _waited(snapshot, want.model)
    cost = room.cost
    worst = max(room.victims, key=lambda v: v.cost)
    costs = (f"the ~{cost:.0f} call-s this costs ({worst.record.model}: "
             f"{worst.rate:.2f} calls/s, out ~{worst.outage:.0f} s)")
    if waited >= cost:
        return f"its callers waited {seconds:.0f} s (~{waited:.0f} call-s), more than {costs}"
    soon = [_frees_itself_in(snapshot, v) for v in room.victims]
    if any(t is None for t in soon):
        return ""
    later = max(soon)
    rate = call_rate(snapshot, want.model)
    waiting_now = 1.0 + rate * seconds
    more = waiting_now * later + rate * later * later / 2
    if more >= cost:
        return (f"waiting {later:.0f} s more for the room to free itself would cost its "
                f"callers ~{more:.0f} call-s, more than {costs}")
    return ""


def evict_action(snapshot: Snapshot, victim: Victim, model: str, why: str) -> Action:
    record = victim.record
    inflight = snapshot.inflight.get(record.id, 0)
    reason = f"evicted for {model}: {why}"
    if inflight:
        then = "asleep" if victim.mode == SLEEP else "stopped"
        return Action("drain", f"{reason}; draining {inflight} calls, then {then}",
                      record.model, record.id, evicted_for=model, then=victim.mode)
    if victim.mode == SLEEP:
        return Action("sleep", f"{reason}; asleep, it keeps only its context",
                      record.model, record.id, evicted_for=model)
    return Action("stop", reason, record.model, record.id, evicted_for=model)
