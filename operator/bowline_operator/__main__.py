"""`python -m bowline_operator`: run the operator with kubeconfig or in-cluster credentials.

Cluster-wide by default; `--namespace` (repeatable, or BOWLINE_OPERATOR_NAMESPACES=a,b) restricts it.
Replicas coordinate through kopf peering (`--peering`, the ClusterKopfPeering/KopfPeering objects in
crds/kopf.dev_peerings.yaml), so running two of them is safe: one handles objects, the other waits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf

from . import handlers  # noqa: F401  (registers the handlers with kopf)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env_namespaces = [ns for ns in os.environ.get("BOWLINE_OPERATOR_NAMESPACES", "").split(",") if ns]
    parser = argparse.ArgumentParser(prog="bowline-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", "-n", action="append", dest="namespaces", default=None,
                        help="namespace to watch (repeatable; globs allowed); default: all namespaces")
    parser.add_argument("--peering", default=os.environ.get("BOWLINE_OPERATOR_PEERING", "bowline"),
                        help="kopf peering object used for leader election between replicas")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering: only for a single replica or tests")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument("--liveness", default=os.environ.get("BOWLINE_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
                        help="URL of the operator's own health endpoint; empty to disable")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    args.namespaces = args.namespaces or env_namespaces
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
