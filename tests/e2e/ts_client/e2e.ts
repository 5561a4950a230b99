/**
 * Drives the live service with the TypeScript client generated from openapi/openapi.json.
 *
 * Usage: SERVICE_URL=http://127.0.0.1:PORT SERVICE_TOKEN=<bearer JWT> tsx e2e.ts
 * (the suite first compiles it with `tsc --strict --noEmit`: no cast, and the switch over the event
 * union is exhaustive). Creates a chat, starts a run with `createRunStream` and reads its events as they
 * arrive, cuts the stream while the run is still going, resumes with `streamRun` and `Last-Event-ID`,
 * and checks the seqs are exactly 1..N with no gap or duplicate, the last event is `run.completed`, and
 * the text deltas add up to `text.done`. A finished run read again answers an empty stream (no retry).
 * Exits non-zero on any failure.
 */
import { client } from '../generated/ts/client.gen';
import { createChat, createRunStream, getRun, streamRun } from '../generated/ts/sdk.gen';
import type { StreamRunResponses } from '../generated/ts/types.gen';

/** The element type of both streaming operations: the event union, discriminated by `type`. */
type Event = StreamRunResponses[200];

const baseUrl = process.env.SERVICE_URL;
const token = process.env.SERVICE_TOKEN;
const CUT_AFTER = 4;

function fail(message: string): never {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

/** What a client renders of each event; the `never` check fails to compile when a type is added. */
function render(event: Event): string {
  switch (event.type) {
    case 'run.started':
      return `started ${event.model}`;
    case 'step.started':
      return `step ${event.step}`;
    case 'step.done':
      return `step ${event.step} done (${event.finish_reason})`;
    case 'text.delta':
    case 'reasoning.delta':
    case 'refusal.delta':
      return event.delta;
    case 'text.done':
    case 'reasoning.done':
      return `[${event.text.length} chars]`;
    case 'refusal.done':
      return `refused: ${event.refusal}`;
    case 'tool_call.started':
      return `call ${event.name}`;
    case 'tool_call.delta':
      return event.arguments_delta;
    case 'tool_call.done':
      return `call ${event.name}(${event.arguments})`;
    case 'tool.result':
      return `${event.name} -> ${event.output}${event.is_error ? ' (error)' : ''}`;
    case 'output.partial':
      return JSON.stringify(event.partial);
    case 'output.done':
      return JSON.stringify(event.output);
    case 'usage':
      return `${event.total_tokens} tokens`;
    case 'run.snapshot':
      return `snapshot at ${event.seq}: ${event.text ?? ''}`;
    case 'run.completed':
      return `completed (${event.finish_reason})`;
    case 'run.cancelled':
      return `cancelled (${event.reason})`;
    case 'run.failed':
      return `failed: ${event.error.code}`;
    default: {
      // A type this client was not generated with: ignore it, as the API's documentation asks.
      const unknown: never = event;
      void unknown;
      return '';
    }
  }
}

function isTerminal(event: Event): boolean {
  return event.type === 'run.completed' || event.type === 'run.cancelled' || event.type === 'run.failed';
}

/** The SDK retries a dropped stream by itself; here any error is a failure, so it never retries. */
function streamOptions(controller: AbortController, what: string) {
  return {
    signal: controller.signal,
    sseMaxRetryAttempts: 1,
    onSseError: (error: unknown) => {
      if (!controller.signal.aborted) fail(`${what}: ${String(error)}`);
    },
  };
}

/** Read `stream` until `limit` events or its end; then cut the connection (a no-op once it ended). */
async function read(stream: AsyncGenerator<Event>, controller: AbortController, limit: number): Promise<Event[]> {
  const events: Event[] = [];
  for await (const event of stream) {
    events.push(event);
    if (events.length >= limit || isTerminal(event)) break;
  }
  controller.abort();
  return events;
}

async function main(): Promise<void> {
  if (!baseUrl) fail('SERVICE_URL is not set');
  if (!token) fail('SERVICE_TOKEN is not set');
  client.setConfig({ baseUrl });
  const refused = await createChat({ body: { model: 'demo' } });
  if (refused.response.status !== 401) fail(`without a token: ${refused.response.status}, not 401`);
  // The generated SDK sends the token on every operation whose security names the bearer scheme.
  client.setConfig({ baseUrl, auth: (auth) => (auth.scheme === 'bearer' ? token : undefined) });

  const chat = await createChat({ body: { model: 'demo' } });
  if (chat.data === undefined) fail(`create chat: ${chat.response.status}`);

  const starting = new AbortController();
  const { stream: started } = await createRunStream({
    path: { chat_id: chat.data.id },
    body: { message: 'Tell me a story about typed events.' },
    ...streamOptions(starting, 'createRunStream'),
  });
  const first = await read(started, starting, CUT_AFTER);
  const last = first.at(-1);
  if (last === undefined || first.length < CUT_AFTER) fail(`only ${first.length} events before the cut`);
  const runId = last.run_id;
  const during = await getRun({ path: { run_id: runId } });
  if (during.data?.status !== 'running') fail(`the run was ${during.data?.status} at the cut: the stream did not stream`);

  const resuming = new AbortController();
  const { stream: resumed } = await streamRun({
    path: { run_id: runId },
    headers: { 'Last-Event-ID': String(last.seq) },
    ...streamOptions(resuming, 'streamRun'),
  });
  const rest = await read(resumed, resuming, Number.POSITIVE_INFINITY);
  const events = [...first, ...rest];

  const seqs = events.map((event) => event.seq);
  const expected = Array.from({ length: events.length }, (_, i) => i + 1);
  if (JSON.stringify(seqs) !== JSON.stringify(expected)) fail(`seqs are not 1..N: ${JSON.stringify(seqs)}`);
  const terminal = events.at(-1);
  if (terminal?.type !== 'run.completed') fail(`last event is ${terminal?.type}, not run.completed`);
  if (events.some((event) => event.run_id !== runId)) fail('an event of another run');
  const deltas = events.flatMap((event) => (event.type === 'text.delta' ? [event.delta] : []));
  const done = events.find((event) => event.type === 'text.done');
  if (done?.type !== 'text.done' || deltas.join('') !== done.text) fail('the text deltas do not add up to text.done');

  const status = await getRun({ path: { run_id: runId } });
  if (status.data?.status !== 'completed' || status.data.last_seq !== events.length) {
    fail(`run status ${JSON.stringify(status.data)} does not match the stream (${events.length} events)`);
  }
  const again = new AbortController();
  const { stream: finished } = await streamRun({
    path: { run_id: runId },
    headers: { 'Last-Event-ID': String(terminal.seq) },
    ...streamOptions(again, 'streamRun of a finished run'),
  });
  const none = await read(finished, again, Number.POSITIVE_INFINITY);
  if (none.length !== 0) fail(`a finished run sent ${none.length} more events`);

  console.log(
    `OK: ${events.length} events (cut after ${first.length} while running, resumed from Last-Event-ID ${last.seq}); ` +
      `types: ${[...new Set(events.map((event) => event.type))].join(', ')}; ` +
      `text: ${JSON.stringify(events.map(render).join('').slice(0, 60))}`,
  );
}

main().catch((error: unknown) => fail(String(error instanceof Error ? (error.stack ?? error.message) : error)));
