// KEEP:R web page: upload -> faces found -> virtual faces -> result, on the app's JSON API (webapp/app.py).
// Plain script, no build step, nothing loaded from anywhere but this server.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
};

const S = {
  info: null, id: null, job: null, timer: null,
  ticked: new Map(),     // person id -> ticked (the user's choice, kept across polls)
  parts: null,           // Set of ticked part numbers
  built: '',             // key of the persons UI built
  shownVersion: {},      // person id -> version of the pictures shown
  originalSet: false, resultSet: false, uploading: false,
};

async function api(method, url, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let r;
  try { r = await fetch(url, opts); } catch (e) { throw new Error('The server cannot be reached.'); }
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((data && data.error) || `The server answered ${r.status}.`);
  return data;
}

function showError(msg) { const e = $('#error'); e.textContent = msg; e.hidden = false; }
function clearError() { $('#error').hidden = true; $('#error').textContent = ''; }
function setStatus(html) { $('#status').innerHTML = html; }
const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

function fmtTime(s) {
  if (s === null || s === undefined || !isFinite(s)) return '?';
  s = Math.round(s);
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
}
const fmtSec = (s) => (s === null || s === undefined ? '?' : `${Number(s).toFixed(2)} s`);

// ---------------------------------------------------------------------------------------------------------------
// Step 1: upload

function setupUpload() {
  const drop = $('#drop');
  const input = $('#file-input');
  input.addEventListener('change', () => { if (input.files.length) upload(input.files[0]); });
  for (const ev of ['dragenter', 'dragover']) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add('over'); });
  }
  for (const ev of ['dragleave', 'drop']) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove('over'); });
  }
  drop.addEventListener('drop', (e) => {
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) upload(f);
  });
  $('#cancel').addEventListener('click', cancelJob);
  $('#restart').addEventListener('click', () => { resetJob(); history.replaceState(null, '', '/'); });
  $('#run').addEventListener('click', runRender);
  $('#play-both').addEventListener('click', () => {
    for (const v of [$('#result-original'), $('#result-video')]) { v.currentTime = 0; v.play().catch(() => {}); }
  });
}

function upload(file) {
  if (S.uploading) return;
  clearError();
  resetJob();
  const limit = S.info ? S.info.max_upload_mb * 1024 * 1024 : Infinity;
  if (file.size > limit) {
    showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB: larger than the upload limit ` +
              `(${S.info.max_upload_mb} MB).`);
    return;
  }
  const form = new FormData();
  form.append('video', file);
  const xhr = new XMLHttpRequest();
  xhr.open('POST', '/api/jobs');
  const bar = $('#upload-progress');
  bar.hidden = false;
  $('#job-bar').hidden = false;
  $('#cancel').hidden = true;
  S.uploading = true;
  setStatus(`Uploading ${esc(file.name)}…`);
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) {
      const pct = Math.round(100 * e.loaded / e.total);
      bar.firstElementChild.style.width = `${pct}%`;
      setStatus(`Uploading ${esc(file.name)}: ${pct}%`);
    }
  };
  const done = () => { S.uploading = false; bar.hidden = true; $('#file-input').value = ''; };
  xhr.onload = () => {
    done();
    let data = null;
    try { data = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status === 201 && data && data.id) {
      startJob(data.id);
    } else {
      $('#job-bar').hidden = true;
      showError((data && data.error) || `The upload was refused (${xhr.status}).`);
    }
  };
  xhr.onerror = () => {
    done();
    $('#job-bar').hidden = true;
    showError('The upload failed: the server closed the connection (is the file larger than the limit?) or cannot ' +
              'be reached.');
  };
  xhr.send(form);
}

function resetJob() {
  if (S.timer) clearTimeout(S.timer);
  Object.assign(S, { id: null, job: null, timer: null, ticked: new Map(), parts: null, built: '',
                     shownVersion: {}, originalSet: false, resultSet: false });
  for (const v of ['#original', '#result-original', '#result-video']) {
    const video = $(v); video.pause(); video.removeAttribute('src'); video.load();
  }
  $('#original-box').hidden = true;
  $('#job-bar').hidden = true;
  $('#step-faces').hidden = true;
  $('#step-virtual').hidden = true;
  $('#step-result').hidden = true;
  $('#result').hidden = true;
  $('#persons').replaceChildren();
  $('#virtual').replaceChildren();
  $('#parts').replaceChildren();
  $('#drop').hidden = false;
}

function startJob(id) {
  S.id = id;
  history.replaceState(null, '', `#job=${id}`);
  $('#job-bar').hidden = false;
  $('#cancel').hidden = false;
  $('#restart').hidden = true;
  $('#drop').hidden = true;
  poll();
}

async function poll() {
  if (!S.id) return;
  const id = S.id;
  try {
    const job = await api('GET', `/api/jobs/${id}`);
    if (id !== S.id) return;
    S.job = job;
    render(job);
  } catch (e) {
    if (id !== S.id) return;
    showError(e.message);
    if (/unknown job/.test(e.message)) {
      S.id = null; $('#cancel').hidden = true; $('#restart').hidden = false;
      return;
    }
  }
  const j = S.job;
  const active = j && !['done', 'failed', 'cancelled'].includes(j.state);
  if (S.id === id && active) S.timer = setTimeout(poll, j.state === 'choosing' && !j.busy ? 1500 : 600);
}

async function cancelJob() {
  if (!S.id) return;
  try {
    await api('DELETE', `/api/jobs/${S.id}`);
  } catch (e) { showError(e.message); return; }
  resetJob();
  history.replaceState(null, '', '/');
  $('#job-bar').hidden = false;
  $('#restart').hidden = true;
  setStatus('Cancelled: the job and its files were deleted.');
}

// ---------------------------------------------------------------------------------------------------------------
// Rendering the job

const STAGE_TEXT = {
  queued: 'Waiting for a worker', tracking: 'Finding the faces', choosing: 'Waiting for your choices',
  rendering: 'Rendering', done: 'Done', failed: 'Failed', cancelled: 'Cancelled',
};

function progressText(p) {
  if (!p || p.done === undefined || p.done === null) return p && p.stage ? esc(p.stage) : '';
  const total = p.total ? `/${p.total}` : '';
  const unit = p.stage === 'virtual faces' ? 'person(s)' : 'frames';
  let s = `${esc(p.stage)}: ${p.done}${total} ${unit} · ${fmtTime(p.elapsed_s)} elapsed`;
  if (p.eta_s !== null && p.eta_s !== undefined && p.done < (p.total || 0)) s += ` · about ${fmtTime(p.eta_s)} left`;
  return s;
}

function render(job) {
  const busy = ['queued', 'tracking', 'rendering'].includes(job.state) || job.busy;
  let status = `<b>${STAGE_TEXT[job.state] || esc(job.state)}</b>`;
  if (job.queue_position) status += ` · position ${job.queue_position} in the queue`;
  if (job.state === 'tracking' || (job.state === 'rendering' && job.queue_position === null)) {
    const t = progressText(job.progress);
    if (t) status += ` · ${t}`;
  }
  if (job.busy) status += ` · ${esc(job.busy)}`;
  if (busy) status = `<span class="spinner"></span> ${status}`;
  if (job.name) status += ` <span class="hint">(${esc(job.name)})</span>`;
  setStatus(status);
  const finished = ['done', 'failed', 'cancelled'].includes(job.state);
  $('#cancel').hidden = job.state === 'cancelled';
  $('#cancel').textContent = finished ? 'Delete' : 'Cancel and delete';
  $('#restart').hidden = !finished;
  $('#drop').hidden = true;

  if (job.state === 'failed') showError(job.error || 'The job failed.');
  else if (job.warnings && job.warnings.length) showError(job.warnings.join('\n'));

  // Original
  const ob = $('#original-box');
  if (job.original && job.original.url) {
    ob.hidden = false;
    if (!S.originalSet) {
      $('#original').src = job.original.url;
      S.originalSet = true;
    }
    $('#original-caption').textContent = job.video && job.video.codec
      ? `Original: ${job.video.width}×${job.video.height}, ${job.video.fps} frames/s, ${fmtSec(job.video.duration)}` +
        (job.original.mime && job.video.format && !/mp4|mov|webm/.test(job.video.format)
          ? ' (shown as an H.264 copy: the browser cannot play the upload itself)' : '')
      : 'Original';
  } else if (job.original && job.original.status === 'pending' && !finished) {
    ob.hidden = false;
    $('#original-caption').textContent = 'The browser cannot play this file as it is: a playable copy is made ' +
      'while the faces are found.';
  } else {
    ob.hidden = !S.originalSet;
  }

  const chooseOrLater = ['choosing', 'rendering', 'done'].includes(job.state);
  if (chooseOrLater && job.persons.length) {
    buildPersons(job);
    updateVirtual(job);
    markParts(job);
  }
  $('#step-faces').hidden = !(chooseOrLater && job.persons.length);
  $('#step-virtual').hidden = !(chooseOrLater && job.persons.length);
  const locked = job.state !== 'choosing';
  for (const input of document.querySelectorAll('#persons input, #parts input')) input.disabled = locked;
  updateRunButton();

  // Result
  const rs = $('#step-result');
  rs.hidden = !['rendering', 'done'].includes(job.state);
  if (job.state === 'rendering') {
    const p = job.progress || {};
    const pct = p.total ? Math.round(100 * (p.done || 0) / p.total) : 0;
    $('#render-progress').firstElementChild.style.width = `${pct}%`;
    $('#render-text').innerHTML = job.queue_position
      ? `Waiting for a worker: position ${job.queue_position} in the queue`
      : (p.done !== undefined ? `Frames ${p.done}/${p.total} · ${fmtTime(p.elapsed_s)} elapsed` +
         (p.eta_s !== null && p.eta_s !== undefined ? ` · about ${fmtTime(p.eta_s)} left` : '') : 'Starting…');
  }
  if (job.state === 'done' && job.result) {
    $('#render-progress').firstElementChild.style.width = '100%';
    $('#render-text').textContent = `Done: ${job.result.frames} frames in ${fmtTime(job.result.seconds)}.` +
      (job.result.complete ? '' : ` Incomplete: ${job.result.incomplete.join('; ')}`);
    $('#result').hidden = false;
    if (!S.resultSet) {
      S.resultSet = true;
      if (job.original && job.original.url) $('#result-original').src = job.original.url;
      $('#result-video').src = job.result.video;
      $('#download-video').href = job.result.video_download;
      $('#download-report').href = job.result.report;
      $('#summary').textContent = job.result.summary;
    }
  }
}

// Step 2: one card per person
function buildPersons(job) {
  const key = job.persons.map((p) => p.id).join(',');
  if (S.built === key) return;
  S.built = key;
  const box = $('#persons');
  box.replaceChildren();
  for (const p of job.persons) {
    if (!S.ticked.has(p.id)) S.ticked.set(p.id, p.selected !== false);
    const input = el('input', { type: 'checkbox', 'data-person': p.id, id: `person-${p.id}` });
    input.checked = S.ticked.get(p.id);
    const card = el('label', { class: 'person', for: `person-${p.id}` },
      el('img', { src: p.thumbnail, alt: `Person ${p.id}`, width: 160, height: 160 }),
      el('span', {}, input, ` Person ${p.id}`),
      el('span', { class: 'when', text: `${fmtSec(p.start_s)} – ${fmtSec(p.end_s)} (${p.frames} frames)` }));
    card.classList.toggle('off', !input.checked);
    input.addEventListener('change', () => {
      S.ticked.set(p.id, input.checked);
      card.classList.toggle('off', !input.checked);
      updateVirtual(S.job);
      markParts(S.job);
      updateRunButton();
    });
    box.append(card);
  }
  if (S.parts === null) S.parts = new Set(job.parts);
  const parts = $('#parts');
  parts.replaceChildren();
  for (let k = 1; k <= job.num_segments; k++) {
    const input = el('input', { type: 'checkbox', value: k, 'data-part': k });
    input.checked = S.parts.has(k);
    input.addEventListener('change', () => {
      if (input.checked) S.parts.add(k); else S.parts.delete(k);
      updateRunButton();
    });
    const colour = (job.persons.find((p) => p.segments && p.segments.length) || { segments: [] })
      .segments.find((s) => s.index === k);
    const swatch = el('span', { class: 'swatch' });
    swatch.style.background = colour ? colour.colour : '#ccc';  // CSSOM: allowed by the page's CSP
    parts.append(el('label', { 'data-part-label': k }, input, swatch, `Part ${k}`,
      el('span', { class: 'absent', text: ' (not in the chosen face)', hidden: true })));
  }
}

// Parts that no chosen face of a ticked person has: said next to their box (swapping them changes nothing).
function markParts(job) {
  const faces = job.persons.filter((p) => S.ticked.get(p.id) && p.segments && p.segments.length);
  for (const label of document.querySelectorAll('#parts [data-part-label]')) {
    const k = Number(label.dataset.partLabel);
    const absent = faces.length > 0 && faces.every((p) => !p.segments.some((s) => s.index === k && s.area > 0));
    label.querySelector('.absent').hidden = !absent;
  }
}

// Step 3: grid, overlay and choice per ticked person
function updateVirtual(job) {
  if (!job) return;
  const box = $('#virtual');
  for (const p of job.persons) {
    let panel = box.querySelector(`[data-vperson="${p.id}"]`);
    if (!S.ticked.get(p.id)) { if (panel) panel.remove(); delete S.shownVersion[p.id]; continue; }
    const version = `${p.grid}|${p.overlay}|${p.chosen}|${p.reason}|${job.busy}|${job.state}`;
    if (panel && S.shownVersion[p.id] === version) continue;
    S.shownVersion[p.id] = version;
    const fresh = el('div', { class: 'vperson', 'data-vperson': p.id });
    fresh.classList.toggle('busy', !!job.busy);
    fresh.append(el('h3', { text: `Person ${p.id}` }));
    const left = el('div', {});
    if (p.grid) {
      const cells = el('div', { class: 'cells' });
      for (const c of p.candidates) {
        const d = c.distance === null ? 'no face' : `d = ${c.distance.toFixed(2)}`;
        const what = c.status === 'no face' ? 'no face' : `distance ${c.distance.toFixed(2)}`;
        const label = `Candidate ${c.index}: ${what}` +
          (c.status === 'rejected' ? ' (too close: rejected by the guard)' : '');
        cells.append(el('button', {
          type: 'button', class: 'cell', 'data-candidate': c.index, title: label, 'aria-label': label,
          'aria-pressed': String(c.index === p.chosen), disabled: job.state !== 'choosing' || !!job.busy,
          onclick: () => pick(p.id, c.index),
        }, el('span', { class: 'idx', text: String(c.index) }), el('span', { text: d })));
      }
      left.append(el('div', { class: 'grid-wrap' },
        el('img', { src: p.grid, alt: `The 9 candidates for person ${p.id}`, width: 768, height: 768 }), cells));
    } else if (p.reason) {
      left.append(el('p', { class: 'reason', text: `No virtual face: ${p.reason}` }));
    }
    left.append(el('p', { class: 'actions' }, el('button', {
      type: 'button', class: 'secondary', 'data-reseed': p.id, disabled: job.state !== 'choosing' || !!job.busy,
      onclick: () => reseed(p.id),
    }, '9 new faces (new seed)'), el('span', { class: 'hint', text: `seed ${p.seed}` })));
    fresh.append(left);
    const side = el('div', { class: 'vside' });
    if (p.overlay) {
      const c = p.candidates.find((x) => x.index === p.chosen);
      const d = !c ? '' : c.distance === null ? ' (no face found in it by dlib)'
        : ` (distance ${c.distance.toFixed(2)})`;
      side.append(el('p', { class: 'chosen-text' }, el('b', { text: `Candidate ${p.chosen}` }), d),
        el('img', { src: p.overlay, alt: `Co-part segmentation of the chosen face of person ${p.id}, parts numbered`,
                    width: 384, height: 384, class: 'overlay' }),
        el('span', { class: 'hint', text: 'Its parts, coloured and numbered as in the list below.' }));
    }
    fresh.append(side);
    if (panel) panel.replaceWith(fresh); else box.append(fresh);
  }
  // Keep the panels in person order.
  for (const p of job.persons) {
    const panel = box.querySelector(`[data-vperson="${p.id}"]`);
    if (panel) box.append(panel);
  }
}

function chosenPersons() { return [...S.ticked.entries()].filter(([, v]) => v).map(([k]) => k); }

function updateRunButton() {
  const job = S.job;
  const persons = chosenPersons();
  const parts = S.parts ? [...S.parts] : [];
  let why = '';
  if (!job || job.state !== 'choosing') why = ' ';
  else if (job.busy) why = 'Wait: new candidates are being made.';
  else if (!persons.length) why = 'Tick at least one person.';
  else if (!parts.length) why = 'Tick at least one face part.';
  $('#run').disabled = why !== '';
  $('#run-hint').textContent = why.trim();
}

async function pick(pid, k) {
  clearError();
  try { S.job = await api('POST', `/api/jobs/${S.id}/persons/${pid}/candidate`, { candidate: k }); render(S.job); }
  catch (e) { showError(e.message); }
  clearTimeout(S.timer); poll();
}

async function reseed(pid) {
  clearError();
  try { S.job = await api('POST', `/api/jobs/${S.id}/persons/${pid}/seed`, {}); render(S.job); }
  catch (e) { showError(e.message); }
  clearTimeout(S.timer); poll();
}

async function runRender() {
  clearError();
  const body = { persons: chosenPersons(), parts: [...S.parts].sort((a, b) => a - b) };
  try { S.job = await api('POST', `/api/jobs/${S.id}/render`, body); render(S.job); }
  catch (e) { showError(e.message); }
  clearTimeout(S.timer); poll();
  $('#step-result').scrollIntoView({ behavior: 'smooth' });
}

// ---------------------------------------------------------------------------------------------------------------

async function init() {
  setupUpload();
  try {
    S.info = await api('GET', '/api/info');
    if (S.info.banner) { $('#banner').textContent = S.info.banner; $('#banner').hidden = false; }
    $('#limits').textContent = `${S.info.formats.join(', ')} · up to ${S.info.max_upload_mb} MB`;
    $('#expiry').textContent = `${S.info.expire_hours} hours after their last change`;
  } catch (e) { showError(e.message); }
  const m = /#job=([0-9a-f-]{36})/.exec(location.hash);
  if (m) startJob(m[1]);
}

init();
