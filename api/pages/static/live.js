// Live updates of running jobs: polls the pages' JSON once a second and updates the page in
// place (no reload), until every job shown has ended. The job page reloads once when its job
// ends, to show the results. Everything else on the pages works without this script.
"use strict";
(function () {
  var PERIOD_MS = 1000;

  function setText(root, field, text) {
    var el = root.querySelector('[data-field="' + field + '"]');
    if (el && el.textContent !== text) { el.textContent = text; }
  }

  function update(root, job, isRow) {
    var badge = root.querySelector('[data-field="status"]');
    if (badge) { badge.textContent = job.status; badge.className = "badge badge-" + job.status; }
    var bar = root.querySelector('[data-field="progress"]');
    if (bar) { bar.value = job.progress; bar.textContent = job.percent; bar.hidden = job.final && isRow; }
    setText(root, "stage", job.final ? "" : job.stage);
    setText(root, "percent", job.percent);
    setText(root, "duration", job.duration);
    setText(root, "size", job.size);
    if (job.metric) { setText(root, "metrics", job.metric + " " + job.before + " \u2192 " + job.after); }
    (job.timeline || []).forEach(function (s) {
      var li = document.querySelector('[data-stage="' + s.name + '"]');
      if (li) { li.className = "stage-" + s.state; }
    });
  }

  function poll(url, onData) {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (r.status === 401) { location.reload(); } return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { onData(data); } })
      .catch(function () { /* a missed poll: the next one tries again */ });
  }

  function watchList(table) {
    var timer = setInterval(function () {
      var rows = table.querySelectorAll('tr[data-final="0"]');
      if (!rows.length) { clearInterval(timer); return; }
      var ids = Array.prototype.map.call(rows, function (r) { return r.dataset.jobId; });
      poll(table.dataset.live + "?ids=" + encodeURIComponent(ids.join(",")), function (data) {
        data.items.forEach(function (job) {
          var row = table.querySelector('tr[data-job-id="' + job.id + '"]');
          if (!row) { return; }
          update(row, job, true);
          if (job.final) { row.dataset.final = "1"; }
        });
      });
    }, PERIOD_MS);
  }

  function watchJob(head) {
    var timer = setInterval(function () {
      poll(head.dataset.state, function (job) {
        update(document.querySelector("main"), job, false);
        if (job.final) { clearInterval(timer); location.reload(); }
      });
    }, PERIOD_MS);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.querySelector("table[data-live]");
    if (table) { watchList(table); }
    var head = document.getElementById("job");
    if (head && head.dataset.final === "0") { watchJob(head); }
  });
})();
