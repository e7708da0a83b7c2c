/* epispec `generate --html` page: renders the embedded generation (the token events and
   final event of POST /generate, in #epispec-data) with the shared EpiView renderer. */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const record = JSON.parse($("epispec-data").textContent);
  const view = new EpiView.View($("transcript"), { legend: $("legend"), summary: $("summary"),
                                                   chart: $("chart"), tooltip: $("tooltip") });
  const container = document.createElement("span");
  $("completion").appendChild(container);
  const thresholds = record.thresholds || {};
  view.begin(container, { threshold: thresholds.eu === undefined ? null : thresholds.eu });
  let final = null;
  for (const ev of record.events) {
    if (ev.summary !== undefined) final = ev;
    else view.add(ev);
  }
  view.summary(final, "incomplete");
  view.chart();
})();
