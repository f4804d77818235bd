"""deepranking.distributed on the CPU with gloo: 2 processes, spawned, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from deepranking import cli, distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = distributed.from_env()
    device = distributed.rank_device("cpu", env)
    log = Path(out) / f"rank{rank}.json"
    record = {}
    if scenario == "peer_dies":
        return _peer_dies(env, device, log)
    try:
        with distributed.session(env, device):
            def build():
                start = time.time()
                if scenario == "fail" and env.main:
                    raise cli.UserError("rank 0 cannot read the images")
                time.sleep(0.5 if env.main else 0.0)  # rank 0 "decodes"; the others would only map
                return (start, time.time())
            record["span"] = distributed.rank_zero_first(env, build)
            record["any"] = distributed.any_rank(env, env.rank == 1, device)
            record["host"] = list(distributed.any_rank_host(env, env.rank == 0, False, env.rank == 1))
            record["gather"] = distributed.all_gather(env, env.rank * 10)
    except cli.UserError as exc:
        record["error"] = str(exc)
    except SystemExit as exc:
        record["exit"] = exc.code
    log.write_text(json.dumps(record))


@pytest.mark.parametrize("scenario", ["ok", "fail"])
def test_rank_zero_builds_first_and_errors_reach_every_rank(tmp_path, scenario):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), scenario), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    if scenario == "ok":
        assert r1["span"][0] >= r0["span"][1]  # rank 1 started only after rank 0 had finished
        assert r0["any"] is True and r1["any"] is True  # a flag set on rank 1 alone reaches rank 0
        assert r0["gather"] == r1["gather"] == [0, 10]
        assert r0["host"] == r1["host"] == [True, False, True]  # the per-step stop flags, over gloo
    else:  # rank 0's error stops both: rank 0 reports it, rank 1 exits quietly with 2 (nobody hangs)
        assert r0 == {"error": "rank 0 cannot read the images"} and r1 == {"exit": 2}


def _peer_dies(env, device, log: Path) -> None:
    """Rank 1 dies (as a kill -9 would end it) between two collectives; rank 0 is left to notice."""
    try:
        with distributed.session(env, device, hint=lambda: "continue with --resume out/temp_0.model"):
            distributed.any_rank_host(env, False)
            if env.rank == 1:
                os._exit(9)
            time.sleep(0.3)
            distributed.any_rank_host(env, True)  # the stop-path's agreement: the peer is gone
    except cli.UserError as exc:
        log.write_text(json.dumps({"error": str(exc), "lost": isinstance(exc, distributed.PeerLost)}))


def test_a_rank_whose_peer_died_says_so_in_one_line(tmp_path):
    """Once a peer had died, the next collective raised gloo's RuntimeError with a C++ source path, and
    the rank ended in a traceback; now it is one line naming the rank and the checkpoint to resume from."""
    context = mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), "peer_dies"), nprocs=2,
                                 start_method="spawn", join=False)
    for process in context.processes:
        process.join(60)
    assert [p.exitcode for p in context.processes] == [0, 9]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert r0["lost"] and "\n" not in r0["error"]
    assert r0["error"].startswith("rank 0 of 2: lost contact with the other ranks (")
    assert r0["error"].endswith("another rank stopped or died; continue with --resume out/temp_0.model")
    assert "pair.cc" not in r0["error"] and "GLHF" not in r0["error"]


def test_peer_lost_keeps_the_backends_reason_without_its_source_location():
    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:1940. This is typically caused by a remote worker crashing. GLHF!")
    assert distributed.lost_contact(gloo) and not distributed.lost_contact(RuntimeError("shape mismatch"))
    exc = distributed.peer_lost(distributed.DistEnv(1, 4, 1), gloo, "no checkpoint to resume from")
    assert str(exc) == ("rank 1 of 4: lost contact with the other ranks (Connection closed by peer [127.0.0.1]:1940): "
                        "another rank stopped or died; no checkpoint to resume from")


def test_from_env_checks_the_torchrun_variables():
    assert distributed.from_env({}) == distributed.DistEnv(0, 1, 0)
    assert distributed.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).active
    with pytest.raises(cli.UserError, match="must be integers"):
        distributed.from_env({"RANK": "x"})
    with pytest.raises(cli.UserError, match="invalid RANK=2 / WORLD_SIZE=2"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert distributed.shard_bounds(10, 3) == [0, 3, 6, 10]
