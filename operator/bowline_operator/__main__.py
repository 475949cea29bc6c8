"""`python -m bowline_operator`: run the operator with kubeconfig or in-cluster credentials.

Cluster-wide by default; `--namespace` (repeatable, or BOWLINE_OPERATOR_NAMESPACES=a,b) restricts it.
Replicas coordinate through kopf peering (`--peering`, the ClusterKopfPeering/KopfPeering objects in
crds/kopf.dev_peerings.yaml), so running two of them is safe: one handles objects, the other waits.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import random

import kopf

# handlers before peering_watch: kopf runs start-up handlers in import order (credentials first).
from . import autoscaling, handlers, peering_watch  # noqa: F401  (importing registers the kopf handlers)

LOG_FORMATS = ("plain", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env_namespaces = [ns for ns in os.environ.get("BOWLINE_OPERATOR_NAMESPACES", "").split(",") if ns]
    parser = argparse.ArgumentParser(prog="bowline-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", "-n", action="append", dest="namespaces", default=None,
                        help="namespace to watch (repeatable; globs allowed); default: all namespaces")
    parser.add_argument("--peering", default=os.environ.get("BOWLINE_OPERATOR_PEERING", "bowline"),
                        help="kopf peering object used for leader election between replicas")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering: only for a single replica or tests")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority of this replica (the highest works, the others wait); "
                             "default: random, so that replicas of one Deployment never tie")
    parser.add_argument("--prometheus-url", default=os.environ.get("BOWLINE_OPERATOR_PROMETHEUS_URL", autoscaling.DEFAULT_PROMETHEUS_URL),
                        help="Prometheus that KEDA ScaledObjects query for spec.autoscaling")
    parser.add_argument("--liveness", default=os.environ.get("BOWLINE_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
                        help="URL of the operator's own health endpoint; empty to disable")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get("BOWLINE_OPERATOR_LOG_FORMAT", "plain"),
                        help="plain text, or json: one object per line (time, level, logger, message) for log collectors")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=os.environ.get("BOWLINE_OPERATOR_LOG_LEVEL", "info"))
    parser.add_argument("--verbose", "-v", action="store_const", const="debug", dest="log_level",
                        help="same as --log-level=debug")
    args = parser.parse_args(argv)
    for flag, value, allowed in (("--log-format", args.log_format, LOG_FORMATS), ("--log-level", args.log_level, LOG_LEVELS)):
        if value not in allowed:  # argparse checks choices on the command line only, not env defaults
            parser.error(f"{flag}: invalid choice {value!r} (choose from {', '.join(allowed)})")
    args.namespaces = args.namespaces or env_namespaces
    return args


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so log collectors (Loki, Cloud Logging, ...) need no parsing rules.

    kopf's own JSON format names its fields `timestamp`/`severity` and drops the logger name; this keeps
    the field names stable and adds `object` ("namespace/name") for messages about one resource.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)  # set by kopf's per-object loggers
        if isinstance(ref, dict) and ref.get("name"):
            entry["object"] = "/".join(str(ref[k]) for k in ("namespace", "name") if ref.get(k))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str, log_level: str) -> None:
    """Root logging for the operator and kopf (kopf.operator() leaves logging to its caller)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    if args.priority is None:
        # kopf pauses *every* peer when two share the highest priority; distinct random priorities make
        # exactly one replica active and hand over to the next when it stops.
        args.priority = random.SystemRandom().randint(1, 2**31 - 1)
    autoscaling.configure(args.prometheus_url)
    peering_watch.configure(None if args.standalone else args.peering, args.namespaces)
    asyncio.run(kopf.operator(
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
    ))


if __name__ == "__main__":
    main()
