// The built-in chat client. Plain JavaScript, no build step: state in localStorage, chat through POST /stream,
// Markdown rendered by the server (POST /ui/render), so model output is never parsed as HTML here.
"use strict";

const I18N = {
  zh: {
    newChat: "＋ 新对话", exportAll: "导出全部", importAll: "导入", lang: "English", untitled: "新对话",
    advanced: "高级设置", exportMd: "导出为 Markdown", clear: "清空对话", temperature: "温度", maxLength: "最大长度",
    apiKey: "API 密钥", prefix: "引导词（回答以此开头，可留空）", inputHint: "输入问题，Enter 发送，Shift+Enter 换行",
    send: "发送", stop: "停止", precise: "精确", default: "默认", creative: "创造", you: "你", bot: "ChatGLM2",
    edit: "编辑", save: "保存", cancel: "取消", regenerate: "重新生成", amend: "修改提问", revert: "撤回",
    rename: "重命名", duplicate: "复制", remove: "删除", deleted: "已删除对话", undo: "撤销",
    confirmClear: "清空这个对话的全部消息？", copy: "复制", copied: "已复制", imported: "已导入 {n} 个对话",
    importBad: "无法导入：文件不是有效的对话导出", storeBroken: "本地保存的数据已损坏，已备份并重新开始。",
    offline: "无法连接服务器：请确认服务正在运行。", loading: "模型加载中，请稍候…",
    downloading: "正在下载模型：{p}", loadError: "模型加载失败：{m}", busy: "服务器忙：排队的请求已满，请稍后再试。",
    overflow: "问题太长：需要 {n} 个 token，最多 {l} 个（上下文 {c}）。请缩短问题或引导词。",
    genError: "生成出错：{m}", keyNeeded: "需要 API 密钥：请在 ⚙ 高级设置中填写。", badRequest: "请求有误：{m}",
    tokens: "上下文 {n} / {c} tokens", willDrop: "，最早的几轮对话将被省略", dropped: "上一次回答时已被省略",
    live: "生成中… {r} tokens/s", finished: "完成：{f}，{n} tokens，{r} tokens/s",
    stopReason: "自然结束", lengthReason: "达到长度上限", interruptedReason: "已停止", errorReason: "出错",
  },
  en: {
    newChat: "+ New chat", exportAll: "Export all", importAll: "Import", lang: "中文", untitled: "New chat",
    advanced: "Advanced", exportMd: "Export as Markdown", clear: "Clear chat", temperature: "Temperature",
    maxLength: "Max length", apiKey: "API key", prefix: "Answer prefix (the reply starts with it; optional)",
    inputHint: "Ask something. Enter sends, Shift+Enter adds a line", send: "Send", stop: "Stop",
    precise: "Precise", default: "Default", creative: "Creative", you: "You", bot: "ChatGLM2", edit: "Edit",
    save: "Save", cancel: "Cancel", regenerate: "Regenerate", amend: "Amend", revert: "Revert", rename: "Rename",
    duplicate: "Duplicate", remove: "Delete", deleted: "Chat deleted", undo: "Undo",
    confirmClear: "Delete every message of this chat?", copy: "Copy", copied: "Copied",
    imported: "Imported {n} chats", importBad: "Cannot import: not a chat export file",
    storeBroken: "The saved data was broken; it was backed up and a fresh start made.",
    offline: "Cannot reach the server: is it running?", loading: "The model is loading, please wait…",
    downloading: "Downloading the model: {p}", loadError: "The model failed to load: {m}",
    busy: "The server is busy: its queue is full. Try again in a moment.",
    overflow: "The question is too long: {n} tokens, at most {l} fit (context {c}). Shorten it or the prefix.",
    genError: "Generation failed: {m}", keyNeeded: "An API key is needed: enter it under ⚙ Advanced.",
    badRequest: "Bad request: {m}", tokens: "context {n} / {c} tokens", willDrop: ", the oldest rounds will be dropped",
    dropped: "left out of the last answer", live: "generating… {r} tokens/s",
    finished: "done: {f}, {n} tokens, {r} tokens/s", stopReason: "finished", lengthReason: "length limit reached",
    interruptedReason: "stopped", errorReason: "error",
  },
};
const STYLES = {precise: {top_p: 0.5, temperature: 0.6}, default: {top_p: 0.7, temperature: 1.0},
                creative: {top_p: 0.9, temperature: 1.4}};
const STORE_KEY = "chatglm2.state.v1";
const $ = (id) => document.getElementById(id);

let state = null;          // {version, lang, active, apiKey, convs: [{id, title, style, params, pairs}]}
let server = {max_context: 8192, status: "unknown"};
let busy = null;           // the running generation: {conv, index, jobId, controller, started, events}
const rendered = new Map(); // Markdown source -> HTML from the server

// -- text -----------------------------------------------------------------------------------------------------
function t(key, values = {}) {
  const text = (I18N[state.lang] || I18N.zh)[key] || key;
  return text.replace(/\{(\w)\}/g, (_, k) => values[k] ?? "");
}
function applyLanguage() {
  document.documentElement.lang = state.lang === "en" ? "en" : "zh-CN";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-title]").forEach((el) => { el.title = t(el.dataset.i18nTitle); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("lang");
}

// -- the store: validated on load, so a broken one cannot brick the page ---------------------------------------
const uid = () => Math.random().toString(36).slice(2, 10) + Date.now().toString(36).slice(-4);
const isText = (v) => typeof v === "string";
const clampNumber = (v, lo, hi, fallback) => (typeof v === "number" && v >= lo && v <= hi ? v : fallback);

function newConversation(title) {
  return {id: uid(), title: title || "", style: "default", params: {...STYLES.default, max_length: 0}, pairs: []};
}
function cleanConversation(raw) {
  if (!raw || typeof raw !== "object" || !Array.isArray(raw.pairs)) return null;
  const pairs = raw.pairs.filter((p) => p && isText(p.q) && isText(p.a))
    .map((p) => ({q: p.q, a: p.a, prefix: isText(p.prefix) ? p.prefix : "", dropped: p.dropped === true}));
  const params = raw.params && typeof raw.params === "object" ? raw.params : {};
  return {
    id: isText(raw.id) && raw.id ? raw.id : uid(),
    title: isText(raw.title) ? raw.title.slice(0, 200) : "",
    style: STYLES[raw.style] ? raw.style : "custom",
    params: {temperature: clampNumber(params.temperature, 0, 2, 1.0), top_p: clampNumber(params.top_p, 0.01, 1, 0.7),
             max_length: clampNumber(params.max_length, 0, 1e6, 0)},
    pairs,
  };
}
function cleanState(raw) {
  const convs = (raw && Array.isArray(raw.convs) ? raw.convs : []).map(cleanConversation).filter(Boolean);
  const seen = new Set();
  convs.forEach((c) => { if (seen.has(c.id)) c.id = uid(); seen.add(c.id); });
  if (!convs.length) convs.push(newConversation());
  const active = convs.some((c) => c.id === raw?.active) ? raw.active : convs[0].id;
  return {version: 1, lang: raw?.lang === "en" ? "en" : "zh", active, apiKey: isText(raw?.apiKey) ? raw.apiKey : "",
          convs};
}
function loadState() {
  const text = localStorage.getItem(STORE_KEY);
  if (text === null) return {state: cleanState(null), broken: false};
  try {
    return {state: cleanState(JSON.parse(text)), broken: false};
  } catch (err) {
    localStorage.setItem(STORE_KEY + ".broken", text);
    return {state: cleanState(null), broken: true};
  }
}
function save() {
  try { localStorage.setItem(STORE_KEY, JSON.stringify(state)); } catch (err) { showBanner(String(err), "error"); }
}
const active = () => state.convs.find((c) => c.id === state.active) || state.convs[0];
const titleOf = (c) => c.title || (c.pairs[0] ? c.pairs[0].q.slice(0, 30) : t("untitled"));

// -- talking to the server ------------------------------------------------------------------------------------
function headers() {
  const h = {"Content-Type": "application/json"};
  if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
  return h;
}
async function postJSON(path, body, signal) {
  return fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
}
async function errorText(res) {
  let body = {};
  try { body = await res.json(); } catch (err) { /* not JSON */ }
  const m = body.message || res.statusText;
  if (res.status === 401) return t("keyNeeded");
  if (res.status === 429) return t("busy");
  if (res.status === 413 && body.prompt_tokens) {
    return t("overflow", {n: body.prompt_tokens, l: body.limit, c: body.max_context});
  }
  if (res.status === 503) return healthText(body) || m;
  return t("badRequest", {m});
}
function healthText(h) {
  if (h.status === "downloading") {
    const p = typeof h.progress === "number" ? (h.progress * 100).toFixed(1) + "%" : "…";
    return t("downloading", {p});
  }
  if (h.status === "loading") {
    return t("loading") + (typeof h.progress === "number" && h.progress > 0 ? ` ${(h.progress * 100).toFixed(0)}%` : "");
  }
  if (h.status === "error") return t("loadError", {m: h.error || ""});
  return "";
}
async function pollHealth() {
  try {
    const res = await fetch("/health", {headers: headers()});  // with a key set, anonymous callers see only the state
    const h = await res.json();
    const wasReady = server.status === "ready";
    server = h;
    showNotices(h.notices || []);
    if (h.status === "ready") {
      if (!wasReady) { hideBanner("health"); updateMeter(); renderAdvanced(); }
    } else {
      showBanner(healthText(h), h.status === "error" ? "error" : "warn", "health");
    }
  } catch (err) {
    server.status = "offline";
    showBanner(t("offline"), "error", "health");
  }
  setTimeout(pollHealth, server.status === "ready" ? 10000 : 1000);
}

async function* sseEvents(res) {
  // Yields {event, data} for each server-sent event of a fetch response.
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = null;
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data = line.slice(6);
      }
      if (data !== null) yield {event, data: JSON.parse(data)};
    }
  }
}

// -- generation -----------------------------------------------------------------------------------------------
function maxLength(conv) {
  return Math.min(conv.params.max_length || server.max_context || 8192, server.max_context || 8192);
}
async function generate(conv, index) {
  const pair = conv.pairs[index];
  const body = {query: pair.q, history: conv.pairs.slice(0, index).map((p) => [p.q, p.a]),
                answer_prefix: pair.prefix, max_length: maxLength(conv), top_p: conv.params.top_p,
                temperature: conv.params.temperature};
  busy = {conv, index, jobId: null, controller: new AbortController(), started: performance.now(), events: 0};
  const previous = pair.a;
  pair.a = pair.prefix;
  renderComposer();
  renderMessages();
  let finish = null;
  try {
    const res = await postJSON("/stream", body, busy.controller.signal);
    if (!res.ok) {
      showBanner(await errorText(res), "error");
      pair.a = previous; // a regenerated answer stays as it was
      return "refused";
    }
    busy.jobId = res.headers.get("X-Job-Id");
    if (busy.stopRequested) stop(); // Stop was pressed before the server named the job
    for await (const {event, data} of sseEvents(res)) {
      if (event === "message") {
        pair.a = data[0];
        busy.events += 1;
        updateBubble(conv, index);
        const seconds = (performance.now() - busy.started) / 1000;
        $("status").textContent = t("live", {r: (busy.events / seconds).toFixed(1)});
      } else if (event === "done") {
        finish = data;
      } else if (event === "error") {
        showBanner(t("genError", {m: data.message}), "error");
        finish = {finish_reason: "error"};
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") showBanner(t("offline"), "error");
    finish = finish || {finish_reason: "error"};
  } finally {
    busy = null;
    renderComposer();
    renderMessages();
  }
  if (finish && finish.finish_reason !== "error") {
    conv.pairs.forEach((p, i) => { p.dropped = i < (finish.dropped_rounds || 0); });
    const rate = finish.completion_tokens / Math.max(finish.seconds, 0.001);
    $("status").textContent = t("finished", {f: t(finish.finish_reason + "Reason"), n: finish.completion_tokens,
                                             r: rate.toFixed(1)});
  } else if (finish) {
    $("status").textContent = t("finished", {f: t("errorReason"), n: "?", r: "?"});
  }
  save();
  renderMessages();
  renderList();
  return finish ? finish.finish_reason : "error";
}
async function send() {
  const conv = active();
  const q = $("input").value;
  if (busy || !q.trim()) return;
  const prefix = $("prefix").value;
  conv.pairs.push({q, a: prefix, prefix, dropped: false});
  $("input").value = "";
  $("prefix").value = "";
  save();
  renderList();
  if (await generate(conv, conv.pairs.length - 1) === "refused") {
    // refused before anything was generated: give the question back, nothing is lost
    conv.pairs.pop();
    $("input").value = q;
    $("prefix").value = prefix;
    save();
    renderMessages();
    renderList();
  }
  updateMeter();
}
async function stop() {
  if (!busy) return;
  if (busy.jobId) {
    // the server ends the stream with the partial reply and finish_reason "interrupted"
    try { await postJSON("/interrupt", {id: busy.jobId}); } catch (err) { busy?.controller.abort(); }
  } else if (busy.stopRequested) {
    busy.controller.abort(); // pressed twice and the server still has not answered: give up on it
  } else {
    busy.stopRequested = true;
  }
}

// -- conversation actions -------------------------------------------------------------------------------------
function regenerate() {
  const conv = active();
  if (busy || !conv.pairs.length) return;
  generate(conv, conv.pairs.length - 1);
}
function amend() {
  const conv = active();
  if (busy || !conv.pairs.length) return;
  const pair = conv.pairs.pop();
  $("input").value = pair.q;
  $("prefix").value = pair.prefix;
  save();
  renderAll();
  $("input").focus();
}
function revert() {
  const conv = active();
  if (busy || !conv.pairs.length) return;
  conv.pairs.pop();
  save();
  renderAll();
}
function clearConversation() {
  if (busy || !confirm(t("confirmClear"))) return;
  active().pairs = [];
  save();
  renderAll();
}
function selectConversation(id) {
  if (busy) return;
  state.active = id;
  save();
  closeDrawer();
  renderAll();
}
function addConversation() {
  if (busy) return;
  const conv = newConversation();
  state.convs.unshift(conv);
  selectConversation(conv.id);
  $("input").focus();
}
function duplicateConversation(conv) {
  const copy = cleanConversation(JSON.parse(JSON.stringify(conv)));
  copy.id = uid();
  copy.title = titleOf(conv) + " (2)";
  state.convs.splice(state.convs.indexOf(conv) + 1, 0, copy);
  save();
  renderList();
}
function deleteConversation(conv) {
  if (busy) return;
  const at = state.convs.indexOf(conv);
  state.convs.splice(at, 1);
  if (!state.convs.length) state.convs.push(newConversation());
  if (state.active === conv.id) state.active = state.convs[Math.min(at, state.convs.length - 1)].id;
  save();
  renderAll();
  showToast(t("deleted"), t("undo"), () => {
    state.convs.splice(at, 0, conv);
    state.active = conv.id;
    save();
    renderAll();
  });
}
function moveConversation(from, to) {
  const [conv] = state.convs.splice(from, 1);
  state.convs.splice(to, 0, conv);
  save();
  renderList();
}
function setStyle(name) {
  const conv = active();
  conv.style = name;
  Object.assign(conv.params, STYLES[name]);
  save();
  renderStyles();
  renderAdvanced();
}

// -- import / export ------------------------------------------------------------------------------------------
function download(name, text, type) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type}));
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
}
function exportAll() {
  download("chatglm2-conversations.json",
           JSON.stringify({app: "my-chatglm2", version: 1, convs: state.convs}, null, 2), "application/json");
}
function exportMarkdown() {
  const conv = active();
  const lines = [`# ${titleOf(conv)}`, ""];
  conv.pairs.forEach((p) => { lines.push(`**${t("you")}:** ${p.q}`, "", `**${t("bot")}:** ${p.a}`, ""); });
  download(`${titleOf(conv).replace(/[\\/:*?"<>|]/g, "_")}.md`, lines.join("\n"), "text/markdown");
}
async function importFile(file) {
  try {
    const data = JSON.parse(await file.text());
    const convs = (Array.isArray(data) ? data : data.convs).map(cleanConversation).filter(Boolean);
    if (!convs.length) throw new Error("empty");
    const ids = new Set(state.convs.map((c) => c.id));
    convs.forEach((c) => { if (ids.has(c.id)) c.id = uid(); });
    state.convs.unshift(...convs);
    state.active = convs[0].id;
    save();
    renderAll();
    showToast(t("imported", {n: convs.length}));
  } catch (err) {
    showBanner(t("importBad"), "error");
  }
}

// -- rendering ------------------------------------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node[k] = v;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
function renderAll() {
  renderList();
  renderStyles();
  renderAdvanced();
  renderMessages();
  renderComposer();
  updateMeter();
}
function renderList() {
  const list = $("conv-list");
  list.replaceChildren(...state.convs.map((conv, i) => {
    const last = conv.pairs[conv.pairs.length - 1];
    const title = el("span", {textContent: titleOf(conv), ondblclick: () => startRename(item, conv)});
    const item = el("li", {class: conv.id === state.active ? "active" : "", draggable: true,
                           onclick: (e) => { if (!e.target.closest("button,input")) selectConversation(conv.id); }},
      el("div", {class: "title"}, title,
         el("span", {class: "actions"},
            el("button", {className: "rename", title: t("rename"), textContent: "✎", onclick: () => startRename(item, conv)}),
            el("button", {className: "duplicate", title: t("duplicate"), textContent: "❐", onclick: () => duplicateConversation(conv)}),
            el("button", {className: "delete", title: t("remove"), textContent: "✕", onclick: () => deleteConversation(conv)}))),
      el("div", {class: "preview", textContent: last ? (last.a || last.q).slice(0, 60) : ""}));
    item.dataset.id = conv.id;
    item.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/plain", String(i)); });
    item.addEventListener("dragover", (e) => { e.preventDefault(); item.classList.add("drag-over"); });
    item.addEventListener("dragleave", () => item.classList.remove("drag-over"));
    item.addEventListener("drop", (e) => {
      e.preventDefault();
      item.classList.remove("drag-over");
      const from = Number(e.dataTransfer.getData("text/plain"));
      if (Number.isInteger(from) && from !== i) moveConversation(from, i);
    });
    return item;
  }));
  $("conv-title").textContent = titleOf(active());
}
function startRename(item, conv) {
  const input = el("input", {value: titleOf(conv), className: "rename-input"});
  const title = item.querySelector(".title span");
  title.replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep) conv.title = input.value.trim();
    save();
    renderList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}
function renderStyles() {
  const conv = active();
  $("styles").replaceChildren(...Object.keys(STYLES).map((name) => el("button", {
    className: conv.style === name ? "on" : "", textContent: t(name), onclick: () => setStyle(name),
    id: "style-" + name})));
}
function renderAdvanced() {
  const conv = active();
  const values = {temperature: conv.params.temperature, top_p: conv.params.top_p, max_length: maxLength(conv)};
  $("max_length").max = String(server.max_context || 8192);
  for (const [name, value] of Object.entries(values)) {
    $(name).value = String(value);
    $(name + "-out").textContent = String(value);
  }
  $("api-key").value = state.apiKey;
}
function messageBox(conv, index, role) {
  const pair = conv.pairs[index];
  const text = role === "user" ? pair.q : pair.a;
  const streaming = busy && busy.conv === conv && busy.index === index && role === "bot";
  const body = el("div", {class: "body"});
  fillBody(body, text, role === "bot" && !streaming);
  const tools = el("span", {class: "tools"},
    streaming ? null : el("button", {className: "edit", title: t("edit"), textContent: "✎",
                                     onclick: () => editMessage(box, conv, index, role)}));
  const box = el("div", {class: `msg ${role}${pair.dropped ? " dropped" : ""}`},
    el("div", {class: "who"}, role === "user" ? t("you") : t("bot"),
       pair.dropped && role === "user" ? el("span", {class: "drop-mark", textContent: "⤺ " + t("dropped")}) : null,
       tools),
    body);
  box.dataset.index = index;
  return box;
}
function fillBody(body, text, markdown) {
  if (markdown && rendered.has(text)) {
    body.className = "body md";
    body.innerHTML = rendered.get(text); // HTML from the server's renderer, with raw HTML escaped
    addCopyButtons(body);
    return;
  }
  body.className = "body";
  body.textContent = text;
  if (markdown && text) renderMarkdown(text).then(() => { if (body.isConnected && body.textContent === text) fillBody(body, text, true); });
}
async function renderMarkdown(text) {
  try {
    const res = await postJSON("/ui/render", {text});
    if (res.ok) rendered.set(text, (await res.json()).html);
  } catch (err) { /* offline: stays plain text */ }
}
function addCopyButtons(body) {
  body.querySelectorAll("pre").forEach((pre) => {
    const button = el("button", {className: "copy", textContent: t("copy"), onclick: async () => {
      await navigator.clipboard?.writeText(pre.querySelector("code")?.textContent ?? pre.textContent);
      button.textContent = t("copied");
    }});
    pre.append(button);
  });
}
function renderMessages() {
  const conv = active();
  const nodes = [];
  conv.pairs.forEach((_, i) => nodes.push(messageBox(conv, i, "user"), messageBox(conv, i, "bot")));
  if (conv.pairs.length && !busy) {
    nodes.push(el("div", {class: "pair-actions"},
      el("button", {id: "regenerate", textContent: "↻ " + t("regenerate"), onclick: regenerate}),
      el("button", {id: "amend", textContent: "✎ " + t("amend"), onclick: amend}),
      el("button", {id: "revert", textContent: "↶ " + t("revert"), onclick: revert})));
  }
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.replaceChildren(...nodes);
  if (atBottom || busy) box.scrollTop = box.scrollHeight;
}
function updateBubble(conv, index) {
  if (conv !== active()) return;
  const box = $("messages").querySelector(`.msg.bot[data-index="${index}"] .body`);
  if (box) box.textContent = conv.pairs[index].a;
  const messages = $("messages");
  messages.scrollTop = messages.scrollHeight;
}
function editMessage(box, conv, index, role) {
  const pair = conv.pairs[index];
  const area = el("textarea", {value: role === "user" ? pair.q : pair.a, className: "edit-area"});
  const commit = () => {
    if (role === "user") pair.q = area.value; else pair.a = area.value;
    save();
    renderMessages();
    renderList();
    updateMeter();
  };
  box.querySelector(".body").replaceWith(el("div", {}, area,
    el("div", {class: "pair-actions"},
       el("button", {className: "save primary", textContent: t("save"), onclick: commit}),
       el("button", {className: "cancel", textContent: t("cancel"), onclick: renderMessages}))));
  area.focus();
}
function renderComposer() {
  const button = $("send");
  button.textContent = busy ? t("stop") : t("send");
  button.classList.toggle("stop", Boolean(busy));
}

// -- the context meter ----------------------------------------------------------------------------------------
let meterTimer = null;
function chatText(conv, query, prefix) {
  const rounds = conv.pairs.map((p, i) => `[Round ${i + 1}]\n\n问：${p.q}\n\n答：${p.a}\n\n`);
  rounds.push(`[Round ${conv.pairs.length + 1}]\n\n问：${query}\n\n答：`);
  return rounds.join("") + prefix;
}
function updateMeter() {
  clearTimeout(meterTimer);
  meterTimer = setTimeout(async () => {
    if (server.status !== "ready") return;
    const conv = active();
    try {
      const res = await postJSON("/tokenize", {text: chatText(conv, $("input").value, $("prefix").value)});
      if (!res.ok) return;
      const n = (await res.json()).len + 2; // + [gMASK] and sop
      const limit = maxLength(conv);
      const reserve = Math.min(512, Math.floor(limit / 4));
      const warn = n > limit - reserve && conv.pairs.length > 0;
      $("meter").classList.toggle("warn", warn);
      $("meter-fill").style.width = Math.min(100, (100 * n) / limit) + "%";
      $("meter-text").textContent = t("tokens", {n, c: limit}) + (warn ? t("willDrop") : "");
    } catch (err) { /* offline: the banner says so */ }
  }, 300);
}

// -- banner, toast, drawer ------------------------------------------------------------------------------------
let bannerSource = null;
function showNotices(lines) {
  // Server-side advice the person should act on (e.g. a GPU that torch cannot use); already bilingual.
  $("notice").textContent = lines.join("\n");
  $("notice").hidden = lines.length === 0;
}
function showBanner(text, kind = "warn", source = "action") {
  if (!text) return;
  bannerSource = source;
  $("banner-text").textContent = text;
  $("banner").className = kind;
  $("banner").hidden = false;
}
function hideBanner(source) {
  if (source && bannerSource !== source) return;
  $("banner").hidden = true;
}
let toastTimer = null;
function showToast(text, action, onAction) {
  $("toast-text").textContent = text;
  const button = $("toast-action");
  button.hidden = !action;
  button.textContent = action || "";
  button.onclick = () => { $("toast").hidden = true; onAction(); };
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").hidden = true; }, 6000);
}
function openDrawer() { $("sidebar").classList.add("open"); $("scrim").hidden = false; }
function closeDrawer() { $("sidebar").classList.remove("open"); $("scrim").hidden = true; }

// -- wiring ---------------------------------------------------------------------------------------------------
function start() {
  const loaded = loadState();
  state = loaded.state;
  applyLanguage();
  renderAll();
  if (loaded.broken) showBanner(t("storeBroken"), "warn");
  save();

  $("send").addEventListener("click", () => (busy ? stop() : send()));
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && busy) stop(); });
  $("input").addEventListener("input", updateMeter);
  $("prefix").addEventListener("input", updateMeter);
  $("new-conv").addEventListener("click", addConversation);
  $("clear-conv").addEventListener("click", clearConversation);
  $("export-md").addEventListener("click", exportMarkdown);
  $("export-all").addEventListener("click", exportAll);
  $("import-file").addEventListener("change", (e) => { if (e.target.files[0]) importFile(e.target.files[0]); e.target.value = ""; });
  $("toggle-advanced").addEventListener("click", () => { $("advanced").hidden = !$("advanced").hidden; });
  $("banner-close").addEventListener("click", () => hideBanner());
  $("open-drawer").addEventListener("click", openDrawer);
  $("close-drawer").addEventListener("click", closeDrawer);
  $("scrim").addEventListener("click", closeDrawer);
  $("lang").addEventListener("click", () => { state.lang = state.lang === "zh" ? "en" : "zh"; save(); applyLanguage(); renderAll(); });
  for (const name of ["temperature", "top_p", "max_length"]) {
    $(name).addEventListener("input", () => {
      const conv = active();
      conv.params[name] = Number($(name).value);
      $(name + "-out").textContent = $(name).value;
      const match = Object.entries(STYLES).find(([, s]) => s.temperature === conv.params.temperature && s.top_p === conv.params.top_p);
      conv.style = match ? match[0] : "custom";
      save();
      renderStyles();
      updateMeter();
    });
  }
  $("api-key").addEventListener("change", () => { state.apiKey = $("api-key").value.trim(); save(); });
  pollHealth();
}
start();
