"""The HTML page of ``noduleflow predict`` (``predictions.html``): every candidate of every scan,
with crops in three planes, self-contained (inline CSS, images as base64 PNG, no script).

Structure:

* ``<h1>`` title; a ``<p class="note">`` with the models, their preprocessing and the predict
  settings; ``<table id="scans">``: a row per scan (seriesuid, input, stored grid, candidates,
  top probability, seconds); a ``<section id="failed">`` listing scans that could not be read;
* per scan a ``<section class="scan" data-seriesuid="...">`` with an ``<h2>``, and per candidate
  (most probable first, at most ``max_candidates``) a ``<section class="candidate"
  data-seriesuid="..." data-label="k" data-probability="0.873">`` holding an ``<h3>`` (rank and
  probability), a ``<table class="facts">`` (probability, maximum probability, diameter mm,
  volume mm^3, world x, y, z mm, voxel x, y, z on the input grid, label value) and three
  ``<figure class="plane">``: axial, coronal and sagittal crops through the candidate's centre on
  the resampled grid the model saw, HU window -1000..400, the candidate's outline in orange,
  patient right on the image's left, head up, anterior up (axial) or left (sagittal).

Arrays are (z, y, x); world coordinates (x, y, z) mm.
"""

from __future__ import annotations

import html
import math
import struct
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from noduleflow.io import world_to_voxel
from noduleflow.report import CROP_HALF_MM, CROP_WINDOW_HU, data_uri, fmt, html_page, html_table, short_uid

#: crops per scan on the page (most probable first); the rest are in candidates.csv only
MAX_CANDIDATES = 100
#: a crop is upscaled (nearest neighbour) to at least this many pixels across
CROP_PIXELS = 160
#: outline colour of the candidate (RGB)
OUTLINE_RGB = (255, 140, 0)

CSS = """
section.scan{margin-top:1.5em}section.candidate{border:1px solid #ddd;border-radius:4px;padding:.4em .8em;
margin:.6em 0;display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
section.candidate h3{width:100%;margin:.2em 0;font-size:1.05em}
figure.plane{margin:0;text-align:center;font-size:.8em}
figure.plane img{width:auto;height:auto;image-rendering:pixelated}
"""


def _plane_slices(image: np.ndarray, labels: np.ndarray, voxel: Sequence[int], spacing_xyz: Sequence[float],
                  half_mm: float) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float]]]:
    """Per plane, (HU crop, label crop, (row mm, column mm)) through ``voxel`` (z, y, x), oriented for
    display: axial rows y (anterior up) x columns x (patient right on the left); coronal rows z
    (head up) x columns x; sagittal rows z (head up) x columns y (anterior on the left)."""
    sx, sy, sz = (float(s) for s in spacing_xyz)
    z, y, x = (int(v) for v in voxel)
    hz, hy, hx = (int(math.ceil(half_mm / s)) for s in (sz, sy, sx))
    nz, ny, nx = image.shape
    zs = slice(max(0, z - hz), min(nz, z + hz + 1))
    ys = slice(max(0, y - hy), min(ny, y + hy + 1))
    xs = slice(max(0, x - hx), min(nx, x + hx + 1))
    return {
        "axial": (image[z, ys, xs], labels[z, ys, xs], (sy, sx)),
        "coronal": (image[zs, y, xs][::-1], labels[zs, y, xs][::-1], (sz, sx)),
        "sagittal": (image[zs, ys, x][::-1], labels[zs, ys, x][::-1], (sz, sy)),
    }


def crop_png(hu: np.ndarray, outline: np.ndarray, pixel_mm: tuple[float, float]) -> bytes:
    """PNG bytes of a 2-D HU crop (rows, cols) in the :data:`noduleflow.report.CROP_WINDOW_HU`
    window, upscaled by nearest neighbour (square pixels in mm, at least :data:`CROP_PIXELS`
    across), with the boundary of the bool ``outline`` in :data:`OUTLINE_RGB`."""
    from scipy import ndimage

    low, high = CROP_WINDOW_HU
    gray = np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    gray = np.rint(gray * 255).astype(np.uint8)
    if gray.size == 0:
        gray, outline = np.zeros((1, 1), np.uint8), np.zeros((1, 1), bool)
    row_mm, col_mm = pixel_mm
    finest = min(row_mm, col_mm)
    base = max(1, int(math.ceil(CROP_PIXELS / max(gray.shape[0] * row_mm / finest, gray.shape[1] * col_mm / finest))))
    fy, fx = max(1, int(round(base * row_mm / finest))), max(1, int(round(base * col_mm / finest)))
    gray = np.repeat(np.repeat(gray, fy, axis=0), fx, axis=1)
    mask = np.repeat(np.repeat(outline.astype(bool), fy, axis=0), fx, axis=1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    rgb[edge] = OUTLINE_RGB
    return png_bytes(rgb)


def png_bytes(rgb: np.ndarray) -> bytes:
    """A PNG file of an 8-bit RGB image (rows, cols, 3): signature, IHDR, one zlib IDAT, IEND."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # each row starts with filter type 0 (none)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _facts(row: pd.Series, source_voxel_xyz: Sequence[float]) -> str:
    world = f"{row['coordX']:.1f}, {row['coordY']:.1f}, {row['coordZ']:.1f}"
    voxel = ", ".join(f"{v:.0f}" for v in source_voxel_xyz)
    items = [("probability", fmt(row["probability"], 3)), ("max probability", fmt(row["max_probability"], 3)),
             ("diameter", f"{fmt(row['diameter_mm'], 1)} mm"), ("volume", f"{fmt(row['volume_mm3'], 0)} mm³"),
             ("world x, y, z", f"{world} mm"), ("voxel x, y, z (input grid)", voxel),
             ("label value", str(int(row["label"])))]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in items)
    return f'<table class="facts">{body}</table>'


def scan_section(prediction, source: str | Path, max_candidates: int | None = None) -> str:
    """The HTML section of one scan (a :class:`noduleflow.apply.ScanPrediction`): a section per
    candidate with its facts and three plane crops (see the module docstring)."""
    limit = MAX_CANDIDATES if max_candidates is None else int(max_candidates)
    uid = prediction.uid
    candidates = prediction.candidates.reset_index(drop=True)
    spacing = prediction.geometry.spacing
    parts = [f'<section class="scan" data-seriesuid="{html.escape(uid)}">',
             f"<h2>{html.escape(uid)}</h2>",
             f'<p class="note">input <code>{html.escape(str(source))}</code>; '
             f"{len(candidates)} candidate(s)"
             + (f", the {limit} most probable shown" if len(candidates) > limit else "") + "</p>"]
    if candidates.empty:
        parts.append('<p class="note">no candidate above the threshold</p>')
    for index, row in candidates.head(limit).iterrows():
        label = index + 1
        row = row.copy()
        row["label"] = label
        centre = np.array([row["coordX"], row["coordY"], row["coordZ"]], dtype=float)
        voxel = np.rint(world_to_voxel(centre, prediction.geometry)).astype(int)
        voxel = np.clip(voxel, 0, np.asarray(prediction.image.shape) - 1)
        source_voxel = world_to_voxel(centre, prediction.scan.source_geometry)[::-1]
        half_mm = max(CROP_HALF_MM, 2.5 * float(row["diameter_mm"]) / 2.0)
        figures = []
        for plane, (hu, lab, pixel_mm) in _plane_slices(prediction.image, prediction.labels, voxel, spacing,
                                                       half_mm).items():
            png = crop_png(hu, lab == label, pixel_mm)
            alt = f"{plane} crop of candidate {label} of {uid}"
            figures.append(f'<figure class="plane"><img alt="{html.escape(alt)}" src="{data_uri(png)}">'
                           f"<figcaption>{plane}, {2 * half_mm:.0f} mm wide</figcaption></figure>")
        probability = float(row["probability"])
        parts.append(f'<section class="candidate" data-seriesuid="{html.escape(uid)}" data-label="{label}" '
                     f'data-probability="{probability:.6f}">'
                     f"<h3>#{label} of {html.escape(short_uid(uid, 16))}: probability {probability:.3f}, "
                     f"Ø {fmt(row['diameter_mm'], 1)} mm</h3>"
                     + _facts(row, source_voxel) + "".join(figures) + "</section>")
    parts.append("</section>")
    return "\n".join(parts)


def page(sections: Sequence[str], scans: pd.DataFrame, failed: Mapping[str, str], ensemble,
         settings: Mapping, device: str) -> str:
    """The whole page: title, settings, the scans table, failures, then ``sections``."""
    n_candidates = int(scans["candidates"].sum()) if len(scans) else 0
    title = f"noduleflow predict: {len(scans)} scan(s), {n_candidates} candidate(s)"
    models = ", ".join(f"fold {m.fold}" if m.fold is not None else str(m.path) for m in ensemble.members)
    coarse_pass = settings.get("coarse_scale", 1.0) > 1.0
    note = (f'<p class="note">Ensemble of {len(ensemble.members)} model(s) ({html.escape(models)}): '
            f"scans resampled to {list(ensemble.spacing_mm)} mm, lung ROI {'on' if ensemble.lung_roi else 'off'}, "
            f"lung mask {html.escape(', '.join(f'{k} {v}' for k, v in sorted(ensemble.lungmask.items())))}; "
            f"threshold {settings['threshold']}, "
            f"planes {', '.join(settings['planes'])}, candidate score {settings['candidate_score']}"
            + (f" / elongation^{settings['elongation_exponent']:g}" if settings.get("elongation_exponent") else "")
            + (f" x min(1, contrast / {settings['contrast_hu']:g} HU)" if settings.get("contrast_hu") else "")
            + ", "
            f"test-time flips {'on' if settings['tta'] else 'off'}, "
            + (f"coarse pass at {settings['coarse_scale']:g}x the voxel size for objects of at least "
               f"{settings['coarse_min_diameter_mm']:g} mm, " if coarse_pass
               else "no coarse pass, ")
            + f"device {html.escape(device)}. "
            f"Probabilities are the mean of the models' maps"
            + (" (and, where the coarse pass finds a large object, the larger of that and the coarse map)"
               if coarse_pass else "")
            + ". Crops: resampled grid, HU "
            f"{CROP_WINDOW_HU[0]:.0f}..{CROP_WINDOW_HU[1]:.0f}, candidate outlined in orange, patient right "
            f"on the left. Label and probability maps on each input's own grid: "
            f"<code>labels/</code>, <code>probabilities/</code>; all candidates: <code>candidates.csv</code>.</p>")
    rows = []
    for _, row in scans.iterrows():
        grid = "×".join(str(v) for v in row["shape_zyx"][::-1])
        spacing = "×".join(f"{v:.3g}" for v in row["spacing_mm"])
        rows.append([html.escape(row["seriesuid"]), f"<code>{html.escape(row['source'])}</code>",
                     f"{grid} at {spacing} mm", str(int(row["candidates"])), fmt(row["top_probability"], 3),
                     fmt(row["seconds"], 1)])
    table = html_table(["seriesuid", "input", "grid (x×y×z)", "candidates", "top probability", "seconds"],
                       rows, table_id="scans")
    failures = ""
    if failed:
        items = "".join(f"<li><code>{html.escape(uid)}</code>: {html.escape(msg)}</li>" for uid, msg in failed.items())
        failures = f'<section id="failed"><h2>Scans that could not be processed</h2><ul>{items}</ul></section>'
    body = note + table + failures + "\n".join(sections)
    return html_page(title, body).replace("</style>", CSS + "</style>", 1)
