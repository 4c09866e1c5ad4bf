"""The transfer example (examples/transfer.rs) from Python, with grpcio.

Begin at the coordinator, Post a debit and a credit to two ledger services with the
transaction's id in `twopc-txn-id` metadata (so each Post joins it), then Commit. If either
Post fails, Abort: nothing is left anywhere. The stubs are made at run time from the .proto
files (grpcio-tools), so there is nothing to generate first.

    .venv/bin/python examples/python/transfer.py --coordinator http://127.0.0.1:50051 \\
        --from http://127.0.0.1:7001 --to http://127.0.0.1:7002 --account alice --amount 25
"""

import argparse
import os
import sys

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path += [os.path.join(ROOT, "proto"), os.path.join(ROOT, "examples", "proto")]
twopc, twopc_grpc = grpc.protos_and_services("twopc/v1/twopc.proto")
ledger, ledger_grpc = grpc.protos_and_services("ledger/v1/ledger.proto")


def target(url):
    """grpc wants host:port, not a URL."""
    return url.split("://", 1)[-1]


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
    txn = coordinator.Begin(twopc.BeginRequest(label="python transfer")).txn_id
    joined = [("twopc-txn-id", txn)]
    try:
        for url, amount in [(a.source, -a.amount), (a.to, a.amount)]:
            post = ledger.PostRequest(account=a.account, amount=amount, memo=a.memo)
            ledger_grpc.LedgerStub(grpc.insecure_channel(target(url))).Post(post, metadata=joined)
    except grpc.RpcError as e:
        coordinator.Abort(twopc.AbortRequest(txn_id=txn, reason=e.details()))
        print(f"aborted everywhere: {e.code().name}: {e.details()}")
        return 1
    r = coordinator.Commit(twopc.CommitRequest(txn_id=txn))
    if r.outcome != twopc.OUTCOME_COMMITTED:
        print(f"aborted everywhere: {r.reason}")
        return 1
    print(f"committed: {a.account} moved {a.amount} from {a.source} to {a.to} in {txn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
