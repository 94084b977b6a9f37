// The context meter: how much of the model's context the next request would use.
import {postJSON} from "./api.js";
import {maxLength} from "./generation.js";
import {$, active, app, t} from "./store.js";

// -- the context meter ----------------------------------------------------------------------------------------
let meterTimer = null;
export function chatText(conv, query, prefix) {
  const rounds = conv.pairs.map((p, i) => `[Round ${i + 1}]\n\n问：${p.q}\n\n答：${p.a}\n\n`);
  rounds.push(`[Round ${conv.pairs.length + 1}]\n\n问：${query}\n\n答：`);
  return rounds.join("") + prefix;
}
export function updateMeter() {
  clearTimeout(meterTimer);
  meterTimer = setTimeout(async () => {
    if (app.server.status !== "ready") return;
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
