// Talking to the server: headers, JSON posts, error texts, /health polling and the SSE reader.
import {hideBanner, showBanner, showNotices} from "./notices.js";
import {renderAll, resumeRenders} from "./render.js";
import {app, t} from "./store.js";

// -- talking to the server ------------------------------------------------------------------------------------
export function headers() {
  const h = {"Content-Type": "application/json"};
  if (app.state.apiKey) h.Authorization = "Bearer " + app.state.apiKey;
  return h;
}
export async function postJSON(path, body, signal) {
  return fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
}
export async function errorText(res) {
  let body = {};
  try { body = await res.json(); } catch (err) { /* not JSON */ }
  const m = body.message || res.statusText;
  if (res.status === 401) return t("keyNeeded");
  if (res.status === 429) return t("busy");
  if (res.status === 413 && body.prompt_tokens) {
    return t("overflow", {n: body.prompt_tokens, l: body.limit, c: body.max_context});
  }
  if (res.status === 503) {  // not ready: /health says why, in the page's language (and polling clears it)
    try { app.server = await fetchHealth(); return healthText(app.server) || m; } catch (err) { return m; }
  }
  return t("badRequest", {m});
}
export function healthText(h) {
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
export async function fetchHealth() {
  const res = await fetch("/health", {headers: headers()});  // with a key set, anonymous callers see only the state
  return res.json();
}
export async function pollHealth() {
  try {
    const h = await fetchHealth();
    const wasReady = app.server.status === "ready";
    app.server = h;
    showNotices(h.notices || []);
    if (h.status === "ready") {
      if (!wasReady) {
        hideBanner("health");
        resumeRenders(); // renders that failed while the server was away can run now
        renderAll();
      }
    } else {
      showBanner(healthText(h), h.status === "error" ? "error" : "warn", "health");
    }
  } catch (err) {
    app.server.status = "offline";
    showBanner(t("offline"), "error", "health");
  }
  setTimeout(pollHealth, app.server.status === "ready" ? 10000 : 1000);
}

export async function* sseEvents(res) {
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
