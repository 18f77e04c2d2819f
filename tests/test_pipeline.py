"""Each public step of the pipeline on its own (tiny models, a short GRID clip): check_input, track_faces,
virtual_faces, render_video, and anonymize_video composing them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anonymizer.pipeline import anonymize_video, check_input, load_models, render_video, track_faces, virtual_faces
from anonymizer.settings import InferSettings
from keepr.errors import KeeprError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip(tmp_path_factory, media_dir):
    from tests.support.clips import first_frames

    return first_frames(media_dir / "videos" / "bbaf2n.mpg", tmp_path_factory.mktemp("clip") / "c.mp4", 6)


@pytest.fixture(scope="module")
def settings(tiny_models):
    import yaml

    d = yaml.safe_load(Path(tiny_models["config"]).read_text())
    models = {k: d[k] for k in ("generator", "encoder", "cosegmentation", "cosegmentation_config")}
    return InferSettings.from_dict({"models": models, "progress": False, "detect": {"upsample": 0, "every": 2},
                                    "coverage": {"identity": False}, "encode": {"preset": "veryfast"}})


@pytest.fixture(scope="module")
def models(settings):
    return load_models(settings.models)


def test_check_input(clip, settings, tmp_path):
    checked = check_input(clip, settings)
    assert checked.reader.width == 360 and checked.model_files["generator"]["sha256"]
    with pytest.raises(KeeprError, match="no such file"):
        check_input(tmp_path / "none.mp4", settings)
    bad = InferSettings.from_dict({**{"models": settings.models.__dict__}, "encode": {"preset": "bogus"}})
    with pytest.raises(KeeprError, match="encode.preset"):
        check_input(clip, bad)


def test_track_faces_progress_and_cancel(clip, settings, models):
    seen = []
    scan = track_faces(clip, settings, models.recognizer, progress=lambda stage, done, total: seen.append(done))
    assert scan.num_frames == 6 and len(scan.persons) == 1 and seen == [1, 2, 3, 4, 5, 6]
    p = scan.persons[0]
    assert p.first_index == 0 and p.last_index == 5 and p.descriptor is not None
    assert p.thumbnail().shape == (128, 128, 3)
    assert all(len(fs) == 1 for fs in scan.faces)  # the coverage detector on every frame
    from anonymizer.scan import Cancelled

    with pytest.raises(Cancelled):
        track_faces(clip, settings, models.recognizer, cancel=lambda: True)


def test_virtual_faces_per_person_seed_and_candidate(clip, settings, models):
    scan = track_faces(clip, settings, models.recognizer)
    a = virtual_faces(scan.persons, models, settings)
    b = virtual_faces(scan.persons, models, settings, seeds={0: 7}, candidates={0: 4})
    assert a[0].chosen != 4 or a[0].report["chosen_why"] != "chosen by --candidate"
    assert b[0].chosen == 4 and b[0].report["seed"] == 7 and b[0].report["chosen_why"] == "chosen by --candidate"
    assert a[0].grid.shape[2] == 3 and not np.array_equal(a[0].latent, b[0].latent)


def test_render_video_and_anonymize_video_agree(clip, settings, models, tmp_path):
    checked = check_input(clip, settings)
    scan = track_faces(checked.reader, settings, models.recognizer)
    vfs = virtual_faces(scan.persons, models, settings)
    rep = render_video(checked, tmp_path / "steps", scan, scan.persons, vfs, models, every_person=True)
    assert (tmp_path / "steps" / "anonymized.mp4").is_file() and rep["complete"]
    assert rep["coverage"]["anonymized"] == 6
    # A person whose virtual face could not be made gets the fallback in every frame, and the report says why.
    rep2 = render_video(check_input(clip, settings), tmp_path / "failed", scan, scan.persons, {0: "guard"}, models,
                        every_person=True)
    assert rep2["coverage"]["by_fallback"] == 6 and rep2["persons"]["without_virtual_face"] == [
        {"person": 0, "why": "guard"}]
    # anonymize_video composes the same steps: same video bytes.
    rep3 = anonymize_video(clip, tmp_path / "all", settings, models=models)
    assert rep3["output"]["sha256"] == rep["output"]["sha256"]
    on_disk = json.loads((tmp_path / "all" / "report.json").read_text())
    assert on_disk["coverage"] == rep3["coverage"]
