// The transfer example (examples/transfer.rs) from Node.js, with @grpc/grpc-js.
//
// Begin at the coordinator, Post a debit and a credit to two ledger services with the
// transaction's id in `twopc-txn-id` metadata (so each Post joins it), then Commit. If either
// Post fails, Abort: nothing is left anywhere. The stubs are loaded at run time from the .proto
// files (@grpc/proto-loader).
//
//   node examples/node/transfer.js --coordinator http://127.0.0.1:50051 \
//       --from http://127.0.0.1:7001 --to http://127.0.0.1:7002 --account alice --amount 25
"use strict";

const path = require("node:path");
const { parseArgs, promisify } = require("node:util");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const root = path.join(__dirname, "..", "..");
const load = (file, dir) =>
  grpc.loadPackageDefinition(
    loader.loadSync(file, { includeDirs: [path.join(root, dir)], keepCase: true, enums: String, longs: String }),
  );
const twopc = load("twopc/v1/twopc.proto", "proto").twopc.v1;
const ledger = load("ledger/v1/ledger.proto", path.join("examples", "proto")).ledger.v1;

const target = (url) => url.replace(/^[a-z]+:\/\//, "");
const call = (client, method) => promisify(client[method].bind(client));

async function main() {
  const { values: a } = parseArgs({
    options: {
      coordinator: { type: "string", default: "http://127.0.0.1:50051" },
      from: { type: "string" },
      to: { type: "string" },
      account: { type: "string" },
      amount: { type: "string" },
      memo: { type: "string", default: "transfer" },
    },
  });
  const plain = grpc.credentials.createInsecure();
  const coordinator = new twopc.Coordinator(target(a.coordinator), plain);
  const { txn_id } = await call(coordinator, "Begin")({ label: "node transfer" });
  const joined = new grpc.Metadata();
  joined.set("twopc-txn-id", txn_id);
  try {
    for (const [url, amount] of [[a.from, -Number(a.amount)], [a.to, Number(a.amount)]]) {
      const l = new ledger.Ledger(target(url), plain);
      await call(l, "Post")({ account: a.account, amount, memo: a.memo }, joined);
    }
  } catch (e) {
    await call(coordinator, "Abort")({ txn_id, reason: e.details });
    console.log(`aborted everywhere: ${grpc.status[e.code]}: ${e.details}`);
    return 1;
  }
  const r = await call(coordinator, "Commit")({ txn_id });
  if (r.outcome !== "OUTCOME_COMMITTED") {
    console.log(`aborted everywhere: ${r.reason}`);
    return 1;
  }
  console.log(`committed: ${a.account} moved ${a.amount} from ${a.from} to ${a.to} in ${txn_id}`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(e);
    process.exit(2);
  },
);
