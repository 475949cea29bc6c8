"""The missing-peering warning: which objects the operator needs and what it tells the user to do."""

from __future__ import annotations

import json

from bowline_operator.__main__ import parse_args
from bowline_operator.peering_watch import PeeringConfig, missing_message, targets


def test_cluster_wide_needs_one_cluster_peering_and_standalone_none() -> None:
    (target,) = targets(PeeringConfig("bowline"))
    assert (target.kind, target.name, target.namespace) == ("ClusterKopfPeering", "bowline", None)
    assert target.path() == "/apis/kopf.dev/v1/clusterkopfpeerings/bowline"
    assert targets(PeeringConfig(None)) == []


def test_watched_namespaces_need_a_peering_each_and_globs_are_left_to_kopf() -> None:
    found = targets(PeeringConfig("bw", ("team-a", "team-b", "ml-*")))
    assert [(t.kind, t.namespace) for t in found] == [("KopfPeering", "team-a"), ("KopfPeering", "team-b")]
    assert found[0].path() == "/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/bw"


def test_message_names_the_object_the_fix_the_chart_and_standalone() -> None:
    missing = targets(PeeringConfig("bw", ("team-a",)))
    message = missing_message(missing, crd_installed=True)
    assert "KopfPeering 'bw' in namespace 'team-a' does not exist" in message
    manifest = message.split("<<< '")[1].split("'")[0]
    assert json.loads(manifest) == {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                    "metadata": {"name": "bw", "namespace": "team-a"}}
    assert "Helm chart creates it" in message and "--standalone" in message
    assert "crds/kopf.dev_peerings.yaml" not in message
    assert "kubectl apply -f crds/kopf.dev_peerings.yaml" in missing_message(missing, crd_installed=False)


def test_standalone_flag_means_no_peering_to_check() -> None:
    args = parse_args(["--standalone"])
    assert args.standalone and targets(PeeringConfig(None if args.standalone else args.peering)) == []
