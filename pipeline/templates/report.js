// Sortable tables without any library (the page must work offline): click a column title to
// sort by it, click again to reverse. Numbers sort as numbers; empty cells always sort last.
(function () {
  "use strict";
  function key(cell) {
    var text = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
    var number = Number(text);
    return { empty: text === "", number: text !== "" && !isNaN(number) ? number : null, text: text };
  }
  function compare(a, b) {
    if (a.empty || b.empty) { return a.empty === b.empty ? 0 : a.empty ? 1 : -1; }
    if (a.number !== null && b.number !== null) { return a.number - b.number; }
    return a.text.localeCompare(b.text, undefined, { numeric: true });
  }
  function sortBy(table, th, index) {
    var descending = th.getAttribute("aria-sort") === "ascending";
    table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (row, position) {
      return { row: row, key: key(row.cells[index]), position: position };
    });
    rows.sort(function (a, b) {
      var order = compare(a.key, b.key);
      if (!a.key.empty && !b.key.empty && descending) { order = -order; }
      return order || a.position - b.position;
    });
    rows.forEach(function (entry) { body.appendChild(entry.row); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, index) {
      if (th.classList.contains("nosort")) { return; }
      th.addEventListener("click", function () { sortBy(table, th, index); });
    });
  });
  // An embedded thumbnail (no link to follow) grows to full width on a click.
  document.querySelectorAll("img.thumb").forEach(function (img) {
    if (img.closest("a")) { return; }
    img.addEventListener("click", function () { img.classList.toggle("big"); });
  });
})();
