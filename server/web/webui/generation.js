// One generation: POST /stream, the streamed reply into the conversation, queue position, stop.
import {errorText, fetchHealth, postJSON, sseEvents} from "./api.js";
import {updateMeter} from "./meter.js";
import {showBanner} from "./notices.js";
import {renderComposer, renderList, renderMessages, scheduleBubble, scrollToEnd, showPrefix} from "./render.js";
import {$, active, app, save, saveSoon, t} from "./store.js";

// -- generation -----------------------------------------------------------------------------------------------
export function maxLength(conv) {
  return Math.min(conv.params.max_length || app.server.max_context || 8192, app.server.max_context || 8192);
}
export async function generate(conv, index) {
  const pair = conv.pairs[index];
  // delta: each event carries only the new text (the seed's format repeats the whole reply twice per event)
  const body = {query: pair.q, history: conv.pairs.slice(0, index).map((p) => [p.q, p.a]),
                answer_prefix: pair.prefix, max_length: maxLength(conv), top_p: conv.params.top_p,
                temperature: conv.params.temperature, delta: true};
  app.busy = {conv, index, jobId: null, controller: new AbortController(), started: performance.now(), events: 0};
  const previous = pair.a;
  pair.a = pair.prefix;
  renderComposer();
  renderMessages();
  scrollToEnd();
  let finish = null;
  let response = null;
  try {
    response = await postJSON("/stream", body, app.busy.controller.signal);
    if (!response.ok) {
      showBanner(await errorText(response), "error", response.status === 503 ? "health" : "action");
      pair.a = previous; // a regenerated answer stays as it was
      return "refused";
    }
    app.busy.jobId = response.headers.get("X-Job-Id");
    if (app.busy.stopRequested) stop(); // Stop was pressed before the server named the job
    watchQueue(app.busy);
    for await (const {event, data} of sseEvents(response)) {
      if (event === "message") {
        pair.a = data.text !== undefined ? data.text : pair.a + data.delta;
        app.busy.events += 1;
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
    app.busy = null;
    if (finish) showFinish(conv, finish); // none when refused: the pair is as it was
    renderComposer();
    save();
    renderMessages();
    renderList();
  }
  return finish.finish_reason;
}
export function showFinish(conv, finish) {
  if (finish.finish_reason === "lost" || finish.finish_reason === "error") {
    $("status").textContent = t("lost");
    return;
  }
  conv.pairs.forEach((p, i) => { p.dropped = i < (finish.dropped_rounds || 0); });
  const rate = finish.completion_tokens / Math.max(finish.seconds, 0.001);
  $("status").textContent = t("finished", {f: t(finish.finish_reason + "Reason"), n: finish.completion_tokens,
                                           r: rate.toFixed(1)});
}
export async function watchQueue(job) {
  // Until the first words arrive: where the request stands (waiting behind others, or reading the prompt).
  while (app.busy === job && job.events === 0) {
    try {
      const h = await fetchHealth();
      if (app.busy !== job || job.events > 0) return;
      const ahead = (h.queued_jobs || []).indexOf(job.jobId);
      $("status").textContent = ahead > 0 ? t("queued", {n: ahead}) : ahead === 0 ? t("queuedNext") : t("thinking");
    } catch (err) { return; }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
export async function send() {
  const conv = active();
  const q = $("input").value;
  if (app.busy || !q.trim()) return;
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
export async function stop() {
  if (!app.busy) return;
  if (app.busy.jobId) {
    // the server ends the stream with the partial reply and finish_reason "interrupted"
    try { await postJSON("/interrupt", {id: app.busy.jobId}); } catch (err) { app.busy?.controller.abort(); }
  } else if (app.busy.stopRequested) {
    app.busy.controller.abort(); // pressed twice and the server still has not answered: give up on it
  } else {
    app.busy.stopRequested = true;
  }
}
