// One assistant turn: its state (plain JSON, so it can be kept in sessionStorage) and its DOM.
//
// Model output only ever reaches the page through textContent / Text nodes, never innerHTML.
// `apply()` drops events whose seq it has already rendered, so a replay that overlaps what is on
// screen (a resume, a reconnect) cannot show anything twice.

export const TERMINAL_STATUS = {
  "run.completed": "completed",
  "run.cancelled": "cancelled",
  "run.failed": "failed",
};

/** The state of a turn nothing has been rendered for yet. */
export function emptyState(runId) {
  return {
    runId,
    seq: 0,
    status: "running",
    text: "",
    reasoning: "",
    refusal: "",
    tools: [], // {id, name, args, result, isError}
    output: null,
    outputFinal: false,
    usage: null,
    error: null, // {code, message}
  };
}

/** The state of a finished turn, rebuilt from the stored assistant and tool messages of one run. */
export function stateFromMessages(runId, messages) {
  const state = { ...emptyState(runId), status: "completed" };
  for (const message of messages) {
    if (message.role === "tool") {
      const call = state.tools.find((t) => t.id === message.tool_call_id);
      if (call) Object.assign(call, { result: textOf(message.content), isError: Boolean(message.is_error) });
      continue;
    }
    state.text += textOf(message.content);
    state.reasoning += message.reasoning || "";
    state.refusal += message.refusal || "";
    for (const call of message.tool_calls || []) {
      state.tools.push({ id: call.id, name: call.name, args: call.arguments, result: null, isError: false });
    }
    if (message.output !== null && message.output !== undefined) {
      Object.assign(state, { output: message.output, outputFinal: true });
    }
    if (message.usage) state.usage = message.usage;
    if (message.status && message.status !== "completed") state.status = message.status;
  }
  return state;
}

/** The text of a message's content: a string, or the text parts of a content-part list. */
export function textOf(content) {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content.map((part) => (part.type === "text" ? part.text : `[${part.type}]`)).join(" ");
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A user message as an <article>. */
export function userTurn(content) {
  const article = el("article", "turn user");
  article.append(el("header", "who", "You"), el("div", "text", textOf(content)));
  return article;
}

// Parts of the current turn that tests (and screen readers' users) find by data-testid.
const TEST_IDS = {
  text: "answer",
  reasoning: "reasoning",
  refusal: "refusal",
  tools: "tool-calls",
  output: "output",
  error: "run-error",
};

export class RunView {
  constructor(state) {
    this.state = state;
    this.root = el("article", "turn assistant");
    this.root.dataset.runId = state.runId;
    this.badge = el("span", "badge");
    const header = el("header", "who", "Assistant ");
    header.append(this.badge);
    this.parts = {
      reasoning: el("details", "reasoning"),
      tools: el("ol", "tool-calls"),
      text: el("div", "text"),
      refusal: el("p", "refusal"),
      output: el("section", "output"),
      error: el("p", "run-error"),
    };
    this.reasoningText = document.createTextNode("");
    const summary = el("summary", "", "Reasoning");
    const reasoningBody = el("div", "reasoning-text");
    reasoningBody.append(this.reasoningText);
    this.parts.reasoning.append(summary, reasoningBody);
    this.parts.reasoning.open = true;
    this.outputLabel = el("h3", "", "Structured output");
    this.outputPre = el("pre");
    this.parts.output.append(this.outputLabel, this.outputPre);
    this.textNode = document.createTextNode("");
    this.parts.text.append(this.textNode);
    this.usage = el("footer", "usage");
    this.root.append(header, ...Object.values(this.parts), this.usage);
    this.render();
  }

  /** Mark this turn as the current one (it carries the data-testids) or not. */
  setCurrent(current) {
    for (const [key, node] of Object.entries(this.parts)) {
      if (current) node.dataset.testid = TEST_IDS[key];
      else delete node.dataset.testid;
    }
  }

  get finished() {
    return this.state.status !== "running";
  }

  /** Render one event; false when it was already rendered (seq not past the last one). */
  apply(event) {
    const s = this.state;
    if (typeof event.seq !== "number" || event.seq <= s.seq) return false;
    s.seq = event.seq;
    switch (event.type) {
      case "text.delta":
        s.text += event.delta;
        this.textNode.appendData(event.delta); // token by token, as text
        break;
      case "reasoning.delta":
        s.reasoning += event.delta;
        this.reasoningText.appendData(event.delta);
        this.parts.reasoning.hidden = false;
        break;
      case "refusal.delta":
        s.refusal += event.delta;
        this.renderRefusal();
        break;
      case "refusal.done":
        s.refusal = event.refusal;
        this.renderRefusal();
        break;
      case "tool_call.started":
        s.tools.push({ id: event.call_id, name: event.name, args: "", result: null, isError: false });
        this.renderTools();
        break;
      case "tool_call.delta":
        this.updateTool(event.call_id, (t) => (t.args += event.arguments_delta));
        break;
      case "tool_call.done":
        this.updateTool(event.call_id, (t) => Object.assign(t, { name: event.name, args: event.arguments }));
        break;
      case "tool.result":
        this.updateTool(event.call_id, (t) => Object.assign(t, { result: event.output, isError: event.is_error }));
        break;
      case "output.partial":
        Object.assign(s, { output: event.partial, outputFinal: false });
        this.renderOutput();
        break;
      case "output.done":
        Object.assign(s, { output: event.output, outputFinal: true });
        this.renderOutput();
        break;
      case "usage":
        s.usage = { prompt_tokens: event.prompt_tokens, completion_tokens: event.completion_tokens };
        this.renderUsage();
        break;
      case "run.failed":
        s.error = event.error;
        this.finish("failed");
        break;
      default:
        if (event.type in TERMINAL_STATUS) this.finish(TERMINAL_STATUS[event.type]);
      // run.started, step.started/step.done, text.done, reasoning.done (the deltas drew it all) and
      // types this page does not know: nothing to draw
    }
    return true;
  }

  /** End the turn with `status` (from a terminal event, or from GET /v1/runs/{id}). */
  finish(status, error) {
    if (error) this.state.error = error;
    this.state.status = status;
    this.renderStatus();
  }

  updateTool(callId, change) {
    const call = this.state.tools.find((t) => t.id === callId);
    if (!call) return;
    change(call);
    this.renderTools();
  }

  render() {
    const s = this.state;
    this.textNode.data = s.text;
    this.reasoningText.data = s.reasoning;
    this.parts.reasoning.hidden = !s.reasoning;
    this.renderRefusal();
    this.renderTools();
    this.renderOutput();
    this.renderUsage();
    this.renderStatus();
  }

  renderRefusal() {
    this.parts.refusal.textContent = this.state.refusal;
    this.parts.refusal.hidden = !this.state.refusal;
  }

  renderTools() {
    const list = this.parts.tools;
    list.hidden = this.state.tools.length === 0;
    list.replaceChildren(
      ...this.state.tools.map((t) => {
        const item = el("li", t.isError ? "tool-call is-error" : "tool-call");
        item.dataset.callId = t.id;
        const head = el("div", "tool-head");
        head.append(el("span", "tool-label", "tool call"), el("code", "tool-name", t.name));
        item.append(head, el("pre", "tool-args", t.args || " "));
        if (t.result !== null) item.append(el("pre", "tool-result", t.result));
        else item.append(el("p", "tool-pending", "waiting for the result…"));
        return item;
      }),
    );
  }

  renderOutput() {
    const { output, outputFinal } = this.state;
    this.parts.output.hidden = output === null;
    this.parts.output.dataset.final = String(outputFinal);
    this.outputLabel.textContent = outputFinal ? "Structured output" : "Structured output (partial)";
    this.outputPre.textContent = output === null ? "" : JSON.stringify(output, null, 2);
  }

  renderUsage() {
    const u = this.state.usage;
    this.usage.textContent = u ? `${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens` : "";
  }

  renderStatus() {
    const { status, error } = this.state;
    this.badge.textContent = status;
    this.badge.className = `badge ${status}`;
    this.root.classList.toggle("streaming", status === "running");
    this.parts.error.hidden = !error;
    this.parts.error.textContent = error ? `${error.code}: ${error.message}` : "";
  }
}
