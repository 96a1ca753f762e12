"""benchmarks/shapes_scale.py builds each stage's config from configs/shapes with per-stage --set."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from shapes_scale import scale_bootstrap, stage_config  # noqa: E402

from flows.train.config import TrainConfig  # noqa: E402

SETS = ["stage2:data.mix={und: 25, gen: 70, text: 5}", "stage1:steps=7", "bootstrap:bootstrap.siglip_steps=5"]


def test_a_stage_set_changes_only_its_own_stage():
    stage2 = stage_config("stage2", SETS, corpus="C")
    assert stage2["data"]["mix"] == {"und": 25, "gen": 70, "text": 5}
    assert stage2["rows"] == 4 and "procs" not in stage2  # the demo's 2 processes x 2 rows, in one process
    assert stage2["steps"] == stage_config("stage2")["steps"] and stage2["corpus"] == "C"
    assert TrainConfig.from_dict(stage2).data["mix"] == {"und": 25, "gen": 70, "text": 5}

    assert stage_config("stage1", SETS)["steps"] == 7
    assert stage_config("bootstrap", SETS)["bootstrap"]["siglip_steps"] == 5
    assert stage_config("stage3", SETS)["data"]["mix"] == stage_config("stage3")["data"]["mix"]


def test_a_set_without_a_known_stage_is_refused():
    with pytest.raises(ValueError, match="STAGE one of bootstrap, stage1, stage2, stage3"):
        stage_config("stage2", ["stage9:steps=1"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        stage_config("stage2", ["stage2:steps"])


def test_the_benchmark_stops_on_a_bad_set_before_any_work(tmp_path):
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_scale.py"), "--set", "steps=3",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("--set 'steps=3': expected STAGE:KEY=VALUE")
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("scale", [0.02, 3.0])
def test_the_scaled_bootstrap_keeps_the_vae_crop_share_and_validates(scale, tmp_path):
    boot = stage_config("bootstrap", corpus=str(tmp_path))
    vae, crop = boot["bootstrap"]["vae_steps"], boot["bootstrap"]["vae_crop_steps"]
    scale_bootstrap(boot["bootstrap"], scale)
    assert boot["bootstrap"]["vae_steps"] == round(vae * scale)
    assert boot["bootstrap"]["vae_crop_steps"] == round(crop * scale) <= boot["bootstrap"]["vae_steps"]
    TrainConfig.from_dict(boot).bootstrap.validate()  # 1000 unscaled crop steps failed here at 0.02
