"""Command line of the control plane: `python -m runtimes status|stop-all|reset MODEL|tick`, and
`prime MODEL` (read a cached model's weights into the page cache, e.g. before the morning rush).

`make run` calls `stop-all` when the stack stops (unless KEEP_RUNTIMES_ON_EXIT is true), so no
engine outlives the orchestrator that started it by accident.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from config.settings import SettingsError, load_settings
from runtimes.catalog import CatalogError
from runtimes.factory import build_control_plane
from runtimes.weights import prime_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtimes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="list runtimes and their states as JSON")
    stop_all = commands.add_parser("stop-all", help="stop every runtime the backend runs")
    stop_all.add_argument("--unless-kept", action="store_true",
                          help="do nothing when KEEP_RUNTIMES_ON_EXIT is true")
    reset = commands.add_parser("reset", help="clear a model's failed-start count")
    reset.add_argument("model")
    commands.add_parser("tick", help="run one autoscaling pass now")
    prime = commands.add_parser("prime", help="read a cached model's weights into the page cache")
    prime.add_argument("model")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
        control = build_control_plane(settings)
    except (SettingsError, CatalogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "status":
        now = time.time()
        rows = [
            {"id": r.id, "model": r.model, "state": r.state, "endpoint": r.endpoint,
             "for_seconds": round(now - r.state_since, 1), "reason": r.reason}
            for r in control.registry.all()
        ]
        print(json.dumps({"runtimes": rows, "failed_starts": control.registry.failed_starts()},
                         indent=2))
    elif args.command == "stop-all":
        if args.unless_kept and settings.keep_runtimes_on_exit:
            print("KEEP_RUNTIMES_ON_EXIT is true: leaving runtimes for the next start to adopt")
            return 0
        print(f"stopped {control.stop_all()} runtime(s)")
    elif args.command == "reset":
        control.registry.reset_model(args.model)
        print(f"reset {args.model}")
    elif args.command == "tick":
        print(json.dumps(control.tick(), indent=2))
    elif args.command == "prime":
        return prime_command(control.weights, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
