// The transfer example (examples/transfer.rs) from Node.js, with @grpc/grpc-js.
//
// A transaction in three kinds of call (docs/PROTOCOL.md §12): the coordinator's epoch (asked
// once), the id made here as a UUIDv7, a debit and a credit Posted to two ledger services with
// the id and epoch in `twopc-txn-id` / `twopc-epoch` metadata (so each Post joins the
// transaction, and its first statement creates it), then Commit naming every participant the
// Posts reached (the services say which in `twopc-participants`). If either Post fails, Abort:
// nothing is left anywhere. The stubs are loaded at run time from the .proto files
// (@grpc/proto-loader).
//
//   node examples/node/transfer.js --coordinator http://127.0.0.1:50051 \
//       --from http://127.0.0.1:7001 --to http://127.0.0.1:7002 --account alice --amount 25
"use strict";

const path = require("node:path");
const { parseArgs, promisify } = require("node:util");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const { v7: uuidv7 } = require("uuid");

const root = path.join(__dirname, "..", "..");
const load = (file, dir) =>
  grpc.loadPackageDefinition(
    loader.loadSync(file, { includeDirs: [path.join(root, dir)], keepCase: true, enums: String, longs: String }),
  );
const twopc = load("twopc/v1/twopc.proto", "proto").twopc.v1;
const ledger = load("ledger/v1/ledger.proto", path.join("examples", "proto")).ledger.v1;

const target = (url) => url.replace(/^[a-z]+:\/\//, "");
const call = (client, method) => promisify(client[method].bind(client));

// A unary call that also yields the response's initial metadata (or the error's).
const withMetadata = (client, method, req, md) =>
  new Promise((resolve, reject) => {
    let headers = new grpc.Metadata();
    const c = client[method](req, md, (err, resp) => (err ? reject(Object.assign(err, { headers })) : resolve({ resp, headers })));
    c.on("metadata", (m) => (headers = m));
  });
// The participants a service's handler sent statements to (`twopc-participants`).
const reported = (md) => String(md.get("twopc-participants")[0] ?? "").split(",").filter(Boolean);

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
  const { epoch } = await call(coordinator, "GetEpoch")({});
  const txn_id = uuidv7();
  const joined = new grpc.Metadata();
  joined.set("twopc-txn-id", txn_id);
  joined.set("twopc-epoch", String(epoch));
  joined.set("twopc-timeout-ms", "30000");
  const names = [];
  try {
    for (const [url, amount] of [[a.from, -Number(a.amount)], [a.to, Number(a.amount)]]) {
      const l = new ledger.Ledger(target(url), plain);
      try {
        const { headers } = await withMetadata(l, "Post", { account: a.account, amount, memo: a.memo }, joined);
        names.push(...reported(headers));
      } catch (e) {
        // Named whatever the answer: its statements may have enlisted.
        // An error without a body comes as trailers only: the names are in its metadata.
        const said = [...reported(e.headers), ...reported(e.metadata ?? new grpc.Metadata())];
        names.push(...(said.length ? said : [url]));
        throw e;
      }
    }
  } catch (e) {
    await call(coordinator, "Abort")({ txn_id, reason: e.details, epoch });
    console.log(`aborted everywhere: ${grpc.status[e.code]}: ${e.details}`);
    return 1;
  }
  const r = await call(coordinator, "Commit")({ txn_id, participants: { names } });
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
