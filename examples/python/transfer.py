"""The transfer example (examples/transfer.rs) from Python, with grpcio.

A transaction in three kinds of call (docs/PROTOCOL.md §12): the coordinator's epoch (asked
once), the id made here as a UUIDv7, a debit and a credit Posted to two ledger services with
the id and epoch in `twopc-txn-id` / `twopc-epoch` metadata (so each Post joins the
transaction, and its first statement creates it), then Commit naming every participant the
Posts reached (the services say which in `twopc-participants`). If either Post fails, Abort:
nothing is left anywhere. The stubs are made at run time from the .proto files
(grpcio-tools), so there is nothing to generate first.

    .venv/bin/python examples/python/transfer.py --coordinator http://127.0.0.1:50051 \\
        --from http://127.0.0.1:7001 --to http://127.0.0.1:7002 --account alice --amount 25
"""

import argparse
import os
import sys

import grpc
import uuid6

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path += [os.path.join(ROOT, "proto"), os.path.join(ROOT, "examples", "proto")]
twopc, twopc_grpc = grpc.protos_and_services("twopc/v1/twopc.proto")
ledger, ledger_grpc = grpc.protos_and_services("ledger/v1/ledger.proto")


def target(url):
    """grpc wants host:port, not a URL."""
    return url.split("://", 1)[-1]


def reported(call):
    """The participants a service's handler sent statements to (`twopc-participants`); an
    error without a body comes as trailers only, so they are looked for there too."""
    names = []
    for key, value in [*(call.initial_metadata() or ()), *(call.trailing_metadata() or ())]:
        if key == "twopc-participants":
            names += [n for n in value.split(",") if n]
    return names


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", default="http://127.0.0.1:50051")
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--account", required=True)
    p.add_argument("--amount", type=int, required=True)
    p.add_argument("--memo", default="transfer")
    a = p.parse_args()

    coordinator = twopc_grpc.CoordinatorStub(grpc.insecure_channel(target(a.coordinator)))
    epoch = coordinator.GetEpoch(twopc.GetEpochRequest()).epoch
    txn = str(uuid6.uuid7())
    joined = [("twopc-txn-id", txn), ("twopc-epoch", str(epoch)), ("twopc-timeout-ms", "30000")]
    named = []
    try:
        for url, amount in [(a.source, -a.amount), (a.to, a.amount)]:
            post = ledger.PostRequest(account=a.account, amount=amount, memo=a.memo)
            stub = ledger_grpc.LedgerStub(grpc.insecure_channel(target(url)))
            try:
                _, call = stub.Post.with_call(post, metadata=joined)
                named += reported(call)
            except grpc.RpcError as e:
                # Named whatever the answer: its statements may have enlisted.
                named += reported(e) or [url]
                raise
    except grpc.RpcError as e:
        coordinator.Abort(twopc.AbortRequest(txn_id=txn, reason=e.details(), epoch=epoch))
        print(f"aborted everywhere: {e.code().name}: {e.details()}")
        return 1
    r = coordinator.Commit(
        twopc.CommitRequest(txn_id=txn, participants=twopc.Participants(names=named))
    )
    if r.outcome != twopc.OUTCOME_COMMITTED:
        print(f"aborted everywhere: {r.reason}")
        return 1
    print(f"committed: {a.account} moved {a.amount} from {a.source} to {a.to} in {txn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
