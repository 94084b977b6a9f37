// The built-in chat client, as ES modules with no build step: state in localStorage, chat through POST
// /stream, Markdown rendered by the server (POST /ui/render), so model output is never parsed as HTML here.
// This module wires the page's controls to the others (strings, store, api, generation, actions, render,
// meter, notices).
import {
  addConversation, clearConversation, exportAll, exportMarkdown, importFile, savePreset, streamingHere
} from "./actions.js";
import {pollHealth} from "./api.js";
import {send, stop} from "./generation.js";
import {updateMeter} from "./meter.js";
import {closeDrawer, hideBanner, narrow, openDrawer, setDrawer, showBanner} from "./notices.js";
import {applyLanguage, applyTheme, el, renderAll, renderStyles, scrollToEnd, showPrefix} from "./render.js";
import {$, active, app, loadState, save, t} from "./store.js";
import {STYLES, THEMES} from "./strings.js";

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
  app.state = loaded.state;
  applyLanguage();
  renderAll();
  if (loaded.broken) showBanner(t("storeBroken"), "warn");
  save();
  setDrawer(false);

  $("send").addEventListener("click", () => (streamingHere() ? stop() : send()));
  $("input").addEventListener("keydown", onInputKey);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && app.busy) stop(); });
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
  $("lang").addEventListener("click", () => { app.state.lang = app.state.lang === "zh" ? "en" : "zh"; save(); applyLanguage(); renderAll(); });
  $("theme").addEventListener("click", () => {
    app.state.theme = THEMES[(THEMES.indexOf(app.state.theme) + 1) % THEMES.length];
    save();
    applyTheme();
  });
  $("messages").addEventListener("scroll", () => {
    const box = $("messages");
    app.following = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    if (app.following) $("new-text").hidden = true;
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
  $("api-key").addEventListener("change", () => { app.state.apiKey = $("api-key").value.trim(); save(); });
  // a reload or a closed tab mid-reply keeps what has arrived
  window.addEventListener("pagehide", save);
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") save(); });
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("/ui/sw.js").catch(() => {});
  pollHealth();
}
start();
