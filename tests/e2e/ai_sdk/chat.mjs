// Drives the service's AI SDK endpoint with the real `ai` package: its AbstractChat (what useChat
// wraps) over DefaultChatTransport, exactly as an app would. Prints one JSON document with what each
// scenario ended with; tests/e2e/test_ai_sdk.py asserts it part by part.
//
// Environment: SERVICE_URL, SERVICE_TOKEN (a bearer JWT), FAILING_MODEL (a model whose upstream cuts
// the answer).
import { AbstractChat, DefaultChatTransport } from "ai";

const api = `${process.env.SERVICE_URL}/v1/ai-sdk/chat`;
const headers = { Authorization: `Bearer ${process.env.SERVICE_TOKEN}` };
const DEADLINE_MS = 30_000;

/** The smallest ChatState: plain arrays, structuredClone snapshots. */
class State {
  status = "ready";
  error = undefined;
  messages = [];
  pushMessage = (message) => (this.messages = [...this.messages, message]);
  popMessage = () => (this.messages = this.messages.slice(0, -1));
  replaceMessage = (index, message) =>
    (this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)]);
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor(options) {
    super({ ...options, state: new State() });
  }
}

function chat(id, { fetch, body } = {}) {
  const errors = [];
  const finishes = [];
  const instance = new Chat({
    id,
    transport: new DefaultChatTransport({ api, headers, fetch, body }),
    onError: (error) => errors.push(error.message),
    onFinish: ({ isAbort, isDisconnect, isError, finishReason }) =>
      finishes.push({ isAbort, isDisconnect, isError, finishReason: finishReason ?? null }),
  });
  return { instance, errors, finishes };
}

async function until(condition, what) {
  const deadline = Date.now() + DEADLINE_MS;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const lastText = (c) => {
  const last = c.instance.messages.at(-1);
  return last?.role === "assistant" ? last.parts.filter((p) => p.type === "text").map((p) => p.text).join("") : "";
};

function outcome(c) {
  return { status: c.instance.status, messages: c.instance.messages, errors: c.errors, finishes: c.finishes };
}

/** A fetch whose response body fails like a dropped network after `chunks` reads (the server sees the close). */
function cutAfter(chunks) {
  return async (url, init) => {
    const response = await fetch(url, init);
    if (init?.method !== "POST") return response;
    const reader = response.body.getReader();
    let reads = 0;
    const body = new ReadableStream({
      async pull(controller) {
        if (reads++ === chunks) {
          await reader.cancel();
          controller.error(new TypeError("network error (cut by the test)"));
          return;
        }
        const { done, value } = await reader.read();
        if (done) controller.close();
        else controller.enqueue(value);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

async function textAnswerThenToolCall() {
  const c = chat(`text-${Date.now()}`);
  await c.instance.sendMessage({ text: "Please think, then say hello" });
  await c.instance.sendMessage({ text: "What time is it?" });
  return outcome(c);
}

async function stop() {
  const c = chat(`stop-${Date.now()}`);
  // The demo quotes the message word by word: 100 words take it longer than the service's grace after a stop.
  const long = Array.from({ length: 100 }, (_, i) => `word${i}`).join(" ");
  const sending = c.instance.sendMessage({ text: long });
  await until(() => lastText(c).length > 0, "the first text delta");
  await c.instance.stop();
  await sending;
  return { ...outcome(c), textAtStop: lastText(c) };
}

async function resumeAfterCut() {
  const c = chat(`resume-${Date.now()}`, { fetch: cutAfter(6) });
  await c.instance.sendMessage({ text: "Say something I can resume" });
  const afterCut = { status: c.instance.status, errors: [...c.errors], finishes: [...c.finishes], text: lastText(c) };
  await c.instance.resumeStream(); // what `resume: true` does after a reload: GET {api}/{id}/stream
  const nothingActive = await c.instance.transport.reconnectToStream({ chatId: c.instance.id, headers: {} });
  return { ...outcome(c), afterCut, nothingActiveIsNull: nothingActive === null };
}

async function failedRun() {
  const c = chat(`fail-${Date.now()}`, { body: { model: process.env.FAILING_MODEL } });
  await c.instance.sendMessage({ text: "This answer will be cut" });
  return { ...outcome(c), error: c.instance.error?.message ?? null };
}

const neverActive = await new DefaultChatTransport({ api, headers }).reconnectToStream({ chatId: "never-used" });
const result = {
  textAnswerThenToolCall: await textAnswerThenToolCall(),
  stop: await stop(),
  resumeAfterCut: await resumeAfterCut(),
  failedRun: await failedRun(),
  unknownChatResumeIsNull: neverActive === null,
};
process.stdout.write(JSON.stringify(result));
