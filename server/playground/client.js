/* epispec playground, live page: sends the form to the streamed POST /generate (prompt mode)
   or POST /v1/chat/completions (chat mode) with fetch + ReadableStream (EventSource can
   neither POST nor send an Authorization header), feeds each token to EpiView, and aborts
   the fetch on Stop, which the server turns into an abort of the request in the engine. */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const transcript = $("transcript");
  const view = new EpiView.View(transcript, { legend: $("legend"), summary: $("summary"),
                                              chart: $("chart"), tooltip: $("tooltip") });
  let controller = null;
  let history = [];  // chat messages so far
  let serverThresholds = {};  // the server's default flag thresholds, from /ready

  const mode = () => document.querySelector("input[name=mode]:checked").value;
  const value = (id) => $(id).value.trim();
  const numberOrNull = (id, parse) => (value(id) === "" ? null : parse(value(id)));

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (value("api_key")) h.Authorization = `Bearer ${value("api_key")}`;
    return h;
  }

  function setStatus(text) { $("status").textContent = text; }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
  }

  // An OpenAI-shaped error body ({"error": {message, type, param, code}}) as a sentence.
  function describeError(status, body) {
    const e = body && body.error;
    if (!e) return `The server answered HTTP ${status}.`;
    let text = `Error${status ? ` ${status}` : ""}${e.type ? ` (${e.type})` : ""}: ${e.message}`;
    if (e.param) text += `\nField: ${e.param}`;
    if (status === 401) text += "\nEnter the server's key in the “API key” field.";
    return text;
  }

  async function errorOf(resp) {
    try { return describeError(resp.status, await resp.json()); }
    catch (_) { return `The server answered HTTP ${resp.status} ${resp.statusText}.`; }
  }

  async function checkReady() {
    try {
      const r = await fetch("ready", { headers: headers() });
      if (r.status === 401) { $("model").textContent = "this server needs an API key"; return; }
      if (!r.ok) { $("model").textContent = "model not ready yet"; return; }
      const info = await r.json();
      serverThresholds = info.thresholds || {};
      const eu = serverThresholds.eu;
      $("model").textContent = `${info.model} · ${info.engine} engine · ${info.num_drafts} drafts · context ${info.max_model_len}`
        + (eu === undefined ? "" : ` · flags eu > ${EpiView.fmt(eu)} nats`);
      if (eu !== undefined) $("th_eu").placeholder = `server's: ${EpiView.fmt(eu)}`;
    } catch (_) { $("model").textContent = "server unreachable"; }
  }

  function sampling() {
    const body = {};
    const maxTokens = numberOrNull("max_tokens", (x) => parseInt(x, 10));
    const temperature = numberOrNull("temperature", Number);
    const seed = numberOrNull("seed", (x) => parseInt(x, 10));
    if (maxTokens !== null) body.max_tokens = maxTokens;
    if (temperature !== null) body.temperature = temperature;
    if (seed !== null) body.seed = seed;
    const thresholds = {};
    for (const k of ["eu", "bias", "variance"]) {
      const v = numberOrNull(`th_${k}`, Number);
      if (v !== null) thresholds[k] = v;
    }
    if (Object.keys(thresholds).length) body.thresholds = thresholds;
    if ($("stop_on_uncertainty").checked) body.stop_on_uncertainty = true;
    body.stream = true;
    return body;
  }

  function turn(kind, label, text) {
    const div = document.createElement("div");
    div.className = `turn ${kind}`;
    if (label) {
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = label;
      div.appendChild(who);
    }
    if (text !== null) {
      const span = document.createElement("span");
      span.className = "prompt-text";
      span.textContent = text;
      div.appendChild(span);
    }
    transcript.appendChild(div);
    return div;
  }

  // Token events and the final event of either endpoint, in the /generate shape.
  function* fromGenerate(data) {
    if (data.summary !== undefined) yield { final: data };
    else yield { token: data };
  }

  function* fromChat(data) {
    if (data.usage && !(data.choices && data.choices.length)) { yield { usage: data.usage }; return; }
    const choice = data.choices && data.choices[0];
    if (!choice) return;
    const content = (choice.logprobs && choice.logprobs.content) || [];
    const ids = (choice.uncertainty && choice.uncertainty.tokens) || [];
    for (let j = 0; j < content.length; j++) {
      const c = content[j];
      yield { token: { text: c.token, token_id: ids[j] ? ids[j].token_id : null,
                       logprob: c.logprob, ...c.uncertainty } };
    }
    if (choice.finish_reason) {
      // a stop on uncertainty is finish_reason "stop" with stop_reason "uncertainty" here
      yield { final: { summary: choice.uncertainty.summary,
                       finish_reason: choice.stop_reason || choice.finish_reason } };
    }
  }

  async function* sseEvents(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value: chunk, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(chunk, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data && data !== "[DONE]") yield JSON.parse(data);
      }
    }
  }

  function busy(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
    transcript.setAttribute("aria-busy", on ? "true" : "false");
  }

  async function send(ev) {
    ev.preventDefault();
    if (controller) return;
    const text = $("prompt").value;
    if (!text.trim()) { showError("Type a prompt first."); $("prompt").focus(); return; }
    showError("");
    const chat = mode() === "chat";
    const body = sampling();
    let url, parse, out, asked = null;
    if (chat) {
      history.push({ role: "user", content: text });
      Object.assign(body, { messages: history.slice(), logprobs: true,
                            stream_options: { include_usage: true } });
      url = "v1/chat/completions";
      parse = fromChat;
      asked = turn("user", "you", text);
      out = turn("assistant", "model", null);
    } else {
      body.prompt = text;
      url = "generate";
      parse = fromGenerate;
      transcript.textContent = "";
      out = turn("completion", null, text);
    }
    const container = document.createElement("span");
    out.appendChild(container);
    const threshold = numberOrNull("th_eu", Number);
    view.begin(container, { scaleMax: numberOrNull("scale_max", Number),
                            threshold: threshold === null ? (serverThresholds.eu ?? null) : threshold });
    controller = new AbortController();
    busy(true);
    setStatus("Waiting for the first token…");
    let final = null, usage = null, stopped = false;
    try {
      const resp = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                      signal: controller.signal });
      if (!resp.ok) {
        showError(await errorOf(resp));
        setStatus("The request was refused.");
        if (chat) history.pop();
        out.remove();
        if (asked) asked.remove();
        return;
      }
      for await (const data of sseEvents(resp)) {
        if (data.error) { showError(describeError(null, data)); break; }
        for (const item of parse(data)) {
          if (item.token) {
            view.add(item.token);
            view.summary(null, "streaming…");
            setStatus(`Generating… ${view.tokens.length} tokens`);
          } else if (item.final) final = item.final;
          else if (item.usage) usage = item.usage;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") stopped = true;
      else showError(`Could not reach the server or read its answer: ${err.message}`);
    } finally {
      controller = null;
      busy(false);
    }
    if (chat) history.push({ role: "assistant", content: view.tokens.map((t) => t.text).join("") });
    if (final) {
      if (usage) final.usage = usage;
      view.summary(final);
      setStatus(`Done: ${view.tokens.length} tokens, finish reason “${final.finish_reason}”.`);
    } else {
      view.summary(null, stopped ? "stopped" : "incomplete");
      setStatus(stopped ? `Stopped after ${view.tokens.length} tokens; the request was aborted.`
                        : `The stream ended early after ${view.tokens.length} tokens.`);
    }
    view.chart();
  }

  function stop() { if (controller) controller.abort(); }

  function clear() {
    stop();
    history = [];
    transcript.textContent = "";
    view.tokens = [];
    view.summary(null);
    view.chart();
    view.recolour();
    showError("");
    setStatus("");
  }

  function switchMode() {
    const chat = mode() === "chat";
    $("prompt-label").textContent = chat ? "Message" : "Prompt";
    $("send").textContent = chat ? "Send" : "Generate";
    clear();
  }

  $("form").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clear);
  $("api_key").addEventListener("change", checkReady);
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", switchMode);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("form").requestSubmit(); }
  });
  view.summary(null);
  view.chart();
  checkReady();
})();
