// The built-in chat client. Plain JavaScript, no build step: state in localStorage, chat through POST /stream,
// Markdown rendered by the server (POST /ui/render), so model output is never parsed as HTML here.
"use strict";

const I18N = {
  zh: {
    newChat: "＋ 新对话", exportAll: "导出全部", importAll: "导入", lang: "English", untitled: "新对话",
    advanced: "高级设置", exportMd: "导出为 Markdown", clear: "清空对话", temperature: "温度", maxLength: "最大长度",
    apiKey: "API 密钥", prefix: "引导词：回答以此开头，例如“好的，”", prefixShort: "引导词",
    inputHint: "输入问题，Enter 发送，Shift/Ctrl+Enter 换行",
    send: "发送", stop: "停止", precise: "精确", default: "默认", creative: "创造", you: "你", bot: "ChatGLM2",
    edit: "编辑", save: "保存", cancel: "取消", regenerate: "重新生成", amend: "修改提问", revert: "撤回",
    rename: "重命名", duplicate: "复制对话", remove: "删除", more: "更多操作", deleted: "已删除对话", undo: "撤销",
    confirmClear: "清空这个对话的全部消息？", copy: "复制", copied: "已复制", imported: "已导入 {n} 个对话",
    importBad: "无法导入：文件不是有效的对话导出", storeBroken: "本地保存的数据已损坏，已备份并重新开始。",
    offline: "无法连接服务器：服务没有运行。请双击 开启API服务.bat（或运行 python -m server）启动它。",
    loading: "模型加载中，请稍候…",
    downloading: "正在下载模型：{p}", loadError: "模型加载失败：{m}",
    unavailable: "后端推理服务无响应（--backend）：{m}。恢复后会自动继续。", busy: "服务器忙：排队的请求已满，请稍后再试。",
    overflow: "问题太长：需要 {n} 个 token，最多 {l} 个（上下文 {c}）。请缩短问题或引导词。",
    genError: "生成出错：{m}", keyNeeded: "需要 API 密钥：请在 ⚙ 高级设置中填写。", badRequest: "请求有误：{m}",
    tokens: "上下文 {n} / {c} tokens", willDrop: "，最早的几轮对话将被省略", tooLong: "，问题太长，发送会被拒绝",
    dropped: "上一次回答时已被省略",
    live: "生成中… {r} tokens/s", finished: "完成：{f}，{n} tokens，{r} tokens/s",
    lost: "出错：连接中断，回答到此为止（已保存）", queued: "排队中，前面还有 {n} 个请求…", queuedNext: "排队中，下一个就轮到你…", thinking: "思考中…",
    stopReason: "自然结束", lengthReason: "达到长度上限", interruptedReason: "已停止", errorReason: "出错",
    otherBusy: "另一个对话正在生成回答；等它完成或停止后再发送。", newText: "↓ 新内容",
    presets: "预设角色", savePreset: "把这个对话存为预设", presetSaved: "已存为预设：{n}", removePreset: "删除预设",
    emptyTitle: "开始一个新对话", emptyModel: "模型 {m} · {d} · {p} · 上下文 {c} tokens", examples: "试试这些：",
    close: "关闭", conversations: "对话列表", loadImage: "加载图片",
    themeSystem: "主题：跟随系统", themeLight: "主题：浅色", themeDark: "主题：深色",
  },
  en: {
    newChat: "+ New chat", exportAll: "Export all", importAll: "Import", lang: "中文", untitled: "New chat",
    advanced: "Advanced", exportMd: "Export as Markdown", clear: "Clear chat", temperature: "Temperature",
    maxLength: "Max length", apiKey: "API key", prefix: "Answer prefix: the reply starts with it, e.g. \"Sure,\"",
    prefixShort: "Prefix", inputHint: "Ask something. Enter sends, Shift/Ctrl+Enter adds a line", send: "Send",
    stop: "Stop", precise: "Precise", default: "Default", creative: "Creative", you: "You", bot: "ChatGLM2",
    edit: "Edit", save: "Save", cancel: "Cancel", regenerate: "Regenerate", amend: "Amend", revert: "Revert",
    rename: "Rename", duplicate: "Duplicate", remove: "Delete", more: "More actions", deleted: "Chat deleted",
    undo: "Undo", confirmClear: "Delete every message of this chat?", copy: "Copy", copied: "Copied",
    imported: "Imported {n} chats", importBad: "Cannot import: not a chat export file",
    storeBroken: "The saved data was broken; it was backed up and a fresh start made.",
    offline: "Cannot reach the server: it is not running. Double-click 开启API服务.bat (or run python -m server).",
    loading: "The model is loading, please wait…",
    downloading: "Downloading the model: {p}", loadError: "The model failed to load: {m}",
    unavailable: "No backend engine answers (--backend): {m}. Chat resumes by itself once one does.",
    busy: "The server is busy: its queue is full. Try again in a moment.",
    overflow: "The question is too long: {n} tokens, at most {l} fit (context {c}). Shorten it or the prefix.",
    genError: "Generation failed: {m}", keyNeeded: "An API key is needed: enter it under ⚙ Advanced.",
    badRequest: "Bad request: {m}", tokens: "context {n} / {c} tokens", willDrop: ", the oldest rounds will be dropped",
    tooLong: ", the question is too long and would be refused", dropped: "left out of the last answer",
    live: "generating… {r} tokens/s", finished: "done: {f}, {n} tokens, {r} tokens/s",
    lost: "Error: the connection was lost; the reply ends here (saved)", queued: "Queued, {n} ahead…", queuedNext: "Queued, next in line…",
    thinking: "Thinking…", stopReason: "finished", lengthReason: "length limit reached",
    interruptedReason: "stopped", errorReason: "error",
    otherBusy: "Another chat is generating a reply; send when it has finished or been stopped.",
    newText: "↓ New text", presets: "Presets", savePreset: "Save this chat as a preset",
    presetSaved: "Saved as a preset: {n}", removePreset: "Delete preset", emptyTitle: "Start a new chat",
    emptyModel: "Model {m} · {d} · {p} · context {c} tokens", examples: "Try one of these:", close: "Close",
    conversations: "Conversations", loadImage: "Load image",
    themeSystem: "Theme: system", themeLight: "Theme: light", themeDark: "Theme: dark",
  },
};
// Built-in presets: a first exchange that sets a role (written for this project).
const BUILTIN_PRESETS = [
  {id: "cat", name: {zh: "猫娘", en: "Cat girl"}, pairs: [
    {q: "从现在开始，你扮演一只可爱的猫娘，说话温柔，每句话结尾都加上“喵~”。明白了吗？",
     a: "明白了喵~ 主人今天想聊些什么呢喵~"}]},
  {id: "adventure", name: {zh: "文字冒险", en: "Text adventure"}, pairs: [
    {q: "我们来玩文字冒险游戏：你是主持人，每次描述场景，再给我三个编号的行动选项，我回复编号来行动。开始吧！",
     a: "你在一座古老森林的边缘醒来，身边有一个旧背包，远处隐约传来钟声。\n\n1. 走进森林深处\n" +
        "2. 沿着小路去寻找钟声\n3. 先打开背包看看"}]},
  {id: "translator", name: {zh: "翻译助手", en: "Translator"}, pairs: [
    {q: "接下来我发给你的每一段中文，都请翻译成自然地道的英文，只输出译文，不要解释。",
     a: "好的，请发送需要翻译的中文。"}]},
  {id: "tutor", name: {zh: "英语陪练", en: "English tutor"}, pairs: [
    {q: "Please be my English conversation partner. Reply in simple English, and after each reply point out one " +
        "mistake in my last message, if there is one.",
     a: "Sure! I'd love to practise with you. What would you like to talk about today?"}]},
];
const EXAMPLES = {
  zh: ["用三句话介绍一下你自己", "写一首关于秋天的七言绝句", "用 Python 写一个快速排序，并解释它的思路"],
  en: ["Introduce yourself in three sentences", "Write a short poem about autumn",
       "Write quicksort in Python and explain how it works"],
};
const STYLES = {precise: {top_p: 0.5, temperature: 0.6}, default: {top_p: 0.7, temperature: 1.0},
                creative: {top_p: 0.9, temperature: 1.4}};
const THEMES = ["system", "light", "dark"];
const STORE_KEY = "chatglm2.state.v1";
const $ = (id) => document.getElementById(id);

let state = null;          // {version, lang, theme, active, apiKey, convs: [...], presets: [...]}
let server = {max_context: 8192, status: "unknown"};
let busy = null;           // the running generation: {conv, index, jobId, controller, started, events}
const rendered = new Map(); // Markdown source -> HTML from the server
const rendering = new Map(); // Markdown source -> the request in flight
let renderPausedUntil = 0;  // after a failed render: no new ones until then (or until the server is back)
let renderBackoff = 1000;
let following = true;       // the view follows a streaming reply while the reader is at the bottom

// -- text -----------------------------------------------------------------------------------------------------
function t(key, values = {}) {
  const text = (I18N[state.lang] || I18N.zh)[key] || key;
  return text.replace(/\{(\w)\}/g, (_, k) => values[k] ?? "");
}
function applyLanguage() {
  document.documentElement.lang = state.lang === "en" ? "en" : "zh-CN";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-label]").forEach((el) => {
    el.title = t(el.dataset.i18nLabel);
    el.setAttribute("aria-label", el.title);
  });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("lang");
  applyTheme();
}
function applyTheme() {
  if (state.theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = state.theme;
  $("theme").textContent = {system: "◐", light: "☀", dark: "☾"}[state.theme];
  $("theme").title = t("theme" + state.theme[0].toUpperCase() + state.theme.slice(1));
  $("theme").setAttribute("aria-label", $("theme").title);
}

// -- the store: validated on load, so a broken one cannot brick the page ---------------------------------------
const uid = () => Math.random().toString(36).slice(2, 10) + Date.now().toString(36).slice(-4);
const isText = (v) => typeof v === "string";
const clampNumber = (v, lo, hi, fallback) => (typeof v === "number" && v >= lo && v <= hi ? v : fallback);

function newConversation(title) {
  return {id: uid(), title: title || "", style: "default", params: {...STYLES.default, max_length: 0}, pairs: []};
}
function cleanPairs(raw) {
  return (Array.isArray(raw) ? raw : []).filter((p) => p && isText(p.q) && isText(p.a))
    .map((p) => ({q: p.q, a: p.a, prefix: isText(p.prefix) ? p.prefix : "", dropped: p.dropped === true}));
}
function cleanConversation(raw) {
  if (!raw || typeof raw !== "object" || !Array.isArray(raw.pairs)) return null;
  const params = raw.params && typeof raw.params === "object" ? raw.params : {};
  return {
    id: isText(raw.id) && raw.id ? raw.id : uid(),
    title: isText(raw.title) ? raw.title.slice(0, 200) : "",
    style: STYLES[raw.style] ? raw.style : "custom",
    params: {temperature: clampNumber(params.temperature, 0, 2, 1.0), top_p: clampNumber(params.top_p, 0.01, 1, 0.7),
             max_length: clampNumber(params.max_length, 0, 1e6, 0)},
    pairs: cleanPairs(raw.pairs),
  };
}
function cleanState(raw) {
  const convs = (raw && Array.isArray(raw.convs) ? raw.convs : []).map(cleanConversation).filter(Boolean);
  const seen = new Set();
  convs.forEach((c) => { if (seen.has(c.id)) c.id = uid(); seen.add(c.id); });
  if (!convs.length) convs.push(newConversation());
  const active = convs.some((c) => c.id === raw?.active) ? raw.active : convs[0].id;
  const presets = (Array.isArray(raw?.presets) ? raw.presets : [])
    .filter((p) => p && isText(p.name) && Array.isArray(p.pairs))
    .map((p) => ({id: isText(p.id) ? p.id : uid(), name: p.name.slice(0, 100), pairs: cleanPairs(p.pairs)}));
  return {version: 1, lang: raw?.lang === "en" ? "en" : "zh", theme: THEMES.includes(raw?.theme) ? raw.theme : "system",
          active, apiKey: isText(raw?.apiKey) ? raw.apiKey : "", convs, presets};
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
let savedAt = 0;
function save() {
  savedAt = performance.now();
  try { localStorage.setItem(STORE_KEY, JSON.stringify(state)); } catch (err) { showBanner(String(err), "error"); }
}
function saveSoon() {
  // while a reply streams: at most once a second (and on pagehide), so a reload keeps the partial reply
  if (performance.now() - savedAt > 1000) save();
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
  if (res.status === 503) {  // not ready: /health says why, in the page's language (and polling clears it)
    try { server = await fetchHealth(); return healthText(server) || m; } catch (err) { return m; }
  }
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
  if (h.status === "unavailable") return t("unavailable", {m: h.error || ""});
  return "";
}
async function fetchHealth() {
  const res = await fetch("/health", {headers: headers()});  // with a key set, anonymous callers see only the state
  return res.json();
}
async function pollHealth() {
  try {
    const h = await fetchHealth();
    const wasReady = server.status === "ready";
    server = h;
    showNotices(h.notices || []);
    if (h.status === "ready") {
      if (!wasReady) {
        hideBanner("health");
        renderPausedUntil = 0; // renders that failed while the server was away can run now
        renderAll();
      }
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
  // delta: each event carries only the new text (the seed's format repeats the whole reply twice per event)
  const body = {query: pair.q, history: conv.pairs.slice(0, index).map((p) => [p.q, p.a]),
                answer_prefix: pair.prefix, max_length: maxLength(conv), top_p: conv.params.top_p,
                temperature: conv.params.temperature, delta: true};
  busy = {conv, index, jobId: null, controller: new AbortController(), started: performance.now(), events: 0};
  const previous = pair.a;
  pair.a = pair.prefix;
  renderComposer();
  renderMessages();
  scrollToEnd();
  let finish = null;
  let response = null;
  try {
    response = await postJSON("/stream", body, busy.controller.signal);
    if (!response.ok) {
      showBanner(await errorText(response), "error", response.status === 503 ? "health" : "action");
      pair.a = previous; // a regenerated answer stays as it was
      return "refused";
    }
    busy.jobId = response.headers.get("X-Job-Id");
    if (busy.stopRequested) stop(); // Stop was pressed before the server named the job
    watchQueue(busy);
    for await (const {event, data} of sseEvents(response)) {
      if (event === "message") {
        pair.a = data.text !== undefined ? data.text : pair.a + data.delta;
        busy.events += 1;
        scheduleBubble(conv, index);
        saveSoon();
      } else if (event === "done") {
        finish = data;
      } else if (event === "error") {
        showBanner(t("genError", {m: data.message}), "error");
        finish = {finish_reason: "error"};
      }
    }
    if (!finish) finish = {finish_reason: "lost"}; // the stream ended without its summary: the server went away
  } catch (err) {
    if (!response && err.name !== "AbortError") {
      // the request never reached the server: nothing was generated, so give the question back
      showBanner(t("offline"), "error");
      pair.a = previous;
      return "refused";
    }
    if (err.name !== "AbortError") showBanner(t("offline"), "error");
    finish = finish || {finish_reason: "lost"};
  } finally {
    busy = null;
    if (finish) showFinish(conv, finish); // none when refused: the pair is as it was
    renderComposer();
    save();
    renderMessages();
    renderList();
  }
  return finish.finish_reason;
}
function showFinish(conv, finish) {
  if (finish.finish_reason === "lost" || finish.finish_reason === "error") {
    $("status").textContent = t("lost");
    return;
  }
  conv.pairs.forEach((p, i) => { p.dropped = i < (finish.dropped_rounds || 0); });
  const rate = finish.completion_tokens / Math.max(finish.seconds, 0.001);
  $("status").textContent = t("finished", {f: t(finish.finish_reason + "Reason"), n: finish.completion_tokens,
                                           r: rate.toFixed(1)});
}
async function watchQueue(job) {
  // Until the first words arrive: where the request stands (waiting behind others, or reading the prompt).
  while (busy === job && job.events === 0) {
    try {
      const h = await fetchHealth();
      if (busy !== job || job.events > 0) return;
      const ahead = (h.queued_jobs || []).indexOf(job.jobId);
      $("status").textContent = ahead > 0 ? t("queued", {n: ahead}) : ahead === 0 ? t("queuedNext") : t("thinking");
    } catch (err) { return; }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
async function send() {
  const conv = active();
  const q = $("input").value;
  if (busy || !q.trim()) return;
  const prefix = $("prefix").value;
  conv.pairs.push({q, a: prefix, prefix, dropped: false});
  $("input").value = "";
  $("prefix").value = "";
  showPrefix(false);
  save();
  renderList();
  if (await generate(conv, conv.pairs.length - 1) === "refused") {
    // refused or never sent: give the question back, nothing is lost
    conv.pairs.pop();
    $("input").value = q;
    $("prefix").value = prefix;
    showPrefix(Boolean(prefix));
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
const streamingHere = () => busy && busy.conv === active();
function forgetDropMarks(conv) {
  conv.pairs.forEach((p) => { p.dropped = false; }); // they described the request of an answer now gone
}
function regenerate() {
  const conv = active();
  if (busy || !conv.pairs.length) return;
  generate(conv, conv.pairs.length - 1);
}
function amend() {
  const conv = active();
  if (busy || !conv.pairs.length) return;
  const pair = conv.pairs.pop();
  forgetDropMarks(conv);
  $("input").value = pair.q;
  $("prefix").value = pair.prefix;
  showPrefix(Boolean(pair.prefix));
  save();
  renderAll();
  $("input").focus();
}
function revert() {
  const conv = active();
  if (busy || !conv.pairs.length) return;
  conv.pairs.pop();
  forgetDropMarks(conv);
  save();
  renderAll();
}
function clearConversation() {
  if (streamingHere() || !confirm(t("confirmClear"))) return;
  active().pairs = [];
  save();
  renderAll();
}
function selectConversation(id) {
  // a reply that is streaming keeps streaming into its own chat
  closeDrawer();
  if (state.active === id) return;
  state.active = id;
  save();
  following = true;
  markActive();
  renderStyles();
  renderAdvanced();
  renderMessages();
  renderComposer();
  updateMeter();
}
function addConversation(pairs = [], title = "") {
  const conv = newConversation(title);
  conv.pairs = pairs.map((p) => ({...p, prefix: "", dropped: false}));
  state.convs.unshift(conv);
  save();
  renderList();
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
  if (busy && busy.conv === conv) stop();
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
function savePreset() {
  const conv = active();
  if (!conv.pairs.length) return;
  const name = titleOf(conv);
  state.presets.push({id: uid(), name, pairs: conv.pairs.map((p) => ({q: p.q, a: p.a, prefix: "", dropped: false}))});
  save();
  renderPresets();
  showToast(t("presetSaved", {n: name}));
}
function presetName(preset) {
  return typeof preset.name === "string" ? preset.name : preset.name[state.lang] || preset.name.zh;
}
function startFromPreset(preset) {
  addConversation(preset.pairs, presetName(preset));
  $("presets").open = false;
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
    else if (k === "label") { node.title = v; node.setAttribute("aria-label", v); }
    else node[k] = v;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
function renderAll() {
  renderList();
  renderPresets();
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
    const name = el("span", {className: "name", textContent: titleOf(conv)});
    const item = el("li", {tabIndex: 0, draggable: true,
                           onclick: (e) => { if (!e.target.closest("button,input")) selectConversation(conv.id); },
                           ondblclick: (e) => { if (!e.target.closest("button,input")) startRename(item, conv); },
                           onkeydown: (e) => listKey(e, item, conv)},
      el("div", {class: "title"}, name),
      el("div", {class: "preview", textContent: last ? (last.a || last.q).slice(0, 60) : ""}),
      el("span", {class: "actions"},
         el("button", {className: "rename", label: t("rename"), textContent: "✎", onclick: () => startRename(item, conv)}),
         el("button", {className: "duplicate", label: t("duplicate"), textContent: "❐",
                       onclick: () => duplicateConversation(conv)}),
         el("button", {className: "delete", label: t("remove"), textContent: "✕", onclick: () => deleteConversation(conv)})),
      el("button", {className: "more only-mobile", label: t("more"), textContent: "⋯",
                    onclick: () => item.classList.toggle("show-actions")}));
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
  markActive();
}
function markActive() {
  // the active row without rebuilding the list, so a double click lands on the row it started on
  for (const item of $("conv-list").children) {
    const on = item.dataset.id === state.active;
    item.classList.toggle("active", on);
    if (on) item.setAttribute("aria-current", "true"); else item.removeAttribute("aria-current");
  }
  $("conv-title").textContent = titleOf(active());
}
function listKey(e, item, conv) {
  if (e.target !== item) return;
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectConversation(conv.id); }
  else if (e.key === "F2") { e.preventDefault(); startRename(item, conv); }
  else if (e.key === "Delete") { e.preventDefault(); deleteConversation(conv); }
  else if (e.key === "ArrowDown") { e.preventDefault(); item.nextElementSibling?.focus(); }
  else if (e.key === "ArrowUp") { e.preventDefault(); item.previousElementSibling?.focus(); }
}
function startRename(item, conv) {
  const input = el("input", {value: titleOf(conv), className: "rename-input"});
  item.querySelector(".title .name").replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep) conv.title = input.value.trim();
    save();
    renderList();
    $("conv-list").querySelector(`li[data-id="${conv.id}"]`)?.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}
function renderPresets() {
  const builtIn = BUILTIN_PRESETS.map((p) => el("button", {className: "preset", textContent: presetName(p),
                                                           onclick: () => startFromPreset(p)}));
  const own = state.presets.map((p) => el("span", {class: "own-preset"},
    el("button", {className: "preset", textContent: p.name, onclick: () => startFromPreset(p)}),
    el("button", {className: "icon remove-preset", label: t("removePreset"), textContent: "✕", onclick: () => {
      state.presets = state.presets.filter((x) => x !== p);
      save();
      renderPresets();
    }})));
  $("preset-list").replaceChildren(...builtIn, ...own);
}
function renderStyles() {
  const conv = active();
  for (const [box, prefix] of [[$("styles"), "style-"], [$("styles-compact"), "style-compact-"]]) {
    box.replaceChildren(...Object.keys(STYLES).map((name) => el("button", {
      className: conv.style === name ? "on" : "", textContent: t(name), onclick: () => setStyle(name),
      id: prefix + name})));
  }
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
const COPY_ICON = '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true" fill="none" ' +
  'stroke="currentColor" stroke-width="1.5"><rect x="5" y="5" width="9" height="9" rx="1.5"/>' +
  '<path d="M11 5V3.5A1.5 1.5 0 0 0 9.5 2h-6A1.5 1.5 0 0 0 2 3.5v6A1.5 1.5 0 0 0 3.5 11H5"/></svg>';
async function copyText(button, text) {
  try { await navigator.clipboard.writeText(text); button.textContent = "✓"; } catch (err) { /* not allowed */ }
}
function messageBox(conv, index, role) {
  const pair = conv.pairs[index];
  const text = role === "user" ? pair.q : pair.a;
  const streaming = busy && busy.conv === conv && busy.index === index && role === "bot";
  const body = el("div", {class: "body"});
  fillBody(body, text, role === "bot" && !streaming);
  if (streaming && busy.events === 0) body.append(el("span", {class: "typing", label: t("thinking")}, el("i"), el("i"), el("i")));
  const tools = streaming ? null : el("span", {class: "tools"},
    el("button", {className: "copy-msg", label: t("copy"), innerHTML: COPY_ICON,  // a constant of this file
                  onclick: (e) => copyText(e.currentTarget, text)}),
    el("button", {className: "edit", label: t("edit"), textContent: "✎", onclick: () => editMessage(box, conv, index, role)}));
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
  if (markdown && text) {
    renderMarkdown(text).then((result) => {
      if (!body.isConnected || body.textContent !== text) return;
      if (result === "done") fillBody(body, text, true);
      else if (result === "later") setTimeout(() => fillBody(body, text, true), renderBackoff); // less and less often
    });
  }
}
function renderMarkdown(text) {
  // One request per text at a time; after a failure none until a pause has passed or the server is back, so a
  // server that is down is not asked again and again (the text stays readable as plain text meanwhile).
  // Resolves to "done", "later" (try again after a pause) or "never" (the server refuses this text).
  if (rendering.has(text)) return rendering.get(text);
  if (Date.now() < renderPausedUntil) return Promise.resolve("later");
  const request = (async () => {
    try {
      const res = await postJSON("/ui/render", {text});
      if (res.ok) {
        rendered.set(text, (await res.json()).html);
        renderBackoff = 1000;
        return "done";
      }
      if (res.status === 413 || res.status === 400) return "never"; // too long to render: stays plain text
    } catch (err) { /* offline */ }
    renderPausedUntil = Date.now() + renderBackoff;
    renderBackoff = Math.min(renderBackoff * 2, 30000);
    return "later";
  })();
  rendering.set(text, request);
  request.finally(() => rendering.delete(text));
  return request;
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
function emptyState() {
  const model = server.name || (server.model || "").split(/[\\/]/).pop() || "ChatGLM2-6B";
  const facts = server.status === "ready"
    ? t("emptyModel", {m: model, d: server.device || "?", p: server.precision || "?", c: server.max_context || "?"}) : "";
  return el("div", {id: "empty"},
    el("h2", {textContent: t("emptyTitle")}),
    el("p", {class: "facts", textContent: facts}),
    el("p", {textContent: t("examples")}),
    el("div", {class: "examples"}, ...EXAMPLES[state.lang].map((text) => el("button", {className: "example",
      textContent: text, onclick: () => { $("input").value = text; $("input").focus(); updateMeter(); }}))),
    el("p", {textContent: t("presets")}),
    el("div", {class: "examples"}, ...[...BUILTIN_PRESETS, ...state.presets].map((p) => el("button", {
      className: "preset", textContent: presetName(p), onclick: () => startFromPreset(p)}))));
}
function renderMessages() {
  const conv = active();
  const nodes = [];
  conv.pairs.forEach((_, i) => nodes.push(messageBox(conv, i, "user"), messageBox(conv, i, "bot")));
  if (!conv.pairs.length) nodes.push(emptyState());
  if (conv.pairs.length && !streamingHere()) {
    nodes.push(el("div", {class: "pair-actions"},
      el("button", {id: "regenerate", className: "icon", label: t("regenerate"), textContent: "↻", onclick: regenerate,
                    disabled: Boolean(busy)}),
      el("button", {id: "amend", className: "icon", label: t("amend"), textContent: "✎", onclick: amend,
                    disabled: Boolean(busy)}),
      el("button", {id: "revert", className: "icon", label: t("revert"), textContent: "↶", onclick: revert,
                    disabled: Boolean(busy)})));
  }
  const box = $("messages");
  const top = box.scrollTop;
  box.replaceChildren(...nodes);
  if (following) scrollToEnd(); else box.scrollTop = top;
}
let bubbleFrame = 0;
function scheduleBubble(conv, index) {
  // at most one DOM update per animation frame, however fast the tokens come
  if (bubbleFrame) return;
  bubbleFrame = requestAnimationFrame(() => {
    bubbleFrame = 0;
    updateBubble(conv, index);
  });
}
function updateBubble(conv, index) {
  if (busy && busy.conv === conv && conv === active()) {
    const seconds = (performance.now() - busy.started) / 1000;
    $("status").textContent = t("live", {r: (busy.events / seconds).toFixed(1)});
  }
  if (!busy || busy.conv !== conv || busy.index !== index || conv !== active()) return; // the reply has ended
  const box = $("messages").querySelector(`.msg.bot[data-index="${index}"] .body`);
  if (!box) return;
  box.textContent = conv.pairs[index].a;
  if (following) scrollToEnd(); else $("new-text").hidden = false;
}
function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
  following = true;
  $("new-text").hidden = true;
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
  const here = streamingHere();
  button.textContent = here ? t("stop") : t("send");
  button.classList.toggle("stop", Boolean(here));
  button.disabled = Boolean(busy && !here);
  button.title = busy && !here ? t("otherBusy") : "";
  if (busy && !here) $("status").textContent = t("otherBusy");
}
function showPrefix(show) {
  $("prefix").hidden = !show;
  $("toggle-prefix").setAttribute("aria-pressed", String(show));
  $("toggle-prefix").classList.toggle("on", show);
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
      const query = $("input").value, prefix = $("prefix").value;
      const res = await postJSON("/tokenize", {text: chatText(conv, query, prefix)});
      if (!res.ok) return;
      const n = (await res.json()).len + 2; // + [gMASK] and sop
      const limit = maxLength(conv);
      const reserve = Math.min(512, Math.floor(limit / 4));
      let note = "";
      if (n > limit - reserve) {
        // dropping old rounds helps only when the question itself fits
        const alone = conv.pairs.length ? (await (await postJSON("/tokenize", {
          text: chatText({pairs: []}, query, prefix)})).json()).len + 2 : n;
        note = alone > limit - reserve ? t("tooLong") : t("willDrop");
      }
      $("meter").classList.toggle("warn", Boolean(note));
      $("meter-fill").style.width = Math.min(100, (100 * n) / limit) + "%";
      $("meter-text").textContent = t("tokens", {n, c: limit}) + note;
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
const narrow = window.matchMedia("(max-width: 760px)");
function setDrawer(open) {
  $("sidebar").classList.toggle("open", open);
  $("scrim").hidden = !open;
  // a closed drawer is off-screen: out of the Tab order and of screen readers too
  $("sidebar").inert = narrow.matches && !open;
}
const openDrawer = () => setDrawer(true);
const closeDrawer = () => setDrawer(false);

// -- wiring ---------------------------------------------------------------------------------------------------
function onInputKey(e) {
  if (e.key !== "Enter" || e.isComposing) return;
  if (e.ctrlKey || e.metaKey) {
    e.preventDefault(); // browsers insert nothing for Ctrl+Enter in a textarea: add the line ourselves
    const input = $("input");
    input.setRangeText("\n", input.selectionStart, input.selectionEnd, "end");
    updateMeter();
  } else if (!e.shiftKey) {
    e.preventDefault();
    send();
  }
}
function start() {
  const loaded = loadState();
  state = loaded.state;
  applyLanguage();
  renderAll();
  if (loaded.broken) showBanner(t("storeBroken"), "warn");
  save();
  setDrawer(false);

  $("send").addEventListener("click", () => (streamingHere() ? stop() : send()));
  $("input").addEventListener("keydown", onInputKey);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && busy) stop(); });
  $("input").addEventListener("input", updateMeter);
  $("prefix").addEventListener("input", updateMeter);
  $("toggle-prefix").addEventListener("click", () => {
    showPrefix($("prefix").hidden);
    if (!$("prefix").hidden) $("prefix").focus();
  });
  $("new-conv").addEventListener("click", () => addConversation());
  $("clear-conv").addEventListener("click", clearConversation);
  $("save-preset").addEventListener("click", savePreset);
  $("export-md").addEventListener("click", exportMarkdown);
  $("export-all").addEventListener("click", exportAll);
  $("import-all").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", (e) => { if (e.target.files[0]) importFile(e.target.files[0]); e.target.value = ""; });
  $("toggle-advanced").addEventListener("click", () => { $("advanced").hidden = !$("advanced").hidden; });
  $("banner-close").addEventListener("click", () => hideBanner());
  $("open-drawer").addEventListener("click", openDrawer);
  $("close-drawer").addEventListener("click", closeDrawer);
  $("scrim").addEventListener("click", closeDrawer);
  narrow.addEventListener("change", () => setDrawer(false));
  $("lang").addEventListener("click", () => { state.lang = state.lang === "zh" ? "en" : "zh"; save(); applyLanguage(); renderAll(); });
  $("theme").addEventListener("click", () => {
    state.theme = THEMES[(THEMES.indexOf(state.theme) + 1) % THEMES.length];
    save();
    applyTheme();
  });
  $("messages").addEventListener("scroll", () => {
    const box = $("messages");
    following = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    if (following) $("new-text").hidden = true;
  });
  $("messages").addEventListener("click", (e) => {
    const button = e.target.closest(".remote-image"); // an image in a reply loads only when asked to
    if (button) button.replaceWith(el("img", {src: button.dataset.src, alt: button.textContent.slice(2)}));
  });
  $("new-text").addEventListener("click", scrollToEnd);
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
  // a reload or a closed tab mid-reply keeps what has arrived
  window.addEventListener("pagehide", save);
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") save(); });
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("/ui/sw.js").catch(() => {});
  pollHealth();
}
start();
