// Drawing the page from the state: language and theme, the conversation list, messages (Markdown from the
// server), the composer.
import {
  amend, deleteConversation, duplicateConversation, moveConversation, presetName, regenerate, revert,
  selectConversation, setStyle, startFromPreset, streamingHere
} from "./actions.js";
import {postJSON} from "./api.js";
import {maxLength} from "./generation.js";
import {updateMeter} from "./meter.js";
import {$, active, app, save, t, titleOf} from "./store.js";
import {BUILTIN_PRESETS, EXAMPLES, STYLES} from "./strings.js";

export const rendered = new Map(); // Markdown source -> HTML from the server
export const rendering = new Map(); // Markdown source -> the request in flight
let renderPausedUntil = 0;  // after a failed render: no new ones until then (or until the server is back)
let renderBackoff = 1000;
export function resumeRenders() {
  renderPausedUntil = 0;
}
export function applyLanguage() {
  document.documentElement.lang = app.state.lang === "en" ? "en" : "zh-CN";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-label]").forEach((el) => {
    el.title = t(el.dataset.i18nLabel);
    el.setAttribute("aria-label", el.title);
  });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("lang");
  applyTheme();
}
export function applyTheme() {
  if (app.state.theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = app.state.theme;
  $("theme").textContent = {system: "◐", light: "☀", dark: "☾"}[app.state.theme];
  $("theme").title = t("theme" + app.state.theme[0].toUpperCase() + app.state.theme.slice(1));
  $("theme").setAttribute("aria-label", $("theme").title);
}

// -- rendering ------------------------------------------------------------------------------------------------
export function el(tag, props = {}, ...children) {
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
export function renderAll() {
  renderList();
  renderPresets();
  renderStyles();
  renderAdvanced();
  renderMessages();
  renderComposer();
  updateMeter();
}
export function renderList() {
  const list = $("conv-list");
  list.replaceChildren(...app.state.convs.map((conv, i) => {
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
export function markActive() {
  // the active row without rebuilding the list, so a double click lands on the row it started on
  for (const item of $("conv-list").children) {
    const on = item.dataset.id === app.state.active;
    item.classList.toggle("active", on);
    if (on) item.setAttribute("aria-current", "true"); else item.removeAttribute("aria-current");
  }
  $("conv-title").textContent = titleOf(active());
}
export function listKey(e, item, conv) {
  if (e.target !== item) return;
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectConversation(conv.id); }
  else if (e.key === "F2") { e.preventDefault(); startRename(item, conv); }
  else if (e.key === "Delete") { e.preventDefault(); deleteConversation(conv); }
  else if (e.key === "ArrowDown") { e.preventDefault(); item.nextElementSibling?.focus(); }
  else if (e.key === "ArrowUp") { e.preventDefault(); item.previousElementSibling?.focus(); }
}
export function startRename(item, conv) {
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
export function renderPresets() {
  const builtIn = BUILTIN_PRESETS.map((p) => el("button", {className: "preset", textContent: presetName(p),
                                                           onclick: () => startFromPreset(p)}));
  const own = app.state.presets.map((p) => el("span", {class: "own-preset"},
    el("button", {className: "preset", textContent: p.name, onclick: () => startFromPreset(p)}),
    el("button", {className: "icon remove-preset", label: t("removePreset"), textContent: "✕", onclick: () => {
      app.state.presets = app.state.presets.filter((x) => x !== p);
      save();
      renderPresets();
    }})));
  $("preset-list").replaceChildren(...builtIn, ...own);
}
export function renderStyles() {
  const conv = active();
  for (const [box, prefix] of [[$("styles"), "style-"], [$("styles-compact"), "style-compact-"]]) {
    box.replaceChildren(...Object.keys(STYLES).map((name) => el("button", {
      className: conv.style === name ? "on" : "", textContent: t(name), onclick: () => setStyle(name),
      id: prefix + name})));
  }
}
export function renderAdvanced() {
  const conv = active();
  const values = {temperature: conv.params.temperature, top_p: conv.params.top_p, max_length: maxLength(conv)};
  $("max_length").max = String(app.server.max_context || 8192);
  for (const [name, value] of Object.entries(values)) {
    $(name).value = String(value);
    $(name + "-out").textContent = String(value);
  }
  $("api-key").value = app.state.apiKey;
}
export const COPY_ICON = '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true" fill="none" ' +
  'stroke="currentColor" stroke-width="1.5"><rect x="5" y="5" width="9" height="9" rx="1.5"/>' +
  '<path d="M11 5V3.5A1.5 1.5 0 0 0 9.5 2h-6A1.5 1.5 0 0 0 2 3.5v6A1.5 1.5 0 0 0 3.5 11H5"/></svg>';
export async function copyText(button, text) {
  try { await navigator.clipboard.writeText(text); button.textContent = "✓"; } catch (err) { /* not allowed */ }
}
export function messageBox(conv, index, role) {
  const pair = conv.pairs[index];
  const text = role === "user" ? pair.q : pair.a;
  const streaming = app.busy && app.busy.conv === conv && app.busy.index === index && role === "bot";
  const body = el("div", {class: "body"});
  fillBody(body, text, role === "bot" && !streaming);
  if (streaming && app.busy.events === 0) body.append(el("span", {class: "typing", label: t("thinking")}, el("i"), el("i"), el("i")));
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
export function fillBody(body, text, markdown) {
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
export function renderMarkdown(text) {
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
export function addCopyButtons(body) {
  body.querySelectorAll("pre").forEach((pre) => {
    const button = el("button", {className: "copy", textContent: t("copy"), onclick: async () => {
      await navigator.clipboard?.writeText(pre.querySelector("code")?.textContent ?? pre.textContent);
      button.textContent = t("copied");
    }});
    pre.append(button);
  });
}
export function emptyState() {
  const model = app.server.name || (app.server.model || "").split(/[\\/]/).pop() || "ChatGLM2-6B";
  const facts = app.server.status === "ready"
    ? t("emptyModel", {m: model, d: app.server.device || "?", p: app.server.precision || "?", c: app.server.max_context || "?"}) : "";
  return el("div", {id: "empty"},
    el("h2", {textContent: t("emptyTitle")}),
    el("p", {class: "facts", textContent: facts}),
    el("p", {textContent: t("examples")}),
    el("div", {class: "examples"}, ...EXAMPLES[app.state.lang].map((text) => el("button", {className: "example",
      textContent: text, onclick: () => { $("input").value = text; $("input").focus(); updateMeter(); }}))),
    el("p", {textContent: t("presets")}),
    el("div", {class: "examples"}, ...[...BUILTIN_PRESETS, ...app.state.presets].map((p) => el("button", {
      className: "preset", textContent: presetName(p), onclick: () => startFromPreset(p)}))));
}
export function renderMessages() {
  const conv = active();
  const nodes = [];
  conv.pairs.forEach((_, i) => nodes.push(messageBox(conv, i, "user"), messageBox(conv, i, "bot")));
  if (!conv.pairs.length) nodes.push(emptyState());
  if (conv.pairs.length && !streamingHere()) {
    nodes.push(el("div", {class: "pair-actions"},
      el("button", {id: "regenerate", className: "icon", label: t("regenerate"), textContent: "↻", onclick: regenerate,
                    disabled: Boolean(app.busy)}),
      el("button", {id: "amend", className: "icon", label: t("amend"), textContent: "✎", onclick: amend,
                    disabled: Boolean(app.busy)}),
      el("button", {id: "revert", className: "icon", label: t("revert"), textContent: "↶", onclick: revert,
                    disabled: Boolean(app.busy)})));
  }
  const box = $("messages");
  const top = box.scrollTop;
  box.replaceChildren(...nodes);
  if (app.following) scrollToEnd(); else box.scrollTop = top;
}
let bubbleFrame = 0;
export function scheduleBubble(conv, index) {
  // at most one DOM update per animation frame, however fast the tokens come
  if (bubbleFrame) return;
  bubbleFrame = requestAnimationFrame(() => {
    bubbleFrame = 0;
    updateBubble(conv, index);
  });
}
export function updateBubble(conv, index) {
  if (app.busy && app.busy.conv === conv && conv === active()) {
    const seconds = (performance.now() - app.busy.started) / 1000;
    $("status").textContent = t("live", {r: (app.busy.events / seconds).toFixed(1)});
  }
  if (!app.busy || app.busy.conv !== conv || app.busy.index !== index || conv !== active()) return; // the reply has ended
  const box = $("messages").querySelector(`.msg.bot[data-index="${index}"] .body`);
  if (!box) return;
  box.textContent = conv.pairs[index].a;
  if (app.following) scrollToEnd(); else $("new-text").hidden = false;
}
export function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
  app.following = true;
  $("new-text").hidden = true;
}
export function editMessage(box, conv, index, role) {
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
export function renderComposer() {
  const button = $("send");
  const here = streamingHere();
  button.textContent = here ? t("stop") : t("send");
  button.classList.toggle("stop", Boolean(here));
  button.disabled = Boolean(app.busy && !here);
  button.title = app.busy && !here ? t("otherBusy") : "";
  if (app.busy && !here) $("status").textContent = t("otherBusy");
}
export function showPrefix(show) {
  $("prefix").hidden = !show;
  $("toggle-prefix").setAttribute("aria-pressed", String(show));
  $("toggle-prefix").classList.toggle("on", show);
}
