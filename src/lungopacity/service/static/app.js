// Lung opacity reader: uploads one file to POST /v1/predict and shows the answer.
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
  const picture = document.getElementById("picture");
  const heatmapToggle = document.getElementById("heatmap-toggle");
  const pictureCaption = document.getElementById("picture-caption");

  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token-input");
  const tokenMessage = document.getElementById("token-message");
  const TOKEN_KEY = "lungopacity.token";

  let maxUploadBytes = 50 * 1024 * 1024;
  let pictures = { overlay: null, heatmap: null, boxCount: 0 };
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

  function formatProbability(p) {
    return Number(p).toFixed(2);
  }

  function showPicture() {
    const wantHeatmap = heatmapToggle.checked && pictures.heatmap;
    picture.src = wantHeatmap ? pictures.heatmap : pictures.overlay || "";
    picture.alt = wantHeatmap
      ? "Heatmap over the X-ray: warmer colours mark the regions that drove the model's answer"
      : "The uploaded X-ray with the model's opacity boxes drawn on it";
    if (wantHeatmap) {
      pictureCaption.textContent = "Warmer colours mark the regions that drove the model's answer.";
    } else {
      pictureCaption.textContent = pictures.boxCount
        ? "Boxes mark where the model found opacity."
        : "No opacity boxes.";
    }
  }

  // "female, 54 years, view not given": imputed values are not shown as if they were known.
  function describeMetadata(meta, missing) {
    const known = function (key) {
      return missing.indexOf(key) < 0 && meta[key] !== null && meta[key] !== undefined;
    };
    const sexes = { F: "female", M: "male" };
    return [
      known("sex") ? sexes[meta.sex] || String(meta.sex) : "sex not given",
      known("age") ? Math.round(meta.age) + " years" : "age not given",
      known("view") ? "view " + meta.view : "view not given",
    ].join(", ");
  }

  function renderResult(data) {
    const summary = document.getElementById("summary");
    summary.textContent = data.summary;
    summary.className = "summary " + (data.decision ? "positive" : "negative");
    document.getElementById("disclaimer").textContent = data.disclaimer;

    const rows = document.getElementById("probability-rows");
    rows.replaceChildren();
    Object.keys(CLASS_LABELS).forEach(function (key) {
      if (!(key in data.probabilities)) return;
      const row = document.createElement("tr");
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = CLASS_LABELS[key];
      const cell = document.createElement("td");
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = 1;
      meter.value = data.probabilities[key];
      meter.setAttribute("aria-hidden", "true");
      cell.append(meter, formatProbability(data.probabilities[key]));
      row.append(name, cell);
      rows.append(row);
    });

    document.getElementById("opacity-probability").textContent = formatProbability(data.opacity_probability);
    document.getElementById("threshold").textContent = formatProbability(data.threshold);
    document.getElementById("box-count").textContent = String(data.boxes.length);
    document.getElementById("metadata").textContent = describeMetadata(data.metadata || {}, data.missing || []);
    const missing = (data.missing || []).map(function (k) { return MISSING_LABELS[k] || k; });
    document.getElementById("missing").textContent = missing.length
      ? "Not in the file or the form, so estimated from the training data: " + missing.join(", ") + "."
      : "";
    const total = data.timings && data.timings.server_total;
    document.getElementById("run-details").textContent =
      "Model " + data.model_version + ", image " + data.image_size.join(" x ") + " pixels" +
      (total !== undefined ? ", " + total.toFixed(2) + " s" : "") + ".";

    pictures = { overlay: data.overlay_png, heatmap: data.heatmap_png, boxCount: data.boxes.length };
    heatmapToggle.checked = false;
    heatmapToggle.disabled = !data.heatmap_png;
    showPicture();

    result.hidden = false;
    document.getElementById("result-heading").focus();
  }

  heatmapToggle.addEventListener("change", showPicture);

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    clearError();
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
      if (!response.ok) {
        const message = data && data.error && data.error.message
          ? data.error.message
          : "The server answered with HTTP " + response.status + ".";
        setStatus("");
        showError(message);
        return;
      }
      setStatus("Done. " + data.summary + ".");
      renderResult(data);
    } catch (err) {
      setStatus("");
      showError("Could not reach the server: " + err.message);
    } finally {
      submitButton.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });

  loadToken();
  loadInfo();
})();
