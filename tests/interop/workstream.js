#!/usr/bin/env node
// Interop check: a Node.js agent on the work stream (DispatchService.Connect),
// with @grpc/grpc-js + @grpc/proto-loader and the .proto files loaded at run
// time. It registers, says hello, and for each assignment sends a heartbeat
// (with progress) and the completion together in one message, checking the
// server's answer to each. After INTEROP_TASKS tasks (default 1) it
// half-closes and waits for the server to end the stream with OK.
//
// Usage: node tests/interop/workstream.js HOST:PORT
//   OPSCORE_API_KEY, OPSCORE_TLS_CA, OPSCORE_TLS_CLIENT_CERT, OPSCORE_TLS_CLIENT_KEY,
//   INTEROP_DEADLINE_MS  as for client.js (the deadline bounds the whole run)
//   INTEROP_AGENT_ID  optional (default node-interop-worker)
//   INTEROP_TASKS  how many tasks to complete before leaving (default 1)
//
// On success prints one JSON line (`"ok": true`) on stdout and exits 0; on
// failure `interop agent FAILED at <step>: <reason>` on stderr and exits 1.
'use strict';

const { StepError, channelCredentials, main, setup, structGetString, unary, waitForReady } =
  require('./client.js');

const AGENT_ID = process.env.INTEROP_AGENT_ID || 'node-interop-worker';
const CAPABILITY = 'node.work';

// A Struct value as proto-loader takes it (protobufjs' bundled struct.proto is
// camelCase: `stringValue`).
const text = (value) => ({ stringValue: String(value) });

function statusName(grpc, code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

// Holds the work stream open until `wanted` tasks are completed, then
// half-closes; resolves with what happened once the server ended it with OK.
function work(grpc, dispatch, metadata, wanted, deadlineMs) {
  return new Promise((resolve, reject) => {
    const call = dispatch.Connect(metadata);
    const report = { accepted: null, tasks: [], answers: [], end: null };
    const asked = new Map(); // item id -> its kind, until answered
    let nextId = 1;
    let completed = 0;
    const stop = (error) => {
      clearTimeout(timer);
      call.cancel();
      reject(error);
    };
    const timer = setTimeout(
      () => stop(new StepError('Connect', `not done within ${deadlineMs} ms`)),
      deadlineMs,
    );

    // Several items in one message; each gets its own id, answered in order.
    const send = (items) => {
      const messages = items.map((item) => ({ id: String(nextId++), ...item }));
      for (const m of messages) asked.set(m.id, Object.keys(m).find((k) => k !== 'id'));
      call.write({ messages });
    };

    call.on('data', (response) => {
      try {
        if (response.accepted) {
          report.accepted = {
            agent_id: response.accepted.agent.agent_id,
            max_in_flight: response.accepted.max_in_flight,
            agent_timeout_seconds: Number(response.accepted.agent_timeout.seconds),
          };
        }
        for (const m of response.messages) {
          if (m.message === 'assignment') {
            const task = m.assignment.task;
            report.tasks.push({ task_id: task.task_id, attempt: task.attempt });
            const { task_id, attempt } = task;
            send([
              { heartbeat: { task_id, attempt, progress: { fields: { stage: text('working') } } } },
              {
                completion: {
                  task_id,
                  attempt,
                  output: {
                    fields: { echo: text(structGetString(task.input, 'text')), lang: text('node') },
                  },
                },
              },
            ]);
          } else if (m.message === 'result') {
            const r = m.result;
            const kind = asked.get(r.id);
            asked.delete(r.id);
            if (kind === undefined) throw new StepError('result', `answer to unknown item ${r.id}`);
            if (r.code !== 0) {
              throw new StepError('result', `${kind} ${r.id} refused: ${r.code} ${r.reason}: ${r.message}`);
            }
            report.answers.push({ id: r.id, kind, code: r.code, task_state: r.task_state });
            if (kind === 'completion' && ++completed === wanted) call.end(); // half-close
          } else if (m.message === 'cancellation') {
            report.tasks.push({ cancelled: m.cancellation.task_id });
          }
        }
      } catch (e) {
        stop(e);
      }
    });
    call.on('error', (err) => {
      stop(new StepError('Connect', `stream failed: ${statusName(grpc, err.code)}: ${err.details}`));
    });
    call.on('status', (status) => {
      if (status.code !== grpc.status.OK) return; // 'error' has it
      clearTimeout(timer);
      if (completed < wanted) {
        reject(new StepError('Connect', `stream ended after ${completed} of ${wanted} tasks`));
        return;
      }
      report.end = statusName(grpc, status.code);
      resolve(report);
    });

    call.write({ hello: { agent_id: AGENT_ID, max_in_flight: 1 } });
  });
}

async function run(target) {
  const { grpc, pkgs } = setup();
  const deadlineMs = Number(process.env.INTEROP_DEADLINE_MS || 10000);
  const wanted = Number(process.env.INTEROP_TASKS || 1);
  const metadata = new grpc.Metadata();
  if (process.env.OPSCORE_API_KEY) {
    metadata.set('authorization', `Bearer ${process.env.OPSCORE_API_KEY}`);
  }
  const creds = channelCredentials(grpc);
  const lifecycle = new pkgs.opscore.LifecycleService(target, creds);
  const dispatch = new pkgs.opscore.DispatchService(target, creds, {
    channelOverride: lifecycle.getChannel(),
  });
  try {
    await waitForReady(lifecycle, deadlineMs);
    await unary(
      grpc,
      lifecycle,
      'RegisterAgent',
      { agent_id: AGENT_ID, name: 'Node work-stream agent', capabilities: [CAPABILITY] },
      metadata,
      deadlineMs,
    );
    const report = await work(grpc, dispatch, metadata, wanted, deadlineMs);
    return { ok: true, agent_id: AGENT_ID, ...report };
  } finally {
    dispatch.close();
    lifecycle.close();
  }
}

main('interop agent', run);
