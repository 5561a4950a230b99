// The demo page: chats, a model, a transport, and one streamed answer at a time.
//
// Reload-safe: the current chat id and, per run, the rendered state of the turn (with the seq of
// the last event rendered) live in sessionStorage. On load the page re-renders the chat's stored
// messages, asks for the chat's active run, restores that turn from sessionStorage and resumes
// after its last seq (EventSource `?after=`, or WebSocket `run.resume`), so nothing shows twice.

import * as api from "./api.js";
import { setToken, token } from "./auth.js";
import { RunView, emptyState, stateFromMessages, userTurn } from "./run-view.js";
import { SseTransport, WsTransport } from "./transports.js";

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const ui = Object.fromEntries(
  ["new-chat", "chat-list", "model", "transport", "connection", "conversation", "error", "composer"]
    .concat(["message", "schema", "status", "stop", "send", "access", "access-summary", "token-form", "token"])
    .map((id) => [id.replace(/-(.)/g, (_, c) => c.toUpperCase()), byTestId(id)]),
);

/** What survives a reload of this tab. */
const saved = {
  get: (key) => sessionStorage.getItem(`chat.${key}`),
  set: (key, value) =>
    value === null ? sessionStorage.removeItem(`chat.${key}`) : sessionStorage.setItem(`chat.${key}`, value),
  run: (runId) => JSON.parse(saved.get(`run.${runId}`) || "null"),
  saveRun: (state) => saved.set(`run.${state.runId}`, JSON.stringify(state)),
  dropRun: (runId) => saved.set(`run.${runId}`, null),
};

const transports = { sse: new SseTransport(), ws: new WsTransport(showError) };
let chatId = null;
let live = null; // {view, transport}: the run this page is following
let current = null; // the RunView that carries the data-testids (the latest assistant turn)

function showError(error) {
  ui.error.textContent = `${error.code || "error"}: ${error.message}`;
  ui.error.hidden = false;
  if (error.status === 401 || error.code === "unauthorized") {
    ui.access.open = true; // the service has auth on: ask for a token
    ui.error.textContent += token() ? " (paste a new access token)" : " (this service needs an access token)";
  }
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setStatus(status) {
  ui.status.textContent = status;
  ui.status.className = `status ${status}`;
}

function setBusy(busy) {
  ui.stop.disabled = !busy;
  ui.send.disabled = busy;
}

function addTurn(node) {
  ui.conversation.querySelector(".empty")?.remove();
  ui.conversation.append(node);
  node.scrollIntoView({ block: "end" });
}

function makeCurrent(view) {
  current?.setCurrent(false);
  current = view;
  view.setCurrent(true);
}

/** Stored messages, each run's assistant and tool messages grouped into one turn. */
function renderMessages(messages, skipRunId) {
  ui.conversation.replaceChildren();
  let group = null;
  const flush = () => {
    if (!group) return;
    const view = new RunView(stateFromMessages(group.runId, group.messages));
    addTurn(view.root);
    makeCurrent(view);
    setStatus(view.state.status);
    group = null;
  };
  for (const message of messages) {
    if (message.role === "user") {
      flush();
      addTurn(userTurn(message.content));
    } else if (message.role !== "system" && message.run_id !== skipRunId) {
      if (group && group.runId !== message.run_id) flush();
      group ??= { runId: message.run_id, messages: [] };
      group.messages.push(message);
    }
  }
  flush();
  if (!ui.conversation.firstChild) ui.conversation.append(emptyNote());
}

/** Show a run's turn and make it the live one. */
function attach(state, transport) {
  const view = new RunView(state);
  addTurn(view.root);
  makeCurrent(view);
  live = { view, transport };
  saved.saveRun(state);
  setStatus(state.status);
  setBusy(true);
  return view;
}

/** The transport callbacks for one run (`view` is known at once on resume, after onRun on start). */
function runHandlers(transport, view = null) {
  return {
    onRun(run) {
      view = attach(emptyState(run.id), transport);
    },
    onEvent(event) {
      if (!view || !view.apply(event)) return; // already rendered: a replay overlap
      saved.saveRun(view.state); // the state and its seq, together
      view.root.scrollIntoView({ block: "end" });
      if (view.finished) finished(view);
    },
    onEnd() {
      if (view && !view.finished) settle(view);
    },
    onError(error) {
      showError(error);
      if (view) settle(view);
      else {
        setStatus("failed");
        setBusy(false);
      }
    },
    onConnection(state) {
      ui.connection.textContent = state === "open" ? "" : state;
    },
  };
}

function finished(view) {
  saved.dropRun(view.state.runId);
  if (view.state.error) showError(view.state.error);
  if (live?.view === view) {
    live = null;
    setBusy(false);
    setStatus(view.state.status);
    ui.connection.textContent = "";
  }
  refreshChats();
}

/** The stream ended without a terminal event in view: ask the run how it ended. */
async function settle(view) {
  try {
    const run = await api.getRun(view.state.runId);
    if (run.status === "running") {
      showError({ code: "stream_closed", message: "the event stream closed; the run goes on (reload to resume)" });
      return;
    }
    view.finish(run.status);
    finished(view);
  } catch (err) {
    showError(err);
  }
}

function runBody(text) {
  const body = { message: text };
  if (ui.model.value) body.model = ui.model.value;
  const schema = ui.schema.value.trim();
  if (schema) {
    body.response_format = { type: "json_schema", json_schema: { name: "output", schema: JSON.parse(schema) } };
  }
  return body;
}

async function send(event) {
  event.preventDefault();
  const text = ui.message.value.trim();
  if (!text || live) return;
  clearError();
  let body;
  try {
    body = runBody(text);
  } catch (err) {
    showError({ code: "invalid_schema", message: `the JSON schema is not JSON: ${err.message}` });
    return;
  }
  setBusy(true);
  try {
    if (!chatId) await openChat((await api.createChat(chatBody())).id);
    setBusy(true);
    setStatus("starting");
    addTurn(userTurn(text));
    ui.message.value = "";
    const transport = transports[ui.transport.value];
    await transport.start(chatId, body, runHandlers(transport));
  } catch (err) {
    showError(err);
    setStatus("failed");
    setBusy(false);
  }
}

function stop() {
  if (!live) return;
  live.transport.cancel(live.view.state.runId).catch(showError); // run.cancelled arrives on the stream
}

function chatBody() {
  return ui.model.value ? { model: ui.model.value } : {};
}

async function openChat(id) {
  if (live) live.transport.detach(live.view.state.runId); // the run goes on without us
  live = null;
  current = null;
  chatId = id;
  saved.set("current", id);
  clearError();
  setBusy(false);
  setStatus("");
  highlightChat();
  const run = await api.activeRun(id);
  const chat = await api.getChat(id);
  renderMessages(chat.messages || [], run?.id);
  if (run) resume(run);
}

function resume(run) {
  const transport = transports[ui.transport.value];
  const state = saved.run(run.id) || emptyState(run.id);
  const handlers = runHandlers(transport, attach(state, transport));
  Promise.resolve(transport.follow(run, state.seq, handlers)).catch((err) =>
    handlers.onError({ code: "connection_failed", message: err.message }),
  );
}

async function newChat() {
  try {
    await openChat((await api.createChat(chatBody())).id);
    await refreshChats();
  } catch (err) {
    showError(err);
  }
}

function emptyNote() {
  const note = document.createElement("p");
  note.className = "empty";
  note.textContent = "No messages yet.";
  return note;
}

async function refreshChats() {
  try {
    const page = await api.listChats();
    ui.chatList.replaceChildren(
      ...page.items.map((chat) => {
        const item = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.chatId = chat.id;
        button.textContent = `${new Date(chat.updated_at * 1000).toLocaleString()} · ${chat.model} · ${chat.id.slice(0, 6)}`;
        button.title = chat.id;
        button.onclick = () => openChat(chat.id).catch(showError);
        item.append(button);
        return item;
      }),
    );
    highlightChat();
  } catch (err) {
    showError(err);
  }
}

function highlightChat() {
  for (const button of ui.chatList.querySelectorAll("button")) {
    if (button.dataset.chatId === chatId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

async function loadModels() {
  const models = await api.listModels();
  ui.model.replaceChildren(
    ...models.data.map((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      return option;
    }),
  );
  const preferred = saved.get("model");
  if (preferred && models.data.some((m) => m.id === preferred)) ui.model.value = preferred;
}

function useToken(event) {
  event.preventDefault();
  setToken(ui.token.value);
  location.reload(); // everything the page shows depends on who is asking
}

async function init() {
  ui.accessSummary.textContent = token() ? "Access token (set)" : "Access token";
  ui.tokenForm.onsubmit = useToken;
  ui.transport.value = saved.get("transport") || "sse";
  ui.transport.onchange = () => saved.set("transport", ui.transport.value);
  ui.model.onchange = () => saved.set("model", ui.model.value);
  ui.composer.onsubmit = send;
  ui.stop.onclick = stop;
  ui.newChat.onclick = newChat;
  ui.message.onkeydown = (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  };
  try {
    await loadModels();
    await refreshChats();
    const id = saved.get("current");
    if (id) {
      await openChat(id).catch((err) => {
        saved.set("current", null); // deleted or unreachable: start afresh
        chatId = null;
        throw err;
      });
    }
  } catch (err) {
    showError(err);
  } finally {
    document.body.dataset.ready = "true"; // tests wait for this before typing
  }
}

init();
