"""Fixtures of the cluster scenarios: a cluster from scripts/cluster.sh (etcd or PostgreSQL for
metadata, moto's S3 for the log, three core nodes in network namespaces, one gateway of each
protocol), from TRIBUTARY_BIN (scripts/test-cluster.sh sets it).

* ``cluster``: parametrised over the metadata stores of TRIBUTARY_CLUSTER_METAS (default
  "etcd postgres"); up before the test, down after it.
* ``shard_cluster``: the same with every node serving its share of six shards
  (`cluster.sh up --shards 6`), over the stores of TRIBUTARY_CLUSTER_SHARD_METAS (default
  "etcd": tests/cluster_shards.rs covers PostgreSQL in shard mode). Its state dir (logs, configs) is removed
  when the test passes (unless TRIBUTARY_CLUSTER_KEEP is set) and kept, named in the report,
  when it fails.
* ``spread_cluster``: six shards placing topics by namespace and name
  (`cluster.sh up --shards 6 --scheme stream`), over the stores of TRIBUTARY_CLUSTER_SHARD_METAS.
* ``leaders_cluster``: the same with a Kafka gateway beside each node N too, broker id N, the
  three one fleet (`cluster.sh up --shards 6 --scheme stream --kafka-per-node`; their
  addresses in ``Cluster.kafka_nodes``).

A failed test's report gets the tail of every node's and gateway's log.
"""

from __future__ import annotations

import os

import pytest

from clusterctl import Cluster
from tributary_process import log_file_tail, tributary_bin

METAS = os.environ.get("TRIBUTARY_CLUSTER_METAS", "etcd postgres").split()
SHARD_METAS = os.environ.get("TRIBUTARY_CLUSTER_SHARD_METAS", "etcd").split()
SHARDS = 6


@pytest.fixture(params=METAS)
def cluster(request):
    yield from running(request, Cluster(request.param, tributary_bin()))


@pytest.fixture(params=SHARD_METAS)
def shard_cluster(request):
    yield from running(request, Cluster(request.param, tributary_bin(), shards=SHARDS))


@pytest.fixture(params=SHARD_METAS)
def spread_cluster(request):
    yield from running(request, Cluster(request.param, tributary_bin(), shards=SHARDS,
                                        scheme="stream"))


@pytest.fixture(params=SHARD_METAS)
def leaders_cluster(request):
    yield from running(request, Cluster(request.param, tributary_bin(), shards=SHARDS,
                                        scheme="stream", kafka_per_node=True))


def running(request, c: Cluster):
    request.node._cluster = c
    try:
        c.up()
    except BaseException:
        c.down(keep_dir=True)
        print(f"cluster state, logs and configs kept in {c.dir}")
        raise
    try:
        yield c
    finally:
        keep = getattr(request.node, "_failed", False) or bool(os.environ.get("TRIBUTARY_CLUSTER_KEEP"))
        c.down(keep_dir=keep)
        if keep:
            print(f"cluster state, logs and configs kept in {c.dir}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item._failed = True
        c = getattr(item, "_cluster", None)
        if c is not None:
            report.sections.append(("cluster status", c.describe()))
            for name, path in c.log_files():
                report.sections.append((f"log {name}", log_file_tail(path, 60)))
