// What the page keeps: the shared state (the conversations in localStorage, the server's health, the running
// generation), validated on load so a broken store cannot brick the page, and the text lookup t().
import {showBanner} from "./notices.js";
import {I18N, STYLES, THEMES} from "./strings.js";

export const STORE_KEY = "chatglm2.state.v1";
export const $ = (id) => document.getElementById(id);
// state: {version, lang, theme, active, apiKey, convs: [...], presets: [...]}; server: the last /health;
// busy: the running generation {conv, index, jobId, controller, started, events}; following: the view
// follows a streaming reply while the reader is at the bottom
export const app = {state: null, server: {max_context: 8192, status: "unknown"}, busy: null, following: true};



// -- text -----------------------------------------------------------------------------------------------------
export function t(key, values = {}) {
  const text = (I18N[app.state.lang] || I18N.zh)[key] || key;
  return text.replace(/\{(\w)\}/g, (_, k) => values[k] ?? "");
}
// -- the store: validated on load, so a broken one cannot brick the page ---------------------------------------
export const uid = () => Math.random().toString(36).slice(2, 10) + Date.now().toString(36).slice(-4);
export const isText = (v) => typeof v === "string";
export const clampNumber = (v, lo, hi, fallback) => (typeof v === "number" && v >= lo && v <= hi ? v : fallback);

export function newConversation(title) {
  return {id: uid(), title: title || "", style: "default", params: {...STYLES.default, max_length: 0}, pairs: []};
}
export function cleanPairs(raw) {
  return (Array.isArray(raw) ? raw : []).filter((p) => p && isText(p.q) && isText(p.a))
    .map((p) => ({q: p.q, a: p.a, prefix: isText(p.prefix) ? p.prefix : "", dropped: p.dropped === true}));
}
export function cleanConversation(raw) {
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
export function cleanState(raw) {
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
export function loadState() {
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
export function save() {
  savedAt = performance.now();
  try { localStorage.setItem(STORE_KEY, JSON.stringify(app.state)); } catch (err) { showBanner(String(err), "error"); }
}
export function saveSoon() {
  // while a reply streams: at most once a second (and on pagehide), so a reload keeps the partial reply
  if (performance.now() - savedAt > 1000) save();
}
export const active = () => app.state.convs.find((c) => c.id === app.state.active) || app.state.convs[0];
export const titleOf = (c) => c.title || (c.pairs[0] ? c.pairs[0].q.slice(0, 30) : t("untitled"));
