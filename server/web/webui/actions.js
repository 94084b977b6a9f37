// What the user does to conversations and presets, and importing/exporting them.
import {generate, stop} from "./generation.js";
import {updateMeter} from "./meter.js";
import {closeDrawer, showBanner, showToast} from "./notices.js";
import {
  markActive, renderAdvanced, renderAll, renderComposer, renderList, renderMessages, renderPresets,
  renderStyles, showPrefix
} from "./render.js";
import {$, active, app, cleanConversation, newConversation, save, t, titleOf, uid} from "./store.js";
import {STYLES} from "./strings.js";

// -- conversation actions -------------------------------------------------------------------------------------
export const streamingHere = () => app.busy && app.busy.conv === active();
export function forgetDropMarks(conv) {
  conv.pairs.forEach((p) => { p.dropped = false; }); // they described the request of an answer now gone
}
export function regenerate() {
  const conv = active();
  if (app.busy || !conv.pairs.length) return;
  generate(conv, conv.pairs.length - 1);
}
export function amend() {
  const conv = active();
  if (app.busy || !conv.pairs.length) return;
  const pair = conv.pairs.pop();
  forgetDropMarks(conv);
  $("input").value = pair.q;
  $("prefix").value = pair.prefix;
  showPrefix(Boolean(pair.prefix));
  save();
  renderAll();
  $("input").focus();
}
export function revert() {
  const conv = active();
  if (app.busy || !conv.pairs.length) return;
  conv.pairs.pop();
  forgetDropMarks(conv);
  save();
  renderAll();
}
export function clearConversation() {
  if (streamingHere() || !confirm(t("confirmClear"))) return;
  active().pairs = [];
  save();
  renderAll();
}
export function selectConversation(id) {
  // a reply that is streaming keeps streaming into its own chat
  closeDrawer();
  if (app.state.active === id) return;
  app.state.active = id;
  save();
  app.following = true;
  markActive();
  renderStyles();
  renderAdvanced();
  renderMessages();
  renderComposer();
  updateMeter();
}
export function addConversation(pairs = [], title = "") {
  const conv = newConversation(title);
  conv.pairs = pairs.map((p) => ({...p, prefix: "", dropped: false}));
  app.state.convs.unshift(conv);
  save();
  renderList();
  selectConversation(conv.id);
  $("input").focus();
}
export function duplicateConversation(conv) {
  const copy = cleanConversation(JSON.parse(JSON.stringify(conv)));
  copy.id = uid();
  copy.title = titleOf(conv) + " (2)";
  app.state.convs.splice(app.state.convs.indexOf(conv) + 1, 0, copy);
  save();
  renderList();
}
export function deleteConversation(conv) {
  if (app.busy && app.busy.conv === conv) stop();
  const at = app.state.convs.indexOf(conv);
  app.state.convs.splice(at, 1);
  if (!app.state.convs.length) app.state.convs.push(newConversation());
  if (app.state.active === conv.id) app.state.active = app.state.convs[Math.min(at, app.state.convs.length - 1)].id;
  save();
  renderAll();
  showToast(t("deleted"), t("undo"), () => {
    app.state.convs.splice(at, 0, conv);
    app.state.active = conv.id;
    save();
    renderAll();
  });
}
export function moveConversation(from, to) {
  const [conv] = app.state.convs.splice(from, 1);
  app.state.convs.splice(to, 0, conv);
  save();
  renderList();
}
export function setStyle(name) {
  const conv = active();
  conv.style = name;
  Object.assign(conv.params, STYLES[name]);
  save();
  renderStyles();
  renderAdvanced();
}
export function savePreset() {
  const conv = active();
  if (!conv.pairs.length) return;
  const name = titleOf(conv);
  app.state.presets.push({id: uid(), name, pairs: conv.pairs.map((p) => ({q: p.q, a: p.a, prefix: "", dropped: false}))});
  save();
  renderPresets();
  showToast(t("presetSaved", {n: name}));
}
export function presetName(preset) {
  return typeof preset.name === "string" ? preset.name : preset.name[app.state.lang] || preset.name.zh;
}
export function startFromPreset(preset) {
  addConversation(preset.pairs, presetName(preset));
  $("presets").open = false;
}

// -- import / export ------------------------------------------------------------------------------------------
export function download(name, text, type) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type}));
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
}
export function exportAll() {
  download("chatglm2-conversations.json",
           JSON.stringify({app: "my-chatglm2", version: 1, convs: app.state.convs}, null, 2), "application/json");
}
export function exportMarkdown() {
  const conv = active();
  const lines = [`# ${titleOf(conv)}`, ""];
  conv.pairs.forEach((p) => { lines.push(`**${t("you")}:** ${p.q}`, "", `**${t("bot")}:** ${p.a}`, ""); });
  download(`${titleOf(conv).replace(/[\\/:*?"<>|]/g, "_")}.md`, lines.join("\n"), "text/markdown");
}
export async function importFile(file) {
  try {
    const data = JSON.parse(await file.text());
    const convs = (Array.isArray(data) ? data : data.convs).map(cleanConversation).filter(Boolean);
    if (!convs.length) throw new Error("empty");
    const ids = new Set(app.state.convs.map((c) => c.id));
    convs.forEach((c) => { if (ids.has(c.id)) c.id = uid(); });
    app.state.convs.unshift(...convs);
    app.state.active = convs[0].id;
    save();
    renderAll();
    showToast(t("imported", {n: convs.length}));
  } catch (err) {
    showBanner(t("importBad"), "error");
  }
}
