"""docs/fidelity.md's measurements: the release's behaviour is the default, and each alternative
changes what the table says it changes (tiny model; python -m miro_scale.tools.fidelity)."""
from miro_scale.config import load_config
from miro_scale.tools.fidelity import measure
from tests.conftest import ROOT


def test_fidelity_measurements():
    r = measure(load_config(ROOT / "configs/tiny_cpu.json"))
    assert r["lamb_groups"]["values_changed_share"] > 0.9  # the plain parameters' first update differs
    assert r["first_step_lr"]["update_norm_release"] > 0
    assert r["nan_reward"]["relative_output_difference"] > 1e-3
    assert r["binning"]["unique_values_default"] == 1.0 and r["binning"]["population_quantiles"] < 0.5
    assert r["release_top_bin"]["share_of_samples_at_value_64_63"] > 0.01
