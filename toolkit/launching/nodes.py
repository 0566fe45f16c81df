"""Runs across several hosts: DeepSpeed hostfiles, and the check every node passes before its workers start.

Two ways to start a multi-node job, both DeepSpeed's own launcher:

* a hostfile (``parallel.hostfile``): ``dstk train`` on the first host gates the data and starts
  every node through pdsh/ssh or MPI; output_dir is shared storage.
* one launcher per node (``parallel.nodes`` > 1 and ``dstk train --node-rank N`` on every host,
  e.g. from SLURM): DeepSpeed's ``--no_ssh`` mode. Node 0 runs the audit gate once; every other
  node waits for its outcome, checks that it sees the same recipe and data (sha256), and reports
  back; node 0 lets them all start only when every node agreed. That exchange goes through a
  ``torch.distributed.TCPStore`` that node 0 serves on ``master_port + 1`` until its run ends.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

from data_checks.files import sha256_file
from toolkit.errors import AuditFailed, UserError
from toolkit.plan.prepare import prepare, resolve_all_data
from toolkit.recipe import Recipe

DEFAULT_PORT = 29500  # DeepSpeed's and torch's default rendezvous port
# Set in the workers' environment once every node agreed before launch, so they do not hash the data again.
AGREED_ENV = "DSTK_NODES_AGREED"


def per_node(recipe: Recipe) -> bool:
    """Whether this recipe runs one launcher per node (``--node-rank``), not one for all."""
    return recipe.parallel.nodes > 1 and recipe.parallel.hostfile is None


def master_port(recipe: Recipe) -> int | None:
    """The fixed rendezvous port every node must agree on; None when one node may pick a free one."""
    p = recipe.parallel
    if p.master_port is not None:
        return p.master_port
    return DEFAULT_PORT if p.nodes > 1 or p.hostfile else None


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Hosts and their slots from a DeepSpeed hostfile (``HOST slots=N`` lines, ``#`` comments).

    Raises:
        UserError: a missing file, a malformed line or a host listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"parallel.hostfile {path} does not exist", "give a file of `HOST slots=N` lines")
    hosts: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].startswith("slots=") or not fields[1][6:].isdigit() \
                or int(fields[1][6:]) < 1:
            raise UserError(f"parallel.hostfile {path} line {number} is {line!r}",
                            "write each host as `HOST slots=N` with N >= 1")
        if fields[0] in hosts:
            raise UserError(f"parallel.hostfile {path} lists host {fields[0]} twice", "list each host once")
        hosts[fields[0]] = int(fields[1][6:])
    if not hosts:
        raise UserError(f"parallel.hostfile {path} lists no host", "write one `HOST slots=N` line per node")
    return hosts


def check_hostfile(recipe: Recipe) -> dict[str, int]:
    """The recipe's hostfile, checked against parallel.nodes and parallel.nproc."""
    p = recipe.parallel
    hosts = read_hostfile(p.hostfile)
    slots = sum(hosts.values())
    if len(hosts) != p.nodes or slots != p.nproc:
        raise UserError(f"parallel.hostfile {p.hostfile} lists {len(hosts)} host(s) with {slots} slot(s), but "
                        f"the recipe sets parallel.nodes={p.nodes} parallel.nproc={p.nproc}",
                        f"set parallel.nodes={len(hosts)} parallel.nproc={slots}, or edit the hostfile")
    return hosts


def world_hostfile(recipe: Recipe, path: Path) -> Path:
    """Write the hostfile DeepSpeed's ``--no_ssh`` mode reads its world from: N nodes, equal slots.

    In that mode no host is contacted, so the names are placeholders; only their order and slots count.
    """
    slots = recipe.parallel.nproc // recipe.parallel.nodes
    path.write_text("".join(f"node{n} slots={slots}\n" for n in range(recipe.parallel.nodes)), encoding="utf-8")
    return path


def check_node_rank(recipe: Recipe, node_rank: int | None) -> None:
    nodes = recipe.parallel.nodes
    if per_node(recipe) and node_rank is None:
        raise UserError(f"parallel.nodes={nodes} needs --node-rank N on each host (0 on the master, "
                        f"{recipe.parallel.master_addr}), or a parallel.hostfile to start them all from one")
    if node_rank is not None and not per_node(recipe):
        raise UserError("--node-rank is for one launcher per node, but the recipe "
                        + ("starts every node from its hostfile" if recipe.parallel.hostfile else "runs on one node"),
                        "drop --node-rank" + ("" if recipe.parallel.hostfile else ", or set parallel.nodes"))
    if node_rank is not None and not 0 <= node_rank < nodes:
        raise UserError(f"--node-rank {node_rank} is outside 0..{nodes - 1} (parallel.nodes={nodes})",
                        "number the nodes from 0")


def identity(recipe: Recipe, data: dict) -> dict:
    """What every node must see alike: the recipe and the content of each data split."""
    return {"recipe_sha256": recipe.sha256(), "data": {split: entry["sha256"] for split, entry in data.items()}}


def differences(mine: dict, theirs: dict) -> list[str]:
    """How this node's :func:`identity` differs from node 0's, one phrase per difference."""
    found = []
    if mine["recipe_sha256"] != theirs["recipe_sha256"]:
        found.append(f"its recipe (sha256 {mine['recipe_sha256'][:12]}) differs from node 0's "
                     f"({theirs['recipe_sha256'][:12]})")
    for split in sorted(set(mine["data"]) | set(theirs["data"])):
        if mine["data"].get(split) != theirs["data"].get(split):
            found.append(f"its data.{split} differs in content from node 0's")
    return found


def data_problems(data: dict) -> list[str]:
    """How the data this node sees differs from the content node 0 hashed into run.json."""
    found = []
    for split, entry in data.items():
        path, expected = Path(entry["path"]), entry["sha256"]
        files = {"": expected} if isinstance(expected, str) else expected or {}  # None: a hub id, named by revision
        for name, digest in files.items():
            where = path / name if name else path
            if not where.is_file():
                found.append(f"data.{split} file {where} is missing")
            elif sha256_file(where) != digest:
                found.append(f"data.{split} file {where} differs from node 0's")
    return found


class NodeGate:
    """The pre-launch exchange of one node with the others (one launcher per node).

    Use as a context manager around the whole launch: node 0 keeps the store open while its
    workers run, so that a late node still gets an answer.
    """

    def __init__(self, recipe: Recipe, node_rank: int):
        self.recipe, self.node_rank = recipe, node_rank
        self.timeout = timedelta(seconds=recipe.parallel.comm_timeout_s)
        self.store = None

    def __enter__(self) -> NodeGate:
        from torch.distributed import TCPStore

        p = self.recipe.parallel
        port = master_port(self.recipe) + 1
        try:
            self.store = TCPStore(p.master_addr, port, is_master=self.node_rank == 0, timeout=self.timeout,
                                  wait_for_workers=False)
        except (RuntimeError, OSError) as err:  # torch raises DistNetworkError, a RuntimeError
            where = "serve" if self.node_rank == 0 else "reach node 0 at"
            raise UserError(f"node {self.node_rank} could not {where} {p.master_addr}:{port}: "
                            f"{str(err).splitlines()[0]}",
                            "check parallel.master_addr and that the port after parallel.master_port is free "
                            "and open between the hosts") from None
        return self

    def __exit__(self, *exc) -> None:
        self.store = None  # node 0's server closes with it

    def prepare(self) -> dict:
        """Prepare this node's run directory once every node agreed; return its run.json content.

        Raises:
            AuditFailed: node 0's audit failed (exit 1, on every node).
            UserError: this node, or another, sees other inputs or could not prepare (exit 2).
        """
        return self._lead() if self.node_rank == 0 else self._follow()

    def _lead(self) -> dict:
        try:
            run = prepare(self.recipe)
        except UserError as err:  # the others must not wait for a run that will not start
            self._set("gate", {"failed": str(err), "audit": isinstance(err, AuditFailed)})
            raise
        self._set("gate", {"identity": identity(self.recipe, run["data"]), "audit": run["audit"]})
        others = [f"node/{n}" for n in range(1, self.recipe.parallel.nodes)]
        print(f"dstk: node 0 waiting for nodes 1..{len(others)} to check in "
              f"(`dstk train ... --node-rank N` on each host)", file=sys.stderr, flush=True)
        self._wait(others, "nodes to check in")
        refusals = [f"node {n}: {problem}" for n, key in enumerate(others, 1)
                    if (problem := self._get(key).get("refused"))]
        self._set("go", {"go": not refusals})
        if refusals:
            raise UserError(f"{'; '.join(refusals)}; no node started its workers",
                            "start every node with the same recipe, overrides and data")
        return run

    def _follow(self) -> dict:
        self._wait(["gate"], "node 0's data audit")
        gate = self._get("gate")
        if "failed" in gate:
            error = AuditFailed if gate["audit"] else UserError
            raise error(f"node 0 did not start: {gate['failed']}")
        try:
            problems = differences(identity(self.recipe, resolve_all_data(self.recipe)), gate["identity"])
            if problems:
                raise UserError(f"node {self.node_rank} refuses to start: {'; '.join(problems)}",
                                "start every node with the same recipe, overrides and data")
            run = prepare(self.recipe, audited={**gate["audit"], "audited_on": "node 0"})
        except UserError as err:
            self._set(f"node/{self.node_rank}", {"refused": str(err)})
            raise
        self._set(f"node/{self.node_rank}", {})
        self._wait(["go"], "node 0's go")
        if not self._get("go")["go"]:
            raise UserError("node 0 stopped the run: another node refused to start (see node 0's output)")
        return run

    def _set(self, key: str, value: dict) -> None:
        self.store.set(key, json.dumps(value))

    def _get(self, key: str) -> dict:
        return json.loads(self.store.get(key))

    def _wait(self, keys: list[str], what: str) -> None:
        try:
            self.store.wait(keys, self.timeout)
        except RuntimeError:  # torch's DistStoreError on timeout, or node 0 gone
            raise UserError(f"node {self.node_rank} gave up waiting for {what} after "
                            f"{self.recipe.parallel.comm_timeout_s} s",
                            "start every node (--node-rank 0..N-1) with the same recipe, or raise "
                            "parallel.comm_timeout_s") from None
