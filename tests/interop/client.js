#!/usr/bin/env node
// Interop check: a Node.js gRPC client (@grpc/grpc-js + @grpc/proto-loader)
// against an Ops-Core server. It loads the .proto files at run time, so it
// checks the wire contract in protos/ rather than any generated code.
//
// Usage: node tests/interop/client.js HOST:PORT
//   OPSCORE_API_KEY  optional; sent as `authorization: Bearer <key>`
//   OPSCORE_TLS_CA  optional CA certificate file: connect with TLS, trusting it
//   OPSCORE_TLS_CLIENT_CERT, OPSCORE_TLS_CLIENT_KEY  optional client certificate (mTLS)
//   INTEROP_DEADLINE_MS  optional per-call deadline (default 10000)
//
// On success prints one JSON line (`"ok": true`) on stdout and exits 0. On
// failure prints `interop client FAILED at <step>: <reason>` on stderr and
// exits 1 (2 for usage errors).
'use strict';

const fs = require('node:fs');
const path = require('node:path');

const AGENT_ID = 'node-interop-agent';
const CAPABILITY = 'node.echo';
const IDLE = 'AGENT_STATE_IDLE';

class StepError extends Error {
  constructor(step, message) {
    super(message);
    this.step = step;
  }
}

function fail(step, message) {
  throw new StepError(step, message);
}

function loadPackages(grpc, protoLoader) {
  const repoRoot = path.resolve(__dirname, '..', '..');
  // google/protobuf/{struct,timestamp}.proto are built into protobufjs (the
  // library proto-loader uses); its package directory also holds the .proto
  // files of the other well-known types, so it goes on the include path too.
  const protobufjsDir = path.dirname(require.resolve('protobufjs/package.json'));
  const options = {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [path.join(repoRoot, 'protos'), protobufjsDir],
  };
  const opscoreDef = protoLoader.loadSync(
    ['opscore/v1/lifecycle.proto', 'opscore/v1/dispatch.proto'],
    options,
  );
  const healthDef = protoLoader.loadSync(path.join(__dirname, 'health.proto'), {
    ...options,
    includeDirs: [__dirname],
  });
  return {
    opscore: grpc.loadPackageDefinition(opscoreDef).opscore.v1,
    health: grpc.loadPackageDefinition(healthDef).grpc.health.v1,
  };
}

function channelCredentials(grpc) {
  const { OPSCORE_TLS_CA: ca, OPSCORE_TLS_CLIENT_CERT: cert, OPSCORE_TLS_CLIENT_KEY: key } =
    process.env;
  if (!ca && !cert && !key) return grpc.credentials.createInsecure();
  const read = (file) => (file ? fs.readFileSync(file) : null);
  try {
    return grpc.credentials.createSsl(read(ca), read(key), read(cert));
  } catch (e) {
    fail('tls', e.message);
  }
}

function unary(grpc, client, method, request, metadata, deadlineMs) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + deadlineMs }, (err, resp) => {
      if (err) {
        const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
        reject(new StepError(method, `RPC failed: ${code || err.code}: ${err.details || err.message}`));
      } else {
        resolve(resp);
      }
    });
  });
}

function waitForReady(client, deadlineMs) {
  return new Promise((resolve, reject) => {
    client.waitForReady(Date.now() + deadlineMs, (err) => {
      if (err) reject(new StepError('connect', err.message));
      else resolve();
    });
  });
}

// google.protobuf.Struct as proto-loader represents it. protobufjs always uses
// its bundled copy of struct.proto, whose field names are camelCase
// (`stringValue`), whatever keepCase says.
function structFromStrings(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = { stringValue: v };
  return { fields };
}

function structGetString(struct, key) {
  const value = struct && struct.fields ? struct.fields[key] : undefined;
  return value ? value.stringValue : undefined;
}

function setup() {
  let grpc;
  let protoLoader;
  try {
    grpc = require('@grpc/grpc-js');
    protoLoader = require('@grpc/proto-loader');
  } catch (e) {
    fail('setup', `cannot load @grpc/grpc-js / @grpc/proto-loader (run npm install): ${e.message}`);
  }
  try {
    return { grpc, pkgs: loadPackages(grpc, protoLoader) };
  } catch (e) {
    fail('load-protos', e.message);
  }
}

async function run(target) {
  const { grpc, pkgs } = setup();

  const deadlineMs = Number(process.env.INTEROP_DEADLINE_MS || 10000);
  const metadata = new grpc.Metadata();
  if (process.env.OPSCORE_API_KEY) {
    metadata.set('authorization', `Bearer ${process.env.OPSCORE_API_KEY}`);
  }
  const creds = channelCredentials(grpc);
  const health = new pkgs.health.Health(target, creds);
  const lifecycle = new pkgs.opscore.LifecycleService(target, creds);
  const call = (client, method, request) =>
    unary(grpc, client, method, request, metadata, deadlineMs);

  try {
    await waitForReady(lifecycle, deadlineMs);

    const hc = await call(health, 'Check', { service: '' });
    if (hc.status !== 'SERVING') fail('health', `status for "" is ${hc.status}, want SERVING`);

    const reg = await call(lifecycle, 'RegisterAgent', {
      agent_id: AGENT_ID,
      name: 'Node interop agent',
      capabilities: [CAPABILITY],
      metadata: { lang: 'node' },
    });
    if (!reg.agent || reg.agent.agent_id !== AGENT_ID) {
      fail('RegisterAgent', `response agent_id is ${reg.agent && reg.agent.agent_id}`);
    }

    const rep = await call(lifecycle, 'ReportState', {
      agent_id: AGENT_ID,
      state: IDLE,
      details: structFromStrings({ from: 'node' }),
    });
    if (!rep.transition || rep.transition.to_state !== IDLE) {
      fail('ReportState', `transition.to_state is ${rep.transition && rep.transition.to_state}`);
    }

    const got = await call(lifecycle, 'GetAgent', { agent_id: AGENT_ID });
    const agent = got.agent;
    if (!agent) fail('GetAgent', 'response has no agent');
    if (agent.state !== IDLE) fail('GetAgent', `state is ${agent.state}, want ${IDLE}`);
    if (!agent.capabilities.includes(CAPABILITY)) {
      fail('GetAgent', `capabilities ${JSON.stringify(agent.capabilities)} lack ${CAPABILITY}`);
    }
    if (agent.metadata.lang !== 'node') {
      fail('GetAgent', `metadata ${JSON.stringify(agent.metadata)} lacks lang=node`);
    }
    const detailsFrom = structGetString(agent.state_details, 'from');
    if (detailsFrom !== 'node') {
      fail('GetAgent', `state_details.from is ${JSON.stringify(detailsFrom)}, want "node"`);
    }

    const hist = await call(lifecycle, 'ListStateTransitions', { agent_id: AGENT_ID });
    const transitions = hist.transitions || [];
    const idle = transitions.filter((t) => t.to_state === IDLE);
    if (idle.length === 0) {
      fail(
        'ListStateTransitions',
        `no transition to ${IDLE} among ${JSON.stringify(transitions.map((t) => t.to_state))}`,
      );
    }

    return {
      ok: true,
      target,
      health: hc.status,
      agent_id: agent.agent_id,
      created: reg.created,
      state: agent.state,
      capabilities: agent.capabilities,
      metadata: agent.metadata,
      state_details_from: detailsFrom,
      register_time_seconds: agent.register_time ? agent.register_time.seconds : null,
      transitions: transitions.length,
      idle_transitions: idle.length,
      latest_transition: {
        from_state: transitions[0].from_state,
        to_state: transitions[0].to_state,
        source: transitions[0].source,
        sequence: transitions[0].sequence,
      },
    };
  } finally {
    health.close();
    lifecycle.close();
  }
}

// Runs `run(target)` as a program: its report as one JSON line on stdout (exit
// 0), or `<name> FAILED at <step>: <reason>` on stderr (exit 1).
async function main(name, run) {
  const target = process.argv[2];
  if (!target) {
    process.stderr.write(`usage: node ${path.relative(process.cwd(), process.argv[1])} HOST:PORT\n`);
    process.exit(2);
  }
  try {
    const result = await run(target);
    process.stdout.write(JSON.stringify(result) + '\n');
    process.exit(0);
  } catch (e) {
    const step = e instanceof StepError ? e.step : 'unexpected';
    process.stderr.write(`${name} FAILED at ${step}: ${e.message}\n`);
    process.exit(1);
  }
}

module.exports = {
  StepError,
  channelCredentials,
  fail,
  main,
  setup,
  structFromStrings,
  structGetString,
  unary,
  waitForReady,
};

if (require.main === module) main('interop client', run);
