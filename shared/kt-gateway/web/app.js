// kt chat: the gateway's web UI. Plain browser JavaScript, no build step, no dependencies.
// Talks to GET /v1/models and POST /v1/chat/completions (stream: true, server-sent events read
// from fetch's ReadableStream). Exposes `window.KT` (markdown renderer, SSE parser, state) for
// the browser test in tests/e2e/browser/.
"use strict";

(function () {
  // ---------------------------------------------------------------- markdown (safe subset)

  // Everything the model writes is escaped first; the renderer then only adds its own tags, so
  // no HTML from the model ever reaches the page.
  function escapeHtml(s) {
    return s
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  // Link targets allowed in rendered markdown (checked on the escaped text, so an entity such
  // as `javascript&#58;` stays inert).
  const SAFE_URL = /^(https?:\/\/|mailto:|\/|#)/i;

  // Inline markdown on already-escaped text: code spans, links, bold, italic.
  function inline(escaped) {
    const codes = [];
    // Code spans first; their content is kept verbatim (placeholders hide it from the rest).
    let s = escaped.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, function (_, ticks, body) {
      codes.push("<code>" + body.replace(/^ (.*) $/, "$1") + "</code>");
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    s = s.replace(/\[([^\]\n]+)\]\(([^()\s]+)\)/g, function (whole, text, url) {
      if (!SAFE_URL.test(url)) return whole;
      return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + text + "</a>";
    });
    s = s.replace(/(\*\*|__)(?=\S)([\s\S]*?\S)\1/g, "<strong>$2</strong>");
    s = s.replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?![*\w])/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?![_\w])/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, function (_, i) {
      return codes[Number(i)];
    });
  }

  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const ORDERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}&gt;\s?(.*)$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

  // Markdown → HTML for the subset models use: fenced code (an unclosed fence, as while
  // streaming, runs to the end), headings, bullet and numbered lists, quotes, rules,
  // paragraphs, and inline code, bold, italic and links.
  function renderMarkdown(text) {
    const lines = escapeHtml(String(text)).split(/\r?\n/);
    const out = [];
    let para = [];
    let list = null; // {tag, items}
    const flushPara = function () {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = function () {
      if (list) {
        const start = list.tag === "ol" && list.start !== 1 ? ' start="' + list.start + '"' : "";
        out.push("<" + list.tag + start + ">" + list.items.map(function (i) {
          return "<li>" + inline(i) + "</li>";
        }).join("") + "</" + list.tag + ">");
      }
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        flushPara();
        flushList();
        const marker = fence[1];
        const body = [];
        i++;
        while (i < lines.length && !(lines[i].trim().startsWith(marker) && lines[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(lines[i]);
          i++;
        }
        const lang = fence[2];
        const cls = lang ? ' class="language-' + lang + '"' : "";
        out.push('<div class="code"><div class="code-bar"><span class="code-lang">' + (lang || "text") +
          '</span><button type="button" class="copy link">Copy</button></div><pre><code' + cls + ">" +
          body.join("\n") + "</code></pre></div>");
        continue;
      }
      let m;
      if ((m = HEADING.exec(line))) {
        flushPara();
        flushList();
        const level = m[1].length;
        out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
      } else if (RULE.test(line)) {
        flushPara();
        flushList();
        out.push("<hr>");
      } else if ((m = BULLET.exec(line))) {
        flushPara();
        if (!list || list.tag !== "ul") {
          flushList();
          list = { tag: "ul", items: [] };
        }
        list.items.push(m[1]);
      } else if ((m = ORDERED.exec(line))) {
        flushPara();
        if (!list || list.tag !== "ol") {
          flushList();
          list = { tag: "ol", start: Number(m[1]), items: [] };
        }
        list.items.push(m[2]);
      } else if ((m = QUOTE.exec(line))) {
        flushPara();
        flushList();
        out.push("<blockquote>" + inline(m[1]) + "</blockquote>");
      } else if (line.trim() === "") {
        flushPara();
        flushList();
      } else if (list && /^\s{2,}\S/.test(line)) {
        list.items[list.items.length - 1] += " " + line.trim();
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara();
    flushList();
    return out.join("\n");
  }

  // ---------------------------------------------------------------- server-sent events

  // Feeds text chunks in, calls onEvent(data) per complete event (its `data:` lines joined).
  function SseParser(onEvent) {
    this.buffer = "";
    this.onEvent = onEvent;
  }
  SseParser.prototype.push = function (chunk) {
    this.buffer += chunk;
    let cut;
    while ((cut = this.buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = this.buffer.slice(0, cut);
      const sep = /\r?\n\r?\n/.exec(this.buffer.slice(cut));
      this.buffer = this.buffer.slice(cut + (sep ? sep[0].length : 2));
      this.dispatch(block);
    }
  };
  SseParser.prototype.finish = function () {
    if (this.buffer.trim() !== "") this.dispatch(this.buffer);
    this.buffer = "";
  };
  SseParser.prototype.dispatch = function (block) {
    const data = [];
    block.split(/\r?\n/).forEach(function (line) {
      if (line.startsWith("data:")) data.push(line.slice(line.charAt(5) === " " ? 6 : 5));
    });
    if (data.length) this.onEvent(data.join("\n"));
  };

  // ---------------------------------------------------------------- the page

  const $ = function (id) {
    return document.getElementById(id);
  };
  const state = {
    history: [], // [{role, content}] of finished turns
    controller: null, // AbortController of the running request
    busy: false,
  };
  const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "seed"];

  // The API lives next to the page: strip a trailing `web/` (the UI is served at / and /web/).
  function apiUrl(path) {
    const base = location.pathname.replace(/[^/]*$/, "").replace(/web\/$/, "");
    return base + path;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function showError(message) {
    $("error-text").textContent = message;
    $("error").hidden = false;
  }
  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  // The message of an error response: OpenAI's `error.message`, Ollama's `error`, or the text.
  async function errorMessage(resp) {
    let body = "";
    try {
      body = await resp.text();
    } catch (e) {
      body = "";
    }
    let msg = body.trim();
    try {
      const j = JSON.parse(body);
      if (j && j.error) msg = typeof j.error === "string" ? j.error : j.error.message || msg;
      else if (j && j.message) msg = j.message;
    } catch (e) {
      // not JSON: keep the text
    }
    const status = "HTTP " + resp.status + (resp.statusText ? " " + resp.statusText : "");
    return msg ? status + ": " + msg : status;
  }

  async function loadModels() {
    const select = $("model");
    const note = $("model-note");
    note.textContent = "loading…";
    try {
      const resp = await fetch(apiUrl("v1/models"), { headers: headers() });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const body = await resp.json();
      const ids = (body.data || []).map(function (m) {
        return m.id;
      });
      const previous = select.value || localStorage.getItem("kt.model");
      select.replaceChildren();
      ids.forEach(function (id) {
        const o = document.createElement("option");
        o.value = id;
        o.textContent = id;
        select.appendChild(o);
      });
      if (previous && ids.indexOf(previous) >= 0) select.value = previous;
      note.textContent = ids.length ? "" : "no models";
      select.disabled = ids.length === 0;
    } catch (e) {
      note.textContent = "unavailable";
      showError("Could not list models: " + (e && e.message ? e.message : String(e)));
    }
  }

  function addMessage(role, text) {
    const empty = $("empty");
    if (empty) empty.remove();
    const el = document.createElement("article");
    el.className = "msg " + role;
    el.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "body";
    if (role === "user") body.textContent = text;
    else body.innerHTML = renderMarkdown(text);
    el.append(who, body);
    $("messages").appendChild(el);
    el.scrollIntoView({ block: "end" });
    return el;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("messages").setAttribute("aria-busy", busy ? "true" : "false");
  }

  function numberOr(id, parse) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;
    const v = parse(raw);
    return Number.isFinite(v) ? v : undefined;
  }

  function requestBody(messages) {
    const body = { model: $("model").value, messages: messages, stream: true };
    const t = numberOr("temperature", parseFloat);
    const p = numberOr("top-p", parseFloat);
    const n = numberOr("max-tokens", function (x) {
      return parseInt(x, 10);
    });
    const seed = numberOr("seed", function (x) {
      return parseInt(x, 10);
    });
    if (t !== undefined) body.temperature = t;
    if (p !== undefined) body.top_p = p;
    if (n !== undefined) body.max_tokens = n;
    if (seed !== undefined) body.seed = seed;
    return body;
  }

  async function send(text) {
    if (state.busy || text.trim() === "") return;
    clearError();
    const userEl = addMessage("user", text);
    const turn = { role: "user", content: text };
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const sent = messages.concat(state.history, [turn]);

    const el = addMessage("assistant", "");
    el.dataset.state = "streaming";
    el.dataset.chunks = "0";
    const bodyEl = el.querySelector(".body");
    let answer = "";
    let finish = null;
    let streamError = null;
    let pending = false;
    const started = performance.now();
    let tokens = 0;
    const paint = function () {
      pending = false;
      bodyEl.innerHTML = renderMarkdown(answer);
      el.scrollIntoView({ block: "end" });
    };

    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    $("status").textContent = "Generating…";
    try {
      const resp = await fetch(apiUrl("v1/chat/completions"), {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(requestBody(sent)),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      if (!resp.body) throw new Error("the response has no body");
      const parser = new SseParser(function (data) {
        if (data === "[DONE]") return;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (e) {
          streamError = "the server sent something that is not JSON: " + data.slice(0, 200);
          return;
        }
        if (chunk.error) {
          streamError = typeof chunk.error === "string" ? chunk.error : chunk.error.message || "error";
          return;
        }
        (chunk.choices || []).forEach(function (c) {
          const piece = c.delta && typeof c.delta.content === "string" ? c.delta.content : "";
          if (piece) {
            answer += piece;
            tokens++;
          }
          if (c.finish_reason) finish = c.finish_reason;
        });
        el.dataset.chunks = String(Number(el.dataset.chunks) + 1);
        if (!pending) {
          pending = true;
          requestAnimationFrame(paint);
        }
      });
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const r = await reader.read();
        if (r.done) break;
        parser.push(r.value);
      }
      parser.finish();
      if (streamError) throw new Error(streamError);
      if (finish === "error") throw new Error("the generation failed on the server");
      paint();
      el.dataset.state = "done";
      el.dataset.finish = finish || "";
      state.history.push(turn, { role: "assistant", content: answer });
      const secs = (performance.now() - started) / 1000;
      $("status").textContent = "Done" + (finish ? " (" + finish + ")" : "") + ", " + tokens +
        " chunks in " + secs.toFixed(1) + " s";
    } catch (e) {
      paint();
      if (controller.signal.aborted) {
        // Stopped by the user: keep what arrived as the answer of this turn.
        el.dataset.state = "stopped";
        const note = document.createElement("div");
        note.className = "note";
        note.textContent = "Stopped.";
        el.appendChild(note);
        state.history.push(turn, { role: "assistant", content: answer });
        $("status").textContent = "Stopped";
      } else {
        // Failed: the turn is not part of the history; its text goes back into the box.
        el.dataset.state = "error";
        userEl.classList.add("failed");
        const msg = e && e.message ? e.message : String(e);
        const note = document.createElement("div");
        note.className = "note error-note";
        note.textContent = "Error: " + msg;
        el.appendChild(note);
        showError(msg);
        if ($("prompt").value.trim() === "") $("prompt").value = text;
        $("status").textContent = "Failed";
      }
    } finally {
      state.controller = null;
      setBusy(false);
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.history = [];
    clearError();
    $("messages").replaceChildren();
    const p = document.createElement("p");
    p.id = "empty";
    p.className = "empty";
    p.textContent = "Send a message to start.";
    $("messages").appendChild(p);
    $("status").textContent = "";
    $("prompt").focus();
  }

  function restoreSettings() {
    SETTINGS.forEach(function (id) {
      const v = localStorage.getItem("kt." + id);
      if (v !== null) $(id).value = v;
      $(id).addEventListener("change", function () {
        localStorage.setItem("kt." + id, $(id).value);
      });
    });
    // The key stays for this tab only.
    const key = sessionStorage.getItem("kt.api-key");
    if (key) $("api-key").value = key;
    $("api-key").addEventListener("change", function () {
      sessionStorage.setItem("kt.api-key", $("api-key").value);
      clearError();
      loadModels();
    });
    $("model").addEventListener("change", function () {
      localStorage.setItem("kt.model", $("model").value);
    });
  }

  function init() {
    restoreSettings();
    $("composer").addEventListener("submit", function (ev) {
      ev.preventDefault();
      const text = $("prompt").value;
      if (text.trim() === "" || state.busy) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("error-close").addEventListener("click", clearError);
    $("messages").addEventListener("click", function (ev) {
      const btn = ev.target.closest("button.copy");
      if (!btn) return;
      const code = btn.closest(".code").querySelector("code").textContent;
      if (navigator.clipboard) {
        navigator.clipboard.writeText(code).then(function () {
          btn.textContent = "Copied";
          setTimeout(function () {
            btn.textContent = "Copy";
          }, 1500);
        }, function () {
          btn.textContent = "Copy failed";
        });
      }
    });
    setBusy(false);
    loadModels();
  }

  window.KT = { renderMarkdown: renderMarkdown, escapeHtml: escapeHtml, SseParser: SseParser, state: state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
