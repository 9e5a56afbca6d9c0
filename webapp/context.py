"""What the web app works with, found from a view: the services, and what only the web needs.

`create_app` builds one `Gateway` and keeps it on the app; views reach it through `gateway()`
and `services()` (typed, one lookup), never through string keys of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from runtimes.lora import AdapterLoader
from runtimes.upstream import EngineClient
from services import Services
from tasks.broker import BrokerStats
from webapp.budgets import BudgetGate
from webapp.keystore import KeyStore
from webapp.limits import KeyLimiter
from webapp.response_owners import ResponseOwners
from webapp.usage import UsageTracker

EXTENSION = "gateway"


@dataclass(frozen=True)
class Gateway:
    services: Services
    keystore: KeyStore
    limiter: KeyLimiter
    usage: UsageTracker
    engine_client: EngineClient
    broker: BrokerStats
    adapters: AdapterLoader
    budgets: BudgetGate
    responses: ResponseOwners


def gateway() -> Gateway:
    return current_app.extensions[EXTENSION]


def services() -> Services:
    return current_app.extensions[EXTENSION].services
