// The deepmad dashboard's script, inlined in every page by web/html.rs.
//
// It sorts and filters the leaderboard in the page, and keeps pages live: progress comes from
// the JSON API (/api/sweeps, /api/sweeps/ID); the leaderboard table and the charts are
// fragments the server renders and escapes (/fragments/sweeps/ID/...), so there is one
// renderer. Data from JSON goes into the page through textContent only. Nothing is fetched
// from outside the coordinator.
"use strict";
(function () {
  var POLL_MS = 3000;
  // Charts cost the server a pass over every result: while a sweep runs, at most this often.
  var CHARTS_MS = 30000;
  var STATES = ["queued", "running", "succeeded", "failed", "dead"];

  function each(list, visit) {
    Array.prototype.forEach.call(list, visit);
  }

  function showError(message) {
    var box = document.querySelector("[data-field=error]");
    if (box) {
      box.textContent = message;
      box.hidden = false;
    }
  }

  function clearError() {
    var box = document.querySelector("[data-field=error]");
    if (box) {
      box.hidden = true;
    }
  }

  // Fetches a path of this coordinator; a lapsed session goes back to the login page.
  function get(path, accept) {
    return fetch(path, { credentials: "same-origin", headers: { Accept: accept } }).then(
      function (response) {
        if (response.status === 401) {
          var next = window.location.pathname + window.location.search;
          window.location.assign("/login?next=" + encodeURIComponent(next));
          throw new Error("the session ended: log in again");
        }
        if (!response.ok) {
          throw new Error(path + " answered " + response.status);
        }
        return accept === "application/json" ? response.json() : response.text();
      }
    );
  }

  // Progress ---------------------------------------------------------------------------

  function showProgress(element, sweep) {
    var counts = sweep.counts;
    var done = counts.succeeded + counts.failed + counts.dead;
    var total = done + counts.queued + counts.running;
    element.querySelector("[data-field=state]").textContent = sweep.state;
    element.querySelector("[data-field=done]").textContent = String(done);
    element.querySelector("[data-field=total]").textContent = String(total);
    var width = total === 0 ? 0 : (100 * done) / total;
    element.querySelector(".bar span").style.width = width.toFixed(1) + "%";
    STATES.forEach(function (name) {
      element.querySelector("[data-count=" + name + "]").textContent = String(counts[name]);
    });
    element.setAttribute("data-updated", new Date().toISOString());
  }

  function progressKey(sweep) {
    var counts = sweep.counts;
    return [sweep.state].concat(STATES.map(function (name) { return counts[name]; })).join("/");
  }

  // The leaderboard ------------------------------------------------------------------------

  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    if (!cell) {
      return numeric ? -Infinity : "";
    }
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (numeric) {
      var number = parseFloat(raw);
      return isNaN(number) ? -Infinity : number;
    }
    return raw.toLowerCase();
  }

  function sortRows(board) {
    var table = board.querySelector("table");
    var index = board.getAttribute("data-sort-index");
    if (!table || index === null) {
      return;
    }
    index = Number(index);
    var descending = board.getAttribute("data-sort-descending") === "1";
    var headers = table.tHead.rows[0].cells;
    var numeric = headers[index].getAttribute("data-sort") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, index, numeric);
      var y = cellValue(b, index, numeric);
      var order = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    each(headers, function (header, at) {
      if (at === index) {
        header.setAttribute("aria-sort", descending ? "descending" : "ascending");
      } else {
        header.removeAttribute("aria-sort");
      }
    });
  }

  function filterRows(board) {
    var table = board.querySelector("table");
    if (!table) {
      return;
    }
    var text = board.querySelector("[data-filter=text]").value.trim().toLowerCase();
    var family = board.querySelector("[data-filter=family]").value;
    var shown = 0;
    each(table.tBodies[0].rows, function (row) {
      var visible =
        (text === "" || row.textContent.toLowerCase().indexOf(text) >= 0) &&
        (family === "" || row.getAttribute("data-family") === family);
      row.hidden = !visible;
      shown += visible ? 1 : 0;
    });
    board.querySelector("[data-field=shown]").textContent = String(shown);
    board.querySelector("[data-field=rows]").textContent = String(table.tBodies[0].rows.length);
  }

  // Offers each family of the table's rows, keeping the current choice.
  function offerFamilies(board) {
    var select = board.querySelector("[data-filter=family]");
    var chosen = select.value;
    var families = [];
    each(board.querySelectorAll("tbody tr[data-family]"), function (row) {
      var family = row.getAttribute("data-family");
      if (families.indexOf(family) < 0) {
        families.push(family);
      }
    });
    families.sort();
    while (select.options.length > 1) {
      select.remove(1);
    }
    families.forEach(function (family) {
      var option = document.createElement("option");
      option.value = family;
      option.textContent = family;
      select.appendChild(option);
    });
    select.value = families.indexOf(chosen) >= 0 ? chosen : "";
  }

  function arrange(board) {
    offerFamilies(board);
    sortRows(board);
    filterRows(board);
  }

  function setUpBoard(board) {
    board.addEventListener("click", function (event) {
      var header = event.target.closest("th[data-sort]");
      if (!header) {
        return;
      }
      var index = String(header.cellIndex);
      var same = board.getAttribute("data-sort-index") === index;
      var descending = same ? board.getAttribute("data-sort-descending") !== "1" : header.getAttribute("data-sort") === "num";
      board.setAttribute("data-sort-index", index);
      board.setAttribute("data-sort-descending", descending ? "1" : "0");
      sortRows(board);
    });
    board.querySelector("[data-filter=text]").addEventListener("input", function () { filterRows(board); });
    board.querySelector("[data-filter=family]").addEventListener("change", function () { filterRows(board); });
    arrange(board);
  }

  // Replaces a fragment's content with the server's rendering of it.
  function refresh(sweep, name) {
    var holder = document.querySelector("[data-fragment=" + name + "]");
    if (!holder) {
      return Promise.resolve();
    }
    return get("/fragments/sweeps/" + sweep + "/" + name, "text/html").then(function (html) {
      holder.innerHTML = html;
      var board = holder.closest("[data-board]");
      if (board) {
        arrange(board);
        board.setAttribute("data-refreshed", String(Number(board.getAttribute("data-refreshed") || "0") + 1));
      }
    });
  }

  // Pages ------------------------------------------------------------------------------------

  // A sweep's page: progress every POLL_MS while the sweep is active; the leaderboard at load
  // and whenever the counts move; the charts when the counts moved since the page drew them,
  // at most every CHARTS_MS while the sweep runs, and once more when it ends.
  function watchSweep(page) {
    var sweep = page.getAttribute("data-sweep-page");
    var boardKey = null;
    var chartsKey = page.getAttribute("data-key");
    var chartsAt = Date.now();
    function tick() {
      get("/api/sweeps/" + sweep, "application/json")
        .then(function (summary) {
          clearError();
          each(document.querySelectorAll("[data-progress]"), function (element) {
            if (element.getAttribute("data-progress") === summary.id) {
              showProgress(element, summary);
            }
          });
          var key = progressKey(summary);
          var work = [];
          if (key !== boardKey) {
            work.push(refresh(sweep, "leaderboard").then(function () { boardKey = key; }));
          }
          var chartsDue = summary.state !== "active" || Date.now() - chartsAt >= CHARTS_MS;
          if (key !== chartsKey && chartsDue) {
            work.push(refresh(sweep, "charts").then(function () {
              chartsKey = key;
              chartsAt = Date.now();
            }));
          }
          return Promise.all(work).then(function () {
            if (summary.state === "active") {
              window.setTimeout(tick, POLL_MS);
            }
          });
        })
        .catch(function (error) {
          showError(String(error.message || error));
          window.setTimeout(tick, POLL_MS * 3);
        });
    }
    tick();
  }

  // The sweeps list: every sweep's progress, while any is active.
  function watchSweeps() {
    function tick() {
      get("/api/sweeps", "application/json")
        .then(function (answer) {
          clearError();
          var active = false;
          answer.sweeps.forEach(function (summary) {
            active = active || summary.state === "active";
            each(document.querySelectorAll("[data-progress]"), function (element) {
              if (element.getAttribute("data-progress") === summary.id) {
                showProgress(element, summary);
              }
            });
          });
          if (active) {
            window.setTimeout(tick, POLL_MS);
          }
        })
        .catch(function (error) {
          showError(String(error.message || error));
          window.setTimeout(tick, POLL_MS * 3);
        });
    }
    tick();
  }

  each(document.querySelectorAll("[data-board]"), setUpBoard);
  var page = document.querySelector("[data-sweep-page]");
  if (page) {
    watchSweep(page);
  } else if (document.querySelector("[data-sweeps-page]")) {
    watchSweeps();
  }
})();
