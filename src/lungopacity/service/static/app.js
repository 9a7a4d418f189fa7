// Lung opacity reader: uploads one file to POST /v1/predict and shows the answer in a
// small viewer: the radiograph (a display-size JPEG drawn on a canvas, so window/level is
// applied here), the boxes as SVG vectors in original pixels on top, and the heatmap layer
// (asked for with ?heatmap=true only when it is switched on) between the two.
// Server text is always inserted with textContent, never as HTML.
// When the server requires a token (401), the page asks for it, keeps it in this tab's
// sessionStorage and sends it as "Authorization: Bearer ..." with every API call. A link
// ending in "#token=..." gives it too: the fragment never reaches the server or its
// logs, and the page removes it from the address bar at once.
"use strict";

(function () {
  const CLASS_LABELS = {
    normal: "Normal",
    not_normal: "No lung opacity / not normal",
    lung_opacity: "Lung opacity",
  };
  const MISSING_LABELS = { sex: "sex", age: "age", view: "view" };

  const form = document.getElementById("upload-form");
  const fileInput = document.getElementById("file-input");
  const dropZone = document.getElementById("drop-zone");
  const fileChosen = document.getElementById("file-chosen");
  const submitButton = document.getElementById("submit-button");
  const statusBox = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const result = document.getElementById("result");
  const pictureCaption = document.getElementById("picture-caption");
  const viewer = document.getElementById("viewer");
  const stage = document.getElementById("stage");
  const canvas = document.getElementById("image-canvas");
  const heatLayer = document.getElementById("heatmap-layer");
  const boxLayer = document.getElementById("box-layer");
  const zoomLevel = document.getElementById("zoom-level");
  const levelSlider = document.getElementById("wl-level");
  const widthSlider = document.getElementById("wl-width");
  const wlReadout = document.getElementById("wl-readout");
  const legend = document.getElementById("legend");
  const layerRadios = Array.prototype.slice.call(document.querySelectorAll('input[name="layer"]'));
  const heatmapRadio = document.getElementById("layer-heatmap");
  const downloadButton = document.getElementById("download-json");

  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token-input");
  const tokenMessage = document.getElementById("token-message");
  const TOKEN_KEY = "lungopacity.token";

  let maxUploadBytes = 50 * 1024 * 1024;
  let token = "";

  function saveToken(value) {
    token = value;
    try {
      if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
      else window.sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      // Storage may be disabled; the token then lasts until the page is closed.
    }
  }

  function loadToken() {
    try {
      token = window.sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (err) {
      token = "";
    }
    const match = /(?:^#|&)token=([^&]*)/.exec(window.location.hash);
    if (match) {
      saveToken(decodeURIComponent(match[1]));
      window.history.replaceState(null, "", window.location.pathname + window.location.search);
    }
  }

  function askForToken(message) {
    tokenMessage.textContent = message;
    tokenForm.hidden = false;
    tokenInput.focus();
  }

  // fetch() with the token, if there is one; a 401 brings up the token form.
  async function apiFetch(url, options) {
    const settings = Object.assign({}, options || {});
    const headers = new Headers(settings.headers || {});
    if (token) headers.set("Authorization", "Bearer " + token);
    settings.headers = headers;
    const response = await fetch(url, settings);
    if (response.status === 401) {
      askForToken(token
        ? "The server did not accept this token; enter it again."
        : "This server asks for an access token. Its administrator can give you one; it is kept in this browser tab only.");
    }
    return response;
  }

  tokenForm.addEventListener("submit", function (event) {
    event.preventDefault();
    const value = tokenInput.value.trim();
    if (!value) {
      tokenMessage.textContent = "Enter the access token first.";
      tokenInput.focus();
      return;
    }
    saveToken(value);
    tokenInput.value = "";
    tokenForm.hidden = true;
    clearError();
    loadInfo();
  });

  function humanBytes(n) {
    if (n < 1024) return n + " bytes";
    if (n < 1024 * 1024) return (n / 1024).toFixed(0) + " KB";
    return (n / (1024 * 1024)).toFixed(n % (1024 * 1024) === 0 ? 0 : 1) + " MB";
  }

  function setStatus(text) {
    statusBox.textContent = text;
  }

  function showError(text) {
    errorBox.textContent = text;
  }

  function clearError() {
    errorBox.textContent = "";
  }

  async function loadInfo() {
    try {
      const response = await apiFetch("/v1/info", { cache: "no-store" });
      if (response.status === 401) {
        document.getElementById("model-version").textContent = "unknown (enter the access token)";
        return;
      }
      const info = await response.json();
      maxUploadBytes = info.max_upload_bytes;
      document.getElementById("max-size").textContent = humanBytes(maxUploadBytes);
      document.getElementById("model-version").textContent = info.model_version || "not loaded yet";
      if (!info.ready) {
        setStatus("The model is still loading; you can choose a file meanwhile.");
        // Ask again until the bundle is loaded, so the page shows the model version.
        window.setTimeout(loadInfo, 2000);
      } else if (statusBox && statusBox.textContent.startsWith("The model is still loading")) {
        setStatus("The model is ready.");
      }
    } catch (err) {
      document.getElementById("model-version").textContent = "unknown (the server did not answer)";
    }
  }

  function describeChosenFile() {
    const file = fileInput.files && fileInput.files[0];
    fileChosen.textContent = file ? "Chosen: " + file.name + " (" + humanBytes(file.size) + ")" : "";
  }

  // Drag and drop onto the box puts the file into the real file input.
  ["dragenter", "dragover"].forEach(function (type) {
    dropZone.addEventListener(type, function (event) {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (type) {
    dropZone.addEventListener(type, function () {
      dropZone.classList.remove("dragging");
    });
  });
  dropZone.addEventListener("drop", function (event) {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length > 0) {
      const transfer = new DataTransfer();
      transfer.items.add(files[0]);
      fileInput.files = transfer.files;
      describeChosenFile();
      clearError();
    }
  });
  // A file dropped next to the box must not make the browser navigate away.
  window.addEventListener("dragover", function (event) { event.preventDefault(); });
  window.addEventListener("drop", function (event) { event.preventDefault(); });

  fileInput.addEventListener("change", function () {
    describeChosenFile();
    clearError();
  });

  // ------------------------------------------------------------------ the viewer

  const ZOOM_STEP = 1.5;
  const ZOOM_MIN = 1;
  const ZOOM_MAX = 16;
  const DEFAULT_LEVEL = 128;
  const DEFAULT_WIDTH = 256;
  const SEXES = { F: "female", M: "male" };
  const SOURCES = { header: "from the file's header", given: "given in the form", missing: "not known (estimated)" };
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Everything one reading shows; replaced whole on every upload (see clearResult).
  let view = freshView();
  let generation = 0;

  function freshView() {
    return {
      data: null, file: null, form: null, original: null, rows: 0, cols: 0,
      zoom: 1, tx: 0, ty: 0, level: DEFAULT_LEVEL, width: DEFAULT_WIDTH,
      layer: "boxes", heatmap: null, heatmapCaption: "", heatmapPending: false,
    };
  }

  function formatProbability(p) {
    return Number(p).toFixed(2);
  }

  function formatPixel(v) {
    return Number(v).toFixed(1);
  }

  // ----- window / level: a lookup table over the display image's grey levels.

  function windowTable(level, width) {
    const table = new Uint8ClampedArray(256);
    const low = level - width / 2;
    for (let v = 0; v < 256; v += 1) table[v] = Math.round((v - low) * 256 / width);
    return table;
  }

  function drawImage() {
    if (!view.original) return;
    const table = windowTable(view.level, view.width);
    const source = view.original.data;
    const out = new ImageData(view.original.width, view.original.height);
    const target = out.data;
    for (let i = 0; i < source.length; i += 4) {
      const g = table[source[i]];
      target[i] = g; target[i + 1] = g; target[i + 2] = g; target[i + 3] = 255;
    }
    canvas.getContext("2d").putImageData(out, 0, 0);
    canvas.dataset.window = view.level + "," + view.width;
  }

  function setWindow(level, width) {
    view.level = Math.max(0, Math.min(255, Math.round(level)));
    view.width = Math.max(1, Math.min(512, Math.round(width)));
    levelSlider.value = String(view.level);
    widthSlider.value = String(view.width);
    wlReadout.textContent = "level " + view.level + ", width " + view.width +
      (view.level === DEFAULT_LEVEL && view.width === DEFAULT_WIDTH ? " (as read)" : "");
    drawImage();
  }

  levelSlider.addEventListener("input", function () { setWindow(Number(levelSlider.value), view.width); });
  widthSlider.addEventListener("input", function () { setWindow(view.level, Number(widthSlider.value)); });
  document.getElementById("wl-reset").addEventListener("click", function () { setWindow(DEFAULT_LEVEL, DEFAULT_WIDTH); });

  // ----- zoom and pan: one CSS transform on the stage (image, heatmap and boxes move together).

  function clampPan() {
    const w = viewer.clientWidth;
    const h = viewer.clientHeight;
    view.tx = Math.min(0, Math.max(w - w * view.zoom, view.tx));
    view.ty = Math.min(0, Math.max(h - h * view.zoom, view.ty));
  }

  function applyTransform() {
    clampPan();
    stage.style.transform = "translate(" + view.tx + "px, " + view.ty + "px) scale(" + view.zoom + ")";
    zoomLevel.textContent = Math.round(view.zoom * 100) + " %";
    viewer.dataset.zoom = String(view.zoom);
    viewer.dataset.panX = String(Math.round(view.tx));
    viewer.dataset.panY = String(Math.round(view.ty));
    viewer.classList.toggle("zoomed", view.zoom > 1);
    document.getElementById("zoom-out").disabled = view.zoom <= ZOOM_MIN;
    document.getElementById("zoom-in").disabled = view.zoom >= ZOOM_MAX;
    sizeLabels();
  }

  // Zoom by a factor about a point of the viewer (its centre by default).
  function zoomBy(factor, px, py) {
    const next = Math.max(ZOOM_MIN, Math.min(ZOOM_MAX, view.zoom * factor));
    const x = px === undefined ? viewer.clientWidth / 2 : px;
    const y = py === undefined ? viewer.clientHeight / 2 : py;
    view.tx = x - (x - view.tx) * (next / view.zoom);
    view.ty = y - (y - view.ty) * (next / view.zoom);
    view.zoom = next;
    applyTransform();
  }

  function resetView() {
    view.zoom = 1; view.tx = 0; view.ty = 0;
    applyTransform();
  }

  function panBy(dx, dy) {
    view.tx += dx; view.ty += dy;
    applyTransform();
  }

  document.getElementById("zoom-in").addEventListener("click", function () { zoomBy(ZOOM_STEP); });
  document.getElementById("zoom-out").addEventListener("click", function () { zoomBy(1 / ZOOM_STEP); });
  document.getElementById("zoom-reset").addEventListener("click", resetView);

  viewer.addEventListener("keydown", function (event) {
    const step = Math.round(viewer.clientWidth / 10);
    const keys = {
      "+": function () { zoomBy(ZOOM_STEP); },
      "=": function () { zoomBy(ZOOM_STEP); },
      "-": function () { zoomBy(1 / ZOOM_STEP); },
      "0": resetView,
      ArrowLeft: function () { panBy(step, 0); },
      ArrowRight: function () { panBy(-step, 0); },
      ArrowUp: function () { panBy(0, step); },
      ArrowDown: function () { panBy(0, -step); },
    };
    const action = keys[event.key];
    if (action && !event.altKey && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      action();
    }
  });

  viewer.addEventListener("wheel", function (event) {
    if (!view.original) return;
    event.preventDefault();
    const rect = viewer.getBoundingClientRect();
    zoomBy(event.deltaY < 0 ? 1.25 : 1 / 1.25, event.clientX - rect.left, event.clientY - rect.top);
  }, { passive: false });

  // Drag moves the image; Shift-drag or the right button changes the window
  // (left/right: width, up/down: level, like a PACS viewer).
  let drag = null;
  viewer.addEventListener("contextmenu", function (event) { event.preventDefault(); });
  viewer.addEventListener("pointerdown", function (event) {
    if (!view.original) return;
    drag = {
      x: event.clientX, y: event.clientY, tx: view.tx, ty: view.ty,
      level: view.level, width: view.width, windowing: event.shiftKey || event.button === 2,
    };
    viewer.setPointerCapture(event.pointerId);
    viewer.classList.add(drag.windowing ? "windowing" : "panning");
  });
  viewer.addEventListener("pointermove", function (event) {
    if (!drag) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (drag.windowing) {
      setWindow(drag.level - dy, drag.width + dx);
    } else {
      view.tx = drag.tx + dx; view.ty = drag.ty + dy;
      applyTransform();
    }
  });
  function endDrag() {
    drag = null;
    viewer.classList.remove("windowing", "panning");
  }
  viewer.addEventListener("pointerup", endDrag);
  viewer.addEventListener("pointercancel", endDrag);
  window.addEventListener("resize", function () { if (view.original) applyTransform(); });

  // ----- the boxes: SVG in original pixels (the viewBox), numbered like the table's rows.

  function sizeLabels() {
    if (!view.cols || !viewer.clientWidth) return;
    // About 14 CSS pixels whatever the zoom and the screen.
    const unitsPerPixel = view.cols / viewer.clientWidth / view.zoom;
    boxLayer.querySelectorAll("text").forEach(function (text) {
      text.setAttribute("font-size", String(14 * unitsPerPixel));
    });
    boxLayer.querySelectorAll(".box-label-plate").forEach(function (plate) {
      plate.setAttribute("width", String(18 * unitsPerPixel * plate.dataset.chars / 2 + 6 * unitsPerPixel));
      plate.setAttribute("height", String(18 * unitsPerPixel));
    });
  }

  function drawBoxes(boxes) {
    boxLayer.replaceChildren();
    boxLayer.setAttribute("viewBox", "0 0 " + view.cols + " " + view.rows);
    boxLayer.setAttribute("preserveAspectRatio", "none");
    boxes.forEach(function (box, k) {
      const group = document.createElementNS(SVG_NS, "g");
      group.setAttribute("class", "box");
      group.dataset.index = String(k + 1);
      const w = box.x2 - box.x1;
      const h = box.y2 - box.y1;
      ["box-halo", "box-line"].forEach(function (name) {
        const rect = document.createElementNS(SVG_NS, "rect");
        rect.setAttribute("class", name);
        rect.setAttribute("x", String(box.x1));
        rect.setAttribute("y", String(box.y1));
        rect.setAttribute("width", String(w));
        rect.setAttribute("height", String(h));
        rect.setAttribute("vector-effect", "non-scaling-stroke");
        group.append(rect);
      });
      const label = String(k + 1);
      const plate = document.createElementNS(SVG_NS, "rect");
      plate.setAttribute("class", "box-label-plate");
      plate.setAttribute("x", String(box.x1));
      plate.setAttribute("y", String(box.y1));
      plate.dataset.chars = String(label.length + 1);
      const text = document.createElementNS(SVG_NS, "text");
      text.setAttribute("class", "box-label");
      text.setAttribute("x", String(box.x1));
      text.setAttribute("y", String(box.y1));
      text.setAttribute("dx", "0.25em");
      text.setAttribute("dy", "1em");
      text.textContent = label;
      group.append(plate, text);
      boxLayer.append(group);
    });
    sizeLabels();
  }

  function highlightBox(index, on) {
    const group = boxLayer.querySelector('g[data-index="' + index + '"]');
    if (group) group.classList.toggle("highlight", on);
  }

  function fillBoxTable(boxes, note) {
    const rows = document.getElementById("box-rows");
    rows.replaceChildren();
    if (!boxes.length) {
      const row = document.createElement("tr");
      const cell = document.createElement("td");
      cell.colSpan = 6;
      cell.className = "empty";
      cell.textContent = note || "No opacity boxes.";
      row.append(cell);
      rows.append(row);
      return;
    }
    boxes.forEach(function (box, k) {
      const row = document.createElement("tr");
      row.tabIndex = 0;
      row.dataset.index = String(k + 1);
      const head = document.createElement("th");
      head.scope = "row";
      head.textContent = String(k + 1);
      row.append(head);
      [box.x1, box.y1, box.x2, box.y2].forEach(function (v) {
        const cell = document.createElement("td");
        cell.textContent = formatPixel(v);
        row.append(cell);
      });
      const confidence = document.createElement("td");
      confidence.textContent = formatProbability(box.box_confidence);
      row.append(confidence);
      ["mouseenter", "focus"].forEach(function (type) {
        row.addEventListener(type, function () { highlightBox(k + 1, true); });
      });
      ["mouseleave", "blur"].forEach(function (type) {
        row.addEventListener(type, function () { highlightBox(k + 1, false); });
      });
      rows.append(row);
    });
  }

  // ----- layers: image only, boxes, boxes + heatmap (the heatmap never hides the boxes).

  // The server's caption (inference/gradcam.py HEATMAP_CAPTION, worded after the pointing game)
  // comes with the heatmap; this says how it is drawn.
  const HEATMAP_DRAWING = " Viridis scale, relative (yellow is this map's maximum), drawn only where it is high and only over the image.";

  function legendItem(kind, text) {
    const item = document.createElement("li");
    item.className = "legend-item " + kind;
    const swatch = document.createElement("span");
    swatch.className = "swatch " + kind;
    swatch.setAttribute("aria-hidden", "true");
    const words = document.createElement("span");
    words.textContent = text;
    item.append(swatch, words);
    if (kind === "heatmap") {
      const ends = document.createElement("span");
      ends.className = "scale-ends";
      ends.textContent = "low → high";
      item.append(ends);
    }
    return item;
  }

  function showLayers() {
    const data = view.data;
    if (!data) return;
    const boxes = view.layer !== "plain";
    const heat = view.layer === "heatmap" && Boolean(view.heatmap);
    boxLayer.classList.toggle("hidden", !boxes);
    heatLayer.hidden = !heat;
    if (heat) heatLayer.src = view.heatmap;
    viewer.dataset.layer = view.layer;
    // The legend names only what is drawn now.
    legend.replaceChildren();
    if (boxes && data.boxes.length) {
      legend.append(legendItem("box", "Opacity box found by the model (its number is its row in the table)"));
    }
    if (heat) legend.append(legendItem("heatmap", "Grad-CAM heatmap (relative)"));
    let caption;
    if (view.layer === "plain") caption = "The image alone.";
    else if (view.layer === "heatmap" && view.heatmapPending) caption = "Computing the heatmap…";
    else if (heat) caption = "Heatmap: " + (view.heatmapCaption || "Grad-CAM of the classifier's opacity score; not a localisation.") + HEATMAP_DRAWING;
    else caption = data.boxes.length ? "Boxes mark where the model found opacity." : "No opacity boxes.";
    pictureCaption.textContent = caption;
  }

  function setLayer(layer) {
    view.layer = layer;
    layerRadios.forEach(function (radio) { radio.checked = radio.value === layer; });
    if (layer === "heatmap" && !view.heatmap && !view.heatmapPending) requestHeatmap();
    showLayers();
  }

  layerRadios.forEach(function (radio) {
    radio.addEventListener("change", function () { if (radio.checked) setLayer(radio.value); });
  });

  // The heatmap is a second request (?heatmap=true) for the same file, made only when asked for.
  async function requestHeatmap() {
    const mine = generation;
    const expected = view.data.upload.sha256;
    view.heatmapPending = true;
    viewer.setAttribute("aria-busy", "true");
    setStatus("Computing the heatmap…");
    try {
      const response = await apiFetch("/v1/predict?images=false&heatmap=true", { method: "POST", body: view.form });
      let data = null;
      try { data = await response.json(); } catch (err) { data = null; }
      if (mine !== generation) return;  // a new upload came meanwhile: this answer is not for it
      if (!response.ok || !data || !data.heatmap_png) {
        const message = data && data.error && data.error.message
          ? data.error.message : "The server answered with HTTP " + response.status + ".";
        throw new Error(message);
      }
      if (data.upload.sha256 !== expected) throw new Error("the server read another file");
      view.heatmap = data.heatmap_png;
      view.heatmapCaption = data.heatmap_caption || "";
      setStatus("Heatmap shown.");
    } catch (err) {
      if (mine !== generation) return;
      showError("The heatmap could not be made: " + err.message);
      setStatus("");
      view.layer = "boxes";
      layerRadios.forEach(function (radio) { radio.checked = radio.value === "boxes"; });
    } finally {
      if (mine === generation) {
        view.heatmapPending = false;
        viewer.removeAttribute("aria-busy");
        showLayers();
      }
    }
  }

  // ----- the rest of the answer.

  // "female, 54 years, view not given": imputed values are not shown as if they were known.
  function describeMetadata(meta, missing) {
    const known = function (key) {
      return missing.indexOf(key) < 0 && meta[key] !== null && meta[key] !== undefined;
    };
    return [
      known("sex") ? SEXES[meta.sex] || String(meta.sex) : "sex not given",
      known("age") ? Math.round(meta.age) + " years" : "age not given",
      known("view") ? "view " + meta.view : "view not given",
    ].join(", ");
  }

  function describeField(key, meta, sources) {
    const value = meta[key];
    const source = sources[key] || (value === null || value === undefined ? "missing" : "");
    if (value === null || value === undefined || source === "missing") return SOURCES.missing;
    const shown = key === "sex" ? SEXES[value] || String(value) : key === "age" ? Math.round(value) + " years" : String(value);
    return shown + (SOURCES[source] ? " (" + SOURCES[source] + ")" : "");
  }

  function fillList(list, items) {
    list.replaceChildren();
    items.forEach(function (text) {
      const item = document.createElement("li");
      item.textContent = text;
      list.append(item);
    });
  }

  function fillProbabilities(probabilities) {
    const rows = document.getElementById("probability-rows");
    rows.replaceChildren();
    Object.keys(CLASS_LABELS).forEach(function (key) {
      if (!(key in probabilities)) return;
      const finding = key === "lung_opacity";
      const row = document.createElement("tr");
      if (finding) row.className = "finding";
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = CLASS_LABELS[key] + (finding ? " (the finding)" : "");
      const cell = document.createElement("td");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill" + (finding ? " finding" : "");
      fill.style.width = (Math.max(0, Math.min(1, probabilities[key])) * 100).toFixed(1) + "%";
      bar.append(fill);
      cell.append(bar, formatProbability(probabilities[key]));
      row.append(name, cell);
      rows.append(row);
    });
  }

  // Back to an empty page: on every new upload and on every error.
  function clearResult() {
    generation += 1;
    view = freshView();
    result.hidden = true;
    ["summary", "opacity-probability", "threshold", "box-count", "metadata", "missing", "run-details",
     "file-name", "file-format", "image-size", "field-sex", "field-age", "field-view", "boxes-note"]
      .forEach(function (id) { document.getElementById(id).textContent = ""; });
    document.getElementById("summary").className = "summary";
    ["probability-rows", "box-rows", "model-warning-list", "no-reading-reasons"]
      .forEach(function (id) { document.getElementById(id).replaceChildren(); });
    document.getElementById("no-reading-reasons").hidden = true;
    document.getElementById("model-warnings").hidden = true;
    document.getElementById("uncertain").hidden = true;
    legend.replaceChildren();
    pictureCaption.textContent = "";
    boxLayer.replaceChildren();
    heatLayer.hidden = true;
    heatLayer.removeAttribute("src");
    canvas.width = 0;
    canvas.height = 0;
    delete canvas.dataset.window;
    heatmapRadio.disabled = false;
    downloadButton.disabled = true;
    viewer.removeAttribute("aria-busy");
    levelSlider.value = String(DEFAULT_LEVEL);
    widthSlider.value = String(DEFAULT_WIDTH);
    wlReadout.textContent = "";
    layerRadios.forEach(function (radio) { radio.checked = radio.value === "boxes"; });
    stage.style.transform = "";
    zoomLevel.textContent = "100 %";
  }

  function loadPicture(url) {
    const mine = generation;
    const image = new Image();
    image.onload = function () {
      if (mine !== generation) return;
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      const context = canvas.getContext("2d", { willReadFrequently: true });
      context.drawImage(image, 0, 0);
      view.original = context.getImageData(0, 0, canvas.width, canvas.height);
      canvas.dataset.width = String(canvas.width);
      setWindow(DEFAULT_LEVEL, DEFAULT_WIDTH);
      applyTransform();
    };
    image.onerror = function () {
      if (mine === generation) showError("The picture of the image could not be shown.");
    };
    image.src = url;
  }

  function renderResult(data, file, form) {
    view.data = data;
    view.file = file;
    view.form = form;
    const [rows, cols] = data.image_size;
    view.rows = rows;
    view.cols = cols;

    const summary = document.getElementById("summary");
    summary.textContent = data.summary;
    summary.className = "summary " + (data.decision === null ? "no-reading" : data.decision ? "positive" : "negative");
    const reasons = data.not_applicable_reasons || [];
    const reasonList = document.getElementById("no-reading-reasons");
    fillList(reasonList, data.decision === null ? reasons : []);
    reasonList.hidden = data.decision !== null || reasons.length === 0;
    document.getElementById("uncertain").hidden = !(data.uncertain && data.decision !== null);
    const warnings = data.model_warnings || [];
    fillList(document.getElementById("model-warning-list"), warnings);
    document.getElementById("model-warnings").hidden = warnings.length === 0;
    document.getElementById("disclaimer").textContent = data.disclaimer;

    fillProbabilities(data.probabilities);
    document.getElementById("opacity-probability").textContent = formatProbability(data.opacity_probability) +
      (data.decision === null ? " (no decision: the image is outside the model's range)" : "");
    document.getElementById("threshold").textContent = formatProbability(data.threshold);
    document.getElementById("box-count").textContent = String(data.boxes.length);
    document.getElementById("metadata").textContent = describeMetadata(data.metadata || {}, data.missing || []);
    const missing = (data.missing || []).map(function (k) { return MISSING_LABELS[k] || k; });
    document.getElementById("missing").textContent = missing.length
      ? "Not in the file or the form, so estimated from the training data: " + missing.join(", ") + "."
      : "";
    const total = data.timings && data.timings.server_total;
    document.getElementById("run-details").textContent =
      "Model " + data.model_version + (total !== undefined ? ", answered in " + total.toFixed(2) + " s" : "") + ".";

    // The file: its name stays in this page (the server never gets to log it).
    document.getElementById("file-name").textContent = file ? file.name : "";
    document.getElementById("file-format").textContent =
      (data.upload.format || "").toUpperCase() + ", " + humanBytes(data.upload.bytes);
    document.getElementById("image-size").textContent = cols + " x " + rows + " pixels";
    const meta = data.metadata || {};
    const sources = data.metadata_source || {};
    ["sex", "age", "view"].forEach(function (key) {
      document.getElementById("field-" + key).textContent = describeField(key, meta, sources);
    });

    fillBoxTable(data.boxes, data.boxes_note);
    document.getElementById("boxes-note").textContent = data.boxes_note || "";
    heatmapRadio.disabled = data.decision === null;
    downloadButton.disabled = false;

    result.hidden = false;
    viewer.style.aspectRatio = cols + " / " + rows;
    drawBoxes(data.boxes);
    setLayer("boxes");
    resetView();
    if (data.image_jpeg) loadPicture(data.image_jpeg);
    else pictureCaption.textContent = "The server sent no picture.";
    document.getElementById("result-heading").focus();
  }

  downloadButton.addEventListener("click", function () {
    if (!view.data) return;
    const blob = new Blob([JSON.stringify(view.data, null, 2)], { type: "application/json" });
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = "lung-opacity-" + view.data.id + ".json";
    document.body.append(link);
    link.click();
    link.remove();
    window.setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  });

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    clearError();
    clearResult();
    const file = fileInput.files && fileInput.files[0];
    if (!file) {
      showError("Choose a chest X-ray file first.");
      fileInput.focus();
      return;
    }
    if (file.size > maxUploadBytes) {
      showError("The file is " + humanBytes(file.size) + "; the limit is " + humanBytes(maxUploadBytes) + ".");
      return;
    }
    const body = new FormData();
    body.append("file", file, file.name);
    ["sex", "age", "view"].forEach(function (name) {
      const value = document.getElementById(name).value.trim();
      if (value) body.append(name, value);
    });

    const mine = generation;
    submitButton.disabled = true;
    form.setAttribute("aria-busy", "true");
    setStatus("Reading the X-ray… this can take a few seconds.");
    try {
      const response = await apiFetch("/v1/predict", { method: "POST", body: body });
      let data = null;
      try {
        data = await response.json();
      } catch (err) {
        data = null;
      }
      if (mine !== generation) return;
      if (!response.ok || !data) {
        const message = data && data.error && data.error.message
          ? data.error.message
          : "The server answered with HTTP " + response.status + ".";
        setStatus("");
        showError(message);
        return;
      }
      setStatus("Done. " + data.summary + ".");
      renderResult(data, file, body);
    } catch (err) {
      clearResult();
      setStatus("");
      showError("Could not reach the server: " + err.message);
    } finally {
      submitButton.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });

  clearResult();
  loadToken();
  loadInfo();
})();
