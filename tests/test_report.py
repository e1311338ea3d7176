"""The inference report: case figures (orientation, overlay, importance panel) and report.html."""

from __future__ import annotations

import html.parser
import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from volumes.inference.figures import (  # noqa: E402
    FIGURE_DPI,
    FIGURE_SIZE,
    FIGURE_SIZE_WITH_IMPORTANCE,
    OVERLAY_ALPHA,
    case_figure,
    display_window,
    label_colour,
)
from volumes.inference.report import write_report  # noqa: E402

# Synthetic CT in RAS+ order: air, a body box of water, and one organ that lies only on the
# patient's right (large x), anterior (large y) and superior (large z).
SHAPE = (40, 32, 24)
SPACING = (1.0, 1.2, 2.5)
ORGAN = (slice(26, 34), slice(20, 28), slice(15, 21))
ORGAN_HU = 40.0  # the centre of the soft-tissue window: drawn mid-grey


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    volume = np.full(SHAPE, -1000.0, dtype=np.float32)
    volume[3:37, 3:29, :] = 0.0
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[ORGAN] = 1
    volume[labels > 0] = ORGAN_HU
    return volume, labels


def _expected_overlay_rgb(label: int) -> np.ndarray:
    """The organ's colour blended over its mid-grey (gray colormap entry 128 of 256)."""
    grey = 128 / 255
    return OVERLAY_ALPHA * np.asarray(label_colour(label)) + (1 - OVERLAY_ALPHA) * grey


def _panel_boxes(image: np.ndarray, panels: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) of the image drawn in each of the first three panel slots.

    Panels sit in equal bands across the figure (the slots' gaps fall on the band
    borders); within a band the image is where most pixels are not the white background,
    sparse text (titles, orientation letters) is not.
    """
    height, width = image.shape[:2]
    not_white = (image[..., :3] < 0.97).any(axis=-1)
    boxes = []
    for i in range(3):
        c0, c1 = i * width // panels, (i + 1) * width // panels
        band = not_white[:, c0:c1]
        cols = np.flatnonzero(band.mean(axis=0) > 0.4)
        rows = np.flatnonzero(band[:, cols].mean(axis=1) > 0.5)
        assert len(cols) and len(rows), f"no image found in panel {i}"
        boxes.append((int(rows[0]), int(rows[-1]) + 1, c0 + int(cols[0]), c0 + int(cols[-1]) + 1))
    return boxes


def _colour_pixels(image: np.ndarray, box: tuple[int, int, int, int], rgb: np.ndarray, tol: float = 0.03):
    """Row and column (relative to the box) of the pixels of colour ``rgb``."""
    r0, r1, c0, c1 = box
    close = (np.abs(image[r0:r1, c0:c1, :3] - rgb) < tol).all(axis=-1)
    return np.nonzero(close)


def _figure_size_px(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[1] * FIGURE_DPI), round(size[0] * FIGURE_DPI)


def test_label_colours_are_fixed_distinct_and_not_grey():
    colours = [label_colour(k) for k in range(1, 19)]
    assert len(set(colours)) == 18
    assert label_colour(1) == label_colour(1) and label_colour(19) == label_colour(1)
    for r, g, b in colours:
        assert max(r, g, b) - min(r, g, b) > 0.05  # never a grey that looks like tissue
    with pytest.raises(ValueError):
        label_colour(0)


def test_display_window_choices():
    ct = np.full((4, 4, 4), 30.0)
    ct[0] = -1000
    assert display_window(ct) == (-160.0, 240.0)  # HU-like data: soft tissue (40, 400)
    assert display_window(ct, (400, 1800)) == (-500.0, 1300.0)
    mr = np.arange(1000, dtype=float).reshape(10, 10, 10)
    low, high = display_window(mr)
    assert low == pytest.approx(9.99) and high == pytest.approx(989.01)  # 1st-99th percentile
    low, high = display_window(np.full((3, 3, 3), 7.0))
    assert low < 7.0 < high  # a constant volume still gets a non-empty window
    with pytest.raises(ValueError):
        display_window(mr, (0, 0))


def test_case_figure_radiological_orientation_and_aspect(tmp_path):
    volume, labels = _phantom()
    out = case_figure(volume, SPACING, tmp_path / "figs" / "case.png", label_map=labels,
                      labels=["background", "liver"], title="case 1")  # fmt: skip
    assert out == tmp_path / "figs" / "case.png" and out.is_file()
    image = imread(out)
    assert image.shape[:2] == _figure_size_px(FIGURE_SIZE)

    axial, coronal, sagittal = _panel_boxes(image, 3)
    nx, ny, nz = SHAPE
    sx, sy, sz = SPACING
    # Pixel aspect from the spacing: each image has the physical proportions of its plane.
    for (r0, r1, c0, c1), (w_mm, h_mm) in zip(
        (axial, coronal, sagittal), ((nx * sx, ny * sy), (nx * sx, nz * sz), (ny * sy, nz * sz))
    ):
        assert (c1 - c0) / (r1 - r0) == pytest.approx(w_mm / h_mm, rel=0.04)

    colour = _expected_overlay_rgb(1)
    for name, box in (("axial", axial), ("coronal", coronal), ("sagittal", sagittal)):
        rows, cols = _colour_pixels(image, box, colour)
        assert len(rows) > 200, f"organ colour missing from the {name} view"
        height, width = box[1] - box[0], box[3] - box[2]
        # Axial and coronal: patient's right (large x) on the viewer's left. Sagittal:
        # anterior (large y) on the left. Axial: anterior up; coronal, sagittal: superior up.
        assert cols.max() < width / 2, f"{name}: organ not on the viewer's left"
        assert rows.max() < height / 2, f"{name}: organ not in the upper half"
    # The organ spans x 26..33 of 40: in the axial view columns (40-34)/40 .. (40-26)/40.
    rows, cols = _colour_pixels(image, axial, colour)
    width = axial[3] - axial[2]
    assert cols.min() / width == pytest.approx(6 / 40, abs=0.02)
    assert (cols.max() + 1) / width == pytest.approx(14 / 40, abs=0.02)


def test_case_figure_importance_panel_moves_the_axial_cut(tmp_path):
    volume, labels = _phantom()
    importance = np.exp(-(((np.arange(SHAPE[2]) - 5.0) / 2.0) ** 2))  # peak far below the organ
    plain = imread(case_figure(volume, SPACING, tmp_path / "plain.png", label_map=labels))
    with_importance = imread(case_figure(volume, SPACING, tmp_path / "imp.png", label_map=labels,
                                         importance=importance, top_slices=[5, 4, 6]))  # fmt: skip
    assert with_importance.shape[:2] == _figure_size_px(FIGURE_SIZE_WITH_IMPORTANCE)
    assert with_importance.shape[1] > plain.shape[1]

    axial, coronal, _ = _panel_boxes(with_importance, 4)
    colour = _expected_overlay_rgb(1)
    # The axial cut is at the most important slice (z=5), which the organ (z 15..20) misses;
    # the coronal cut still goes through the organ.
    assert len(_colour_pixels(with_importance, axial, colour)[0]) == 0
    assert len(_colour_pixels(with_importance, coronal, colour)[0]) > 200
    # Without importance the axial cut goes through the organ centroid.
    assert len(_colour_pixels(plain, _panel_boxes(plain, 3)[0], colour)[0]) > 200


def test_case_figure_without_labels_with_importance_and_torch_input(tmp_path):
    torch = pytest.importorskip("torch")
    volume = torch.linspace(0, 1, 8 * 8 * 3).reshape(1, 8, 8, 3)  # MR-like, channel first
    out = case_figure(volume, (0.7, 0.7, 5.0), tmp_path / "tiny.png", importance=torch.tensor([0.1, 0.7, 0.2]),
                      top_slices=[{"slice": 1, "importance": 0.7}])  # fmt: skip
    assert imread(out).shape[:2] == _figure_size_px(FIGURE_SIZE_WITH_IMPORTANCE)


def test_case_figure_background_only_labels_and_constant_volume(tmp_path):
    constant = np.full((8, 8, 3), 5.0)
    out = case_figure(constant, (0.5, 0.5, 4.0), tmp_path / "empty.png",
                      label_map=np.zeros((8, 8, 3), dtype=np.uint8), labels=["background", "liver"])  # fmt: skip
    image = imread(out)
    assert image.shape[:2] == _figure_size_px(FIGURE_SIZE)
    assert np.isfinite(image).all()
    r0, r1, c0, c1 = _panel_boxes(image, 3)[0]
    # A constant volume is drawn mid-grey (no division by zero, no black or white flood).
    assert image[(r0 + r1) // 2, (c0 + c1) // 2, :3] == pytest.approx([128 / 255] * 3, abs=0.01)
    # No label present: no overlay colour anywhere and no legend.
    for k in range(1, 4):
        assert not (np.abs(image[..., :3] - np.asarray(label_colour(k))) < 0.03).all(axis=-1).any()


def test_case_figure_rejects_mismatched_inputs_and_leaves_no_file(tmp_path):
    volume, labels = _phantom()
    with pytest.raises(ValueError, match="axial slices"):
        case_figure(volume, SPACING, tmp_path / "bad.png", importance=np.ones(SHAPE[2] + 1))
    with pytest.raises(ValueError, match="shape"):
        case_figure(volume, SPACING, tmp_path / "bad.png", label_map=labels[:, :, :-1])
    with pytest.raises(ValueError, match="spacing"):
        case_figure(volume, (1.0, 0.0, 1.0), tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


class _Links(html.parser.HTMLParser):
    """Ids, fragment links, image sources and whether any <script> element occurs."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.fragments: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.hrefs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a" and attrs.get("href", "").startswith("#"):
            self.fragments.append(attrs["href"][1:])
        elif tag == "a":
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1


def _rows() -> list[dict]:
    common = {"source": "/data/in/ct_001.nii.gz", "input_sha256": "ab" * 32}
    timings = {"load": 0.5, "preprocess": 0.25, "infer": 1.5, "write": 0.125}
    return [
        {"case_id": "ct_001", **common, "bundle": "organ_classifier", "bundle_version": "0.2.0",
         "task": "classification", "weights_sha256": "cd" * 32,
         "probabilities": {"normal": 0.125, "abnormal": 0.875}, "predicted": "abnormal",
         "top_slices": [{"slice": 17, "importance": 0.4321}, {"slice": 16, "importance": 0.2}],
         "outputs": {"figure": "figures/ct_001.png"}, "timings_s": timings},
        {"case_id": "mr <7> & co", "source": "/data/in/mr 7.nii.gz", "input_sha256": "ef" * 32,
         "bundle": "organ_classifier", "bundle_version": "0.2.0", "task": "classification",
         "weights_sha256": "cd" * 32, "probabilities": {"normal": 0.6, "abnormal": 0.4},
         "predicted": "normal", "top_slices": [], "outputs": {}, "timings_s": timings},
        {"case_id": "ct_001", **common, "bundle": "abdomen_seg", "bundle_version": "1.0.0",
         "task": "segmentation", "weights_sha256": "12" * 32,
         "organ_volumes_ml": {"liver": 1534.26, "spleen": 201.04},
         "outputs": {"segmentation": "masks/ct_001 seg.nii.gz", "dicom_seg": "masks/ct_001.dcm"},
         "timings_s": timings},
    ]  # fmt: skip


def test_write_report_content_escaping_and_links(tmp_path):
    failures = [{"case_id": "bad_case", "source": "/data/in/bad.nii.gz", "stage": "load",
                 "error": "cannot read <script>alert('x')</script> & NaN voxels"}]  # fmt: skip
    path = write_report(tmp_path, _rows(), failures, summary={"cases": 3, "failed": 1, "device": "cpu"})
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")

    assert "<script" not in text.lower()
    assert "cannot read &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; NaN voxels" in text
    assert "ct_001" in text and "mr &lt;7&gt; &amp; co" in text and "mr <7>" not in text
    assert "bad_case" in text and "<td>cpu</td>" in text
    # Cases in the order of their first row; each once, with its short input hash.
    assert text.index('id="case-0-ct_001"') < text.index('id="case-1-mr-7-co"')
    assert text.count('<section class="case"') == 2
    assert "abababababab</code>" in text and "ab" * 7 + "</code>" not in text
    # Classification: predicted class, probabilities as percent (most probable first), top slices.
    assert "<strong>abnormal</strong>" in text
    assert text.index("87.5%") < text.index("12.5%") and "60.0%" in text and "40.0%" in text
    assert "z=17 (0.432)" in text
    # Segmentation: organ volumes in mL with one decimal, links to the mask files.
    assert ">1534.3<" in text and ">201.0<" in text
    # Timings per stage and their total.
    assert ">1.50<" in text and ">2.38<" in text

    page = _Links()
    page.feed(text)
    assert page.scripts == 0
    assert set(page.fragments) <= set(page.ids)  # every table-of-contents link resolves
    assert {"case-0-ct_001", "case-1-mr-7-co", "failures"} <= set(page.fragments)
    assert len(page.ids) == len(set(page.ids))
    assert "masks/ct_001%20seg.nii.gz" in page.hrefs and "masks/ct_001.dcm" in page.hrefs
    assert [(img["src"], img["loading"]) for img in page.images] == [("figures/ct_001.png", "lazy")]
    assert not any(h.startswith(("http:", "https:", "//")) for h in page.hrefs)


def test_write_report_without_failures_or_rows(tmp_path):
    text = write_report(tmp_path / "new", [], []).read_text(encoding="utf-8")
    assert "No failures." in text and "No results." in text


def test_report_writes_are_atomic(tmp_path):
    volume, labels = _phantom()
    case_figure(volume, SPACING, tmp_path / "figures" / "ct_001.png", label_map=labels)
    case_figure(volume, SPACING, tmp_path / "figures" / "ct_001.png", label_map=labels)  # replaced in place
    write_report(tmp_path, _rows(), [])
    write_report(tmp_path, _rows(), [])
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert files == ["figures", "figures/ct_001.png", "report.html"]  # no temporary files left
